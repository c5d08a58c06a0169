"""The fresh-VM scheduler: which VM may run when, for ``--retries`` and ``--isolate``.

A run has ``slots`` VM slots (``--vms``): a VM holds one from its boot (resume) to the end
of its teardown, so at most ``slots`` VMs run at once and the host's limit of running VMs
holds. A clone needs no slot: a VM may be cloned ahead and wait, held before its boot by
its :class:`SlotGate`, until the slot it is bound to frees.

What runs on the slots:

- **shared VMs** (the queue's VMs, or the one VM of a ``go test`` suite), each holding its
  slot from the start;
- **fresh VMs**, one job each: a test on a VM of its own (``--isolate``), or a retry of a
  failed test (``--retries``). A test that fails is put on the retry list at once (a shared
  VM reports it through :meth:`FreshScheduler.test_failed` while it goes on with the queue;
  otherwise when its VM has ended); retries go before first runs.

As soon as a slot frees (its VM torn down), the VM cloned ahead for it starts, or a job
gets a new VM there (or, when VMs do not depend on their slot, ``movable``, a VM cloned
ahead for a slot still busy moves there). While a fresh VM holds a slot, the next job's VM is cloned ahead for
that slot, once that VM is past its own clone (a shared VM's end is unknown, so nothing
waits on its slot). A retry that fails (or whose VM was lost) goes back on the list while
it has attempts left. Cancel: no new VM,
every gate raises ``Cancelled``, and :meth:`FreshScheduler.run` returns once every VM it
started has been torn down.

Plain Python: a pipeline is anything with ``name``, ``gate``, ``teardown_done`` (a
``threading.Event``); ``make``, ``start`` and ``failures`` are the run's (tests pass fakes).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Hashable, List, Optional, Set, Tuple

from vmtasks.guest.errors import Cancelled

STEP = 0.05  # seconds between two looks at the VMs


class SlotGate:
    """Holds a pipeline before its boot until the scheduler gives it its slot."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self._open = threading.Event()
        self.opened_at: Optional[float] = None  # time.monotonic() when the slot became its VM's
        self.passed_at: Optional[float] = None  # ...and when its VM, cloned, went on to boot

    def open(self) -> None:
        self.opened_at = time.monotonic()
        self._open.set()

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    def wait(self, cancel: threading.Event, on_wait: Optional[Callable[[str], None]] = None) -> float:
        """Block until the slot is ours (returns how long that took) or the run stops (Cancelled)."""
        started = time.monotonic()
        told = False
        while not self._open.wait(STEP):
            if cancel.is_set():
                raise Cancelled("the run is stopping")
            if not told and on_wait is not None:
                on_wait("cloned ahead: waiting for slot {} to free".format(self.slot))
                told = True
        if cancel.is_set():
            raise Cancelled("the run is stopping")
        if told and on_wait is not None:
            on_wait("")
        self.passed_at = time.monotonic()
        return self.passed_at - started


@dataclass(frozen=True)
class FreshJob:
    """One test on one fresh VM: ``attempt`` 0 is its first run (``--isolate``), 1.. a retry."""

    key: Any  # the test (a gotest.TestId in a run); hashable
    attempt: int = 0


@dataclass
class _Slot:
    number: int
    holder: Any = None  # the VM that holds it (from its gate opening to its teardown's end)
    shared: bool = False  # the holder is a shared VM
    next: Any = None  # a VM cloned ahead, bound to this slot, its gate still shut


@dataclass
class SlotEvent:
    """What happened when (``time.monotonic()``), for tests and the run record."""

    at: float
    what: str  # "start", "hold", "release", "retry"
    vm: str
    slot: int
    key: Any = None


