"""--rerun-failed: the tests that failed in the last recorded run of this config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Tuple

from .errors import ConfigError


def failed_regex(records_root: Path) -> Tuple[str, str]:
    """The `go test -run` regex for the last run's failed tests (never its interrupted or
    not-run ones), and a line naming the run it came from."""
    from .records import latest_run
    from .results import rerun_regex

    last = latest_run(records_root)
    if last is None or not (last / "result.json").is_file():
        raise ConfigError("--rerun-failed: no recorded run in {}".format(records_root),
                          "run `invoke test-vm` first")
    try:
        data = json.loads((last / "result.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError("--rerun-failed: cannot read {}: {}".format(last / "result.json", exc),
                          "run `invoke test-vm` again to make a new record") from None
    failed = data.get("failed_tests") or []
    if not failed:
        raise ConfigError("--rerun-failed: the last run ({}) had no failed tests".format(last.name),
                          "nothing to rerun")
    return rerun_regex(failed), "run {} ({})".format(last.name, last)
