"""One VM's pipeline on its own: built from ``VmServices`` (no ``Run``), with a fake machine,
a real ledger, run record and reporter."""

from __future__ import annotations

import json
import threading
import types

import pytest

from vmtasks.guest.errors import BackendError
from vmtasks.lifecycle.backend import SshTarget
from vmtasks.lifecycle.vm import VmPipeline, VmServices
from vmtasks.state.ledger import Ledger
from vmtasks.state.records import RunRecord
from vmtasks.ui.report import Reporter


class Machine:
    """A machine whose methods record calls; ``fail_in``: the method that raises."""

    name = "vm-1"

    def __init__(self, fail_in=""):
        self.calls, self.fail_in = [], fail_in

    def __getattr__(self, item):
        def method(*args, **kwargs):
            self.calls.append(item)
            if item == self.fail_in:
                raise BackendError("{} refused".format(item), "try again")
        return method

    def plan(self, step, image="", into=""):
        return ["fake {} {}".format(step, image).strip()]

    def alive(self):
        return True

    def boot_note(self):
        return ""

    def address(self):
        return ""

    def console_tail(self, lines=15):
        return []

    def ssh_target(self):
        return SshTarget("")


def services(tmp_path, **extra):
    cfg = types.SimpleNamespace(
        keep="never", vm=types.SimpleNamespace(base="base", user="admin", name_prefix="p"),
        guest=types.SimpleNamespace(tool_dir=".vmtasks/tool", dir="/Users/admin/p", env={}, python="python3",
                                    command_prefix=""),
        setup=[], prepare=[], sync=types.SimpleNamespace(compress=False), project_dir=str(tmp_path),
        timeouts=types.SimpleNamespace(clone=5, boot=5, key=5, setup=5, sync=5, suite=5, teardown=5, poll=0.05))
    ledger = Ledger(tmp_path / "state")
    ledger.ensure()
    record = RunRecord(tmp_path / "runs", "r1")
    record.create("{}")
    values = dict(cfg=cfg, backend=None, cancel=threading.Event(), ledger=ledger, record=record,
                  reporter=Reporter(quiet=True), runner=None, run_id="r1", tool_bundle=lambda: b"",
                  sync_excludes=[], cleanup_command="invoke cleanup-orphans")
    values.update(extra)
    return VmServices(**values)


def test_a_pipeline_runs_without_a_run_and_tears_down_after_a_failure(tmp_path):
    svc = services(tmp_path)
    machine = Machine(fail_in="start")
    pipeline = VmPipeline(svc, "p-r1", machine, image="base")
    pipeline.execute()
    assert machine.calls == ["prepare_key", "create", "start", "destroy"]
    assert "start refused" in pipeline.ctx.error.message and pipeline.ctx.error.stage == "boot"
    assert pipeline.teardown_done.is_set()
    # The lease and key dir it made are gone with the VM.
    assert svc.ledger.all() == {} and svc.ledger.key_dirs() == []
    stages = [(s["stage"], s["status"]) for s in json.loads(svc.record.path("stages.json").read_text())]
    assert stages == [("clone", "ok"), ("boot", "failed"), ("teardown", "ok")]


def test_the_plan_of_a_pipeline_comes_from_its_machine(tmp_path):
    pipeline = VmPipeline(services(tmp_path), "p-r1", Machine(), image="base", test="TestA")
    commands = [cmd for stage in pipeline.stages() + [pipeline.teardown_stage()] if stage.enabled(pipeline.ctx)
                for cmd in stage.commands(pipeline.ctx)]
    assert commands[:3] == ["fake create base", "fake start", "fake install_key"]
    assert commands[-1] == "fake destroy"
    assert any("test-vm-inner-run" in cmd and "TestA" in cmd for cmd in commands)


def test_a_shipped_binary_that_cannot_start_in_the_guest_says_why(tmp_path):
    """A test binary built on the host that the guest's loader refuses (cgo against a newer
    macOS, another architecture) names the cause and the fix, once per VM, beside its error."""
    from vmtasks.transport import ssh

    svc = services(tmp_path, queue=object())
    svc.cfg.timeouts.test = 5
    pipeline = VmPipeline(svc, "p-r1", Machine(), image="base")
    said = "dyld[4711]: Symbol not found: _SecKeyCopyExternalRepresentation\n" \
           "  Referenced from: /Users/admin/.vmtasks/bin/e2e.test (built for macOS 15.0 which is newer than " \
           "running OS)\n"

    def remote(command, timeout, on_output=None, stdin=None):
        on_output(said)
        return ssh.RemoteResult(command, 134, said)

    pipeline.remote = remote
    for _ in range(2):
        code = pipeline._stream_command(pipeline.ctx, "./e2e.test -test.run '^TestA$'", "test",
                                        expected=[("example.com/e2e", "TestA")], label="TestA")
        assert code == 134
    hints = [line for line in pipeline.ctx.evidence if "did not start in the guest" in line]
    assert len(hints) == 1 and "MACOSX_DEPLOYMENT_TARGET" in hints[0] and "built for macOS 15.0" in hints[0]
    # An ordinary failure of the same kind is not taken for one.
    plain = VmPipeline(svc, "p-r2", Machine(), image="base")
    plain.remote = lambda command, timeout, on_output=None, stdin=None: (
        on_output("panic: boom\n"), ssh.RemoteResult(command, 2, "panic: boom\n"))[1]
    plain._stream_command(plain.ctx, "./e2e.test", "test", expected=[("example.com/e2e", "TestA")], label="TestA")
    assert plain.ctx.evidence == []


class BarrierRunner:
    """A runner whose commands each wait until ``parties`` of them run at the same time; one
    command at a time never gets there (BrokenBarrierError after the timeout)."""

    def __init__(self, parties, fail=None):
        self.barrier = threading.Barrier(parties, timeout=5)
        self.fail, self.seen = fail, []

    def run(self, argv, **kwargs):
        self.seen.append(argv[0])
        self.barrier.wait()
        if argv[0] == self.fail:
            raise BackendError("{} broke".format(argv[0]), "look")
        return types.SimpleNamespace(ok=True, returncode=0, stdout="", stderr="", argv=argv)


def test_the_two_rsyncs_of_the_sync_stage_run_at_once(tmp_path):
    """The tree and the test binaries go side by side: a fresh VM per test pays the longer of
    the two, not the sum. Their results come back in order; an error is raised once both end."""
    runner = BarrierRunner(2)
    pipeline = VmPipeline(services(tmp_path, runner=runner), "p-r1", Machine(), image="base")
    done = pipeline._run_at_once([["tree"], ["bins"]], 5, None)
    assert [d.argv[0] for d in done] == ["tree", "bins"] and sorted(runner.seen) == ["bins", "tree"]

    broken = VmPipeline(services(tmp_path / "b", runner=BarrierRunner(2, fail="bins")), "p-r2", Machine(),
                        image="base")
    with pytest.raises(BackendError, match="bins broke"):
        broken._run_at_once([["tree"], ["bins"]], 5, None)
