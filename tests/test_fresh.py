"""The fresh-VM scheduler (vmtasks/lifecycle/fresh.py) with fake pipelines: a fake VM clones, waits at
its slot gate, "runs" (holds its slot) until the test tells it to end, and records when it
did each. Checked: the slot limit is never exceeded, retries start as soon as a slot frees
(before the slowest shared VM ends), the next VM is cloned while the previous one runs, a
retry that fails again goes back on the list, and cancel stops everything."""

from __future__ import annotations

import threading
import time
from typing import Dict, List, Optional

import pytest

from vmtasks.guest.errors import Cancelled
from vmtasks.lifecycle.fresh import FreshJob, FreshScheduler, SlotGate

WAIT = 5.0  # seconds a test waits for something the scheduler should do at once


class FakeVm:
    """A pipeline: clone, wait for the slot (the gate), run until told to end, tear down."""

    def __init__(self, name: str, gate: Optional[SlotGate], cancel: threading.Event, log: "Log",
                 fails: bool = False) -> None:
        self.name = name
        self.gate = gate
        self.cancel = cancel
        self.log = log
        self.fails = fails
        self.cloned = threading.Event()
        self.running = threading.Event()
        self.finish = threading.Event()  # the test says: the VM's work is done
        self.teardown_done = threading.Event()
        self.cancelled_at_gate = False
        self.clone_fails = threading.Event()
        self.clone_may_end = threading.Event()
        self.clone_may_end.set()

    def execute(self) -> None:
        try:
            self.log.add(self.name, "clone")
            assert self.clone_may_end.wait(WAIT)
            self.cloned.set()
            if self.clone_fails.wait(0.3 if self.gate is not None else 0):
                return  # its clone failed: it tears down without ever waiting for its slot
            if self.gate is not None:
                self.gate.wait(self.cancel)
            self.log.add(self.name, "boot")
            self.log.running(self.name, +1)
            self.running.set()
            while not self.finish.wait(0.01):
                if self.cancel.is_set():
                    break
            self.log.running(self.name, -1)
        except Cancelled:
            self.cancelled_at_gate = True
        finally:
            self.log.add(self.name, "torn down")
            self.teardown_done.set()


class Log:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: List[tuple] = []
        self.now = 0
        self.peak = 0

    def add(self, vm: str, what: str) -> None:
        with self.lock:
            self.events.append((time.monotonic(), vm, what))

    def running(self, vm: str, delta: int) -> None:
        with self.lock:
            self.now += delta
            self.peak = max(self.peak, self.now)

    def first(self, vm: str, what: str) -> float:
        return next(t for t, v, w in self.events if v == vm and w == what)


class Harness:
    """A scheduler over fake VMs, run in a thread; ``fail`` names the tests that fail
    (a set of (test, attempt) pairs; attempt 0 is the first run)."""

    def __init__(self, slots: int, retries: int = 0, fail=(), movable: bool = False) -> None:
        self.cancel = threading.Event()
        self.log = Log()
        self.vms: Dict[str, FakeVm] = {}
        self.fail = set(fail)
        self.sched = FreshScheduler(slots=slots, make=self.make, start=self.start, failures=self.failures,
                                    cancel=self.cancel, retries=retries, movable=movable)
        self.thread: Optional[threading.Thread] = None
        self.shared_failures: Dict[str, List[str]] = {}
        self.slow_clones: set = set()  # VMs whose clone goes on until the test lets it end

    def make(self, job: FreshJob, slot: int, gate: SlotGate) -> FakeVm:
        name = "{}#{}".format(job.key, job.attempt)
        vm = FakeVm(name, gate, self.cancel, self.log, fails=(job.key, job.attempt) in self.fail)
        if name in self.slow_clones:
            vm.clone_may_end.clear()
        self.vms[name] = vm
        return vm

    def start(self, vm: FakeVm) -> None:
        threading.Thread(target=vm.execute, daemon=True).start()

    def failures(self, vm: FakeVm) -> List[str]:
        if vm.name in self.shared_failures:
            return self.shared_failures[vm.name]
        job = self.sched.job_of(vm)
        return [job.key] if job is not None and vm.fails else []

    def shared(self, name: str, slot: int, failures=()) -> FakeVm:
        vm = FakeVm(name, None, self.cancel, self.log)
        self.vms[name] = vm
        self.shared_failures[name] = list(failures)
        self.sched.add_shared(vm, slot)
        self.start(vm)
        return vm

    def run(self) -> None:
        self.thread = threading.Thread(target=self.sched.run, daemon=True)
        self.thread.start()

    def vm(self, name: str) -> FakeVm:
        deadline = time.monotonic() + WAIT
        while name not in self.vms:
            assert time.monotonic() < deadline, "no VM {} (have {})".format(name, sorted(self.vms))
            time.sleep(0.01)
        return self.vms[name]

    def done(self) -> None:
        assert self.thread is not None
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the scheduler did not end"


