"""`invoke vm-doctor`: can this machine run test-vm? One line per check with a fix hint."""

from __future__ import annotations

import os
import platform
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

from . import hostchecks, orphans, prepare, sweep
from .errors import VmtasksError
from .machine_tart import MACOS_VM_LIMIT, TartBackend, exec_hint
from .proc import which
from .tart import INSTALL_HINT, Tart


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "ok", "warn" or "fail"
    detail: str
    hint: str = ""


def _tart_home() -> Path:
    return Path(os.environ.get("TART_HOME") or Path.home() / ".tart")


def checks(load_config: Callable, tart: Optional[Tart] = None) -> List[Check]:
    from .factory import Parts

    out: List[Check] = []
    add = out.append
    try:
        cfg = load_config()
        add(Check("config", "ok", cfg.source))
    except VmtasksError as exc:
        add(Check("config", "fail", exc.message, exc.hint))
        return out
    out += project_checks(cfg)
    parts = Parts(cfg, None, tart=tart)
    if not isinstance(parts.backend, TartBackend):
        return out + backend_checks(parts)
    for tool in ("ssh", "rsync"):
        path = which(tool)
        add(Check(tool, "ok", path) if path else Check(tool, "fail", "not on PATH", "install " + tool))
    tart = parts.tart
    if which("tart") is None:
        add(Check("tart", "fail", "not on PATH", INSTALL_HINT))
        return out
    version = tart.version()
    standin = "stand-in" in version.lower() or "standin" in version.lower()
    add(Check("tart", "ok", "{} ({})".format(which("tart"), version or "version unknown")))
    mac = platform.system() == "Darwin" and platform.machine() == "arm64"
    if mac:
        add(Check("host", "ok", "Apple Silicon Mac"))
    elif standin or platform.system() == "Linux":
        # Tart itself only runs on macOS: a `tart` on Linux is a stand-in.
        add(Check("host", "ok", "{} {}: a stand-in `tart` is in use".format(platform.system(), platform.machine())))
    else:
        add(Check("host", "fail", "{} {} is not an Apple Silicon Mac".format(platform.system(), platform.machine()),
                  "run on an Apple Silicon Mac, or put scripts/ first on PATH for the stand-in"))
    out += host_checks(version, mac)
    try:
        vms = tart.list()
    except VmtasksError as exc:
        add(Check("tart list", "fail", exc.message, exc.hint))
        return out
    out.append(agent_user_check(tart, vms, cfg))
    base = next((vm for vm in vms if vm.name == cfg.vm.base), None)
    if base is None:
        add(Check("base image", "fail", "'{}' is not in `tart list`".format(cfg.vm.base),
                  parts.backend.base_image_hint(cfg.vm.base)))
    else:
        add(Check("base image", "ok", cfg.vm.base))
        info = tart.get(cfg.vm.base) or {}
        try:
            size_gb = float(info.get("Size", base.size_gb) or 0)
        except (TypeError, ValueError):
            size_gb = base.size_gb
        home = _tart_home()
        probe = home if home.exists() else Path.home()
        free_gb = shutil.disk_usage(str(probe)).free / 1e9
        status = "ok" if free_gb >= max(size_gb, 1) else "warn"
        add(Check("disk", status, "{:.1f} GB free in {}; the base image uses {:.1f} GB".format(free_gb, probe, size_gb),
                  "" if status == "ok" else "free space: clones grow as the suite writes (tart #989)"))
    running = [vm.name for vm in vms if vm.running]
    if len(running) >= MACOS_VM_LIMIT:
        add(Check("VM slots", "warn", "{} VMs running ({}); macOS allows {}".format(
            len(running), ", ".join(running), MACOS_VM_LIMIT), "test-vm will wait for a slot; stop one to go now"))
    else:
        add(Check("VM slots", "ok", "{} of {} running".format(len(running), MACOS_VM_LIMIT)))
    ledger = parts.ledger
    listed = parts.backend.list_vms()
    plan = sweep.plan(parts.backend, ledger, cfg.vm.name_prefix, listed=orphans.owned_listing(parts, listed),
                      child_wait=0, cleanup_command=parts.cleanup_command)
    if plan.actions:
        add(Check("leftovers", "warn", ", ".join("{} {}".format(a.kind, a.name) for a in plan.actions),
                  parts.cleanup_command))
    else:
        add(Check("leftovers", "ok", "none ({} live, {} kept)".format(len(plan.live), len(plan.kept))))
    if base is not None:
        out += [Check(*row) for row in prepare.doctor_checks(parts, listed)]
    try:
        ledger.ensure()
        add(Check("state dir", "ok", str(ledger.state_dir)))
    except VmtasksError as exc:
        add(Check("state dir", "fail", exc.message, exc.hint))
    return out


