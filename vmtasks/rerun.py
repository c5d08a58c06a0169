"""--rerun-failed: the tests that failed in the last recorded run of this config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Tuple

from .errors import ConfigError


def last_completed_run(records_root: Path) -> Tuple[Path, dict]:
    """The newest recorded test run that finished: a run stopped by a signal, or a
    vm-prepare, is not the source of "what failed last time"."""
    try:
        runs = sorted((p for p in records_root.iterdir() if p.is_dir() and not p.is_symlink()
                       and not p.name.startswith(".")), key=lambda p: p.name, reverse=True)
    except OSError:
        runs = []
    for run in runs:
        try:
            data = json.loads((run / "result.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "failed_tests" in data and not data.get("interrupted"):
            return run, data
    raise ConfigError("--rerun-failed: no finished run recorded in {}".format(records_root),
                      "run `invoke test-vm` first")


def failed_regex(records_root: Path) -> Tuple[str, str]:
    """The `go test -run` regex for the last finished run's failed tests (never its
    interrupted or not-run ones), and a line naming the run it came from."""
    from .results import rerun_regex

    last, data = last_completed_run(records_root)
    failed = data.get("failed_tests") or []
    if not failed:
        raise ConfigError("--rerun-failed: the last run ({}) had no failed tests".format(last.name),
                          "nothing to rerun")
    return rerun_regex(failed), "run {} ({})".format(last.name, last)
