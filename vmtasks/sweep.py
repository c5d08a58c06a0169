"""The orphan sweep: remove VMs, key dirs and leases whose owning run is gone.

Never a live run's: a VM is removed only when its lease is missing, or its owner process is
dead or its PID was reused. Kept VMs (``--keep``) are listed, and removed only when asked
(``include_kept``) or past ``kept_max_age``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from .errors import TartError
from .ledger import Ledger
from .tart import Tart, VmInfo


@dataclass(frozen=True)
class Action:
    kind: str  # "vm", "lease" or "key"
    name: str
    reason: str


@dataclass
class SweepPlan:
    actions: List[Action] = field(default_factory=list)
    live: List[str] = field(default_factory=list)
    kept: List[str] = field(default_factory=list)


def plan(tart: Tart, ledger: Ledger, prefix: str, include_kept: bool = False,
         kept_max_age: Optional[float] = None, now: Optional[float] = None,
         listed: Optional[Sequence[VmInfo]] = None) -> SweepPlan:
    """Decide what to remove. Order matters for safety against a run starting right now: a
    run writes its lease before its key dir and its VM, so we list key dirs and VMs *before*
    reading leases; whatever we saw then has its lease visible by the time we read them.
    ``listed``: a `tart list` already read (it is older than the leases we read, as required)."""
    now = time.time() if now is None else now
    key_dirs = ledger.key_dirs()
    vms = [vm for vm in (tart.list() if listed is None else listed) if vm.name.startswith(prefix + "-")]
    leases = ledger.all()
    result = SweepPlan()
    vm_names = {vm.name for vm in vms}
    for vm in vms:
        lease = leases.get(vm.name)
        if lease is None:
            result.actions.append(Action("vm", vm.name, "no lease: its run is gone"))
            continue
        if lease.owner_alive():
            result.live.append(vm.name)
        elif lease.keep:
            age = now - lease.created
            if include_kept or (kept_max_age is not None and age > kept_max_age):
                result.actions.append(Action("vm", vm.name, "kept VM, {:.0f} min old".format(age / 60)))
            else:
                result.kept.append(vm.name)
        else:
            result.actions.append(Action("vm", vm.name, "owner process {} is gone".format(lease.pid)))
    for name, lease in leases.items():
        if name in vm_names or not name.startswith(prefix + "-"):
            continue
        if not lease.owner_alive():
            result.actions.append(Action("lease", name, "VM gone and owner {} dead".format(lease.pid)))
    leased_key_dirs = {Path(lease.key_dir).name for lease in leases.values()}
    for key_dir in key_dirs:
        if key_dir.name not in leased_key_dirs:
            result.actions.append(Action("key", key_dir.name, "no lease refers to it"))
    return result


def apply(plan_: SweepPlan, tart: Tart, ledger: Ledger, stop_timeout: float = 30,
          on_action: Callable[[Action], None] = lambda a: None) -> List[str]:
    """Carry out a plan; returns error messages for what could not be removed."""
    errors = []
    for action in plan_.actions:
        on_action(action)
        try:
            if action.kind == "vm":
                tart.stop(action.name, timeout=stop_timeout)
                tart.delete(action.name)
            if action.kind in ("vm", "lease"):
                lease = ledger.read(action.name)
                if lease is not None:
                    shutil.rmtree(lease.key_dir, ignore_errors=True)
                ledger.remove(action.name)
            if action.kind == "key":
                shutil.rmtree(ledger.keys_dir / action.name, ignore_errors=True)
        except TartError as exc:
            errors.append("{}: {}".format(action.name, exc.message))
    return errors
