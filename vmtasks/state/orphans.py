"""What dead runs left: the sweep at the start of every run and ``invoke cleanup-orphans``.

The rules (who is an orphan) live in vmtasks/state/sweep.py; this module feeds it the backend's
listing (without prepared images, which are kept on purpose and have no lease), shows the
plan, carries it out, and prints commands that work when pasted (they name the config).
"""

from __future__ import annotations

import socket
from typing import Optional

from vmtasks.lifecycle import images

from . import sweep as rules


def owned_listing(parts, listed=None):
    """The backend's VMs, minus finished prepared images (vmtasks/lifecycle/images.py names)."""
    prefix = parts.cfg.vm.name_prefix
    vms = parts.backend.list_vms() if listed is None else listed
    return [vm for vm in vms if images.parse_prepared(prefix, vm.name) is None]


def sweep(reporter, parts, dry_run: bool = False, include_kept: bool = False,
          max_age: Optional[float] = None, quiet: bool = False, listed=None,
          include_unleased: bool = False, child_wait: Optional[float] = None) -> int:
    """Plan and (unless ``dry_run``) apply the sweep; 1 if something could not be removed."""
    extra = {} if child_wait is None else {"child_wait": child_wait}
    listing = owned_listing(parts, listed)
    plan = rules.plan(parts.backend, parts.ledger, parts.cfg.vm.name_prefix, include_kept=include_kept,
                      kept_max_age=max_age, listed=listing, include_unleased=include_unleased,
                      unleased_after=parts.cfg.sweep.unleased_after * 3600,
                      cleanup_command=parts.cleanup_command, on_wait=reporter.info, **extra)
    judge_by_owner(plan, parts, listing, include_kept)
    lines = plan.lines(dry_run)
    if not quiet or plan.actions or plan.unreadable:
        for line in lines:
            reporter.info("  " + line)
    errors = [] if dry_run else rules.apply(plan, parts.backend, parts.ledger,
                                            stop_timeout=min(30, parts.cfg.timeouts.teardown))
    for error in errors:
        reporter.error(error)
    if not quiet:
        reporter.info(count_line(plan, listing, parts.cfg.vm.name_prefix, dry_run, len(errors)))
    return 1 if errors else 0


def count_line(plan, listing, prefix: str, dry_run: bool, failed: int = 0) -> str:
    """The sweep's last line, never silent: what it did, out of how many VMs it checked."""
    checked = sum(1 for vm in listing if vm.name.startswith(prefix + "-"))
    where = "checked {} VM{} with prefix {} on {}".format(checked, "" if checked == 1 else "s", prefix,
                                                          socket.gethostname())
    removable = [a for a in plan.actions if a.kind != "child"]
    if not plan.actions:
        return "nothing to remove ({})".format(where)
    if dry_run:
        return "would remove {} ({}; dry run: nothing removed)".format(len(removable), where)
    done = len(removable) - failed
    return "removed {} of {} ({})".format(max(done, 0), len(removable), where)


# --- VMs without a lease here, judged by the owner they record (issue 14) ------------------
def judge_by_owner(plan, parts, listing, include_kept: bool) -> None:
    """A backend whose VMs record their owner (run, host, PID and start time, state dir)
    judges a VM with no lease in this ledger (a run from another state dir or checkout, or a
    state dir that was lost): removed when that owner is this host's and gone, live when the
    owner may still run (``Backend.judge_unleased``). Leased VMs keep the ledger's rules;
    VMs the backend cannot judge are left as they were."""
    if not plan.unleased:
        return
    labels = {vm.name: vm.labels for vm in listing}
    if any(vm.name not in labels for vm in plan.unleased):  # the plan listed again meanwhile
        labels.update({vm.name: vm.labels for vm in parts.backend.list_vms()})
    left = []
    for vm in plan.unleased:
        verdict, why = parts.backend.judge_unleased(vm.name, labels.get(vm.name) or {}, include_kept)
        if verdict == "orphan":
            plan.actions.append(rules.Action("vm", vm.name, why))
        elif verdict == "live":
            plan.live.append(vm.name)
        elif verdict == "kept":
            plan.kept.append(vm.name)
        else:
            left.append(vm)
    plan.unleased = left
