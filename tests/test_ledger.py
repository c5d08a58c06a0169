"""Leases and the orphan sweep: never a live run's VM, always a dead run's."""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import FakeRunner, fail, ok, tart_list_json
from vmtasks import sweep
from vmtasks.errors import PreflightError
from vmtasks.ledger import Lease, Ledger, process_start_time
from vmtasks.tart import Tart


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path / "state")
    led.ensure()
    return led


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def lease_for(ledger, vm, pid=None, keep=False, start=None, created=None):
    lease = ledger.new_lease(vm, vm.rsplit("-", 1)[-1], keep=keep, base="tahoe-base")
    if pid is not None:
        lease = Lease(**dict(lease.__dict__, pid=pid, pid_start=start if start is not None else (process_start_time(pid) or "gone")))
    if created is not None:
        lease = Lease(**dict(lease.__dict__, created=created))
    ledger.write(lease)
    os.makedirs(lease.key_dir, exist_ok=True)
    return lease


def test_lease_round_trip_and_atomic_file(ledger):
    lease = lease_for(ledger, "p-1")
    assert ledger.read("p-1") == lease
    assert lease.owner_alive()
    assert not list(ledger.leases_dir.glob("*.tmp"))
    ledger.remove("p-1")
    assert ledger.read("p-1") is None


def test_reused_pid_is_not_alive(ledger):
    lease = lease_for(ledger, "p-2", pid=os.getpid(), start="linux:1")
    assert not lease.owner_alive()


def test_dead_pid_is_not_alive(ledger):
    assert not lease_for(ledger, "p-3", pid=dead_pid()).owner_alive()


def test_unwritable_state_dir_is_a_preflight_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PreflightError, match="not writable"):
        Ledger(blocker / "state").ensure()


def listing(*names_running):
    return FakeRunner({"list": ok(tart_list_json(*[{"Name": n, "Running": r, "State": "running" if r else "stopped"}
                                                   for n, r in names_running]))})


def test_sweep_spares_live_and_kept_removes_dead_and_unleased(ledger):
    lease_for(ledger, "p-live")
    lease_for(ledger, "p-dead", pid=dead_pid())
    lease_for(ledger, "p-kept", pid=dead_pid(), keep=True)
    lease_for(ledger, "p-gone", pid=dead_pid())  # VM already deleted
    (ledger.keys_dir / "stray").mkdir()
    runner = listing(("tahoe-base", False), ("p-live", True), ("p-dead", True), ("p-kept", True),
                     ("p-nolease", False), ("other-vm", True))
    tart = Tart(runner)
    plan = sweep.plan(tart, ledger, "p")
    assert plan.live == ["p-live"]
    assert plan.kept == ["p-kept"]
    assert sorted((a.kind, a.name) for a in plan.actions) == [
        ("key", "stray"), ("lease", "p-gone"), ("vm", "p-dead"), ("vm", "p-nolease")]
    errors = sweep.apply(plan, tart, ledger)
    assert errors == []
    touched = [c[1:] for c in runner.calls if c[1] in ("stop", "delete")]
    assert touched == [["stop", "--timeout", "30", "p-dead"], ["delete", "p-dead"],
                       ["stop", "--timeout", "30", "p-nolease"], ["delete", "p-nolease"]]
    assert set(ledger.all()) == {"p-live", "p-kept"}
    assert sorted(p.name for p in ledger.key_dirs()) == sorted(
        [os.path.basename(ledger.read("p-live").key_dir), os.path.basename(ledger.read("p-kept").key_dir)])


def test_kept_removed_when_asked_or_old(ledger):
    lease_for(ledger, "p-kept", pid=dead_pid(), keep=True, created=time.time() - 7200)
    tart = Tart(listing(("p-kept", True)))
    assert sweep.plan(tart, ledger, "p").kept == ["p-kept"]
    assert [a.name for a in sweep.plan(tart, ledger, "p", include_kept=True).actions] == ["p-kept"]
    assert [a.name for a in sweep.plan(tart, ledger, "p", kept_max_age=3600).actions] == ["p-kept"]
    assert sweep.plan(tart, ledger, "p", kept_max_age=3 * 3600).actions == []


def test_sweep_reports_tart_failure(ledger):
    runner = FakeRunner({"list": ok(tart_list_json({"Name": "p-x", "Running": True})),
                         "delete": fail(1, 'VM "p-x" is running')})
    errors = sweep.apply(sweep.plan(Tart(runner), ledger, "p"), Tart(runner), ledger)
    assert errors and "p-x" in errors[0]


def test_full_disk_while_writing_the_lease_is_a_clear_error(ledger, monkeypatch):
    import errno

    real_replace = os.replace

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    lease = ledger.new_lease("p-full", "full", keep=False, base="b")
    with pytest.raises(PreflightError) as err:
        ledger.write(lease)
    monkeypatch.setattr(os, "replace", real_replace)
    assert "No space left" in err.value.message and "free disk space" in err.value.hint
    assert ledger.all() == {} and not list(ledger.leases_dir.iterdir())
