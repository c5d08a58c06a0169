"""`invoke vm-doctor`: can this machine run test-vm? One line per check with a fix hint.

The backend checks itself (``Backend.doctor``); then, whatever the backend, what dead runs
left (the sweep's plan, nothing removed) and the state dir."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from typing import Callable, List, Optional

from vmtasks.guest import config as config_mod
from vmtasks.guest import gotest
from vmtasks.guest.errors import VmtasksError
from vmtasks.lifecycle.backend import Check
from vmtasks.settings.factory import Parts
from vmtasks.state import orphans, sweep


def checks(load_config: Callable, driver=None) -> List[Check]:
    """``driver``: the backend's command driver, for tests (see ``factory.Parts``)."""
    out: List[Check] = []
    add = out.append
    try:
        cfg = load_config()
        add(Check("config", "ok", cfg.source))
    except VmtasksError as exc:
        add(Check("config", "fail", exc.message, exc.hint))
        return out
    out += project_checks(cfg)
    parts = Parts(cfg, None, driver=driver)
    try:
        out += parts.backend.doctor(parts)
    except VmtasksError as exc:
        return out + [Check(parts.backend.name, "fail", exc.message, exc.hint)]
    failed = any(check.status == "fail" for check in out)
    try:
        add(leftovers_check(parts))
    except VmtasksError as exc:
        if failed:  # the backend said why already (unreachable, no tool)
            return out
        add(Check("leftovers", "warn", exc.message, exc.hint))
    try:
        parts.ledger.ensure()
        add(Check("state dir", "ok", str(parts.ledger.state_dir)))
    except VmtasksError as exc:
        add(Check("state dir", "fail", exc.message, exc.hint))
    return out


def leftovers_check(parts) -> Check:
    """What the sweep would remove (by lease, or by the owner a VM records), without waiting
    for children and without removing anything."""
    listing = orphans.owned_listing(parts)
    plan = sweep.plan(parts.backend, parts.ledger, parts.cfg.vm.name_prefix, listed=listing, child_wait=0,
                      cleanup_command=parts.cleanup_command)
    orphans.judge_by_owner(plan, parts, listing, include_kept=False)
    if plan.actions:
        return Check("leftovers", "warn", ", ".join("{} {}".format(a.kind, a.name) for a in plan.actions),
                     parts.cleanup_command)
    return Check("leftovers", "ok", "none ({} live, {} kept)".format(len(plan.live), len(plan.kept)))


def project_checks(cfg, run_go: Optional[Callable] = None) -> List[Check]:
    """What a run of this config needs on the host besides the VMs: the project and its
    go.mod (as pre-flight checks them), go where the run calls it (the queue compiles on the
    host; one VM lists the tests there, best effort), the suite's packages as go sees them,
    and the programs the `build` commands start."""

    out = []
    try:
        config_mod.check_host_paths(cfg)
        out.append(Check("project", "ok", "{} (project_dir, from {})".format(cfg.project_dir,
                                                                          cfg.origin("project_dir"))))
    except VmtasksError as exc:
        out.append(Check("project", "fail", exc.message, exc.hint))
        return out
    go = shutil.which("go")
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
        if program and "/" not in program and shutil.which(program) is None and program not in _SHELL_WORDS:
            out.append(Check("build", "fail", "`{}` is not on PATH (build: {})".format(program, command[:120]),
                             "install it, or fix the build commands in the config"))
    return out


_SHELL_WORDS = frozenset(["cd", "export", "set", "test", "[", "echo", "true", "false", "if", "for", "exec", "env"])


def _program(command: str) -> str:
    """The program a shell command line starts (after VAR=value assignments), or ""."""
    try:
        words = shlex.split(command)
    except ValueError:
        return ""
    words = [w for w in words if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", w)]
    return words[0] if words else ""


def run(reporter, load_config: Callable, driver=None) -> int:
    results = checks(load_config, driver)
    for check in results:
        reporter.info("{:<5} {:<11} {}".format(check.status, check.name, check.detail))
        if check.hint and check.status != "ok":
            reporter.info("      fix: " + check.hint)
    failed = [c for c in results if c.status == "fail"]
    reporter.info("{} checks, {} failed".format(len(results), len(failed)))
    return 1 if failed else 0
