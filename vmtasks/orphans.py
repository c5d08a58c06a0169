"""What dead runs left: the sweep at the start of every run and ``invoke cleanup-orphans``.

The rules (who is an orphan) live in vmtasks/sweep.py; this module shows the plan, carries
it out, and prints commands that work when pasted (they name the config in use).
"""

from __future__ import annotations

import socket
from typing import Optional


def sweep(reporter, parts, dry_run: bool = False, include_kept: bool = False,
          max_age: Optional[float] = None, quiet: bool = False, listed=None,
          include_unleased: bool = False) -> int:
    """Plan and (unless ``dry_run``) apply the sweep; 1 if something could not be removed."""
    from . import sweep as rules

    plan = rules.plan(parts.tart, parts.ledger, parts.cfg.vm.name_prefix, include_kept=include_kept,
                      kept_max_age=max_age, listed=_as_tart_rows(listed))
    if not quiet or plan.actions:
        for name in plan.live:
            reporter.info("  live (not touched): {}".format(name))
        for name in plan.kept:
            reporter.info("  kept (not touched; `{} --include-kept` removes it): {}".format(
                parts.cleanup_command, name))
    for action in plan.actions:
        reporter.info("  {} {} {}: {}".format("would remove" if dry_run else "removing", action.kind,
                                              action.name, action.reason))
    if dry_run:
        return 0
    errors = rules.apply(plan, parts.tart, parts.ledger, stop_timeout=min(30, parts.cfg.timeouts.teardown))
    for error in errors:
        reporter.error(error)
    if errors:
        reporter.error("{} of {} could not be removed: run `{}` again, or remove them by hand "
                       "(`tart list`)".format(len(errors), len(plan.actions), parts.cleanup_command))
    if not quiet and not plan.actions:
        reporter.info("no orphans on {}".format(socket.gethostname()))
    return 1 if errors else 0


def _as_tart_rows(listed):
    """The backend's listing in the shape the sweep reads (name, running, state)."""
    if listed is None:
        return None
    from .tart import VmInfo

    return [VmInfo(vm.name, vm.running, vm.state, "local", vm.size_gb) for vm in listed]
