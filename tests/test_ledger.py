"""Leases, liveness and in-flight children: a dead owner is proved dead, everything else is alive."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from test_records import fill_disk, mounted_tmpfs

from vmtasks.guest.errors import StateError
from vmtasks.state.ledger import (
    GONE,
    RUNNING,
    ZOMBIE,
    Lease,
    Ledger,
    _probe_proc,
    _probe_ps,
    probe_process,
    process_alive,
    process_start_time,
)


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
        started = start if start is not None else (process_start_time(pid) or "gone")
        lease = Lease(**dict(lease.__dict__, pid=pid, pid_start=started))
    if created is not None:
        lease = Lease(**dict(lease.__dict__, created=created))
    ledger.write(lease)
    os.makedirs(lease.key_dir, exist_ok=True)
    return lease


def test_lease_round_trip_and_atomic_file(ledger):
    lease = lease_for(ledger, "p-1")
    assert ledger.read("p-1") == lease
    assert lease.owner_alive()
    assert not [p for p in ledger.leases_dir.iterdir() if p.name.endswith(".tmp")]
    assert oct(ledger.lease_path("p-1").stat().st_mode & 0o777) == "0o600"
    ledger.remove("p-1")
    assert ledger.read("p-1") is None


def test_reused_pid_is_not_alive(ledger):
    lease = lease_for(ledger, "p-2", pid=os.getpid(), start="linux:1")
    assert not lease.owner_alive()


def test_dead_pid_is_not_alive(ledger):
    assert not lease_for(ledger, "p-3", pid=dead_pid()).owner_alive()


def test_another_hosts_owner_and_an_unknown_start_time_count_as_alive():
    assert process_alive(dead_pid(), "linux:1", host=socket.gethostname() + "-elsewhere")
    assert process_alive(os.getpid(), "")  # the PID exists; without a start time we cannot prove reuse
    assert not process_alive(dead_pid(), "")


@pytest.fixture
def zombie():
    """A real zombie: a child that has exited and is not reaped (yet)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    start = process_start_time(child.pid)
    assert start  # alive and probed while it runs
    deadline = time.monotonic() + 10
    while _probe_proc(child.pid)[0] != ZOMBIE:
        assert time.monotonic() < deadline, "the child never became a zombie"
        time.sleep(0.02)
    yield child.pid, start
    child.wait()


def test_a_zombie_owner_is_dead(ledger, zombie):
    pid, start = zombie
    assert probe_process(pid) == (ZOMBIE, None)
    assert process_start_time(pid) is None
    assert not process_alive(pid, start)
    assert not lease_for(ledger, "p-z", pid=pid, start=start).owner_alive()


def test_a_zombie_is_dead_through_ps_too(zombie):
    """The macOS path (`ps -o stat=,lstart=`), run with the real `ps` here."""
    pid, _ = zombie
    assert _probe_ps(pid) == (ZOMBIE, None)
    state, token = _probe_ps(os.getpid())
    assert state == RUNNING and token.startswith("ps:") and len(token) > 10
    assert _probe_ps(dead_pid())[0] == GONE


def test_a_lease_with_unknown_fields_is_read(ledger):
    """Forward compatible: a newer version's extra field does not make a live VM look orphaned."""
    lease = lease_for(ledger, "p-new")
    data = json.loads(ledger.lease_path("p-new").read_text())
    data.update(region="eu", labels={"a": "b"})
    ledger.lease_path("p-new").write_text(json.dumps(data))
    assert ledger.read("p-new") == lease
    assert ledger.scan().unreadable == []


def test_unreadable_leases_are_reported_with_why(ledger):
    ledger.lease_path("p-junk").write_text("{not json")
    ledger.lease_path("p-short").write_text(json.dumps({"vm": "p-short", "pid": 1}))
    ledger.lease_path("p-typed").write_text(json.dumps(dict(
        ledger.new_lease("p-typed", "t", keep=False, base="b").__dict__, pid="12")))
    ledger.lease_path("p-moved").write_text(json.dumps(ledger.new_lease("p-other", "o", keep=False, base="b").__dict__))
    scan = ledger.scan()
    assert scan.leases == {}
    why = {u.vm: u.reason for u in scan.unreadable}
    assert set(why) == {"p-junk", "p-short", "p-typed", "p-moved"}
    assert "not a valid lease" in why["p-junk"]
    assert "missing field(s): run_id, pid_start, host, key_dir, keep, created" in why["p-short"]
    assert "pid is not an integer" in why["p-typed"]
    assert "names VM 'p-other'" in why["p-moved"]
    assert all(u.path == ledger.lease_path(u.vm) for u in scan.unreadable)


def test_unwritable_state_dir_is_a_state_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StateError, match="not writable") as err:
        Ledger(blocker / "state").ensure()
    assert "VMTASKS_STATE_DIR" in err.value.hint


