"""The orphan sweep: a live VM is never removed, a dead run's always is, and every
suggested command works when pasted."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import FakeRunner, fail, ok, tart_list_json
from test_ledger import dead_pid, lease_for

from vmtasks.backends.tart.cli import Tart
from vmtasks.guest.errors import CommandTimeout
from vmtasks.state import sweep
from vmtasks.state.ledger import Lease, Ledger, process_start_time
from vmtasks.transport.proc import Result, Runner

REPO = Path(__file__).resolve().parent.parent
CLEANUP = "invoke cleanup-orphans --config /abs/vm.yaml"


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path / "state")
    led.ensure()
    return led


def listing(*names_running):
    return FakeRunner({"list": ok(tart_list_json(*[{"Name": n, "Running": r, "State": "running" if r else "stopped"}
                                                   for n, r in names_running]))})


def kinds(plan):
    return sorted((a.kind, a.name) for a in plan.actions)


def touched(runner):
    return [c[1:] for c in runner.calls if c[1] in ("stop", "delete")]


def test_sweep_spares_live_kept_and_unleased_removes_dead(ledger):
    lease_for(ledger, "p-live")
    lease_for(ledger, "p-dead", pid=dead_pid())
    lease_for(ledger, "p-kept", pid=dead_pid(), keep=True)
    lease_for(ledger, "p-gone", pid=dead_pid())  # VM already deleted
    (ledger.keys_dir / "stray").mkdir()
    runner = listing(("tahoe-base", False), ("p-live", True), ("p-dead", True), ("p-kept", True),
                     ("p-nolease", False), ("other-vm", True))
    tart = Tart(runner)
    plan = sweep.plan(tart, ledger, "p", cleanup_command=CLEANUP)
    assert plan.live == ["p-live"] and plan.kept == ["p-kept"]
    assert [vm.name for vm in plan.unleased] == ["p-nolease"]
    assert kinds(plan) == [("key", "stray"), ("lease", "p-gone"), ("vm", "p-dead")]
    assert sweep.apply(plan, tart, ledger) == []
    assert touched(runner) == [["stop", "--timeout", "30", "p-dead"], ["delete", "p-dead"]]
    assert set(ledger.all()) == {"p-live", "p-kept"}
    assert sorted(p.name for p in ledger.key_dirs()) == sorted(
        [os.path.basename(ledger.read("p-live").key_dir), os.path.basename(ledger.read("p-kept").key_dir)])


def test_another_state_dirs_live_vm_is_never_removed(tmp_path):
    """Two checkouts, two state dirs, one TART_HOME: checkout B's sweep sees A's running VM
    without a lease in B's ledger, and leaves it (today: "no lease: its run is gone")."""
    mine, theirs = Ledger(tmp_path / "state-b"), Ledger(tmp_path / "state-a")
    mine.ensure()
    theirs.ensure()
    lease_for(theirs, "p-a1")
    runner = listing(("p-a1", True))
    plan = sweep.plan(Tart(runner), mine, "p", cleanup_command=CLEANUP)
    assert plan.actions == []
    assert [(vm.name, vm.running) for vm in plan.unleased] == [("p-a1", True)]
    # ...even when asked to remove unleased VMs, or a day later: it is running.
    later = time.time() + 2 * 86400
    assert sweep.plan(Tart(runner), mine, "p", include_unleased=True, now=later).actions == []
    sweep.apply(sweep.plan(Tart(runner), mine, "p", include_unleased=True, now=later), Tart(runner), mine)
    assert touched(runner) == []
    note = [line for line in plan.notes() if "p-a1" in line][0]
    assert "another checkout" in note and "tart stop p-a1; " + CLEANUP + " --include-unleased" in note


def test_a_lease_with_an_unexpected_field_still_protects_its_vm(ledger):
    lease_for(ledger, "p-new")
    data = json.loads(ledger.lease_path("p-new").read_text())
    data["machine"] = {"backend": "tart"}
    ledger.lease_path("p-new").write_text(json.dumps(data))
    plan = sweep.plan(Tart(listing(("p-new", True))), ledger, "p")
    assert plan.live == ["p-new"] and plan.actions == []


