"""``--replay RUN[:VM]``: run exactly the tests one VM of a recorded run ran, in the same order,
on one fresh VM, each as its own invocation, and say whether that run's failures come back.

"Fails sometimes on vm-2" becomes a repeatable case: the order is what made it fail, when an
earlier test left the machine in a state the failing one did not expect. The sequence comes
from the record's ``tests.json`` (each test's VM and start time, written by every run)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Sequence, Tuple

from vmtasks.guest.errors import ConfigError
from vmtasks.ui.html_report import find_run


@dataclass(frozen=True)
class Replay:
    """What a replay runs: the tests in order, and the run and VM they come from."""

    source: str  # "<run id> vm-2", for the summary
    tests: List[Tuple[str, str]]  # (package, name), in the order they ran
    failed: List[str] = field(default_factory=list)  # the ones that failed there


def _label(vm: str) -> str:
    """vm1, vm2 ... for a run's N-th VM (its name ends in -N), as its lines and rows say."""
    tail = vm.rsplit("-", 1)[-1]
    return "vm" + tail if tail.isdigit() else vm


def parse(spec: str) -> Tuple[str, str]:
    """``RUN[:VM]`` -> (run, vm); the VM may be its name or its label (vm2)."""
    if not spec or not spec.strip():
        raise ConfigError("--replay is empty", "give a recorded run, e.g. --replay 20261205-0612:vm2")
    run, _, vm = spec.strip().partition(":")
    return run, vm


def load(records_root: Path, spec: str) -> Replay:
    """The sequence to replay from the record of ``spec``'s run (see :func:`parse`)."""
    run, vm = parse(spec)
    run_dir = find_run(records_root, run)
    try:
        data = json.loads((run_dir / "tests.json").read_text())
        tests = [t for t in data.get("tests", []) if isinstance(t, dict) and isinstance(t.get("name"), str)]
    except (OSError, ValueError, AttributeError):
        raise ConfigError("run {} has no readable tests.json in {}".format(run_dir.name, run_dir),
                          "replay a run made by this version of vmtasks (it writes tests.json)") from None
    tests = [t for t in tests if "/" not in t["name"] and t.get("status") not in ("notrun",)]
    vms = sorted({str(t.get("vm") or "") for t in tests})
    if vm:
        chosen = [v for v in vms if vm in (v, _label(v))]
        if not chosen:
            raise ConfigError("run {} has no VM {!r}; its VMs: {}".format(
                run_dir.name, vm, ", ".join("{} ({})".format(_label(v), v) for v in vms if v) or "one, unnamed"),
                "give one of them, e.g. --replay {}:{}".format(run_dir.name, _label(vms[-1]) if vms else "vm1"))
        wanted = chosen[0]
    elif len(vms) == 1:
        wanted = vms[0]
    else:
        raise ConfigError("run {} ran its tests on {} VMs: say which to replay".format(run_dir.name, len(vms)),
                          "e.g. --replay {}:{} (its VMs: {})".format(run_dir.name, _label(vms[0]),
                                                                      ", ".join(_label(v) for v in vms)))
    mine = [t for t in tests if str(t.get("vm") or "") == wanted]
    # Start order; a test with no start time (it never reported one) after the others.
    mine.sort(key=lambda t: (t.get("started") is None, t.get("started") or 0.0))
    if not mine:
        raise ConfigError("run {} ran no test on {}".format(run_dir.name, wanted or "its VM"),
                          "pick a VM that ran tests (see its report.html or timeline.txt)")
    return Replay("{} {}".format(run_dir.name, _label(wanted) if wanted else "").strip(),
                  [(str(t.get("package") or ""), t["name"]) for t in mine],
                  [t["name"] for t in mine if t.get("status") == "fail"])


def order(items: Sequence, replay: Replay) -> Tuple[List, List[str]]:
    """The listed ``items`` (with ``.key`` = (package, name)) in the replay's order, and the
    replayed tests the suite no longer has."""
    by_key = {tuple(i.key): i for i in items}
    by_name = {i.key[1]: i for i in items}
    out, missing = [], []
    for package, name in replay.tests:
        item = by_key.get((package, name)) or by_name.get(name)
        if item is None:
            missing.append(name)
        else:
            out.append(item)
    return out, missing


def verdict(replay: Replay, failed_now: Sequence[str]) -> str:
    """One line: did the recorded failures come back?"""
    again = [n for n in replay.failed if n in failed_now]
    gone = [n for n in replay.failed if n not in failed_now]
    new = [n for n in failed_now if n not in replay.failed]
    parts = ["replay of {} ({} tests, the same order)".format(replay.source, len(replay.tests))]
    if again:
        parts.append("reproduced: " + ", ".join(again))
    if gone:
        parts.append("did not fail this time: " + ", ".join(gone))
    if new:
        parts.append("failed now, not then: " + ", ".join(new))
    if not replay.failed and not failed_now:
        parts.append("nothing failed, then or now")
    return "; ".join(parts)
