"""The orphan sweep: remove VMs, key dirs and leases whose owning run is gone.

Never a live run's. The rules, in the order they are checked for each VM with our prefix:

- a readable lease whose owner is alive (or on another host, or cannot be probed): live;
- a lease that cannot be read: reported (path and why), the VM is not touched;
- a lease whose owner is proved dead (gone, zombie, PID reused) and whose recorded child
  command (``tart clone``) still runs: wait for the child (bounded by ``child_wait``), then
  decide; a child still running after that is stopped and the VM left for the next sweep;
- a dead owner's VM: removed (``keep`` ones only with ``include_kept`` or past ``kept_max_age``);
- no lease at all: the VM may be another checkout's (another state dir on the same
  ``TART_HOME``), so it is listed, and removed only when it is stopped and either a sweep first
  saw it more than ``unleased_after`` ago or ``include_unleased`` is set. A running VM without a
  lease is never removed. (``tart list`` shows no creation time; ``Accessed`` changes on every
  start, so the age we know is "first seen by a sweep", recorded in the state dir.)

``plan`` decides and explains, ``apply`` acts; every line shown to the user that suggests a
command uses the caller's ``cleanup_command`` (e.g. ``invoke cleanup-orphans --config
/abs/vm.yaml``, already shell-quoted), so it works when pasted as is. Why wait for a dead
run's child and then stop it: a ``tart clone`` builds the VM in a temporary directory and
moves it into place at the end, so stopping it leaves no half VM; waiting first lets a clone
that is nearly done finish, and the lease is kept until the child is over, so its VM always
has a lease when it appears.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from vmtasks.guest.errors import StateError, VmtasksError

from .ledger import GONE, ZOMBIE, Child, Lease, Ledger, Scan, Unreadable, probe_process

DEFAULT_CLEANUP = "invoke cleanup-orphans"
UNLEASED_AFTER = 24 * 3600.0
CHILD_WAIT = 60.0  # a `tart clone` is an APFS copy-on-write clone: seconds, not minutes
CHILD_GRACE = 5.0  # after SIGTERM, before SIGKILL



@dataclass(frozen=True)
class Action:
    kind: str  # "vm", "lease", "key" or "child"
    name: str  # VM name; key dir name for "key"; the VM whose child it is for "child"
    reason: str
    stop: bool = True  # "vm": `tart stop` first (False for unleased VMs: only a stopped one goes)


@dataclass(frozen=True)
class UnleasedVm:
    """A VM with our prefix and no lease in this ledger, left alone (for now)."""

    name: str
    running: bool
    first_seen: float  # epoch seconds: when a sweep first saw it (or its creation, if known)
    age: float  # seconds since then
    since: str = "first seen"  # or "created", when the backend knows


@dataclass
class SweepPlan:
    actions: List[Action] = field(default_factory=list)
    live: List[str] = field(default_factory=list)
    kept: List[str] = field(default_factory=list)
    unleased: List[UnleasedVm] = field(default_factory=list)
    unreadable: List[Unreadable] = field(default_factory=list)
    busy: List[str] = field(default_factory=list)  # VMs left for the next sweep: a dead run's child still ran
    waited: List[str] = field(default_factory=list)  # one line per child the plan waited for
    problems: List[str] = field(default_factory=list)
    cleanup_command: str = DEFAULT_CLEANUP
    unleased_after: float = UNLEASED_AFTER
    stop_command: Callable[[str], str] = lambda name: ""  # the backend's, for the notes

    def notes(self) -> List[str]:
        """What is left alone and why, each with a command that removes it when pasted."""
        cmd = self.cleanup_command
        lines = ["live (not touched): {}".format(name) for name in self.live]
        lines += ["kept (not touched): {}; remove kept VMs with: {} --include-kept".format(name, cmd)
                  for name in self.kept]
        for vm in self.unleased:
            if vm.running:
                lines.append("no lease (not touched): {} is running, {} {} ago; it may be another "
                             "checkout's run (another state dir). If it is an orphan: {}{} "
                             "--include-unleased".format(vm.name, vm.since, _age(vm.age),
                                                         self.stop_command(vm.name) + "; " if self.stop_command(
                                                             vm.name) else "stop it, then: ", cmd))
            else:
                lines.append("no lease (not touched yet): {} is stopped, {} {} ago; a sweep removes it "
                             "{} after that, or now: {} --include-unleased".format(
                                 vm.name, vm.since, _age(vm.age), _age(self.unleased_after), cmd))
        for bad in self.unreadable:
            lines.append("unreadable lease (VM {} not touched): {}: {}; fix or delete that file, then: {}".format(
                bad.vm, bad.path, bad.reason, cmd))
        lines += ["left for the next sweep: {}; then: {}".format(text, cmd) for text in self.busy]
        lines += self.problems
        return lines

    def action_line(self, action: Action, dry_run: bool = False) -> str:
        if action.kind == "child":
            return "{} the child of {}: {}".format("would stop" if dry_run else "stopping", action.name, action.reason)
        return "{} {} {}: {}".format("would remove" if dry_run else "removing", action.kind, action.name, action.reason)

    def lines(self, dry_run: bool = False) -> List[str]:
        """Everything to show: the waits, the actions, then the notes."""
        return self.waited + [self.action_line(a, dry_run) for a in self.actions] + self.notes()


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return "{:.0f} s".format(seconds)
    if seconds < 7200:
        return "{:.0f} min".format(seconds / 60)
    return "{:.0f} h".format(seconds / 3600)


def _expired(lease: Lease, now: float) -> bool:
    """A kept VM whose keep_for has run out (recorded in its lease when it was kept)."""
    return bool(lease.keep_until) and now > lease.keep_until


def _kept_goes(lease: Lease, now: float, include_kept: bool, kept_max_age: Optional[float]) -> bool:
    """A dead run's kept VM is removed: asked to, past its keep_for, or older than --max-age."""
    return include_kept or _expired(lease, now) or (kept_max_age is not None and now - lease.created > kept_max_age)