@dataclass
class FreshScheduler:
    """See the module's docstring. ``make(job, slot, gate)`` builds a fresh VM's pipeline
    (bound to ``slot``); ``start(pipeline)`` runs it in its own thread; ``failures(pipeline)``
    (called once its teardown is done) lists the tests that failed on it, or the retried test
    when its attempt failed or was lost; ``retries``: how many times a failed test runs again."""

    slots: int
    make: Callable[[FreshJob, int, SlotGate], Any]
    start: Callable[[Any], None]
    failures: Callable[[Any], List[Any]]
    cancel: threading.Event
    retries: int = 0
    # True when a fresh VM does not depend on its slot (no suspended copy per slot): a VM cloned
    # ahead for a slot still busy takes another slot that frees first.
    movable: bool = False
    events: List[SlotEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._slots = [_Slot(n) for n in range(1, max(1, self.slots) + 1)]
        self._first: Deque[FreshJob] = deque()  # --isolate: tests not yet run
        self._retry: Deque[FreshJob] = deque()
        self._retried: Dict[Hashable, int] = {}  # test -> retries handed out so far
        self._reported: Set[Tuple[int, Hashable]] = set()  # (id(pipeline), test) already on the list
        self._inbox: List[Tuple[Any, Hashable]] = []  # test_failed() from the VMs' threads
        self._lock = threading.Lock()
        self._started: List[Any] = []
        self._jobs: Dict[int, FreshJob] = {}  # id(pipeline) -> its job (fresh VMs)
        self._ended: Set[int] = set()

    # -- what the run gives it -------------------------------------------------
    def add_shared(self, pipeline: Any, slot: int) -> None:
        """A shared VM that holds ``slot`` from now on (the caller starts it)."""
        entry = self._slots[slot - 1]
        assert entry.holder is None, "slot {} is taken".format(slot)
        entry.holder, entry.shared = pipeline, True
        self._started.append(pipeline)
        self._event("hold", pipeline, slot)

    def add_tests(self, keys: List[Hashable]) -> None:
        """--isolate: each of these tests runs on a fresh VM of its own, in this order."""
        self._first.extend(FreshJob(key) for key in keys)

    def test_failed(self, pipeline: Any, key: Hashable) -> None:
        """A shared VM says a test failed on it (from its own thread): it goes on the retry
        list at once, not when that VM ends."""
        with self._lock:
            self._inbox.append((pipeline, key))

    @property
    def started(self) -> List[Any]:
        """Every VM this scheduler started or was given, in order."""
        return list(self._started)

    def job_of(self, pipeline: Any) -> Optional[FreshJob]:
        return self._jobs.get(id(pipeline))

    def may_start_more(self) -> bool:
        """True while a new VM may still be started: a job is waiting, or (with retries) a VM
        has not ended yet whose failures would be retried. A signal then stops the run, even
        when every VM running now is in its teardown."""
        if self._first or self._retry:
            return True
        return self.retries > 0 and any(id(p) not in self._ended for p in self._started)

    # -- the loop ----------------------------------------------------------------
    def run(self, tick: Callable[[], bool] = lambda: True) -> bool:
        """Until every job is done and every VM torn down. ``tick()`` runs between two steps
        (the run watches its signals there); False stops waiting at once (teardown abandoned).
        Returns False when it stopped that way."""
        while True:
            if not self.step():
                return True
            if not tick():
                return False
            self._wait_a_moment()

    def step(self) -> bool:
        """One look at the VMs: release the slots of torn-down VMs (their failures go on the
        retry list), give free slots to the VMs cloned ahead for them or to new ones, clone
        ahead where a fresh VM holds a slot. False once there is nothing left to do or wait for."""
        self._take_inbox()
        for entry in self._slots:
            if entry.next is not None and entry.next.teardown_done.is_set():
                self._ended_pipeline(entry.next)  # never got its slot (its clone failed, or a stop)
                entry.next = None
            if entry.holder is not None and entry.holder.teardown_done.is_set():
                self._event("release", entry.holder, entry.number)
                self._ended_pipeline(entry.holder)
                entry.holder, entry.shared = None, False
        stopping = self.cancel.is_set()
        for entry in self._slots:
            if entry.holder is None and entry.next is None and self.movable and not stopping:
                donor = next((e for e in self._slots if e.next is not None and e.holder is not None), None)
                if donor is not None:
                    entry.next, donor.next = donor.next, None
                    entry.next.gate.slot = entry.number
            if entry.holder is None and entry.next is not None and not stopping:
                entry.holder, entry.next = entry.next, None
                entry.holder.gate.open()
                self._event("hold", entry.holder, entry.number)
            if entry.holder is None and not stopping:
                job = self._next_job()
                if job is not None:
                    entry.holder = self._launch(job, entry.number, hold=True)
        for entry in self._slots:
            # The next VM is cloned once the slot's VM is past its own clone (booting, testing):
            # two clones of one slot never compete, and the next one is ready when the slot frees.
            if entry.holder is not None and not entry.shared and entry.next is None and not stopping \
                    and entry.holder.gate.passed_at is not None:
                job = self._next_job()
                if job is not None:
                    entry.next = self._launch(job, entry.number, hold=False)
        busy = any(e.holder is not None or e.next is not None for e in self._slots)
        return busy or (not stopping and bool(self._first or self._retry))

    # -- inside ----------------------------------------------------------------
    def _wait_a_moment(self) -> None:
        self.cancel.wait(STEP)

    def _event(self, what: str, pipeline: Any, slot: int, key: Any = None) -> None:
        self.events.append(SlotEvent(time.monotonic(), what, getattr(pipeline, "name", "?"), slot, key))

    def _launch(self, job: FreshJob, slot: int, hold: bool) -> Any:
        gate = SlotGate(slot)
        if hold:
            gate.open()
        pipeline = self.make(job, slot, gate)
        self._jobs[id(pipeline)] = job
        self._started.append(pipeline)
        self._event("start", pipeline, slot, job.key)
        if hold:
            self._event("hold", pipeline, slot)
        self.start(pipeline)
        return pipeline

    def _next_job(self) -> Optional[FreshJob]:
        if self._retry:
            return self._retry.popleft()
        if self._first:
            return self._first.popleft()
        return None

    def _take_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for pipeline, key in inbox:
            self._failed(pipeline, key)

    def _ended_pipeline(self, pipeline: Any) -> None:
        if id(pipeline) in self._ended:
            return
        self._ended.add(id(pipeline))
        if self.cancel.is_set():
            return
        for key in self.failures(pipeline):
            self._failed(pipeline, key)

    def _failed(self, pipeline: Any, key: Hashable) -> None:
        if (id(pipeline), key) in self._reported or self.cancel.is_set():
            return
        self._reported.add((id(pipeline), key))
        made = self._retried.get(key, 0)
        if made >= self.retries:
            return
        self._retried[key] = made + 1
        self._retry.append(FreshJob(key, made + 1))
        self._event("retry", pipeline, 0, key)
