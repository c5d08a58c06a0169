"""The one reporter: every line a person sees during and after a run.

A ``Reporter`` has one method per event (a stage started or finished, a test finished, a VM
was kept, the run is done ...). It holds no module-level state and takes one lock per
event, so several per-VM pipelines can report from their own threads at once.

- Progress goes to stderr. On a terminal it is a live view (rich ``Live``, transient): one
  row per VM with its active stage, the stage's elapsed time computed at each refresh and
  its deadline (``boot 12s / 60s``), and in the suite stage the VM's counts and running
  tests. Finished stages, failing tests and messages scroll above it. When stderr is not a
  terminal or ``CI`` is set, the same events become plain lines: no colour, no redraw.
- The summary and the verdict line go to stdout (plain when piped), so
  ``invoke test-vm | tee log`` keeps them. The summary is rendered once, from the results
  model, into lines (:func:`summary_lines`); the console prints those lines and
  ``summary.txt`` holds their plain text, so the two cannot differ.
- Everything that comes from the guest (test names, output, console and error tails) is
  passed through :func:`vmtasks.guest.visible.visible` and printed as ``rich.text.Text``: an
  escape sequence arrives as visible characters, and rich markup is never interpreted.
- ``command_ran`` appends one line per ``tart``/``ssh``/``rsync`` command to the run
  record's ``commands.log``.

The reporter reads a summary through a small duck type (:class:`SummaryView`,
:class:`TestView`) with the results model's own names, so the model is read as it is
(nothing renames it) and the reporter does not import the results package.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import (
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Protocol,
    Sequence,
    TextIO,
    Tuple,
    Union,
)

from rich.console import Console, Group
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from vmtasks.guest.atomic import write_atomic
from vmtasks.guest.results.model import format_duration
from vmtasks.guest.visible import visible, visible_line

STAGE_TITLES = {
    "preflight": "pre-flight", "sweep": "orphan sweep", "build": "build", "clone": "clone",
    "boot": "boot", "ip+ssh": "IP + SSH", "key": "key", "setup": "setup", "sync": "sync",
    "suite": "suite", "teardown": "teardown",
}
STATUS_WORDS = {"pass": "PASS", "fail": "FAIL", "skip": "SKIP", "interrupted": "INTERRUPTED",
                "notrun": "NOT RUN"}
SLOW_THRESHOLD = 0.5   # seconds: a passing run does not list five "slow" tests of 0.00s
SLOW_COUNT = 5
OUTPUT_LINES = 60      # lines of a failing test's output shown on screen and in the summary
RUNNING_SHOWN = 3      # running tests named in a VM's live row


# -- what the reporter reads from a summary ------------------------------------
class TestView(Protocol):
    """One top-level test (or subtest) as the reporter reads it.

    ``status``: "pass", "fail", "skip", "interrupted" or "notrun". ``elapsed``: seconds.
    ``output``: bounded text. ``vm``: the VM that ran it ("" when unknown or not run).
    ``started``: epoch seconds, or None. ``subtests``: the same shape, nested.
    """

    name: str
    package: str
    status: str
    elapsed: float
    output: str
    vm: str
    started: Optional[float]
    subtests: Sequence["TestView"]


class SummaryView(Protocol):
    """A run's results as the reporter reads them, the results model's own names
    (vmtasks/guest/results/model.py ``Summary``): ``results`` (top-level, each a
    :class:`TestView`) and ``package_failures`` (package -> output: build errors, a failing
    ``TestMain``, a package that never finished)."""

    @property
    def results(self) -> Sequence[TestView]: ...

    @property
    def package_failures(self) -> Mapping[str, str]: ...

    @property
    def counts(self) -> "CountsView": ...


class CountsView(Protocol):
    """The model's top-level counts (``results.Counts``): the summary's rows read them."""

    passed: int
    failed: int
    skipped: int
    interrupted: int
    notrun: int


Verdict = Union[str, Callable[[Optional[SummaryView], float], str]]


# -- formatting ----------------------------------------------------------------
def format_seconds(seconds: Optional[float]) -> str:
    """A duration for the summary: ``0.42s``, ``12.30s``, ``1m05s``, ``2h03m04s`` (the
    results model's ``format_duration``; None shows as ``0.00s``)."""
    return format_duration(0.0 if seconds is None else seconds)


def format_clock(seconds: float) -> str:
    """A coarse duration for the live view: ``12s``, ``90s``, ``2m05s``, ``30m``, ``1h02m``."""
    whole = max(0, int(seconds))
    if whole < 120:
        return "{}s".format(whole)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return "{}h{:02d}m".format(hours, minutes) if minutes else "{}h".format(hours)
    return "{}m{:02d}s".format(minutes, secs) if secs else "{}m".format(minutes)


def _bounded_lines(text: str, limit: int = OUTPUT_LINES) -> List[str]:
    """The last ``limit`` lines of guest ``text``, each made visible."""
    text = (text or "").rstrip("\n")
    if not text:
        return []
    # Split on newlines only: splitlines() would also eat \f, \x1c and the like unseen.
    lines = text.split("\n")
    shown = [visible(line.rstrip("\r")) for line in lines[-limit:]]
    if len(lines) > limit:
        shown.insert(0, "... ({} earlier lines in the run record)".format(len(lines) - limit))
    return shown


def _indented(text: str, prefix: str, limit: int = OUTPUT_LINES) -> List[Text]:
    return [Text(prefix + line) for line in _bounded_lines(text, limit)]


# -- the summary, rendered once ------------------------------------------------
def _all_subtests(test: TestView) -> Iterable[TestView]:
    for sub in getattr(test, "subtests", None) or ():
        yield sub
        yield from _all_subtests(sub)


def _spans(tests: Iterable[TestView]) -> List[Tuple[float, float, TestView]]:
    """``(start, end, test)`` of every test that has a start time, in start order."""
    out = []
    for test in tests:
        if test.started is not None:
            out.append((test.started, test.started + (test.elapsed or 0.0), test))
    return sorted(out, key=lambda span: (span[0], span[2].name))


def _busy_seconds(tests: Sequence[TestView]) -> float:
    """Seconds a VM was running at least one test (overlaps counted once)."""
    busy = sum(t.elapsed or 0.0 for t in tests if t.started is None)
    current: Optional[Tuple[float, float]] = None
    for start, end, _ in _spans(tests):
        if current is None or start > current[1]:
            if current is not None:
                busy += current[1] - current[0]
            current = (start, end)
        else:
            current = (current[0], max(current[1], end))
    if current is not None:
        busy += current[1] - current[0]
    return busy


@dataclass
class VmShare:
    """One VM's part of a run: its tests, the seconds it ran tests, the seconds it sat idle
    inside the run's test window (first start to last end, over every VM)."""

    vm: str
    tests: int
    busy: float
    idle: Optional[float]
    first: Optional[float]  # seconds after the window opened
    last: Optional[float]


def vm_shares(summary: SummaryView) -> List[VmShare]:
    """The per-VM balance of a run, in VM name order (tests with no VM are left out)."""
    tests = [t for t in summary.results if getattr(t, "vm", "")]
    timed = _spans(tests)
    window = (min(s for s, _, _ in timed), max(e for _, e, _ in timed)) if timed else None
    shares = []
    for vm in sorted({t.vm for t in tests}):
        mine = [t for t in tests if t.vm == vm]
        busy = _busy_seconds(mine)
        spans = _spans(mine)
        idle = first = last = None
        if window is not None:
            idle = max(0.0, (window[1] - window[0]) - busy)
            if spans:
                first = min(s for s, _, _ in spans) - window[0]
                last = max(e for _, e, _ in spans) - window[0]
        shares.append(VmShare(vm, len(mine), busy, idle, first, last))
    return shares


NOT_RUN_SHOWN = 10  # more not-run tests than this fold into one line


def _status_counts(tests: Iterable[TestView]) -> Dict[str, int]:
    counts = {status: 0 for status in STATUS_WORDS}
    for test in tests:
        counts[test.status] = counts.get(test.status, 0) + 1
    return counts


def summary_lines(summary: Optional[SummaryView], seconds: float, verdict_text: str,
                  record_dir: Optional[Union[str, os.PathLike]] = None,
                  extra_lines: Sequence[str] = (), slow_threshold: float = SLOW_THRESHOLD,
                  output_lines: int = OUTPUT_LINES) -> List[Text]:
    """The end of a run as styled lines: counts, per-VM balance, slow tests, failures,
    interrupted and not-run tests, package errors, record paths, and the verdict last.

    The console prints these lines; :meth:`Reporter.render_summary_text` joins their plain
    text for ``summary.txt``. Paths stand on their own lines, so nothing wraps inside one.
    """
    lines: List[Text] = []
    if summary is not None:
        tests = list(summary.results)
        errors = dict(summary.package_failures)
        several_vms = len({t.vm for t in tests if getattr(t, "vm", "")}) > 1
        lines += _count_lines(tests, summary.counts, errors, seconds)
        if several_vms:
            lines += _vm_lines(summary)
        lines += _slow_lines(tests, slow_threshold, several_vms)
        lines += _problem_lines(tests, errors, several_vms, output_lines)
    if record_dir is not None:
        lines.append(Text("record: " + visible(str(record_dir))))
    lines += [Text(visible(line)) for line in extra_lines]
    lines.append(Text(visible(verdict_text), style="bold"))
    return lines


def _row(what: str, value: str, style: str = "") -> Text:
    return Text("{:<12} {}".format(what, value), style=style)


def _count_lines(tests: Sequence[TestView], counts: CountsView, errors: Mapping[str, str],
                 seconds: float) -> List[Text]:
    subtests = [sub for test in tests for sub in _all_subtests(test)]
    # One count on screen: the verdict counts subtests too (as gotestsum does), so say so here.
    total = str(len(tests)) if not subtests else "{} (+ {} subtests = {}, the verdict's count)".format(
        len(tests), len(subtests), len(tests) + len(subtests))
    lines = [Text("e2e results", style="bold"),
             _row("tests", total),
             _row("passed", str(counts.passed), "green" if counts.passed else ""),
             _row("failed", str(counts.failed), "bold red" if counts.failed else ""),
             _row("skipped", str(counts.skipped))]
    # Rows that only matter when they are not zero.
    flaky = getattr(counts, "flaky", 0)  # --retries: failed, then passed on a fresh VM
    if flaky:
        lines.append(_row("flaky", str(flaky), "yellow"))
    if counts.interrupted:
        lines.append(_row("interrupted", str(counts.interrupted), "yellow"))
    if counts.notrun:
        lines.append(_row("not run", str(counts.notrun), "bold red"))
    if errors:
        lines.append(_row("errors", "{} (package or build)".format(len(errors)), "bold red"))
    if subtests:
        sub_counts = _status_counts(subtests)
        parts = ["{} {}".format(sub_counts[status], word) for status, word in
                 (("pass", "passed"), ("fail", "failed"), ("skip", "skipped"), ("interrupted", "interrupted"))
                 if sub_counts[status] or status == "pass"]
        lines.append(_row("subtests", "{} ({})".format(len(subtests), ", ".join(parts))))
    timed = _spans(tests)
    if timed:
        window = max(e for _, e, _ in timed) - min(s for s, _, _ in timed)
        lines.append(_row("suite time", format_seconds(window)))
    lines.append(_row("total time", format_seconds(seconds)))
    return lines


def _vm_lines(summary: SummaryView) -> List[Text]:
    shares = vm_shares(summary)
    # As wide as the longest VM name: the columns stay aligned whatever the names are.
    width = max([22] + [len(visible_line(share.vm)) for share in shares])
    lines = [Text(""), Text("{:<{w}} {:>5}  {:>9}  {:>9}  {}".format(
        "per VM", "tests", "busy", "idle", "first start .. last end", w=width + 2), style="bold")]
    for share in shares:
        span = "-"
        if share.first is not None:
            span = "+{} .. +{}".format(format_seconds(share.first), format_seconds(share.last))
        lines.append(Text("  {:<{w}} {:>5}  {:>9}  {:>9}  {}".format(
            visible_line(share.vm), share.tests, format_seconds(share.busy),
            "-" if share.idle is None else format_seconds(share.idle), span, w=width)))
    return lines


def _slow_lines(tests: Sequence[TestView], threshold: float, several_vms: bool) -> List[Text]:
    # Interrupted tests are left out: their time says when the run stopped, not how slow they are.
    slow = sorted((t for t in tests if t.status in ("pass", "fail") and (t.elapsed or 0) >= threshold),
                  key=lambda t: t.elapsed, reverse=True)[:SLOW_COUNT]
    if not slow:
        return []
    lines = [Text(""), Text("slowest (over {:g}s):".format(threshold))]
    for test in slow:
        vm = "  [{}]".format(visible(test.vm)) if several_vms and test.vm else ""
        lines.append(Text("  {:>9}  {}{}".format(format_seconds(test.elapsed), visible(test.name), vm)))
    return lines


def _problem_lines(tests: Sequence[TestView], errors: Mapping[str, str], several_vms: bool,
                   output_lines: int) -> List[Text]:
    """Failed tests with their output, then interrupted (never counted as failed), not run,
    and package errors."""
    starts = [t.started for t in tests if t.started is not None]
    origin = min(starts) if starts else None
    packages = {t.package for t in tests}

    def where(test: TestView) -> str:
        parts = [format_seconds(test.elapsed)]
        if len(packages) > 1:
            parts.append(visible(test.package))
        if several_vms and test.vm:
            parts.append(visible(test.vm))
        if several_vms and origin is not None and test.started is not None:
            parts.append("started +" + format_seconds(test.started - origin))
        return ", ".join(parts)

    lines: List[Text] = []
    for status, style in (("fail", "bold red"), ("interrupted", "yellow")):
        for test in (t for t in tests if t.status == status):
            lines.append(Text("--- {}: {} ({})".format(STATUS_WORDS[status], visible(test.name), where(test)),
                              style=style))
            lines += _indented(test.output, "    ", output_lines)
            for sub in _all_subtests(test):
                if sub.status == status:
                    lines.append(Text("    --- {}: {} ({})".format(
                        STATUS_WORDS[status], visible(sub.name), format_seconds(sub.elapsed)), style=style))
    not_run = [visible_line(t.name) for t in tests if t.status == "notrun"]
    if len(not_run) > NOT_RUN_SHOWN:
        # Many not run (no VM left): one line, not a screenful.
        lines.append(Text("--- NOT RUN: {} tests: {} +{} more (all in junit.xml)".format(
            len(not_run), ", ".join(not_run[:NOT_RUN_SHOWN]), len(not_run) - NOT_RUN_SHOWN), style="bold red"))
    else:
        lines += [Text("--- NOT RUN: {}".format(name), style="bold red") for name in not_run]
    for package, output in errors.items():
        lines.append(Text("--- ERROR package {}".format(visible(package)), style="bold red"))
        lines += _indented(output, "    ", output_lines)
    return [Text("")] + lines if lines else []


def timeline_text(summary: SummaryView) -> str:
    """Which VM ran which test and when, one test a line in start order (for the run
    record): start offset, elapsed, status, VM, package, name. Tests that never ran last."""
    tests = list(summary.results)
    ran = _spans(tests)
    origin = ran[0][0] if ran else 0.0
    rows = []
    for start, _, test in ran:
        rows.append("{:>10}  {:>9}  {:<11}  {:<22}  {}  {}".format(
            "+" + format_seconds(start - origin), format_seconds(test.elapsed),
            STATUS_WORDS.get(test.status, test.status), visible(test.vm or "-"),
            visible(test.package), visible(test.name)))
    for test in (t for t in tests if t.started is None):
        rows.append("{:>10}  {:>9}  {:<11}  {:<22}  {}  {}".format(
            "-", format_seconds(test.elapsed), STATUS_WORDS.get(test.status, test.status),
            visible(test.vm or "-"), visible(test.package), visible(test.name)))
    return "\n".join(rows) + ("\n" if rows else "")


# -- consoles ------------------------------------------------------------------
def _is_plain(stream: TextIO, env: Mapping[str, str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(env.get("CI")) or not (isatty is not None and isatty())


def make_console(stream: Optional[TextIO] = None, env: Optional[Mapping[str, str]] = None) -> Console:
    """A rich Console on ``stream`` (default stderr): colour on a terminal, plain text (no colour, no
    wrapping) when the stream is not a terminal or ``CI`` is set."""
    env = os.environ if env is None else env
    stream = stream or sys.stderr
    if _is_plain(stream, env):
        return Console(file=stream, force_terminal=False, no_color=True, highlight=False,
                       soft_wrap=True, emoji=False, markup=False)
    return Console(file=stream, force_terminal=True, highlight=False, emoji=False, markup=False)


# -- live state ----------------------------------------------------------------
@dataclass
class _Vm:
    vm: str
    label: str
    spinner: Spinner
    stage: str = ""
    started: float = 0.0
    deadline: Optional[float] = None
    waiting: str = ""
    last: str = ""
    counts: Dict[str, int] = field(default_factory=lambda: {"pass": 0, "fail": 0, "skip": 0})
    running: List[str] = field(default_factory=list)
    raw_partial: str = ""
    test_started: float = 0.0  # when the newest running test started (the queue's per-test clock)
    test_deadline: Optional[float] = None  # a queued test's own deadline (timeouts.test)


# The stages that run tests: one VM's `suite`, the queue's `tests`. Their rows show the counts.
TEST_STAGES = ("suite", "tests")


class _Row(NamedTuple):
    """What the live view draws for one VM, published under the lock and read without it
    (the refresh thread must not take the reporter's lock: see ``Reporter._publish``)."""

    label: str
    spinner: Spinner
    stage: str
    started: float
    deadline: Optional[float]
    waiting: str
    last: str
    counts: Tuple[int, int, int]
    running: Tuple[str, ...]
    test_started: float = 0.0
    test_deadline: Optional[float] = None


class Reporter:
    """Renders a run's events: live view or plain lines on stderr, summary on stdout.

    ``stderr``/``stdout``: the streams (default ``sys.stderr``/``sys.stdout``). ``quiet``:
    only failures, errors, warnings and the summary. ``verbose``: also the tests' raw
    output as it arrives. ``vms``: how many VMs the run will drive; with more than one (or
    once a second VM is added) every line names its VM. ``env``: where ``CI`` is read
    (default ``os.environ``). ``clock``: the monotonic clock the live view reads.

    Call :meth:`close` in a ``finally``: it stops the live view and restores the cursor.
    """

    def __init__(self, *, stderr: Optional[TextIO] = None, stdout: Optional[TextIO] = None,
                 quiet: bool = False, verbose: bool = False, vms: int = 1,
                 env: Optional[Mapping[str, str]] = None,
                 clock: Callable[[], float] = time.monotonic, refresh_per_second: float = 4.0) -> None:
        env = os.environ if env is None else env
        self.err = make_console(stderr or sys.stderr, env)
        self.out = make_console(stdout or sys.stdout, env)
        self.quiet = quiet
        self.verbose = verbose
        # A dumb terminal cannot redraw: it gets the plain lines.
        self.live_mode = (self.err.is_terminal and not self.err.is_dumb_terminal and not env.get("CI")
                          and not quiet)
        self._label_vms = vms > 1
        self._clock = clock
        self._refresh_per_second = refresh_per_second
        # Re-entrant: a signal handler (the SignalGuard's warning) runs in the main thread and
        # may report while that thread is inside an event.
        self._lock = threading.RLock()
        self._vms: Dict[str, _Vm] = {}
        self._rows: Tuple[_Row, ...] = ()
        self._live: Optional[Live] = None
        self._closed = False

    # -- run ---------------------------------------------------------------
    def run_started(self, run_id: str, plan_lines: Sequence[str] = ()) -> None:
        """The run has an id: name it and what it will do (one line each)."""
        with self._lock:
            self._start_live()
            if not self.quiet:
                self._print(Text("run {}".format(visible(run_id)), style="bold"),
                            *(Text("  " + visible(line)) for line in plan_lines))

    def vm_added(self, vm: str, label: str = "") -> None:
        """A VM joins the run (it gets a row). ``label``: a short name for its lines and row
        (default: the VM's name)."""
        with self._lock:
            self._vm(vm, label)
            self._publish()

    # -- stages ------------------------------------------------------------
    def stage_started(self, vm: str, stage: str, deadline_seconds: Optional[float] = None) -> None:
        """``vm`` ("" for the run itself: pre-flight, sweep) entered ``stage``, which must end
        within ``deadline_seconds`` (None: no deadline shown)."""
        with self._lock:
            state = self._vm(vm)
            state.stage, state.started, state.deadline = stage, self._clock(), deadline_seconds
            state.waiting = ""
            if stage not in TEST_STAGES:
                state.running = []
            self._start_live()
            if not self.live_mode and not self.quiet:
                suffix = " (deadline {})".format(format_clock(deadline_seconds)) if deadline_seconds else ""
                self._print(Text(self._prefix(state) + "-> " + _title(stage) + suffix))
            self._publish()

    def stage_finished(self, vm: str, stage: str, seconds: float, status: str, note: str = "") -> None:
        """``stage`` of ``vm`` ended after ``seconds``; ``status``: "ok", "failed",
        "skipped" or "interrupted"; ``note``: a few words after the time (e.g. "kept")."""
        with self._lock:
            state = self._vm(vm)
            self._flush_raw(state)
            if state.stage == stage:
                state.stage, state.deadline, state.waiting, state.running = "", None, "", []
            state.last = "{} {}".format(_title(stage), status)
            if not (self.quiet and status in ("ok", "skipped")):
                self._print(self._stage_line(state, stage, seconds, status, note))
            self._publish()

    def _stage_line(self, state: "_Vm", stage: str, seconds: float, status: str, note: str) -> Text:
        """``✓ boot 12.30s`` above the live view; ``   boot ok 12.30s`` as a plain line."""
        note_text = "  " + visible(note) if note else ""
        if self.live_mode:
            mark, style = {"ok": ("✓", "green"), "failed": ("✗", "bold red"), "skipped": ("-", "dim"),
                           "interrupted": ("!", "yellow")}.get(status, ("?", "yellow"))
            if status == "skipped":
                time_text = "skipped"
            elif status == "ok":
                time_text = format_seconds(seconds)
            else:
                time_text = "{} {}".format(status, format_seconds(seconds))
            return Text("{} {}{} {}{}".format(mark, self._prefix(state), _title(stage), time_text, note_text),
                        style=style)
        word = {"ok": "ok", "failed": "FAILED", "interrupted": "INTERRUPTED"}.get(status, status)
        time_text = "" if status == "skipped" else " " + format_seconds(seconds)
        return Text("{}   {} {}{}{}".format(self._prefix(state), _title(stage), word, time_text, note_text))

    def vm_waiting(self, vm: str, text: str) -> None:
        """``vm`` waits (a VM slot, Orchard's pending queue). Shown once per change of
        ``text``: calling again with the same text on each retry prints nothing. ""
        clears it."""
        with self._lock:
            state = self._vm(vm)
            if text == state.waiting:
                return
            state.waiting = text
            if text and not self.quiet:
                self._print(Text("{}   waiting: {}".format(self._prefix(state), visible(text)), style="yellow"))
            self._publish()

    # -- tests -------------------------------------------------------------
    def test_started(self, vm: str, name: str, deadline_seconds: Optional[float] = None) -> None:
        """A top-level test started on ``vm`` (it shows in the VM's row until it finishes).
        ``deadline_seconds``: the test's own deadline (a queued test), shown with its clock."""
        with self._lock:
            state = self._vm(vm)
            state.running.append(visible(name))
            state.test_started, state.test_deadline = self._clock(), deadline_seconds
            self._publish()

    def test_finished(self, vm: str, name: str, status: str, seconds: float, output: str = "") -> None:
        """A top-level test ended (``status`` as in :class:`TestView`). A failing test's
        output is shown at once (unless ``verbose`` already showed it raw)."""
        with self._lock:
            state = self._vm(vm)
            shown = visible(name)
            if shown in state.running:
                state.running.remove(shown)
            if status in state.counts:
                state.counts[status] += 1
            # Raw output first: `--- PASS X` must not come before X's own `=== RUN`.
            self._flush_raw(state)
            if not self.quiet or status in ("fail", "interrupted"):
                word = STATUS_WORDS.get(status, status.upper())
                style = {"fail": "red", "interrupted": "yellow"}.get(status, "")
                lines = [Text("{}   {} {} ({})".format(self._prefix(state), word, shown, format_seconds(seconds)),
                              style=style)]
                if status in ("fail", "interrupted") and not self.verbose:
                    lines += _indented(output, self._prefix(state) + "      ")
                self._print(*lines)
            self._publish()

    def package_failed(self, vm: str, package: str, output: str) -> None:
        """A package failed without a failing test (build error, TestMain): an error."""
        with self._lock:
            state = self._vm(vm)
            self._flush_raw(state)
            lines = [Text("{}   ERROR package {}".format(self._prefix(state), visible(package)), style="bold red")]
            lines += _indented(output, self._prefix(state) + "      ")
            self._print(*lines)

    def raw_output(self, vm: str, text: str) -> None:
        """The tests' own output as it arrives (shown with ``verbose``), already taken out of
        any JSON events by the caller, in stream order: a test's output before its
        ``test_finished``. Partial lines wait for their end (or for the next event)."""
        if not self.verbose:
            return
        with self._lock:
            state = self._vm(vm)
            *complete, state.raw_partial = (state.raw_partial + text).split("\n")
            if complete:
                self._print(*(Text(self._prefix(state) + visible(line.rstrip("\r"))) for line in complete))

    # -- messages ----------------------------------------------------------
    def vm_kept(self, vm: str, attach_cmd: str, cleanup_cmd: str, login_cmd: str = "",
                sweep_cmd: str = "invoke cleanup-orphans --include-kept", until: str = "") -> None:
        """``vm`` is kept: how to log in, attach and remove it, each command on one line
        (the tasks' lines name the config, so they work wherever they are pasted)."""
        with self._lock:
            lines = [Text("kept VM {}{}".format(visible(vm), "  (" + visible(until) + ")" if until else ""),
                          style="bold")]
            if login_cmd:
                lines.append(Text("  log in:   " + visible(login_cmd)))
            lines += [Text("  attach:   " + visible(attach_cmd)),
                      Text("  clean up: " + visible(cleanup_cmd)),
                      Text("            (or: {})".format(visible(sweep_cmd)))]
            self._print(*lines)

    def info(self, text: str) -> None:
        """A progress message (not shown with ``quiet``)."""
        if self.quiet:
            return
        with self._lock:
            self._print(Text(visible(text)))

    def warn(self, text: str) -> None:
        """Something the user should know; the run goes on."""
        with self._lock:
            self._print(Text("warning: " + visible(text), style="yellow"))

    def error(self, text: str) -> None:
        """A failure (a rendered error with its hint, possibly with a guest tail)."""
        with self._lock:
            self._print(Text("error: " + visible(text), style="bold red"))

    # -- the end -----------------------------------------------------------
    def render_summary_text(self, summary: Optional[SummaryView], seconds: float, verdict: Verdict,
                            record_dir: Optional[Union[str, os.PathLike]] = None,
                            extra_lines: Sequence[str] = ()) -> str:
        """The summary exactly as :meth:`run_done` prints it, as plain text."""
        lines = summary_lines(summary, seconds, _verdict_text(verdict, summary, seconds), record_dir, extra_lines)
        return "\n".join(line.plain for line in lines) + "\n"

    def run_done(self, summary: Optional[SummaryView], seconds: float, verdict: Verdict,
                 record_dir: Optional[Union[str, os.PathLike]] = None, extra_lines: Sequence[str] = (),
                 summary_path: Optional[Union[str, os.PathLike]] = None) -> str:
        """Stop the live view; print the summary and the verdict line on stdout. ``verdict``:
        the line itself or ``verdict(summary, seconds)`` (called with None when the run
        ended before any test). ``extra_lines``: e.g. the JUnit path, where failures were
        rerun from. ``summary_path``: also write the same text there (``summary.txt``).
        Returns that text."""
        with self._lock:
            for state in self._vms.values():
                self._flush_raw(state)
            self._stop_live()
            lines = summary_lines(summary, seconds, _verdict_text(verdict, summary, seconds), record_dir,
                                  extra_lines)
            text = "\n".join(line.plain for line in lines) + "\n"
            if summary_path is not None:
                write_atomic(summary_path, text)
            self.err.file.flush()
            self.out.print(Text(""))
            self.out.print(Text("\n").join(lines), soft_wrap=True)
            self.out.file.flush()
            return text

    def close(self) -> None:
        """Stop the live view (idempotent); the reporter prints plain lines after this."""
        with self._lock:
            for state in self._vms.values():
                self._flush_raw(state)
            self._stop_live()
            self._closed = True

    # -- internals (called with the lock held) ------------------------------
    def _vm(self, vm: str, label: str = "") -> _Vm:
        state = self._vms.get(vm)
        if state is None:
            state = _Vm(vm, label or vm or "run", Spinner("dots"))
            self._vms[vm] = state
            if len([name for name in self._vms if name]) > 1:
                self._label_vms = True
        elif label:
            state.label = label
        return state

    def _prefix(self, state: _Vm) -> str:
        return "[{}] ".format(visible(state.label)) if self._label_vms and state.vm else ""

    def _print(self, *lines: Text) -> None:
        # One print call per event: lines from two threads never interleave.
        # soft_wrap: rich inserts no line breaks, so a path or a command is never split.
        # Publish first: printing redraws the live view, which must show the new state.
        self._publish()
        self.err.print(Text("\n").join(lines), soft_wrap=True)

    def _flush_raw(self, state: _Vm) -> None:
        if state.raw_partial:
            partial, state.raw_partial = state.raw_partial, ""
            if self.verbose:
                self._print(Text(self._prefix(state) + visible(partial.rstrip("\r"))))

    def _start_live(self) -> None:
        if self.live_mode and self._live is None and not self._closed:
            self._live = Live(console=self.err, get_renderable=self._render_live, transient=True,
                              auto_refresh=True, refresh_per_second=self._refresh_per_second,
                              redirect_stdout=False, redirect_stderr=False)
            self._live.start()

    def _stop_live(self) -> None:
        if self._live is not None:
            live, self._live = self._live, None
            live.stop()
        self.live_mode = False

    def _publish(self) -> None:
        """Replace the rows the live view draws. Lock order is reporter, then rich (an event
        prints while holding our lock); the refresh thread holds rich's lock while it draws,
        so it reads this immutable snapshot and never takes ours."""
        self._rows = tuple(
            _Row(s.label if self._label_vms else "", s.spinner, s.stage, s.started, s.deadline,
                 s.waiting, s.last, (s.counts["pass"], s.counts["fail"], s.counts["skip"]), tuple(s.running),
                 s.test_started, s.test_deadline)
            for s in self._vms.values() if s.stage or s.waiting or (s.vm and self._label_vms))

    def live_rows(self) -> List[str]:
        """The live view's rows as plain text, as the next refresh would draw them."""
        return [text.plain for _, text in self._row_texts(self._rows)]

    def _row_texts(self, rows: Sequence[_Row]) -> List[Tuple[_Row, Text]]:
        now = self._clock()
        out = []
        for row in rows:
            text = Text()
            if row.label:
                text.append(visible(row.label) + "  ", style="bold")
            if row.stage:
                clock = format_clock(now - row.started)
                if row.deadline:
                    clock += " / " + format_clock(row.deadline)
                text.append("{} {}".format(_title(row.stage), clock))
                if row.stage in TEST_STAGES:
                    passed, failed, skipped = row.counts
                    text.append("  passed {}".format(passed), style="green")
                    text.append("  failed {}".format(failed), style="red" if failed else "")
                    text.append("  skipped {}".format(skipped))
                    if row.running:
                        more = len(row.running) - RUNNING_SHOWN
                        names = ", ".join(row.running[:RUNNING_SHOWN]) + (" +{}".format(more) if more > 0 else "")
                        if row.test_deadline and len(row.running) == 1:
                            names += " {} / {}".format(format_clock(now - row.test_started),
                                                       format_clock(row.test_deadline))
                        text.append("  running: " + names, style="cyan")
            else:
                text.append(row.last or "not started", style="dim")
            if row.waiting:
                text.append("  waiting: " + visible(row.waiting), style="yellow")
            out.append((row, text))
        return out

    def _render_live(self):
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True)
        grid.add_column(no_wrap=True, overflow="ellipsis")
        for row, text in self._row_texts(self._rows):
            grid.add_row(row.spinner if row.stage else Text(" "), text)
        return Group(grid) if self._rows else Group()


def _title(stage: str) -> str:
    return STAGE_TITLES.get(stage, stage)


def _verdict_text(verdict: Verdict, summary: Optional[SummaryView], seconds: float) -> str:
    return verdict(summary, seconds) if callable(verdict) else str(verdict)