def test_an_unreadable_lease_is_reported_and_its_vm_and_key_left_alone(ledger):
    lease = lease_for(ledger, "p-run7")
    ledger.lease_path("p-run7").write_text('{"vm": "p-run7", "pid": ')  # torn or hand-edited
    runner = listing(("p-run7", True))
    plan = sweep.plan(Tart(runner), ledger, "p", include_unleased=True, cleanup_command=CLEANUP)
    assert plan.actions == [] and plan.unleased == []
    assert [(u.path, u.vm) for u in plan.unreadable] == [(ledger.lease_path("p-run7"), "p-run7")]
    note = [line for line in plan.notes() if "unreadable" in line][0]
    assert str(ledger.lease_path("p-run7")) in note and "not a valid lease" in note and note.endswith(CLEANUP)
    assert os.path.isdir(lease.key_dir)


def test_unleased_stopped_vm_goes_after_a_day_from_first_sighting_or_when_asked(ledger):
    runner = listing(("p-left", False))
    tart = Tart(runner)
    t0 = 1_800_000_000.0
    first = sweep.plan(tart, ledger, "p", now=t0, cleanup_command=CLEANUP)
    assert first.actions == [] and [(u.name, u.age) for u in first.unleased] == [("p-left", 0.0)]
    assert CLEANUP + " --include-unleased" in first.notes()[0] and "24 h" in first.notes()[0]
    assert json.loads(ledger.unleased_file.read_text()) == {"p-left": t0}
    later = sweep.plan(tart, ledger, "p", now=t0 + 23 * 3600)
    assert later.actions == [] and later.unleased[0].age == 23 * 3600  # measured from the first sighting
    day = sweep.plan(tart, ledger, "p", now=t0 + 25 * 3600)
    assert kinds(day) == [("vm", "p-left")] and "first seen 25 h ago" in day.actions[0].reason
    asked = sweep.plan(tart, ledger, "p", now=t0 + 60, include_unleased=True)
    assert kinds(asked) == [("vm", "p-left")]
    assert sweep.apply(asked, tart, ledger) == []
    assert touched(runner) == [["delete", "p-left"]]  # never `tart stop`: a running one would refuse
    # A VM no longer listed is forgotten.
    sweep.plan(Tart(listing()), ledger, "p")
    assert json.loads(ledger.unleased_file.read_text()) == {}


def test_an_unleased_vm_started_since_the_plan_is_not_killed(ledger):
    runner = FakeRunner({"list": ok(tart_list_json({"Name": "p-x", "Running": False, "State": "stopped"})),
                         "delete": fail(1, 'VM "p-x" is running')})
    plan = sweep.plan(Tart(runner), ledger, "p", include_unleased=True, cleanup_command=CLEANUP)
    errors = sweep.apply(plan, Tart(runner), ledger)
    assert len(errors) == 1 and "p-x" in errors[0] and errors[0].endswith("retry: " + CLEANUP)
    assert touched(runner) == [["delete", "p-x"]]


def test_apply_goes_on_after_a_hung_and_a_failing_stop(ledger):
    for name in ("p-hang", "p-fail", "p-ok"):
        lease_for(ledger, name, pid=dead_pid())

    def stop(argv):
        if argv[-1] == "p-hang":
            raise CommandTimeout(argv, 60)
        if argv[-1] == "p-fail":
            return Result(argv, 1, "", "tart: internal error")
        return Result(argv, 0, "", "")

    listed = tart_list_json(*[{"Name": n, "Running": True} for n in ("p-hang", "p-fail", "p-ok")])
    runner = FakeRunner({"list": ok(listed), "stop": stop})
    plan = sweep.plan(Tart(runner), ledger, "p", cleanup_command=CLEANUP)
    errors = sorted(sweep.apply(plan, Tart(runner), ledger))
    assert len(errors) == 2 and "p-fail" in errors[0] and "p-hang" in errors[1]
    assert "did not finish within 60s" in errors[1] and all(e.endswith(CLEANUP) for e in errors)
    assert ["delete", "p-ok"] in touched(runner)
    assert set(ledger.all()) == {"p-hang", "p-fail"}  # the next sweep finds them


