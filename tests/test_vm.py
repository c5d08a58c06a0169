"""One VM's pipeline on its own: built from ``VmServices`` (no ``Run``), with a fake machine,
a real ledger, run record and reporter."""

from __future__ import annotations

import json
import threading
import types

from vmtasks.backend import SshTarget
from vmtasks.errors import BackendError
from vmtasks.ledger import Ledger
from vmtasks.records import RunRecord
from vmtasks.report import Reporter
from vmtasks.vm import VmPipeline, VmServices


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