def wait(event: threading.Event, what: str) -> None:
    assert event.wait(WAIT), what


def test_isolate_never_holds_more_slots_than_it_has_and_clones_ahead():
    h = Harness(slots=2)
    h.sched.add_tests(["A", "B", "C", "D", "E"])
    h.run()
    a, b = h.vm("A#0"), h.vm("B#0")
    wait(a.running, "A boots at once")
    wait(b.running, "B boots at once")
    # While A and B run their tests, the next VMs are cloned ahead, one per slot, and wait.
    c, d = h.vm("C#0"), h.vm("D#0")
    wait(c.cloned, "C cloned ahead")
    wait(d.cloned, "D cloned ahead")
    time.sleep(0.2)
    assert not c.running.is_set() and not d.running.is_set(), "no third VM runs while two do"
    assert "E#0" not in h.vms, "one VM cloned ahead per slot, no more"
    b.finish.set()
    wait(d.running, "D starts once B is torn down")  # D was bound to B's slot
    assert h.log.first("D#0", "boot") >= h.log.first("B#0", "torn down")
    assert h.log.first("D#0", "clone") < h.log.first("B#0", "torn down"), "D's clone overlapped B's test"
    for name in ("A#0", "C#0", "D#0"):
        h.vm(name).finish.set()
    h.vm("E#0").finish.set()
    h.done()
    assert h.log.peak == 2
    assert sorted(h.vms) == ["A#0", "B#0", "C#0", "D#0", "E#0"]


def test_a_shared_vm_failure_is_retried_as_soon_as_a_slot_frees():
    """--vms 2 --retries 1: a test fails on vm1 (told at once); vm1 ends its share and is torn
    down; the retry's fresh VM starts on that slot while vm2 is still running."""
    h = Harness(slots=2, retries=1)
    vm1, vm2 = h.shared("vm1", 1), h.shared("vm2", 2)
    h.run()
    wait(vm1.running, "vm1 runs")
    h.sched.test_failed(vm1, "T")
    time.sleep(0.2)
    assert "T#1" not in h.vms, "no slot is free yet: the retry waits (no clone onto a shared VM's slot)"
    vm1.finish.set()
    retry = h.vm("T#1")
    wait(retry.running, "the retry runs on vm1's slot")
    assert not vm2.teardown_done.is_set(), "the slowest shared VM is still running"
    retry.finish.set()
    vm2.finish.set()
    h.done()
    assert h.log.first("T#1", "boot") < h.log.first("vm2", "torn down")
    assert h.log.peak == 2
    assert [e.what for e in h.sched.events if e.vm == "T#1"] == ["start", "hold", "release"]


def test_a_failure_reported_at_once_and_again_at_the_end_is_retried_once():
    h = Harness(slots=1, retries=2)
    vm1 = h.shared("vm1", 1, failures=["T"])
    h.run()
    h.sched.test_failed(vm1, "T")
    vm1.finish.set()
    h.vm("T#1").finish.set()
    h.done()
    assert sorted(h.vms) == ["T#1", "vm1"]


def test_one_vm_retries_after_the_suite_one_fresh_vm_per_attempt_until_attempts_run_out():
    h = Harness(slots=1, retries=2, fail={("T", 1), ("T", 2)})
    vm1 = h.shared("vm1", 1, failures=["T", "U"])
    h.run()
    vm1.finish.set()
    t1 = h.vm("T#1")
    wait(t1.running, "T's first retry runs after the suite's VM is torn down")
    assert h.log.first("T#1", "boot") >= h.log.first("vm1", "torn down")
    u1 = h.vm("U#1")  # cloned ahead for the slot
    wait(u1.cloned, "the next retry is cloned ahead")
    t1.finish.set()  # fails again: back on the list
    wait(u1.running, "U's retry takes the slot")
    t2 = h.vm("T#2")
    u1.finish.set()
    t2.finish.set()  # fails again: no attempts left
    h.done()
    assert sorted(h.vms) == ["T#1", "T#2", "U#1", "vm1"]
    assert h.log.peak == 1


def test_a_passing_retry_is_not_retried_again():
    h = Harness(slots=2, retries=3)
    vm1 = h.shared("vm1", 1, failures=["T"])
    h.run()
    vm1.finish.set()
    h.vm("T#1").finish.set()  # passes
    h.done()
    assert sorted(h.vms) == ["T#1", "vm1"]