def project_checks(cfg, run_go: Optional[Callable] = None) -> List[Check]:
    """What a run of this config needs on the host besides the VMs: the project and its
    go.mod (as pre-flight checks them), go where the run calls it (the queue compiles on the
    host; one VM lists the tests there, best effort), the suite's packages as go sees them,
    and the programs the `build` commands start."""
    import shlex
    import subprocess

    from . import config as config_mod
    from . import gotest

    out = []
    try:
        config_mod.check_host_paths(cfg)
        out.append(Check("project", "ok", "{} (project_dir, from {})".format(cfg.project_dir,
                                                                          cfg.origin("project_dir"))))
    except VmtasksError as exc:
        out.append(Check("project", "fail", exc.message, exc.hint))
        return out
    go = which("go")
    if go is None:
        needed = cfg.vms > 1 or any(_program(c) == "go" for c in cfg.build)
        out.append(Check("go", "fail" if needed else "warn", "not on PATH on the host",
                         "install Go on the host: {}".format(
                             "--vms {} compiles the test binaries here".format(cfg.vms) if cfg.vms > 1 else
                             "the build commands call it" if needed else
                             "a one-VM run lists the suite's tests here first (without it every reported "
                             "test counts, and a regex that matches nothing boots a VM to find out)")))
    else:
        out.append(Check("go", "ok", go))
        try:
            suite = gotest.parse_suite(cfg.suite.all, None)
        except VmtasksError:
            suite = None
        if suite is not None:
            argv = ["go", "list"] + [f for f in suite.build_flags if f.startswith("-tags=")] + list(suite.packages)
            try:
                done = (run_go or subprocess.run)(argv, cwd=cfg.project_dir, capture_output=True, text=True,
                                                  timeout=120, stdin=subprocess.DEVNULL)
                ok, text = done.returncode == 0, (done.stderr or done.stdout).strip()
            except (OSError, subprocess.SubprocessError) as exc:
                ok, text = False, str(exc)
            shown = " ".join(shlex.quote(w) for w in argv)
            if ok:
                count = len([line for line in text.splitlines() if line.strip()]) if text else 0
                out.append(Check("suite", "ok", "`{}` in project_dir: {} package{}".format(
                    shown, count, "" if count == 1 else "s")))
            else:
                last = text.splitlines()[-1] if text else "no output"
                out.append(Check("suite", "fail", "`{}` in project_dir failed: {}".format(shown, last[:300]),
                                 "fix suite.all's packages or tags (and suite.one), or project_dir"))
    for command in cfg.build:
        program = _program(command)
        if program and "/" not in program and which(program) is None and program not in _SHELL_WORDS:
            out.append(Check("build", "fail", "`{}` is not on PATH (build: {})".format(program, command[:120]),
                             "install it, or fix the build commands in the config"))
    return out


_SHELL_WORDS = frozenset(["cd", "export", "set", "test", "[", "echo", "true", "false", "if", "for", "exec", "env"])


