"""``invoke vm-list`` and ``invoke vm-login``: the tool's VMs and a way into a kept one,
the way Test Kitchen has ``list`` and ``login``."""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

from . import images, ssh
from .errors import VmtasksError
from .visible import visible_line


def rows(parts) -> List[List[str]]:
    """One row per VM with our prefix: name, run, owner, state, age, address."""
    prefix = parts.cfg.vm.name_prefix + "-"
    leases = parts.ledger.all()
    now = time.time()
    out = []
    for vm in parts.backend.list_vms():
        if not vm.name.startswith(prefix):
            continue
        lease = leases.get(vm.name)
        image = images.parse_prepared(parts.cfg.vm.name_prefix, vm.name)
        if image is not None:
            out.append([vm.name, "-", "-", "prepared image" + (" (running)" if vm.running else ""), "-", "-"])
            continue
        if lease is None:
            out.append([vm.name, "-", "-", "no lease" + (", running" if vm.running else ""), "-", "-"])
            continue
        if lease.owner_alive():
            state = "live"
        elif lease.keep:
            state = "kept"
        else:
            state = "orphan"
        out.append([vm.name, lease.run_id, "{}@{} pid {}".format(getattr(lease, "user", "") or "?", lease.host,
                                                                lease.pid),
                    state + ("" if vm.running else " (stopped)"), _age(now - lease.created), lease.ip or "-"])
    return out


def _age(seconds: float) -> str:
    if seconds < 3600:
        return "{:.0f}m".format(seconds / 60)
    if seconds < 48 * 3600:
        return "{:.1f}h".format(seconds / 3600)
    return "{:.1f}d".format(seconds / 86400)


def show(reporter, parts) -> int:
    table = rows(parts)
    if not table:
        print("no {}-* VMs".format(visible_line(parts.cfg.vm.name_prefix)))
        return 0
    header = ["VM", "RUN", "OWNER", "STATE", "AGE", "ADDRESS"]
    # Names come from `tart list`, leases and records: anything a VM, a run or a guest wrote.
    table = [[visible_line(cell) for cell in row] for row in table]
    widths = [max(len(r[i]) for r in table + [header]) for i in range(len(header))]
    for row in [header] + table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


@dataclass(frozen=True)
class Login:
    """``ssh`` into a VM: its argv, and what its environment needs on top of ours (a
    ProxyCommand's credentials, never in argv)."""

    argv: List[str]
    env: Dict[str, str]


def login(parts, target: str) -> Login:
    """The ssh command line into a kept (or live) VM, by VM name or run id. The VM's
    backend says how to reach it (``Machine.login_target``)."""
    leases = parts.ledger.all()
    matches = [lease for name, lease in leases.items() if target in (name, lease.run_id)]
    if not matches:
        raise VmtasksError("no VM or run {!r} in the ledger {}".format(target, parts.ledger.leases_dir),
                           "see `invoke vm-list` for the VMs you can log in to")
    if len(matches) > 1:
        raise VmtasksError("run {} has {} VMs: {}".format(target, len(matches), ", ".join(m.vm for m in matches)),
                           "name one VM: invoke vm-login " + shlex.quote(matches[0].vm))
    lease = matches[0]
    key_dir = Path(lease.key_dir)
    if not lease.ip or not (key_dir / "id_ed25519").is_file():
        raise VmtasksError("VM {} has no address or key on record (its run may still be booting, or "
                           "its key was removed)".format(lease.vm), "run with --keep=always to keep a VM to log in to")
    key = ssh.RunKey(key_dir, key_dir / "id_ed25519", "", key_dir / "known_hosts")
    machine = parts.backend.machine(lease.vm, parts.owner(lease.run_id), parts.cfg)
    where = machine.login_target(lease.ip)
    return Login(["ssh"] + ssh.ssh_options(key, proxy_command=where.proxy_command) +
                 [parts.cfg.vm.user + "@" + where.host], dict(where.env))