def test_retries_go_before_tests_not_yet_run():
    h = Harness(slots=1, retries=1, fail={("A", 0)})
    h.sched.add_tests(["A", "B"])
    h.run()
    a = h.vm("A#0")
    wait(a.running, "A runs")
    b = h.vm("B#0")  # cloned ahead before A failed
    a.finish.set()
    wait(b.running, "B runs")
    retry = h.vm("A#1")  # A's retry is next, before any further test
    b.finish.set()
    wait(retry.running, "A's retry runs")
    retry.finish.set()
    h.done()


def test_cancel_stops_everything_including_a_vm_cloned_ahead():
    h = Harness(slots=1, retries=1)
    h.sched.add_tests(["A", "B", "C"])
    h.run()
    a = h.vm("A#0")
    wait(a.running, "A runs")
    b = h.vm("B#0")
    wait(b.cloned, "B cloned ahead")
    h.cancel.set()
    h.done()
    assert b.cancelled_at_gate and b.teardown_done.is_set(), "the VM cloned ahead is torn down, never booted"
    assert not b.running.is_set()
    assert a.teardown_done.is_set()
    assert "C#0" not in h.vms, "no VM is made after cancel"
    assert h.log.peak == 1


def test_no_retry_is_made_after_cancel():
    h = Harness(slots=2, retries=2)
    vm1 = h.shared("vm1", 1, failures=["T"])
    h.run()
    h.cancel.set()
    vm1.finish.set()
    h.done()
    assert sorted(h.vms) == ["vm1"]


def test_a_vm_that_never_got_its_slot_frees_its_place_for_the_next():
    """A VM cloned ahead whose clone failed ends before its slot frees: the slot's next job
    gets a VM of its own."""
    h = Harness(slots=1)
    h.sched.add_tests(["A", "B", "C"])
    h.run()
    a = h.vm("A#0")
    b = h.vm("B#0")
    b.clone_fails.set()
    wait(b.teardown_done, "B's clone failed")
    c = h.vm("C#0")
    wait(c.cloned, "C cloned ahead in B's place")
    a.finish.set()
    wait(c.running, "C runs")
    c.finish.set()
    h.done()


def test_may_start_more_while_a_vm_may_still_fail():
    h = Harness(slots=1, retries=1)
    vm1 = h.shared("vm1", 1)
    assert h.sched.may_start_more()
    vm1.finish.set()
    vm1.teardown_done.wait(WAIT)
    h.sched.step()
    assert not h.sched.may_start_more()
    h.sched.add_tests(["A"])
    assert h.sched.may_start_more()


def test_gate_raises_cancelled_and_says_it_waits():
    cancel = threading.Event()
    gate = SlotGate(2)
    said: List[str] = []
    threading.Timer(0.2, cancel.set).start()
    with pytest.raises(Cancelled):
        gate.wait(cancel, said.append)
    assert said == ["cloned ahead: waiting for slot 2 to free"]
    gate = SlotGate(1)
    threading.Timer(0.1, gate.open).start()
    assert gate.wait(threading.Event()) >= 0.05 and gate.opened_at is not None


def test_the_next_vm_is_cloned_only_once_the_slots_vm_is_past_its_own_clone():
    h = Harness(slots=1)
    h.slow_clones.add("A#0")
    h.sched.add_tests(["A", "B"])
    h.run()
    a = h.vm("A#0")
    time.sleep(0.3)
    assert "B#0" not in h.vms, "two clones for one slot at once"
    a.clone_may_end.set()
    b = h.vm("B#0")
    wait(b.cloned, "B cloned ahead while A runs")
    assert not b.running.is_set()
    a.finish.set()
    wait(b.running, "B runs once A is torn down")
    b.finish.set()
    h.done()


@pytest.mark.parametrize("movable", [True, False])
def test_a_vm_cloned_ahead_takes_the_slot_that_frees_first_unless_it_is_tied_to_its_slot(movable):
    """A holds slot 1 and C is cloned ahead for it; B (slot 2) ends first. Without a suspended
    copy per slot (movable) C starts on slot 2 at once; tied to slot 1's copy (its MAC), C
    waits for A."""
    h = Harness(slots=2, movable=movable)
    h.slow_clones.add("B#0")  # A is past its clone first, so C is bound to A's slot
    h.sched.add_tests(["A", "B", "C"])
    h.run()
    a, b = h.vm("A#0"), h.vm("B#0")
    c = h.vm("C#0")
    wait(c.cloned, "C cloned ahead")
    b.clone_may_end.set()
    wait(b.running, "B runs")
    b.finish.set()
    wait(b.teardown_done, "B torn down")
    if movable:
        wait(c.running, "C takes B's slot")
        assert not a.teardown_done.is_set()
    else:
        time.sleep(0.3)
        assert not c.running.is_set(), "C runs only on its own slot"
    a.finish.set()
    wait(c.running, "C runs")
    c.finish.set()
    h.done()
    assert h.log.peak == 2