def test_a_zombie_owners_vm_is_removed(ledger):
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    lease_for(ledger, "p-zed", pid=owner.pid, start=process_start_time(owner.pid))
    try:
        deadline = time.monotonic() + 10
        while True:  # exited, not reaped: a zombie
            with open("/proc/{}/stat".format(owner.pid)) as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            assert time.monotonic() < deadline
            time.sleep(0.02)
        plan = sweep.plan(Tart(listing(("p-zed", True))), ledger, "p")
        assert kinds(plan) == [("vm", "p-zed")] and "zombie" in plan.actions[0].reason
    finally:
        owner.wait()


def test_one_run_with_two_vms_is_removed_whole(ledger):
    a = lease_for(ledger, "p-r9-a", pid=dead_pid())
    ledger.write(Lease(**dict(a.__dict__, vm="p-r9-b")))
    runner = listing(("p-r9-a", True), ("p-r9-b", False))
    plan = sweep.plan(Tart(runner), ledger, "p")
    assert kinds(plan) == [("vm", "p-r9-a"), ("vm", "p-r9-b")]
    assert sweep.apply(plan, Tart(runner), ledger) == []
    assert ledger.all() == {} and ledger.key_dirs() == []


class FakeBackend:
    """A ``backend.Backend`` as the sweep uses it: ``list_vms`` and ``remove``."""

    name = "fake"

    def stop_command(self, name):
        return ""

    def __init__(self, vms):
        self.vms = {vm.name: vm for vm in vms}
        self.removed = []

    def list_vms(self):
        return list(self.vms.values())

    def remove(self, name, timeout):
        self.removed.append(name)
        del self.vms[name]


def test_a_backend_is_swept_through_list_vms_and_remove(ledger):
    from vmtasks.lifecycle.backend import ListedVm

    lease_for(ledger, "p-dead", pid=dead_pid())
    backend = FakeBackend([ListedVm("p-dead", True, "running"), ListedVm("p-old", False, "stopped"),
                           ListedVm("p-new", False, "stopped", created=time.time() - 3 * 86400)])
    plan = sweep.plan(backend, ledger, "p", include_unleased=True)
    assert kinds(plan) == [("vm", "p-dead"), ("vm", "p-new"), ("vm", "p-old")]
    assert "created 72 h ago" in [a.reason for a in plan.actions if a.name == "p-new"][0]  # its known creation
    backend.vms["p-old"] = ListedVm("p-old", True, "running")  # started since the plan
    errors = sweep.apply(plan, backend, ledger)
    assert backend.removed == ["p-dead", "p-new"] and len(errors) == 1 and "p-old is not stopped" in errors[0]
    assert ledger.all() == {}


