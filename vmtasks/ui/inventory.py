"""``invoke vm-list`` and ``invoke vm-login``: the tool's VMs and a way into a kept one,
the way Test Kitchen has ``list`` and ``login``."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

from vmtasks.guest.errors import VmtasksError
from vmtasks.guest.inner import suite_argv
from vmtasks.guest.results import rerun_regex
from vmtasks.guest.visible import visible_line
from vmtasks.lifecycle import images
from vmtasks.lifecycle.backend import SuspendableMachine
from vmtasks.settings.factory import task_command
from vmtasks.transport import ssh


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
        elif lease.keep and lease.keep_until:
            left = lease.keep_until - now
            state = "kept, expires in {}".format(_age(left)) if left > 0 else \
                "kept, expired {} ago (cleanup-orphans removes it)".format(_age(-left))
        elif lease.keep:
            state = "kept"
        else:
            state = "orphan"
        out.append([vm.name, lease.run_id, "{}@{} pid {}".format(getattr(lease, "user", "") or "?", lease.host,
                                                                lease.pid),
                    state + ("" if vm.running else " ({})".format(vm.state or "stopped")), _age(now - lease.created),
                    lease.ip or "-"])
    return out


def _age(seconds: float) -> str:
    if seconds < 3600:
        return "{:.0f}m".format(seconds / 60)
    if seconds < 48 * 3600:
        return "{:.1f}h".format(seconds / 3600)
    return "{:.1f}d".format(seconds / 86400)


# A run's VM (<prefix>-<YYYYMMDD-HHMMSS-hhhh>[-N]) or a prepared image or build, of any prefix.
_OURS_RE = re.compile(r"^(?P<prefix>[A-Za-z0-9][A-Za-z0-9._-]*?)-(?:\d{8}-\d{6}-[0-9a-f]{4}(?:-\d+)?|"
                      r"(?:prepared|building)-[0-9a-f]{12}(?:-s\d+)?)$")


def other_prefixes(parts, listing=None) -> Dict[str, int]:
    """Other vmtasks prefixes (other configs) with VMs on this host, and how many each."""
    mine = parts.cfg.vm.name_prefix
    counts: Dict[str, int] = {}
    for vm in parts.backend.list_vms() if listing is None else listing:
        m = _OURS_RE.match(vm.name)
        if m and m.group("prefix") != mine:
            counts[m.group("prefix")] = counts.get(m.group("prefix"), 0) + 1
    return counts


def show(reporter, parts) -> int:
    table = rows(parts)
    others = other_prefixes(parts)
    if others:
        listed = ", ".join("{} ({} VM{})".format(visible_line(p), n, "" if n == 1 else "s")
                           for p, n in sorted(others.items()))
        reporter.info("other vmtasks prefixes have VMs on this host: {}; see them with their own config "
                      "(invoke vm-list --config THEIR.yaml) or VMTASKS_VM_PREFIX=PREFIX {}".format(
                          listed, task_command(parts.cfg, "vm-list")))
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
    """``ssh`` into a VM: its argv, what its environment needs on top of ours (a
    ProxyCommand's credentials, never in argv), and the lease it was found by."""

    argv: List[str]
    env: Dict[str, str]
    lease: Any = None


def login_banner(parts, how: Login) -> List[str]:
    """What vm-login says before the session: the run and VM, where the synced tree is, and
    the line that reruns the run's failed test in there with the guard set (the suite's
    destructive tests refuse without it)."""

    lease = how.lease
    cfg = parts.cfg
    try:
        result = json.loads((parts.records_root / lease.run_id / "result.json").read_text())
        failed = [n for n in result.get("failed_tests") or [] if isinstance(n, str) and n and "/" not in n]
    except (OSError, ValueError, AttributeError):
        failed = []
    regex = rerun_regex(failed) if failed else "TestName"
    argv = suite_argv(cfg, regex)
    prefix = shlex.split(cfg.guest.command_prefix) if cfg.guest.command_prefix else []
    command = "cd {} && VMTASKS_IN_VM=1 OPENBOOT_IN_VM=1 {}".format(
        shlex.quote(cfg.guest.dir), " ".join(shlex.quote(w) for w in prefix + argv))
    what = "rerun its failed test{} ({})".format("s" if len(failed) > 1 else "", ", ".join(failed)) if failed \
        else "run a test (no failed test on record for this run)"
    return ["vm-login: VM {} of run {}, {}@{}".format(lease.vm, lease.run_id, cfg.vm.user, lease.ip),
            "  synced tree: {}".format(cfg.guest.dir),
            "  {} inside, with the guard set:".format(what),
            "    " + command,
            "  when done: exit, then remove it: {} --include-kept".format(parts.cleanup_command)]


def login(parts, target: str, on_wait=None) -> Login:
    """The ssh command line into a kept (or live) VM, by VM name or run id. The VM's
    backend says how to reach it (``Machine.login_target``). A kept VM that was suspended (it
    held no slot) is resumed first, waiting for a slot if the host is at its limit (said
    through ``on_wait``); it then runs on until it is removed."""
    leases = parts.ledger.all()
    matches = [lease for name, lease in leases.items() if target in (name, lease.run_id)]
    if not matches:
        raise VmtasksError("no VM or run {!r} in the ledger {}".format(target, parts.ledger.leases_dir),
                           "see `{}` for the VMs you can log in to".format(task_command(parts.cfg, "vm-list")))
    if len(matches) > 1:
        raise VmtasksError("run {} has {} VMs: {}".format(target, len(matches), ", ".join(m.vm for m in matches)),
                           "name one VM: " + task_command(parts.cfg, "vm-login " + shlex.quote(matches[0].vm)))
    lease = matches[0]
    key_dir = Path(lease.key_dir)
    if not lease.ip or not (key_dir / "id_ed25519").is_file():
        raise VmtasksError("VM {} has no address or key on record (its run may still be booting, or "
                           "its key was removed)".format(lease.vm), "run with --keep=always to keep a VM to log in to")
    key = ssh.RunKey(key_dir, key_dir / "id_ed25519", "", key_dir / "known_hosts")
    machine = parts.backend.machine(lease.vm, parts.owner(lease.run_id), parts.cfg)
    if isinstance(machine, SuspendableMachine) and machine.suspended():
        say = on_wait or (lambda text: None)
        say("resuming kept VM {} (suspended to free its slot)".format(lease.vm))
        cfg = parts.cfg
        ip = machine.wake(key_dir / "console-login.log", time.monotonic() + cfg.timeouts.boot + cfg.timeouts.slot_wait,
                          threading.Event(), lambda text: say(text) if text else None)
        if ip and ip != lease.ip:
            lease = dataclasses.replace(lease, ip=ip)
            parts.ledger.write(lease)
    where = machine.login_target(lease.ip)
    return Login(["ssh"] + ssh.ssh_options(key, proxy_command=where.proxy_command) +
                 [parts.cfg.vm.user + "@" + where.host], dict(where.env), lease)
