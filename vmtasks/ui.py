"""Compatibility shim: the old single-VM ``Ui`` API on top of :class:`vmtasks.report.Reporter`.

Callers not yet moved to the reporter (``tasks.py``, ``host.py``, ``run.py``, ``doctor.py``,
``scripts/bench.py``) keep working through it; delete this module once they call the
reporter's events directly.
"""

from __future__ import annotations

import json
from typing import List, Optional

from rich.text import Text

from .report import STAGE_TITLES, Reporter, make_console  # noqa: F401  (old import sites)


class Ui:
    """The old ``Ui`` methods, each forwarded to a one-VM :class:`Reporter`."""

    def __init__(self, console=None, quiet: bool = False, verbose: bool = False) -> None:
        stream = console.file if console is not None else None
        self.reporter = Reporter(stderr=stream, quiet=quiet, verbose=verbose)
        self.console = self.reporter.err
        self.quiet = quiet
        self.verbose = verbose
        self._raw_buffer = ""

    @property
    def live_mode(self) -> bool:
        return self.reporter.live_mode

    def stage_started(self, name: str, detail: str = "") -> None:
        self.reporter.stage_started("", name)

    def stage_finished(self, name: str, elapsed: float, ok: bool, note: str = "") -> None:
        self.reporter.stage_finished("", name, elapsed, "ok" if ok else "failed", note)

    def suite_progress(self, passed: int, failed: int, skipped: int, running: List[str]) -> None:
        for name in running:
            if name not in self.reporter._vm("").running:
                self.reporter.test_started("", name)

    def test_finished(self, name: str, status: str, elapsed: float, output: str = "") -> None:
        self.reporter.test_finished("", name, status, elapsed, output)

    def raw(self, text: str) -> None:
        """Legacy: the old ``VmRun._suite`` passes the JSON stream itself, so take the text
        out of its events here. The reporter's ``raw_output`` gets decoded text only."""
        if not self.verbose:
            return
        self._raw_buffer += text
        *lines, self._raw_buffer = self._raw_buffer.split("\n")
        for line in lines:
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
                if isinstance(event, dict):
                    if isinstance(event.get("Output"), str):
                        self.reporter.raw_output("", event["Output"])
                    continue
            self.reporter.raw_output("", line + "\n")

    def print(self, text, style: Optional[str] = None) -> None:
        with self.reporter._lock:
            if isinstance(text, str):
                self.reporter._print(Text(text, style=style or ""))
            else:
                self.reporter.err.print(text)

    def info(self, text: str) -> None:
        self.reporter.info(text)

    def warn(self, text: str) -> None:
        self.reporter.warn(text)

    def error(self, text: str) -> None:
        self.reporter.error(text)

    def close(self) -> None:
        self.reporter.close()