CLONER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from vmtasks.state.ledger import Ledger
time.sleep({delay})
Path({marker!r}).write_text("cloned")
"""


def spawn_child(marker: Path, delay: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CLONER.format(repo=str(REPO), marker=str(marker), delay=delay)])


def test_a_dead_runs_clone_still_running_is_waited_for(ledger, tmp_path):
    """kill -9 during `tart clone`: the child finishes after the sweep started. The sweep
    waits for it, lists again, and removes the VM it made (today: lease removed at once,
    VM appears later with no lease)."""
    marker = tmp_path / "cloned"
    lease_for(ledger, "p-cl", pid=dead_pid())
    child = spawn_child(marker, 1.0)
    ledger.note_child("p-cl", child.pid, ["tart", "clone", "base", "p-cl"])
    runner = FakeRunner({"list": lambda argv: Result(argv, 0, tart_list_json(
        *([{"Name": "p-cl", "Running": False}] if marker.exists() else [])), "")})
    waits = []
    try:
        started = time.monotonic()
        plan = sweep.plan(Tart(runner), ledger, "p", child_wait=30, on_wait=waits.append)
        assert time.monotonic() - started < 20
    finally:
        child.wait()
    assert len(waits) == 1 and "waiting up to 30 s for `tart clone base p-cl`" in waits[0]
    assert plan.waited == waits
    assert kinds(plan) == [("vm", "p-cl")]
    assert sweep.apply(plan, Tart(runner), ledger) == []
    assert touched(runner) == [["stop", "--timeout", "30", "p-cl"], ["delete", "p-cl"]]
    assert ledger.all() == {} and ledger.key_dirs() == [] and ledger.child("p-cl") is None


def test_a_child_still_running_after_the_wait_is_stopped_and_its_lease_kept(ledger, tmp_path):
    lease_for(ledger, "p-slow", pid=dead_pid())
    child = spawn_child(tmp_path / "never", 60)
    ledger.note_child("p-slow", child.pid, ["tart", "clone", "base", "p-slow"])
    runner = listing()
    try:
        plan = sweep.plan(Tart(runner), ledger, "p", child_wait=0.3, cleanup_command=CLEANUP)
        assert kinds(plan) == [("child", "p-slow")]
        assert any("left for the next sweep: p-slow" in line and line.endswith(CLEANUP) for line in plan.notes())
        assert sweep.apply(plan, Tart(runner), ledger) == []
        assert child.wait(timeout=10) == -signal.SIGTERM
    finally:
        child.kill()
        child.wait()
    assert set(ledger.all()) == {"p-slow"}  # kept until the child is known to be over
    again = sweep.plan(Tart(runner), ledger, "p", child_wait=0.3)
    assert kinds(again) == [("lease", "p-slow")]


def test_a_live_owners_child_is_not_waited_for(ledger, tmp_path):
    lease_for(ledger, "p-mine")
    child = spawn_child(tmp_path / "x", 30)
    try:
        ledger.note_child("p-mine", child.pid, ["tart", "clone"])
        started = time.monotonic()
        plan = sweep.plan(Tart(listing(("p-mine", False))), ledger, "p", child_wait=30)
        assert time.monotonic() - started < 5 and plan.live == ["p-mine"] and plan.actions == []
    finally:
        child.kill()
        child.wait()


# -- with the Linux `tart` stand-in ---------------------------------------------------

SCRIPTS = REPO / "scripts"


@pytest.fixture
def standin():
    """``(env, Tart)`` for the stand-in with its own TART_HOME and a base VM ``sweep-base``;
    every VM in it is stopped and deleted afterwards."""
    if os.geteuid() != 0 or sys.platform != "linux":
        pytest.skip("the Linux `tart` stand-in needs root")
    home = Path("/tmp/ledger") / ("tart-home-" + uuid.uuid4().hex[:8])
    home.mkdir(parents=True)
    env = dict(os.environ, TART_HOME=str(home), PATH=str(SCRIPTS) + os.pathsep + os.environ["PATH"])
    tart = Tart(Runner(env=env))
    try:
        subprocess.run(["tart", "create", "sweep-base"], env=env, check=True, timeout=60, capture_output=True)
        yield env, tart
    finally:
        for vm in tart.list():
            tart.stop(vm.name, timeout=10)
            tart.delete(vm.name)
        shutil.rmtree(str(home), ignore_errors=True)


OWNER = """
import os, subprocess, sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from vmtasks.state.ledger import Ledger
ledger = Ledger(Path({state!r}))
ledger.ensure()
ledger.write(ledger.new_lease({vm!r}, "run1", keep=False, base="sweep-base"))
argv = ["sh", "-c", "sleep 1.5; exec tart clone sweep-base {vm}"]
child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
ledger.note_child({vm!r}, child.pid, argv)
print("cloning", flush=True)
time.sleep(60)
"""


def test_kill_9_during_a_real_clone_leaves_nothing_after_the_sweep(standin, tmp_path):
    env, tart = standin
    state = tmp_path / "state"
    vm = "p-" + uuid.uuid4().hex[:6]
    owner = subprocess.Popen([sys.executable, "-c", OWNER.format(repo=str(REPO), state=str(state), vm=vm)],
                             env=env, stdout=subprocess.PIPE, text=True)
    assert owner.stdout.readline().strip() == "cloning"
    owner.kill()  # kill -9: the clone child lives on
    owner.wait()
    ledger = Ledger(state)
    plan = sweep.plan(tart, ledger, "p", child_wait=30)
    assert kinds(plan) == [("vm", vm)], plan
    assert sweep.apply(plan, tart, ledger) == []
    time.sleep(2)  # had the clone been left running, its VM would appear now
    assert [v.name for v in tart.list() if v.name.startswith("p-")] == []
    assert ledger.all() == {} and ledger.key_dirs() == []


def test_a_running_vm_leased_in_another_state_dir_survives_a_sweep(standin, tmp_path):
    """Two checkouts on one TART_HOME, for real: checkout A's VM runs; B's sweep, even
    with --include-unleased and two days later, leaves it running."""
    env, tart = standin
    vm = "p-" + uuid.uuid4().hex[:6]
    theirs, mine = Ledger(tmp_path / "state-a"), Ledger(tmp_path / "state-b")
    theirs.ensure()
    mine.ensure()
    theirs.write(theirs.new_lease(vm, "a1", keep=False, base="sweep-base"))
    tart.clone("sweep-base", vm, timeout=120)
    with open(tmp_path / "console.log", "ab") as log:
        run = tart.start(vm, log)
    try:
        deadline = time.monotonic() + 60
        while not any(v.name == vm and v.running for v in tart.list()):
            assert time.monotonic() < deadline and run.poll() is None, (tmp_path / "console.log").read_text()
            time.sleep(0.2)
        plan = sweep.plan(tart, mine, "p", include_unleased=True, now=time.time() + 2 * 86400)
        assert plan.actions == [] and [u.name for u in plan.unleased] == [vm]
        assert sweep.apply(plan, tart, mine) == []
        assert any(v.name == vm and v.running for v in tart.list())
        assert sweep.plan(tart, theirs, "p").live == [vm]
    finally:
        tart.stop(vm, timeout=10)
        run.wait(timeout=60)


def test_dead_leases_under_another_prefix_are_removed_or_named(ledger):
    """Two configs, one state dir (round-1 F5): the sweep of config "p" judges "q"'s leases too."""
    lease_for(ledger, "q-dead", pid=dead_pid())  # its VM is listed here: removed
    gone = lease_for(ledger, "q-gone", pid=dead_pid())  # its VM is gone from this backend
    ledger.write(Lease(**dict(gone.__dict__, backend="tart")))
    lease_for(ledger, "q-orch", pid=dead_pid())  # made on Orchard: not here, so only named
    orch = ledger.read("q-orch")
    ledger.write(Lease(**dict(orch.__dict__, backend="orchard", cleanup="invoke cleanup-orphans --config /q/vm.yaml")))
    lease_for(ledger, "q-old", pid=dead_pid())  # an older lease that does not say where its VM was
    lease_for(ledger, "q-live")  # alive: untouched and not even mentioned
    lease_for(ledger, "q-kept", pid=dead_pid(), keep=True)
    runner = listing(("q-dead", True), ("q-live", True), ("q-kept", False), ("r-nolease", False))
    plan = sweep.plan(Tart(runner), ledger, "p", cleanup_command=CLEANUP)
    assert kinds(plan) == [("lease", "q-gone"), ("vm", "q-dead")]
    assert plan.kept == ["q-kept"] and plan.live == [] and plan.unleased == []
    text = "\n".join(plan.notes())
    assert "q-orch" in text and "on orchard" in text and "--config /q/vm.yaml" in text
    assert "q-old" in text and "q-live" not in text and "r-nolease" not in text
    assert sweep.apply(plan, Tart(runner), ledger) == []
    assert [c[-1] for c in touched(runner)] == ["q-dead", "q-dead"]
    assert sorted(ledger.all()) == ["q-kept", "q-live", "q-old", "q-orch"]
    assert not Path(gone.key_dir).exists()


def test_a_kept_vm_goes_once_its_keep_for_has_run_out(ledger):
    """keep_for bounds a kept VM's life: past it, the sweep removes it without --include-kept."""
    now = time.time()
    fresh = lease_for(ledger, "p-fresh", pid=dead_pid(), keep=True)
    ledger.write(Lease(**dict(fresh.__dict__, keep_until=now + 3600)))
    old = lease_for(ledger, "p-old", pid=dead_pid(), keep=True)
    ledger.write(Lease(**dict(old.__dict__, keep_until=now - 7200)))
    lease_for(ledger, "p-legacy", pid=dead_pid(), keep=True)  # an older lease without keep_until: kept as before
    runner = listing(("p-fresh", True), ("p-old", True), ("p-legacy", True))
    plan = sweep.plan(Tart(runner), ledger, "p", cleanup_command=CLEANUP, now=now)
    assert kinds(plan) == [("vm", "p-old")] and sorted(plan.kept) == ["p-fresh", "p-legacy"]
    assert "past its keep_for (expired 2 h ago)" in plan.actions[0].reason
