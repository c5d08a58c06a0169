"""--rerun-failed: the tests that failed in the last recorded run of this config that ran
tests. Runs that cannot say what failed are skipped, and named: one stopped by a signal
(its unfinished tests are offered instead), one that ran no test (a pre-flight or build
failure does not erase the failures to rerun), a vm-prepare."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from vmtasks.guest.errors import ConfigError
from vmtasks.guest.results import rerun_regex


@dataclass
class RerunChoice:
    regex: Optional[str]  # None: nothing to rerun
    source: str = ""  # "run <id> (<path>)"
    notes: List[str] = field(default_factory=list)  # the runs skipped, and what they offer


def _runs(records_root: Path) -> List[Path]:
    try:
        return sorted((p for p in records_root.iterdir() if p.is_dir() and not p.is_symlink()
                       and not p.name.startswith(".")), key=lambda p: p.name, reverse=True)
    except OSError:
        return []


def _top_level(names) -> List[str]:
    return [n for n in names or [] if isinstance(n, str) and n and "/" not in n]


def choose(records_root: Path, run_command: str = "invoke test-vm") -> RerunChoice:
    """What to rerun: the failed tests of the newest run that ran tests and finished.
    ``run_command``: the command that makes a first run (it names the config)."""
    notes: List[str] = []
    found_any = False
    for run in _runs(records_root):
        try:
            data = json.loads((run / "result.json").read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or "failed_tests" not in data:
            continue  # a vm-prepare, or a run still going
        found_any = True
        if data.get("interrupted"):
            left = _top_level(data.get("unfinished_tests"))
            offer = "; it left {} test{} unfinished: {}; run them with --test='{}'".format(
                len(left), "" if len(left) == 1 else "s", ", ".join(left[:10]) + (", ..." if len(left) > 10 else ""),
                rerun_regex(left)) if left else ""
            notes.append("skipped run {}: it was interrupted{}".format(run.name, offer))
            continue
        if data.get("tests_run") == 0:
            notes.append("skipped run {}: it ran no test (exit {})".format(run.name, data.get("exit_code", "?")))
            continue
        failed = _top_level(data.get("failed_tests"))
        source = "run {} ({})".format(run.name, run)
        if not failed:
            notes.append("nothing to rerun: {} had no failed test".format(source))
            return RerunChoice(None, source, notes)
        return RerunChoice(rerun_regex(failed), source, notes)
    if not found_any:
        raise ConfigError("--rerun-failed: no finished run recorded in {}".format(records_root),
                          "run `{}` first".format(run_command))
    notes.append("nothing to rerun: no run in {} ran tests to the end".format(records_root))
    return RerunChoice(None, "", notes)


def failed_regex(records_root: Path) -> Tuple[str, str]:
    """The `go test -run` regex for the last usable run's failed tests, and a line naming
    the run it came from; a ConfigError when there is nothing to rerun."""
    choice = choose(records_root)
    if choice.regex is None:
        raise ConfigError("--rerun-failed: " + "; ".join(choice.notes), "nothing to rerun")
    return choice.regex, choice.source
