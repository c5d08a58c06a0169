"""The lifecycle with a fake `tart` (an injected runner) or a fake machine: which commands,
in which order, and that teardown runs on every failure path without a real VM."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import FakeRunner, fail

from vmtasks.backends.tart.cli import Tart
from vmtasks.guest import config
from vmtasks.guest.errors import CommandTimeout
from vmtasks.lifecycle.run import Run, RunRequest
from vmtasks.lifecycle.vm import VmPipeline
from vmtasks.settings import factory
from vmtasks.ui.report import Reporter

VM = "vmtasks-r1"


class SpawningRunner(FakeRunner):
    """`tart run` is a real tiny process printing ``console`` and exiting with ``code``."""

    def __init__(self, responses, console: str, code: int) -> None:
        super().__init__(responses)
        self.console, self.code = console, code
        self.spawned = 0

    def spawn(self, argv, log):
        self.calls.append(list(argv))
        self.spawned += 1
        return subprocess.Popen(["sh", "-c", 'printf "%s\\n" "$1"; exit "$2"', "sh", self.console, str(self.code)],
                                stdout=log, stderr=subprocess.STDOUT)


def make_run(tmp_path, runner, quiet=True, **overrides) -> Run:
    (tmp_path / "project").mkdir(exist_ok=True)
    (tmp_path / "project" / "go.mod").write_text("module example.com/p\n")
    path = tmp_path / "vm.yaml"
    path.write_text("project_dir: project\n")
    values = dict({"timeouts.poll": 0.05, "prepared": False}, **overrides)
    cfg = config.load(path, environ={}, overrides=values, cwd=tmp_path)
    parts = factory.Parts(cfg, Reporter(quiet=quiet), environ={"VMTASKS_STATE_DIR": str(tmp_path / "state")},
                          driver=Tart(runner))
    parts.backend.preflight = lambda image: []  # no PATH checks in unit tests
    parts.ledger.ensure()
    return Run(parts, RunRequest(), run_id="r1")


def tart_calls(runner):
    return [c[1:] for c in runner.calls if c[0] == "tart" and c[1] != "list"]


def test_clone_failure_tears_down_and_leaves_nothing(tmp_path):
    runner = FakeRunner({"clone": fail(1, "no space left on device")})
    run = make_run(tmp_path, runner)
    assert run.execute() == 1
    # A failed `tart clone` made nothing: no stop, no delete of a VM that never existed.
    assert tart_calls(runner) == [["clone", "tahoe-base", VM]]
    assert run.ledger.all() == {} and run.ledger.key_dirs() == []
    stages = json.loads(run.record.path("stages.json").read_text())
    assert {"stage": "clone", "status": "failed"}.items() <= next(s for s in stages if s["stage"] == "clone").items()


def test_vm_limit_waits_for_a_slot_and_says_so_once(tmp_path, capsys):
    runner = SpawningRunner({"ip": fail(1, "no IP address found")},
                            "The number of VMs exceeds the system limit (other running VMs: a, b)", 1)
    run = make_run(tmp_path, runner, quiet=False, **{"timeouts.slot_wait": 2.5})
    assert run.execute() == 1
    err = capsys.readouterr().err
    assert runner.spawned >= 2, "did not retry `tart run` while waiting for a slot"
    assert err.count("waiting for a slot") == 1
    # The final error shows the limit line once, not once per retry.
    assert err.count("exceeds the system limit") == 1, err
    assert tart_calls(runner)[-2:] == [["stop", "--timeout", "30", VM], ["delete", VM]]
    assert run.ledger.all() == {} and run.ledger.key_dirs() == []


def test_guest_that_dies_during_boot_is_a_boot_failure(tmp_path, capsys):
    runner = SpawningRunner({"ip": fail(1, "no IP address found")}, "kernel panic", 1)
    run = make_run(tmp_path, runner, quiet=False)
    assert run.execute() == 1
    err = capsys.readouterr().err
    assert "stage 'boot' failed for VM " + VM in err
    assert "kernel panic" in err and "run record:" in err
    assert runner.spawned == 1


def test_hung_tart_stop_in_teardown_reports_what_is_left_with_commands_that_work(tmp_path, capsys):
    def hang(argv):
        raise CommandTimeout(argv, 60)

    runner = SpawningRunner({"ip": fail(1, "no IP address found"), "stop": hang}, "kernel panic", 1)
    run = make_run(tmp_path, runner, quiet=False)
    assert run.execute() == 1
    err = capsys.readouterr().err
    assert "teardown of {} failed".format(VM) in err
    assert "left behind: VM " + VM in err
    # Pasteable: names the config this run used, and removes the lease too.
    assert "invoke cleanup-orphans --config {}".format(tmp_path / "vm.yaml") in err
    assert str(run.ledger.lease_path(VM)) in err
    assert set(run.ledger.all()) == {VM}  # the sweep can still find it


class FakeMachine:
    """A machine whose methods record calls; the stage under test is made to fail."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getattr__(self, item):
        def method(*args, **kwargs):
            self.calls.append(item)
            return None
        return method

    def alive(self):
        return True

    def console_tail(self, lines=15):
        return ["console line"]

    def address(self):
        return "10.0.0.9"

    def plan(self, step, image="", into=""):
        return ["fake {}".format(step)]

    def boot_note(self):
        return ""