def why_dead(lease: Lease) -> str:
    """Why ``lease``'s owner counts as dead, for the plan's reasons."""
    state, _ = probe_process(lease.pid)
    if state == GONE:
        return "owner process {} of run {} is gone".format(lease.pid, lease.run_id)
    if state == ZOMBIE:
        return "owner process {} of run {} has exited (zombie)".format(lease.pid, lease.run_id)
    return "owner PID {} of run {} is now another process".format(lease.pid, lease.run_id)


def plan(source, ledger: Ledger, prefix: str, include_kept: bool = False,
         kept_max_age: Optional[float] = None, now: Optional[float] = None,
         listed: Optional[Sequence] = None, *, include_unleased: bool = False,
         unleased_after: float = UNLEASED_AFTER, child_wait: float = CHILD_WAIT,
         cleanup_command: str = DEFAULT_CLEANUP,
         on_wait: Callable[[str], None] = lambda text: None) -> SweepPlan:
    """Decide what to remove, with a reason for each, and what to leave and why.

    ``source``: a ``backend.Backend`` or a backend's driver; its VMs have ``name``,
    ``running``, ``state`` (and optionally ``created``). ``listed``: a listing already read (pre-flight's); it must
    be older than the leases we read, see below. ``now``: wall clock, for tests.

    Order matters for safety against a run starting right now: a run writes its lease before
    its key dir and its VM, so we list key dirs and VMs *before* reading leases; whatever we
    saw then has its lease visible by the time we read them. After waiting for a child we list
    again (the child may have made its VM meanwhile), in the same order."""
    now = time.time() if now is None else now
    result = SweepPlan(cleanup_command=cleanup_command, unleased_after=unleased_after,
                       stop_command=source.stop_command)
    deadline = time.monotonic() + max(0.0, child_wait)
    announced: Dict[str, Child] = {}
    while True:
        key_dirs = ledger.key_dirs()
        everything = _list(source) if listed is None else list(listed)
        vms = [vm for vm in everything if vm.name.startswith(prefix + "-")]
        scan = ledger.scan()
        # Judged once per pass: an owner dying mid-plan must not look alive to one rule
        # (its child not waited for) and dead to the next (its lease removed).
        alive = {name: lease.owner_alive() for name, lease in scan.leases.items() if name.startswith(prefix + "-")}
        pending = _pending_children(ledger, scan, alive)
        if not pending or time.monotonic() >= deadline:
            break
        for name, child in pending.items():
            if name not in announced:
                announced[name] = child
                text = "waiting up to {:.0f} s for `{}` (pid {}) of dead run {} to end before deciding " \
                       "about {}".format(child_wait, child.command(), child.pid, scan.leases[name].run_id, name)
                result.waited.append(text)
                on_wait(text)
        _wait_for_any(pending, deadline)
        listed = None
    _decide(result, ledger, vms, scan, alive, key_dirs, pending, prefix, now,
            include_kept, kept_max_age, include_unleased, unleased_after, child_wait)
    _decide_other_prefixes(result, ledger, everything, scan, prefix, source.name,
                           include_kept, kept_max_age, now)
    return result


