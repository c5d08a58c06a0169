"""All terminal output: one rich Console on stderr.

Live redraw (spinners) on a terminal; plain, line-by-line text without colour when stderr
is not a terminal or CI is set, so logs read well.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, List, Optional

from rich.console import Console, Group
from rich.live import Live
from rich.spinner import Spinner
from rich.text import Text

STAGE_TITLES = {
    "preflight": "pre-flight", "sweep": "orphan sweep", "clone": "clone", "boot": "boot",
    "ip+ssh": "IP + SSH", "key": "key", "setup": "setup", "sync": "sync", "suite": "suite",
    "teardown": "teardown", "build": "build",
}


def make_console(stream=None) -> Console:
    stream = stream or sys.stderr
    plain = bool(os.environ.get("CI")) or not stream.isatty()
    if plain:
        return Console(file=stream, force_terminal=False, no_color=True, highlight=False,
                       soft_wrap=True, emoji=False)
    return Console(file=stream, highlight=False)


class Ui:
    """Stage list with spinners, suite counters, and messages."""

    def __init__(self, console: Optional[Console] = None, quiet: bool = False, verbose: bool = False) -> None:
        self.console = console or make_console()
        self.quiet = quiet
        self.verbose = verbose
        self.live_mode = self.console.is_terminal and not os.environ.get("CI")
        self._live: Optional[Live] = None
        self._done: List[Text] = []
        self._active: Optional[str] = None
        self._active_started = 0.0
        self._suite_line = ""
        self._raw_buffer = ""

    # -- stages ------------------------------------------------------------
    def stage_started(self, name: str, detail: str = "") -> None:
        self._active = name
        self._active_started = time.monotonic()
        self._suite_line = ""
        title = STAGE_TITLES.get(name, name)
        if self.live_mode and not self.quiet:
            if self._live is None:
                self._live = Live(self._render(), console=self.console, refresh_per_second=8, transient=True)
                self._live.start()
            self._refresh()
        elif not self.quiet:
            self.console.print("-> {}{}".format(title, " ({})".format(detail) if detail else ""))

    def stage_finished(self, name: str, elapsed: float, ok: bool, note: str = "") -> None:
        title = STAGE_TITLES.get(name, name)
        mark = "ok" if ok else "FAILED"
        line = "{} {} {:.2f}s{}".format("✓" if ok else "✗", title, elapsed, "  " + note if note else "")
        self._active = None
        if self.quiet and ok:
            return
        if self.live_mode and self._live is not None:
            self._live.console.print(Text(line, style="green" if ok else "bold red"))
            self._refresh()
        else:
            self.console.print("   {} {} {:.2f}s{}".format(title, mark, elapsed, "  " + note if note else ""))

    def suite_progress(self, passed: int, failed: int, skipped: int, running: List[str]) -> None:
        line = "passed {}  failed {}  skipped {}".format(passed, failed, skipped)
        if running:
            line += "  running: " + ", ".join(running[-3:])
        if line == self._suite_line:
            return
        self._suite_line = line
        if self.live_mode:
            self._refresh()

    def test_finished(self, name: str, status: str, elapsed: float, output: str = "") -> None:
        if self.quiet and status != "fail":
            return
        label = {"pass": "PASS", "fail": "FAIL", "skip": "SKIP"}.get(status, status.upper())
        text = "   {} {} ({:.2f}s)".format(label, name, elapsed)
        self.print(text, style="red" if status == "fail" else None)
        if status == "fail" and output and not self.verbose:
            self.print(_indent(output.rstrip("\n")))

    def raw(self, text: str) -> None:
        """Raw test output as it arrives (``--verbose``): go test's own text, taken out of
        its JSON events when the suite runs with -json."""
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
                    output = event.get("Output")
                    if isinstance(output, str):
                        self.print(output.rstrip("\n"))
                    continue
            self.print(line)

    def _render(self):
        rows = []
        if self._active:
            title = STAGE_TITLES.get(self._active, self._active)
            elapsed = time.monotonic() - self._active_started
            label = "{} {:.0f}s".format(title, elapsed)
            if self._suite_line:
                label += "  " + self._suite_line
            rows.append(Spinner("dots", text=Text(label)))
        return Group(*rows)

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render(), refresh=True)

    # -- messages ----------------------------------------------------------
    def print(self, text, style: Optional[str] = None) -> None:
        target = self._live.console if self._live is not None else self.console
        if isinstance(text, str):
            target.print(Text(text, style=style or ""))
        else:
            target.print(text)

    def info(self, text: str) -> None:
        if not self.quiet:
            self.print(text)

    def warn(self, text: str) -> None:
        self.print("warning: " + text, style="yellow")

    def error(self, text: str) -> None:
        self.print("error: " + text, style="bold red")

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def _indent(text: str, prefix: str = "      ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())