VM_STAGES = ["clone", "boot", "ip+ssh", "key", "setup", "sync", "suite"]


@pytest.mark.parametrize("failure", ["unexpected", "timeout"])
@pytest.mark.parametrize("stage", VM_STAGES)
def test_a_failure_in_each_stage_still_tears_down(tmp_path, monkeypatch, stage, failure):
    run = make_run(tmp_path, FakeRunner())
    calls = []
    run.backend.machine = lambda name, owner, cfg: FakeMachine(name, calls)
    methods = {"clone": None, "boot": "_boot", "ip+ssh": "_wait_ssh", "key": "_key", "setup": "_setup",
               "sync": "_sync", "suite": "_suite"}
    for name, attr in methods.items():
        if attr is not None and name != stage:
            monkeypatch.setattr(VmPipeline, attr, lambda self, ctx: None)

    def boom(self, ctx):
        if failure == "timeout":
            raise CommandTimeout(["tart", stage], 7, "partial output\n")
        raise RuntimeError("boom in " + stage)

    if stage == "clone":
        original = VmPipeline._clone

        def clone_then_boom(self, ctx):
            original(self, ctx)
            boom(self, ctx)
        monkeypatch.setattr(VmPipeline, "_clone", clone_then_boom)
    else:
        monkeypatch.setattr(VmPipeline, methods[stage], boom)
    assert run.execute() == 1
    assert "destroy" in calls, "teardown did not run"
    assert run.ledger.all() == {} and run.ledger.key_dirs() == []
    stages = json.loads(run.record.path("stages.json").read_text())
    assert [s["status"] for s in stages if s["stage"] == stage] == ["failed"]
    assert stages[-1]["stage"] == "teardown"
    if failure == "unexpected":
        log = run.record.path("errors.log").read_text()
        assert "RuntimeError: boom in " + stage in log and "Traceback" in log


@pytest.mark.parametrize("build", [[], ["true"]])
def test_dry_run_order_is_the_run_order(tmp_path, monkeypatch, build):
    run = make_run(tmp_path, FakeRunner(), build=build)
    planned = [line.split()[0] for line in run.plan() if line.startswith("  ") and not line.startswith("   ")
               and line.split()[0] not in ("config:", "project:", "backend:", "then,", "finally:")]
    planned += [line.split()[0] for line in run.plan() if line.startswith("    ") and not line.startswith("     ")]
    calls = []
    run.backend.machine = lambda name, owner, cfg: FakeMachine(name, calls)
    for attr in ("_boot", "_wait_ssh", "_key", "_setup", "_sync", "_suite"):
        monkeypatch.setattr(VmPipeline, attr, lambda self, ctx: None)
    monkeypatch.setattr(Run, "_build", lambda self, ctx: None)
    run.execute()
    ran = [s["stage"] for s in json.loads(run.record.path("stages.json").read_text())]
    assert planned == ran
    assert ("build" in ran) == bool(build)


def test_a_bug_while_starting_the_vms_still_ends_the_record(tmp_path, monkeypatch):
    """The whole run is under one guard: a bug outside any stage still writes result.json."""
    run = make_run(tmp_path, FakeRunner())

    def broken(self):
        raise RuntimeError("boom in _vms")

    monkeypatch.setattr(Run, "_vms", broken)
    assert run.execute() == 1
    result = json.loads(run.record.path("result.json").read_text())
    assert result["exit_code"] == 1
    assert "RuntimeError: boom in _vms" in run.record.path("errors.log").read_text()


def test_a_bug_in_the_merge_still_writes_result_json_and_tears_down(tmp_path, monkeypatch, capsys):
    from vmtasks.lifecycle.finish import RunEnd

    run = make_run(tmp_path, FakeRunner(), quiet=False)
    calls = []
    run.backend.machine = lambda name, owner, cfg: FakeMachine(name, calls)
    for attr in ("_boot", "_wait_ssh", "_key", "_setup", "_sync", "_suite"):
        monkeypatch.setattr(VmPipeline, attr, lambda self, ctx: None)

    def broken(self):
        raise KeyError("boom in the merge")

    monkeypatch.setattr(RunEnd, "finish", broken)
    assert run.execute() == 1
    assert "destroy" in calls
    result = json.loads(run.record.path("result.json").read_text())
    assert result["exit_code"] == 1 and result["vms"] == [VM]
    assert "KeyError: 'boom in the merge'" in run.record.path("errors.log").read_text()
    assert "this is a bug in vmtasks" in capsys.readouterr().err
