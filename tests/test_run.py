"""The lifecycle with a fake `tart` (an injected runner): which commands, in which order,
and that teardown runs on failure paths without a real VM."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import FakeRunner, fail, ok, tart_list_json
from vmtasks import config
from vmtasks.ledger import Ledger
from vmtasks.run import RunRequest, VmRun
from vmtasks.tart import Tart
from vmtasks.ui import Ui


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


def make_run(tmp_path, runner, **overrides) -> VmRun:
    cfg = config.load(None, environ={}, overrides=dict({"timeouts.poll": 0.05}, **overrides), cwd=tmp_path)
    ledger = Ledger(tmp_path / "state")
    ledger.ensure()
    return VmRun(cfg, RunRequest(), tart=Tart(runner), ledger=ledger, ui=Ui(quiet=True),
                 records_root=tmp_path / "runs", run_id="r1")


def tart_calls(runner):
    return [c[1:] for c in runner.calls if c[0] == "tart" and c[1] != "list"]


def test_clone_failure_tears_down_and_leaves_nothing(tmp_path):
    runner = FakeRunner({"clone": fail(1, "no space left on device"),
                         "stop": fail(2, 'VM "x" is not running'), "delete": fail(2, "does not exist")})
    run = make_run(tmp_path, runner)
    assert run.execute() == 1
    vm = "openboot-ephemeral-r1"
    assert tart_calls(runner) == [["clone", "tahoe-base", vm], ["stop", "--timeout", "30", vm], ["delete", vm]]
    assert run.ledger.all() == {} and run.ledger.key_dirs() == []
    stages = (tmp_path / "runs" / "r1" / "stages.json").read_text()
    assert '"clone"' in stages and '"failed"' in stages


def test_vm_limit_waits_for_a_slot_then_says_so(tmp_path):
    runner = SpawningRunner({"ip": fail(1, "no IP address found")},
                            "The number of VMs exceeds the system limit (other running VMs: a, b)", 1)
    run = make_run(tmp_path, runner, **{"timeouts.slot_wait": 1.5})
    assert run.execute() == 1
    assert runner.spawned >= 2, "did not retry `tart run` while waiting for a slot"
    assert [c[1:3] for c in runner.calls if c[1] == "set"] == [["set", "openboot-ephemeral-r1"]]
    assert tart_calls(runner)[-2:] == [["stop", "--timeout", "30", "openboot-ephemeral-r1"],
                                       ["delete", "openboot-ephemeral-r1"]]
    assert run.ledger.all() == {} and run.ledger.key_dirs() == []


def test_guest_that_dies_during_boot_is_a_boot_failure(tmp_path, capsys):
    runner = SpawningRunner({"ip": fail(1, "no IP address found")}, "kernel panic", 1)
    run = make_run(tmp_path, runner)
    ui = Ui()
    run.ui = ui
    assert run.execute() == 1
    err = capsys.readouterr().err
    assert "stage 'boot' failed for VM openboot-ephemeral-r1" in err
    assert "kernel panic" in err and "run record:" in err
    assert runner.spawned == 1


def test_hung_tart_stop_in_teardown_reports_what_is_left(tmp_path, capsys):
    from vmtasks.proc import CommandTimeout

    def hang(argv):
        raise CommandTimeout(argv, 60)

    runner = FakeRunner({"clone": fail(1, "boom"), "stop": hang})
    run = make_run(tmp_path, runner)
    run.ui = Ui()
    assert run.execute() == 1
    err = capsys.readouterr().err
    assert "teardown of openboot-ephemeral-r1 failed" in err
    assert "left behind: VM openboot-ephemeral-r1" in err and "invoke cleanup-orphans" in err
    assert set(run.ledger.all()) == {"openboot-ephemeral-r1"}  # the sweep can still find it
