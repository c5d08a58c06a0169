"""What the controller says of its VMs and workers: each VM's owner (in its startup script's
env), whether that owner is alive, how a sweep judges a VM no lease names, and the workers'
free slots.
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from vmtasks.guest.results.stream import parse_time as parse_rfc3339
from vmtasks.lifecycle.backend import Owner
from vmtasks.state.ledger import Ledger, process_alive

TART_VMS = "org.cirruslabs.tart-vms"
OWNER_ENV = {"run_id": "VMTASKS_RUN_ID", "host": "VMTASKS_OWNER_HOST", "user": "VMTASKS_OWNER_USER",
             "pid": "VMTASKS_OWNER_PID", "pid_start": "VMTASKS_OWNER_PID_START"}
# The owner's state dir (leases): a sweep from another state dir on the same host reads the
# lease there to tell a kept VM (keep=True in its lease) from an orphan.
STATE_DIR_ENV = "VMTASKS_OWNER_STATE_DIR"


def parse_time(text: str) -> Optional[float]:
    """Epoch seconds from Go's RFC 3339 (nanoseconds allowed; the go test -json parser's);
    None for Go's zero time (a field the controller has not set)."""
    if not text or text.startswith("0001-01-01"):
        return None
    return parse_rfc3339(text)


def env_value(value) -> str:
    """A value Orchard's worker can put inside `export K="..."` untouched (it does not escape):
    other characters become ``_``. Owner values are stored this way, so compare through it."""
    return re.sub(r'[^A-Za-z0-9 ._:@+=/,-]', "_", str(value))


def owner_labels(vm: dict) -> Dict[str, str]:
    env = ((vm.get("startup_script") or {}).get("env") or {})
    labels = {key: env[var] for key, var in OWNER_ENV.items() if var in env}
    if env.get(STATE_DIR_ENV):
        labels["state_dir"] = env[STATE_DIR_ENV]
    return labels


def owner_of(labels: Dict[str, str]) -> Optional[Owner]:
    """The Owner recorded on a VM (``ListedVm.labels``), or None for someone else's VM."""
    try:
        return Owner(labels["run_id"], labels["host"], labels["user"], int(labels["pid"]), labels["pid_start"])
    except (KeyError, ValueError):
        return None


def owner_alive(labels: Dict[str, str], hostname: Optional[str] = None) -> Optional[bool]:
    """For the sweep and cleanup-orphans: None when the VM carries no vmtasks owner (not ours:
    never touch it); True when its owner may still run (another host, which we cannot judge,
    or that very process still lives); False when the owning process on this host is gone."""
    owner = owner_of(labels)
    if owner is None:
        return None
    return process_alive(owner.pid, owner.pid_start, owner.host or "?", this_host=hostname, stored=env_value)


def judge_unleased(name: str, labels: Dict[str, str], include_kept: bool = False) -> Tuple[str, str]:
    """The sweep's verdict on an Orchard VM that has no lease in the sweeping ledger (another
    state dir, another checkout, or a lost state dir), from the owner its resource records:
    ``("foreign", why)`` no vmtasks owner (never touched); ``("live", why)`` the owner may
    run; ``("kept", why)`` its dead owner's lease (in the state dir the VM records) says
    keep; ``("orphan", why)`` the owner is gone: remove it."""
    alive = owner_alive(labels)
    owner = owner_of(labels)
    if alive is None or owner is None:
        return "foreign", "{} carries no vmtasks owner record".format(name)
    if alive:
        where = "on this host" if owner.host == env_value(socket.gethostname()) else "on host " + owner.host
        return "live", "owner process {} of run {} {} may still run".format(owner.pid, owner.run_id, where)
    why = "owner process {} of run {} on this host is gone (the VM's owner record)".format(owner.pid, owner.run_id)
    state_dir = labels.get("state_dir")
    if state_dir and Path(state_dir).is_dir():
        ledger = Ledger(Path(state_dir))
        lease = ledger.read(name)
        if lease is None and ledger.has_lease(name):
            return "live", "its lease in {} cannot be read: left alone".format(state_dir)
        if lease is not None and lease.keep and not include_kept:
            return "kept", "kept on purpose (lease in {}); {}".format(state_dir, why)
    return "orphan", why


def online_workers(workers: List[dict], offline_after: float, now: Optional[float] = None) -> List[dict]:
    """Workers that reported within ``offline_after`` seconds and take new VMs. ``last_seen``
    is the controller's clock: the default 180 s (Orchard's own offline timeout) leaves room
    for a skewed client clock."""
    now = time.time() if now is None else now
    alive = []
    for worker in workers:
        seen = parse_time(str(worker.get("last_seen", "")))
        if seen is not None and now - seen <= offline_after and not worker.get("scheduling_paused"):
            alive.append(worker)
    return alive


def fleet_slots(workers: List[dict], vms: List[dict]) -> Tuple[int, int]:
    """(capacity, busy) in Tart VM slots over ``workers``: what the scheduler will count."""
    names = {w.get("name") for w in workers}
    capacity = sum(int((w.get("resources") or {}).get(TART_VMS, 0)) for w in workers)
    busy = sum(int((vm.get("resources") or {}).get(TART_VMS, 1)) for vm in vms
               if vm.get("worker") in names and vm.get("status") != "failed")
    return capacity, busy