def _program(command: str) -> str:
    """The program a shell command line starts (after VAR=value assignments), or ""."""
    import shlex

    try:
        words = shlex.split(command)
    except ValueError:
        return ""
    words = [w for w in words if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", w)]
    return words[0] if words else ""


def host_checks(version: str, mac: bool) -> List[Check]:
    """Tart's own version, and on a Mac the host conditions Tart needs (vmtasks/hostchecks.py)."""
    out = [Check(*hostchecks.tart_version_check(version))]
    if not mac:
        out.append(Check("Mac-only", "ok", "skipped on {}: macOS version, DHCP lease time and lease file, "
                         "Local Network privacy, login keychain (they matter on a Mac host only)".format(
                             platform.system())))
        return out
    return out + [Check(*hostchecks.macos_check()), Check(*hostchecks.lease_check())]


def agent_user_check(tart: Tart, vms, cfg) -> Check:
    """The guest agent answers and runs as vm.user (the key goes into the agent user's home),
    asked of a running VM of ours if there is one; doctor boots none."""
    running = [vm.name for vm in vms if vm.running and vm.name.startswith(cfg.vm.name_prefix)]
    if not running:
        return Check("guest agent", "ok", "not checked: no running VM of ours to ask; test-vm checks it "
                     "(`tart exec NAME whoami`) at its key stage")
    try:
        result = tart.exec(running[0], ["whoami"], timeout=30)
    except VmtasksError as exc:
        return Check("guest agent", "warn", "`tart exec {} whoami`: {}".format(running[0], exc.message), exc.hint)
    if not result.ok:
        return Check("guest agent", "warn", "`tart exec {} whoami` exited {}: {}".format(
            running[0], result.returncode, (result.stderr or result.stdout).strip()[-200:]), exec_hint(result))
    user = result.stdout.strip()
    if user != cfg.vm.user:
        return Check("guest agent", "fail", "the agent in {} runs as '{}' but vm.user is '{}'".format(
            running[0], user, cfg.vm.user), "set vm.user: " + user)
    return Check("guest agent", "ok", "answers in {} as {}".format(running[0], user))


def backend_checks(parts) -> List[Check]:
    """A fleet backend checks itself (reachable, credentials, workers, free slots); then,
    as for tart, what dead runs left (the sweep's plan, nothing removed)."""
    try:
        out = [Check(name, status, detail, hint) for name, status, detail, hint in parts.backend.doctor()]
    except VmtasksError as exc:
        return [Check(parts.backend.name, "fail", exc.message, exc.hint)]
    if any(check.status == "fail" for check in out) or parts.backend.name != "orchard":
        return out
    # Orchard (issue 14): the controller's VMs judged as cleanup-orphans would, by lease or
    # by the owner record on the VM (vmtasks/orphans.py), without waiting for children.
    from . import orphans

    try:
        listing = orphans.owned_listing(parts)
        plan = sweep.plan(parts.backend, parts.ledger, parts.cfg.vm.name_prefix, listed=listing, child_wait=0)
        orphans.judge_orchard_owners(plan, parts, listing, include_kept=False)
    except VmtasksError as exc:
        return out + [Check("leftovers", "warn", exc.message, exc.hint)]
    if plan.actions:
        out.append(Check("leftovers", "warn", ", ".join("{} {}".format(a.kind, a.name) for a in plan.actions),
                         parts.cleanup_command))
    else:
        out.append(Check("leftovers", "ok", "none ({} live, {} kept)".format(len(plan.live), len(plan.kept))))
    return out


def run(reporter, load_config: Callable, tart: Optional[Tart] = None) -> int:
    results = checks(load_config, tart)
    for check in results:
        reporter.info("{:<5} {:<11} {}".format(check.status, check.name, check.detail))
        if check.hint and check.status != "ok":
            reporter.info("      fix: " + check.hint)
    failed = [c for c in results if c.status == "fail"]
    reporter.info("{} checks, {} failed".format(len(results), len(failed)))
    return 1 if failed else 0