def _decide_other_prefixes(result: SweepPlan, ledger: Ledger, everything: Sequence, scan: Scan, prefix: str,
                           backend: str, include_kept: bool, kept_max_age: Optional[float], now: float) -> None:
    """Leases in this state dir under another config's prefix (two configs, one state dir).

    The ledger proves these as well as our own: a dead owner's VM that this backend lists
    is removed with its lease and key, whatever its prefix; a lease whose VM this backend
    does not list is released only when the lease says it was made on this backend (the VM
    is gone); otherwise (another backend, or an older lease that does not say) it is
    reported with the command of the config that made it. Live owners and kept VMs (unless
    asked) are left alone, as for our own prefix."""
    listed = {vm.name for vm in everything}
    for name, lease in sorted(scan.leases.items()):
        if name.startswith(prefix + "-"):
            continue
        if lease.owner_alive():
            continue  # another config's live run: not ours to judge, and nothing to say
        child = ledger.child(name)
        if child is not None and child.alive():
            result.busy.append("{}: its dead run's child `{}` was still running".format(name, child.command()))
            continue
        cmd = lease.cleanup or "invoke cleanup-orphans --config <the config that made it>"
        if lease.keep and not _kept_goes(lease, now, include_kept, kept_max_age):
            if name in listed:
                result.kept.append(name)
            continue
        if name in listed:
            result.actions.append(Action("vm", name, "another config's VM, " + why_dead(lease)))
        elif lease.backend == backend:
            result.actions.append(Action("lease", name, "another config's lease, VM gone and " + why_dead(lease)))
        else:
            where = "on {}".format(lease.backend) if lease.backend else "on a backend the lease does not name"
            result.problems.append("dead run's lease (not touched): {} of run {}, its VM is {}, not here; "
                                   "remove it with: {}".format(name, lease.run_id, where, cmd))


def _pending_children(ledger: Ledger, scan: Scan, alive: Dict[str, bool]) -> Dict[str, Child]:
    """Dead owners' VMs whose recorded child command still runs."""
    out: Dict[str, Child] = {}
    for name in scan.leases:
        if name in alive and not alive[name]:
            child = ledger.child(name)
            if child is not None and child.alive():
                out[name] = child
    return out


def _wait_for_any(pending: Dict[str, Child], deadline: float) -> None:
    delay = 0.05
    while time.monotonic() < deadline:
        if any(not child.alive() for child in pending.values()):
            return
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.5)


def _decide(result: SweepPlan, ledger: Ledger, vms: Sequence, scan: Scan, alive: Dict[str, bool],
            key_dirs: List[Path], pending: Dict[str, Child], prefix: str, now: float, include_kept: bool,
            kept_max_age: Optional[float], include_unleased: bool, unleased_after: float,
            child_wait: float) -> None:
    leases = scan.leases
    result.unreadable = [u for u in scan.unreadable if u.vm.startswith(prefix + "-")]
    unreadable_vms = {u.vm for u in scan.unreadable}
    vm_names = {vm.name for vm in vms}
    no_lease = []
    for name, child in sorted(pending.items()):
        result.actions.append(Action("child", name, "`{}` (pid {}) of dead run {} still runs after {:.0f} s: "
                                     "stop it".format(child.command(), child.pid, leases[name].run_id, child_wait)))
        result.busy.append("{}: its dead run's child `{}` was still running".format(name, child.command()))
    for vm in vms:
        lease = leases.get(vm.name)
        if lease is None:
            if vm.name not in unreadable_vms:
                no_lease.append(vm)
            continue
        if vm.name in pending:
            continue
        if alive[vm.name]:
            result.live.append(vm.name)
        elif lease.keep:
            age = now - lease.created
            if _expired(lease, now):
                result.actions.append(Action("vm", vm.name, "kept VM past its keep_for (expired {} ago), {}".format(
                    _age(now - lease.keep_until), why_dead(lease))))
            elif _kept_goes(lease, now, include_kept, kept_max_age):
                result.actions.append(Action("vm", vm.name, "kept VM, {} old, {}".format(_age(age), why_dead(lease))))
            else:
                result.kept.append(vm.name)
        else:
            result.actions.append(Action("vm", vm.name, why_dead(lease)))
    for name, lease in sorted(leases.items()):
        if name in vm_names or name in pending or name not in alive:
            continue
        if not alive[name]:
            result.actions.append(Action("lease", name, "VM gone and " + why_dead(lease)))
    _decide_unleased(result, ledger, no_lease, now, include_unleased, unleased_after)
    for key_dir in key_dirs:
        if not ledger.key_dir_in_use(str(key_dir), scan):
            result.actions.append(Action("key", key_dir.name, "no lease refers to it"))