@contextlib.contextmanager
def full_state_dir(tmp_path):
    """A ledger whose state dir is on a real small disk, made and then filled up."""
    with mounted_tmpfs(tmp_path / "disk", "64k") as disk:
        ledger = Ledger(disk / "state")
        ledger.ensure()
        fill_disk(disk)
        yield ledger


def test_full_disk_while_writing_the_lease_is_a_clear_error(tmp_path):
    with full_state_dir(tmp_path) as ledger:
        with pytest.raises(StateError) as err:
            ledger.write(ledger.new_lease("p-full", "full", keep=False, base="b"))
        assert "No space left" in err.value.message and "disk is full" in err.value.hint
        assert ledger.all() == {} and not list(ledger.leases_dir.iterdir())


def test_full_disk_in_pre_flight_leaves_no_probe_file(tmp_path):
    with full_state_dir(tmp_path) as ledger:
        with pytest.raises(StateError) as err:
            ledger.ensure()
        assert "disk is full" in err.value.hint
        assert [p.name for p in ledger.leases_dir.iterdir()] == []  # no .write-test-<pid> left behind


def test_full_disk_while_making_the_run_key_is_a_state_error(tmp_path):
    from vmtasks.transport import ssh

    with full_state_dir(tmp_path) as ledger:
        with pytest.raises(StateError) as err:
            ssh.generate_key(ledger.keys_dir / "vm-1", "vmtasks-test")
        assert "run's SSH key" in err.value.message and "disk is full" in err.value.hint


def test_a_lease_says_where_its_vm_lives_and_how_to_clean_it(tmp_path):
    ledger = Ledger(tmp_path / "state", backend="orchard", cleanup="invoke cleanup-orphans --config /x/vm.yaml")
    ledger.ensure()
    lease = ledger.new_lease("p-9", "run9", keep=False, base="b")
    ledger.write(lease)
    read = Ledger(tmp_path / "state").read("p-9")
    assert read.backend == "orchard" and read.cleanup.endswith("--config /x/vm.yaml")


def test_read_only_state_dir_is_a_state_error(tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "64k", read_only=True, prepare=lambda p: Ledger(p / "ok").ensure()) as disk:
        with pytest.raises(StateError, match="Read-only file system"):
            Ledger(disk / "state").ensure()
        with pytest.raises(StateError, match="Read-only file system"):
            Ledger(disk / "ok").ensure()
        ledger = Ledger(disk / "ok")
        with pytest.raises(StateError, match="Read-only file system"):
            ledger.write(ledger.new_lease("p-ro", "ro", keep=False, base="b"))


def test_note_child_records_pid_and_start_time(ledger):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        noted = ledger.note_child("p-c", child.pid, ["tart", "clone", "base", "p-c"])
        assert noted.pid_start == process_start_time(child.pid)
        read = ledger.child("p-c")
        assert read == noted and read.alive() and read.command() == "tart clone base p-c"
    finally:
        child.kill()
        child.wait()
    assert not ledger.child("p-c").alive()  # a dead child's record is harmless
    ledger.clear_child("p-c")
    assert ledger.child("p-c") is None
    ledger.clear_child("p-c")  # twice is fine


def test_one_run_many_vms_share_a_key_dir_until_the_last_release(ledger):
    a = lease_for(ledger, "p-run1-a")
    b = Lease(**dict(ledger.new_lease("p-run1-b", a.run_id, keep=False, base="b").__dict__))
    ledger.write(b)
    assert a.key_dir == b.key_dir and [lease.run_id for lease in ledger.all().values()] == [a.run_id] * 2
    ledger.release("p-run1-a")
    assert os.path.isdir(a.key_dir) and ledger.read("p-run1-a") is None
    ledger.release("p-run1-b")
    assert not os.path.exists(a.key_dir) and ledger.all() == {}


def test_remove_by_hand_command_removes_vm_key_and_lease_when_pasted(ledger, tmp_path):
    """The printed line (the machine's removal + the ledger's forget, as a kept VM's
    teardown prints it), run by a shell as is (a fake `tart` records what it is asked)."""
    from vmtasks.backends.tart.machine import remove_command

    lease = lease_for(ledger, "p-kept it", keep=True)
    ledger.note_child("p-kept it", os.getpid(), ["x"])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "tart.log"
    (bin_dir / "tart").write_text("#!/bin/sh\necho \"$@\" >> {}\n".format(log))
    (bin_dir / "tart").chmod(0o755)
    line = remove_command("p-kept it") + "; " + ledger.forget_command("p-kept it", lease.key_dir)
    subprocess.run(["sh", "-c", line], check=True, env=dict(os.environ, PATH=str(bin_dir) + ":/usr/bin:/bin"))
    assert log.read_text().splitlines() == ["stop p-kept it", "delete p-kept it"]
    assert not os.path.exists(lease.key_dir) and ledger.all() == {} and ledger.child("p-kept it") is None
