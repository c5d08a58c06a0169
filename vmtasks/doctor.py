"""`invoke vm-doctor`: can this machine run test-vm? One line per check with a fix hint.

The backend checks itself (``Backend.doctor``); then, whatever the backend, what dead runs
left (the sweep's plan, nothing removed) and the state dir."""

from __future__ import annotations

from typing import Callable, List

from . import orphans, sweep
from .backend import Check
from .errors import VmtasksError


def checks(load_config: Callable, driver=None) -> List[Check]:
    """``driver``: the backend's command driver, for tests (see ``factory.Parts``)."""
    from .factory import Parts

    out: List[Check] = []
    add = out.append
    try:
        cfg = load_config()
        add(Check("config", "ok", cfg.source))
    except VmtasksError as exc:
        add(Check("config", "fail", exc.message, exc.hint))
        return out
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


def run(reporter, load_config: Callable, driver=None) -> int:
    results = checks(load_config, driver)
    for check in results:
        reporter.info("{:<5} {:<11} {}".format(check.status, check.name, check.detail))
        if check.hint and check.status != "ok":
            reporter.info("      fix: " + check.hint)
    failed = [c for c in results if c.status == "fail"]
    reporter.info("{} checks, {} failed".format(len(results), len(failed)))
    return 1 if failed else 0