def _decide_unleased(result: SweepPlan, ledger: Ledger, vms: Sequence, now: float,
                     include_unleased: bool, unleased_after: float) -> None:
    first_seen, problem = ledger.unleased_first_seen([vm.name for vm in vms], now)
    if problem:
        result.problems.append("cannot record when unleased VMs were first seen ({}): they count as "
                               "new".format(problem))
    for vm in vms:
        created = getattr(vm, "created", None)
        known = isinstance(created, (int, float)) and created > 0
        since = float(created) if isinstance(created, (int, float)) and known else first_seen[vm.name]
        label = "created" if known else "first seen"
        age = now - since
        stopped = not vm.running and getattr(vm, "state", "stopped") == "stopped"
        if stopped and (include_unleased or age >= unleased_after):
            why = "asked to (--include-unleased)" if include_unleased and age < unleased_after else \
                "{} {} ago".format(label, _age(age))
            result.actions.append(Action("vm", vm.name, "stopped, no lease, {}".format(why), stop=False))
        else:
            result.unleased.append(UnleasedVm(vm.name, bool(vm.running), since, age, label))


def apply(plan_: SweepPlan, source, ledger: Ledger, stop_timeout: float = 30,
          on_action: Callable[[Action], None] = lambda a: None) -> List[str]:
    """Carry out a plan with the same ``source`` (backend or driver) it was made from; one
    action failing (a hung or failing stop) does not stop the others. Returns one
    line per failure, each saying what to run next."""
    errors = []
    for action in plan_.actions:
        on_action(action)
        try:
            if action.kind == "child":
                _stop_child(ledger, action.name)
            elif action.kind == "vm":
                _remove_vm(action, source, ledger, stop_timeout)
            elif action.kind == "lease":
                ledger.release(action.name)
            elif action.kind == "key":
                key_dir = ledger.keys_dir / action.name
                if not ledger.key_dir_in_use(str(key_dir)):
                    ledger.remove_key_dir(key_dir)
        except VmtasksError as exc:
            errors.append("could not remove {} {}: {}; retry: {}".format(
                action.kind, action.name, getattr(exc, "message", exc), plan_.cleanup_command))
    return errors


def _list(source) -> list:
    """The VMs of a driver (``list``) or a ``backend.Backend`` (``list_vms``)."""
    return source.list_vms() if hasattr(source, "list_vms") else source.list()


def _remove_vm(action: Action, source, ledger: Ledger, stop_timeout: float) -> None:
    if not action.stop and ledger.has_lease(action.name):
        return  # a lease appeared since the plan: not an orphan after all
    if not hasattr(source, "delete"):  # a backend.Backend: one call stops and deletes
        if not action.stop and any(vm.name == action.name and (vm.running or vm.state != "stopped")
                                   for vm in _list(source)):
            raise StateError("{} is not stopped any more: left alone".format(action.name),
                             "it may be another checkout's run; stop it first if it is an orphan")
        source.remove(action.name, timeout=stop_timeout)
    else:
        if action.stop:
            source.stop(action.name, timeout=stop_timeout)
        # Unleased VMs are never stopped: `tart delete` refuses a running VM, so one that a
        # run started since the plan fails here instead of being killed.
        source.delete(action.name)
    if action.stop:
        ledger.release(action.name)


def _stop_child(ledger: Ledger, vm: str) -> None:
    """SIGTERM the recorded child of ``vm``'s dead run (if it is still that process), then
    SIGKILL after ``CHILD_GRACE``. The lease stays: the next sweep decides about the VM."""
    child = ledger.child(vm)
    if child is None:
        return
    for signum, grace in ((signal.SIGTERM, CHILD_GRACE), (signal.SIGKILL, CHILD_GRACE)):
        if not child.alive():
            break
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:
            break
        except OSError as exc:
            raise StateError("cannot stop pid {} ({}): {}".format(child.pid, child.command(), exc.strerror or exc),
                             "stop it by hand: kill {}".format(child.pid)) from None
        end = time.monotonic() + grace
        while child.alive() and time.monotonic() < end:
            time.sleep(0.05)
    if not child.alive():
        ledger.clear_child(vm)
