"""Parse the ``go test -json`` stream from a guest as it arrives, in bounded memory.

The host receives the remote command's output as arbitrary text chunks (not line
aligned, stderr and shell noise mixed in). :class:`SuiteStream` turns them into live
:class:`TestEvent` callbacks, live :attr:`~SuiteStream.counts` and a final
:class:`~.model.Summary`.

What counts, and what a guest can forge
---------------------------------------
Only go's own JSON events decide results. The *content* of a test's output (its
``Output`` strings) is never interpreted: a test that prints ``FAIL\\tpkg [build failed]``,
``--- FAIL: TestX`` or a whole JSON event line only adds text to its own output.

The one place text decides something is go's package verdict for a package whose test
binary never ran (a build or setup failure): before go 1.24 that verdict is a line,
``FAIL\\tpkg [build failed]``, not a field. It is believed only where a test cannot have
written it: as the *last* package-level line before the package's ``fail`` event, in a
run of the package that reported no test; or as a raw (non-JSON) line for a package whose
binary sent nothing, neither a test event nor output. (go 1.19 and 1.20 print that raw
line on their own stdout, while a test's stdout and stderr both go through test2json and
reach us as JSON.) go prints its
own ``FAIL\\tpkg\\t0.01s`` after everything a test binary wrote, so a forged verdict from
``TestMain`` or a leaked goroutine is never last. go 1.24's ``FailedBuild`` field is
trusted as is. (The old parser searched every package-level line for the pattern, so a
``TestMain`` print turned a failing package into a spurious build error.)

What test2json itself can be fooled by: it builds the events from the test binary's
text output. Without framing (go before 1.20) a test printing a line that starts with
``=== RUN``, ``--- FAIL:``, ``--- PASS:`` (or indented ones) at the start of a line makes
test2json emit a real ``run``/``fail``/``pass`` event for whatever test it names, and
``FAIL``/``PASS`` alone ends the package early. Nothing after test2json can tell those
events from real ones. From go 1.20 ``go test -json`` runs the binary with
``-test.v=test2json``: the testing package prefixes its own framing lines with a ^V
(0x16) byte, and test2json only treats ^V-prefixed lines as framing, so a test's prints
stay output. Run the suite with go 1.20 or later (or pass ``-test.v=test2json`` when
piping a prebuilt test binary through ``go tool test2json``), and this stream inherits
that protection.

Where go cannot (a guest with go 1.19), ``SuiteStream(expected=...)`` limits the damage to
the test that printed: given the tests the suite lists (its own ``-test.list``; for one
queued test, that test alone), an event for any other test, or a result for a listed test
that is not running, is kept as output of the test running at the time (with a
``[vmtasks]`` note) and never counted. What it cannot undo: a test that forges its *own*
result before its real one (the first one counts; the run's exit code still says whether
the binary failed, and the caller makes the two agree).

Bounded memory
--------------
The stream keeps no list of every line or chunk. Per test and per package it keeps the
last :data:`TAIL_LINES` lines / :data:`TAIL_CHARS` characters of output (an earlier-lines
note says how many were dropped; a test that passed or skipped keeps only
:data:`PASSED_LINES` / :data:`PASSED_CHARS`), at most :data:`LINE_CHARS` of any one line, and a
partial line longer than :data:`MAX_LINE` is cut. Raw (non-JSON) lines: the last
:data:`TAIL_LINES` and a count. What grows with the run is one small record per test;
what the guest prints does not. The caller writes the full stream to the run record.

Imported inside the guest (Python 3.9, standard library only).
"""

from __future__ import annotations

import codecs
import datetime
import json
import math
import re
import time
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Tuple, Union

from .model import FAIL, INTERRUPTED, PASS, RUNNING, SKIP, Counts, PackageError, PackageResult, Summary, TestResult

TAIL_LINES = 200
TAIL_CHARS = 64 * 1024
PASSED_LINES = 40  # what a test that passed or skipped keeps: its last words are enough
PASSED_CHARS = 8 * 1024
LINE_CHARS = 8 * 1024
MAX_LINE = 1024 * 1024
RAW_BLOCKS = 32  # "# pkg" compiler-error blocks kept for go < 1.24 build failures

# "# example.com/pkg [example.com/pkg.test]": header of a compiler/vet error block that go
# (before 1.24) writes to stderr.
_BUILD_HEADER = re.compile(r"^# (\S+)(.*)$")
# "FAIL\texample.com/pkg [build failed]": go's verdict for a package whose binary never ran.
_PKG_BUILD_FAIL = re.compile(r"^FAIL\s+(\S+)\s+\[(build failed|setup failed)\]\s*$")
_TIME = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"([Zz]|[+-]\d{2}:?\d{2})?$"
)


_MINUTES: Dict[Tuple[str, ...], Optional[float]] = {}


def parse_time(value: Any) -> Optional[float]:
    """Parse go's RFC 3339 (nanosecond) timestamp to epoch seconds, or None.

    ``datetime.fromisoformat`` on 3.9 rejects both ``Z`` and nine fractional digits,
    hence the hand-rolled parser. The epoch of each minute is cached: every event has a
    timestamp, and building a datetime per event was the parser's largest cost.
    """
    if not isinstance(value, str):
        return None
    m = _TIME.match(value.strip())
    if not m:
        return None
    groups = m.groups()
    minute = groups[:5] + (groups[7] or "Z",)
    base = _MINUTES.get(minute, -1.0)
    if base == -1.0:
        base = _minute_epoch(minute)
        if len(_MINUTES) > 4096:
            _MINUTES.clear()
        _MINUTES[minute] = base
    sec = int(groups[5])
    if base is None or sec > 59:
        return None
    frac = groups[6]
    return base + sec + (float("0." + frac) if frac else 0.0)


def _minute_epoch(minute: Tuple[str, ...]) -> Optional[float]:
    year, month, day, hour, mins = (int(g) for g in minute[:5])
    zone = minute[5]
    if zone in ("Z", "z"):
        tz = datetime.timezone.utc
    else:
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        offset = datetime.timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
        try:
            tz = datetime.timezone(sign * offset)
        except ValueError:
            return None
    try:
        return datetime.datetime(year, month, day, hour, mins, tzinfo=tz).timestamp()
    except ValueError:
        return None


def _as_seconds(value: Any) -> Optional[float]:
    """Return ``value`` as a finite, non-negative float, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    f = float(value)
    if not math.isfinite(f) or f < 0:
        return None
    return f


def _cut(text: str, limit: int = LINE_CHARS) -> str:
    if len(text) <= limit:
        return text
    end = "\n" if text.endswith("\n") else ""
    return "%s... [vmtasks: %d characters of this line not kept]%s" % (text[:limit], len(text) - limit, end)


class _Tail:
    """The last lines of some output, bounded in lines and characters."""

    __slots__ = ("parts", "chars", "dropped", "max_lines", "max_chars")

    def __init__(self) -> None:
        self.parts: Deque[str] = deque()
        self.chars = 0
        self.dropped = 0
        self.max_lines = TAIL_LINES
        self.max_chars = TAIL_CHARS

    def add(self, text: str) -> None:
        text = _cut(text)
        self.parts.append(text)
        self.chars += len(text)
        self._trim()

    def shrink(self, max_lines: int, max_chars: int) -> None:
        """Keep less from now on (a test that passed needs less than one that failed)."""
        self.max_lines, self.max_chars = max_lines, max_chars
        self._trim()

    def _trim(self) -> None:
        while len(self.parts) > self.max_lines or (self.chars > self.max_chars and len(self.parts) > 1):
            self.chars -= len(self.parts.popleft())
            self.dropped += 1

    def text(self) -> str:
        body = "".join(self.parts)
        if self.dropped:
            note = "[vmtasks] %d earlier output lines not kept here (the run record has them all)\n" % self.dropped
            return note + body
        return body

    def last(self) -> str:
        return self.parts[-1] if self.parts else ""


@dataclass
class TestEvent:
    """A state change reported to ``SuiteStream(on_event=...)``.

    ``kind`` is ``"run"``, ``"pass"``, ``"fail"``, ``"skip"``, ``"interrupted"`` or
    ``"package-fail"``. For test kinds ``test`` is the test name and ``subtest`` tells
    whether it is a subtest (UIs that only show top-level tests filter on it). ``output``
    is the test's output so far (empty for ``"run"``); for ``"package-fail"`` it is the
    package's failure text (build errors etc.) and ``test`` is ``""``. ``result`` is a
    snapshot :class:`TestResult` for finished tests, None for the other kinds.
    ``unreported``: go never reported this result; vmtasks decided it.
    """

    __test__ = False

    kind: str
    package: str
    test: str = ""
    elapsed: float = 0.0
    output: str = ""
    subtest: bool = False
    unreported: bool = False
    result: Optional[TestResult] = None


class _Node:
    """Mutable per-test state while the stream is parsed."""

    __slots__ = ("package", "name", "parent", "children", "tail", "seq", "started", "host_started", "status",
                 "elapsed", "unreported")

    def __init__(self, package: str, name: str, parent: Optional["_Node"], seq: int,
                 started: Optional[float]) -> None:
        self.package = package
        self.name = name
        self.parent = parent
        self.children: List[_Node] = []
        self.tail = _Tail()
        self.seq = seq
        self.started = started
        self.host_started = time.monotonic()  # a silent test's time still runs on the host
        self.status = RUNNING
        self.elapsed = 0.0
        self.unreported = False

    def root(self) -> "_Node":
        n = self
        while n.parent is not None:
            n = n.parent
        return n

    def depth(self) -> int:
        d, n = 0, self
        while n.parent is not None:
            d, n = d + 1, n.parent
        return d


class _Package:
    """Mutable per-package state (one run of its test binary at a time)."""

    __slots__ = ("name", "status", "elapsed", "tail", "run_tail", "failed_tests", "failed_build",
                 "build_failed", "ran", "tests")

    def __init__(self, name: str) -> None:
        self.name = name
        self.status = RUNNING
        self.elapsed: Optional[float] = None
        self.tail = _Tail()  # package-level output of every run
        self.run_tail = _Tail()  # ... of this run: what explains its failure
        self.failed_tests = 0
        self.failed_build = ""  # go >= 1.24: the FailedBuild field
        self.build_failed = False
        self.ran = False  # its test binary ran: a test event or package output arrived
        self.tests = 0  # test events in this run of the package

    def add(self, output: str) -> None:
        self.tail.add(output)
        self.run_tail.add(output)

    def reopen(self) -> None:
        """Another run of the same package in this stream (one test binary run per test)."""
        self.status = RUNNING
        self.run_tail = _Tail()
        self.failed_tests = 0
        self.failed_build = ""
        self.build_failed = False
        self.ran = False
        self.tests = 0


class SuiteStream:
    """Incremental parser for ``go test -json`` output received in arbitrary chunks.

    Feed it text (or bytes, decoded as UTF-8) with :meth:`feed` as it arrives and call
    :meth:`close` when the remote process ends. Partial lines are buffered; ``\\r\\n`` line
    ends are accepted; lines that are not go events (build errors on stderr, shell noise)
    are counted in :attr:`raw_lines` (the last ones kept) and never raise.

    Both go 1.19 (no ``start`` action, build errors as raw text followed by a raw
    ``FAIL\\tpkg [build failed]`` line) and newer go (``start``, ``build-output``/
    ``build-fail`` events, ``FailedBuild``) are understood. Events from several packages
    may be interleaved, and a package may run more than once (one test binary run per
    test, as the VM queue does).

    ``on_event(event)`` is called after the state was updated: a test started, finished
    (``pass``/``fail``/``skip``/``interrupted``), and a package error (``package-fail``).
    An exception from the callback is caught into :attr:`callback_errors` (the first one
    also warns) so that a UI bug cannot lose the run's results.

    Tests still running when their package reports its result (the ``go test -timeout``
    panic) become ``fail`` with ``unreported`` set and a ``[vmtasks]`` note; tests still
    running at :meth:`close` get the status its ``reason`` says.
    """

    def __init__(self, on_event: Optional[Callable[[TestEvent], Any]] = None,
                 on_output: Optional[Callable[[str], Any]] = None,
                 expected: Optional[Iterable[Tuple[str, str]]] = None) -> None:
        self._on_event = on_event
        # ``expected``: the ``(package, name)`` top-level tests this stream may report (the
        # suite's own listing; for one queued test, that test alone). An event for any other
        # test, or for one of these that has not started, is something a test printed (go
        # before 1.20 cannot tell): it is kept as output of the test running, never counted.
        # None: every test go reports counts.
        self._expected = None if expected is None else {(p, n) for p, n in expected}
        self.forged = 0  # such events seen
        # ``on_output(text)``: each piece of the tests' own output, decoded from its event
        # (or a raw line go printed outside JSON), for --verbose. Parsed once, here.
        self._on_output = on_output
        self.callback_errors: List[BaseException] = []
        self._parts: List[str] = []
        self._held = 0
        self._overflow = 0  # characters of an over-long partial line thrown away
        self._decoder: Optional[codecs.IncrementalDecoder] = None
        self._closed = False
        self._seq = 0
        self._first_time: Optional[float] = None
        self._last_time: Optional[float] = None
        self._active: Dict[Tuple[str, str], _Node] = {}
        self._last: Dict[Tuple[str, str], _Node] = {}
        self._top: List[_Node] = []
        self._failures: List[_Node] = []
        self._packages: Dict[str, _Package] = {}
        self._errors: List[PackageError] = []
        self._build_output: Dict[str, _Tail] = {}
        self._raw_blocks: Deque[Tuple[str, bool, _Tail]] = deque(maxlen=RAW_BLOCKS)
        self._block: Optional[_Tail] = None
        self._raw: Deque[str] = deque(maxlen=TAIL_LINES)
        self._raw_count = 0
        self._counts = Counts()

    # ---- feeding -------------------------------------------------------

    def feed(self, chunk: Union[str, bytes]) -> None:
        """Consume the next chunk of output; complete lines are parsed immediately."""
        if self._closed:
            raise RuntimeError("SuiteStream.feed() after close()")
        if isinstance(chunk, (bytes, bytearray, memoryview)):
            if self._decoder is None:
                self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            chunk = self._decoder.decode(bytes(chunk))
        if not chunk:
            return
        if "\n" not in chunk:
            self._hold(chunk)
            return
        lines = chunk.split("\n")
        self._hold(lines[0])
        self._line(self._take())
        for i in range(1, len(lines) - 1):
            self._line(lines[i])
        self._hold(lines[-1])

    def _hold(self, text: str) -> None:
        """Keep the start of a line that has not ended yet (bounded)."""
        if not text:
            return
        if self._overflow:
            self._overflow += len(text)
            return
        self._parts.append(text)
        self._held += len(text)
        if self._held > MAX_LINE:
            joined = "".join(self._parts)
            self._parts = [joined[:LINE_CHARS]]
            self._overflow = len(joined) - LINE_CHARS
            self._held = LINE_CHARS

    def _take(self) -> str:
        line = "".join(self._parts)
        if self._overflow:
            line += "... [vmtasks: %d characters of this line not kept]" % self._overflow
        self._parts, self._held, self._overflow = [], 0, 0
        return line

    def close(self, reason: Optional[str] = None) -> None:
        """End of stream: parse a trailing partial line and settle whatever is unfinished.

        ``reason`` says why the stream ended: None (the remote command ended; tests still
        running become failed, "the output stream ended"), ``"interrupted"`` (the run was
        stopped on purpose, Ctrl-C: running tests become ``interrupted``, not failed, and
        unfinished packages are not errors), or any other text such as ``"VM lost"`` (the
        guest crashed or the connection was lost: running tests fail with that reason in
        their output). Calling it twice is harmless.
        """
        if self._closed:
            return
        if reason is not None and (not isinstance(reason, str) or not reason.strip()):
            raise ValueError("SuiteStream.close(reason): None, 'interrupted' or a non-empty reason")
        if self._decoder is not None:
            self._hold(self._decoder.decode(b"", final=True))
        if self._parts or self._overflow:
            self._line(self._take())
        self._block = None
        for pkg in list(self._packages.values()):
            if pkg.status == RUNNING:
                self._finish_package(pkg, FAIL, None, self._last_time, end=reason or "")
        if self._active:  # tests only run in known packages; stay defensive
            self._end_tests(list(self._active.values()), reason or "")
        self._closed = True

    # ---- live state ----------------------------------------------------

    @property
    def counts(self) -> Counts:
        """Top-level tests passed/failed/skipped/interrupted so far and running now,
        finished subtests, package errors."""
        c = self._counts
        running = sum(1 for n in self._active.values() if n.parent is None)
        return Counts(c.passed, c.failed, c.skipped, running, c.interrupted, 0, len(self._errors), c.subtests)

    @property
    def running(self) -> List[str]:
        """Names of the top-level tests running (or paused) now, in start order."""
        return [n.name for n in self._active.values() if n.parent is None]

    @property
    def running_tests(self) -> List[Tuple[str, str]]:
        """``(package, name)`` of every running test and subtest, in start order."""
        return [(n.package, n.name) for n in self._active.values()]

    @property
    def raw_lines(self) -> int:
        """How many non-JSON lines were seen."""
        return self._raw_count

    # ---- summary -------------------------------------------------------

    def summary(self) -> Summary:
        """The :class:`Summary` of what has finished so far (call after :meth:`close`).

        The returned objects are fresh copies; later feeding does not change them.
        """
        built: Dict[int, TestResult] = {}
        results = []
        for node in self._top:
            if node.status != RUNNING:
                r = self._result(node)
                built[id(node)] = r
                results.append(r)
        failures = [built[id(n)] if id(n) in built else self._result(n) for n in self._failures]
        packages = {
            p.name: PackageResult(p.name, p.status, p.elapsed, p.tail.text(), p.build_failed)
            for p in self._packages.values()
        }
        first, last = self._first_time, self._last_time
        if first is not None and last is not None and last > first:
            elapsed = last - first
        else:
            elapsed = sum(p.elapsed or 0.0 for p in self._packages.values())
        return Summary(results=results, failures=failures, package_errors=list(self._errors),
                       packages=packages, elapsed=elapsed, raw_output=list(self._raw),
                       raw_lines=self._raw_count, started=first, finished=last)

    def _result(self, node: _Node) -> TestResult:
        return TestResult(
            package=node.package,
            name=node.name,
            status=node.status,
            elapsed=node.elapsed,
            output=node.tail.text(),
            subtests=[self._result(c) for c in node.children if c.status != RUNNING],
            unreported=node.unreported,
            started=node.started,
        )

    # ---- line handling -------------------------------------------------

    def _line(self, line: str) -> None:
        if line.endswith("\r"):
            line = line[:-1]
        event = self._decode(line) if len(line) <= MAX_LINE else None
        if event is None:
            self._raw_line(_cut(line))
        else:
            self._block = None
            self._event(event)

    @staticmethod
    def _decode(line: str) -> Optional[Dict[str, Any]]:
        text = line.strip()
        if not text.startswith("{") or not text.endswith("}"):
            return None
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("Action"), str):
            return None
        for name in ("Package", "Test", "Output", "ImportPath", "FailedBuild"):
            if obj.get(name) is not None and not isinstance(obj[name], str):
                return None
        return obj

    def _raw_line(self, line: str) -> None:
        if self._on_output is not None:
            self._on_output(line + "\n")
        self._raw.append(line)
        self._raw_count += 1
        m = _BUILD_HEADER.match(line)
        if m:
            block = _Tail()
            block.add(line + "\n")
            # A "[pkg.test]" suffix means the error is in that package's test build;
            # without it, the error is in a package others may import.
            self._raw_blocks.append((m.group(1), "[" in m.group(2), block))
            self._block = block
            return
        m = _PKG_BUILD_FAIL.match(line)
        if m:
            self._block = None
            known = self._packages.get(m.group(1))
            # go prints this verdict on its own stdout only for a package whose binary
            # never ran; a package with test events or output had a binary (whose tests
            # could have written this), so the line is just noise there.
            if known is None or not known.ran:
                pkg = self._package(m.group(1))
                if pkg.status == RUNNING:
                    pkg.add(line + "\n")
                    pkg.build_failed = True
                    self._finish_package(pkg, FAIL, None, self._last_time)
            return
        if self._block is not None and line.strip():
            self._block.add(line + "\n")
        else:
            self._block = None

    def _event(self, ev: Dict[str, Any]) -> None:
        action = ev["Action"]
        t = parse_time(ev.get("Time"))
        if t is not None:
            if self._first_time is None or t < self._first_time:
                self._first_time = t
            if self._last_time is None or t > self._last_time:
                self._last_time = t
        output = ev.get("Output") or ""
        if output and action == "output" and self._on_output is not None:
            self._on_output(output)
        if action in ("build-output", "build-fail"):
            path = ev.get("ImportPath")
            if path and action == "build-output":
                self._build_output.setdefault(path, _Tail()).add(output)
            return
        pkg_name = ev.get("Package") or ""
        test = ev.get("Test") or ""
        pkg = self._package(pkg_name)
        if pkg.status != RUNNING:
            # go sends nothing for a package after its verdict: this is another run of
            # its test binary (the VM queue runs it once per test).
            pkg.reopen()
        if not test:
            if action == "output":
                pkg.ran = True
                pkg.add(output)
            elif action in (PASS, FAIL, SKIP):
                failed_build = ev.get("FailedBuild")
                if failed_build:
                    pkg.failed_build = failed_build
                    pkg.build_failed = True
                self._package_verdict(pkg, action, _as_seconds(ev.get("Elapsed")), t)
            return
        pkg.ran = True
        if self._expected is not None and not self._believable(pkg, test, action):
            self._forged(pkg, test, action, output)
            return
        if action in ("run", "cont", PASS, FAIL, SKIP, "bench"):
            pkg.tests += 1
        if action == "run":
            self._start(pkg, test, t)
        elif action == "cont":
            if (pkg.name, test) not in self._active:
                self._start(pkg, test, t)
        elif action == "output":
            node = self._active.get((pkg.name, test)) or self._last.get((pkg.name, test))
            if node is None:
                pkg.add(output)
            else:
                self._append(node, output)
        elif action in (PASS, FAIL, SKIP, "bench"):
            status = PASS if action == "bench" else action
            self._finish(pkg, test, status, _as_seconds(ev.get("Elapsed")), t)
        # "start" with a test, "pause", "attr" and actions added by later go versions
        # carry nothing we track.

    def _believable(self, pkg: _Package, test: str, action: str) -> bool:
        """Could go have sent this test event, given the tests the suite lists?"""
        if not self._listed(pkg, test):
            return False
        if "/" in test or (pkg.name, test) in self._active:
            return True
        if action in (PASS, FAIL, SKIP, "bench"):
            # go reports a result only for a test it started: a report for one that is not
            # running was printed by another test (before its real run, or after it ended).
            return False
        if action in ("run", "cont"):
            # A test that already finished starts again only in a new round (-count), when
            # no other test is running; otherwise another test printed its "=== RUN".
            done = self._last.get((pkg.name, test))
            busy = any(n.package == pkg.name and n.parent is None for n in self._active.values())
            return done is None or not busy
        return True

    def _forged(self, pkg: _Package, test: str, action: str, output: str) -> None:
        """A test event no test of the suite can have caused: keep its text as output of the
        test running now (test2json sends the printed line itself as an ``output`` event)."""
        running = [n for n in self._active.values() if n.package == pkg.name]
        node = max(running, key=lambda n: n.seq) if running else None
        if action == "output":
            if node is None:
                pkg.add(output)
            else:
                self._append(node, output)
            return
        self.forged += 1
        note = "[vmtasks] go reported %s %r, which %s: not counted (a test printed go's framing?)\n" % (
            action, test, "the suite does not list" if not self._listed(pkg, test) else "was not running")
        if node is None:
            pkg.add(note)
        else:
            self._append(node, note)

    def _listed(self, pkg: _Package, test: str) -> bool:
        root = test.split("/", 1)[0]
        return (pkg.name, root) in self._expected or ("", root) in self._expected  # type: ignore[operator]

    def _package_verdict(self, pkg: _Package, action: str, elapsed: Optional[float], t: Optional[float]) -> None:
        """The package's own pass/fail/skip event."""
        if action == FAIL and not pkg.build_failed and pkg.tests == 0:
            # go < 1.24 says "build failed" only in text: believe it only as the last
            # package line before go's verdict (see the module docstring).
            m = _PKG_BUILD_FAIL.match(pkg.run_tail.last().rstrip("\n"))
            if m and m.group(1) == pkg.name:
                pkg.build_failed = True
        self._finish_package(pkg, action, elapsed, t)

    # ---- tests ---------------------------------------------------------

    def _package(self, name: str) -> _Package:
        pkg = self._packages.get(name)
        if pkg is None:
            pkg = self._packages[name] = _Package(name)
        return pkg

    def _start(self, pkg: _Package, name: str, t: Optional[float]) -> _Node:
        key = (pkg.name, name)
        node = self._active.get(key)
        if node is not None:
            return node
        parent = self._find_parent(pkg, name, t) if "/" in name else None
        self._seq += 1
        node = _Node(pkg.name, name, parent, self._seq, t)
        self._active[key] = node
        self._last[key] = node
        if parent is None:
            self._top.append(node)
        else:
            parent.children.append(node)
        self._emit(TestEvent("run", pkg.name, name, subtest=parent is not None))
        return node

    def _find_parent(self, pkg: _Package, name: str, t: Optional[float]) -> _Node:
        parts = name.split("/")
        for i in range(len(parts) - 1, 0, -1):
            key = (pkg.name, "/".join(parts[:i]))
            node = self._active.get(key) or self._last.get(key)
            if node is not None:
                return node
        # The parent's "run" was never seen (stream joined late): stand one in; its own
        # pass/fail event, if it comes, finishes it.
        return self._start(pkg, parts[0], t)

    @staticmethod
    def _append(node: _Node, text: str) -> None:
        n: Optional[_Node] = node
        while n is not None:
            n.tail.add(text)
            n = n.parent

    def _finish(self, pkg: _Package, name: str, status: str, elapsed: Optional[float], t: Optional[float]) -> None:
        key = (pkg.name, name)
        node = self._active.get(key)
        if node is None:
            node = self._start(pkg, name, t)
        del self._active[key]
        node.status = status
        if elapsed is None:
            ok = t is not None and node.started is not None and t >= node.started
            elapsed = (t - node.started) if ok else 0.0  # type: ignore[operator]
        node.elapsed = elapsed
        self._settle(node)

    def _settle(self, node: _Node) -> None:
        """Count a node that just finished and report it."""
        if node.status in (PASS, SKIP):
            node.tail.shrink(PASSED_LINES, PASSED_CHARS)
        c = self._counts
        if node.parent is not None:
            c.subtests += 1
        elif node.status == PASS:
            c.passed += 1
        elif node.status == SKIP:
            c.skipped += 1
        elif node.status == INTERRUPTED:
            c.interrupted += 1
        else:
            c.failed += 1
            self._failures.append(node)
            self._packages[node.package].failed_tests += 1
        if self._on_event is None:
            return
        result = self._result(node)
        self._emit(TestEvent(node.status, node.package, node.name, elapsed=node.elapsed, output=result.output,
                             subtest=node.parent is not None, unreported=node.unreported, result=result))

    def _end_tests(self, nodes: List[_Node], end: str, extra: str = "", package_ended: str = "") -> None:
        """Settle still-running ``nodes``: subtests before parents, roots in start order.

        ``package_ended`` names a package whose result came while they ran (timeout
        panic); otherwise ``end`` is the close reason ("" clean end, "interrupted", other).
        """
        t = self._last_time
        nodes = sorted(nodes, key=lambda n: (n.root().seq, -n.depth(), n.seq))
        for node in nodes:
            self._active.pop((node.package, node.name), None)
            node.unreported = True
            if package_ended:
                node.status = FAIL
                note = "[vmtasks] %s did not report a result before package %s ended " \
                       "(go test -timeout panic or crash?); marked as failed.\n" % (node.name, package_ended)
            elif end == INTERRUPTED:
                node.status = INTERRUPTED
                note = "[vmtasks] %s was interrupted (the run was stopped) before it reported a result.\n" % node.name
            elif end:
                node.status = FAIL
                note = "[vmtasks] %s did not report a result: %s; marked as failed.\n" % (node.name, end)
            else:
                node.status = FAIL
                note = "[vmtasks] %s did not report a result before the output stream ended " \
                       "(guest crash, lost connection or killed go test?); marked as failed.\n" % node.name
            if t is not None and node.started is not None and t >= node.started:
                node.elapsed = t - node.started
            if not package_ended:
                # The stream stopped now (Ctrl-C, VM lost): the test ran until now, even if
                # it printed nothing since its start.
                node.elapsed = max(node.elapsed, time.monotonic() - node.host_started)
            if node.tail.parts and not node.tail.last().endswith("\n"):
                note = "\n" + note
            # The package output goes once per tree: on the outermost unfinished test.
            top = node.parent is None or node.parent.status != RUNNING
            self._append(node, note)
            if top and extra:
                self._append(node, extra)
            self._settle(node)

    # ---- packages ------------------------------------------------------

    def _finish_package(self, pkg: _Package, status: str, elapsed: Optional[float], t: Optional[float],
                        end: Optional[str] = None) -> None:
        """The package's result arrived (``end`` None) or the stream ended (``end`` = close reason)."""
        if pkg.status != RUNNING:
            return
        running = [n for n in self._active.values() if n.package == pkg.name]
        if running:
            if end is None:
                extra = pkg.run_tail.text()
                self._end_tests(running, "", "[vmtasks] package output:\n" + extra if extra else "",
                                package_ended=pkg.name)
            else:
                self._end_tests(running, end)
        if end == INTERRUPTED:
            pkg.status = INTERRUPTED
            return
        pkg.status = FAIL if end is not None else status
        if elapsed is not None:
            pkg.elapsed = (pkg.elapsed or 0.0) + elapsed
        if pkg.status != FAIL:
            return
        if not (pkg.build_failed or pkg.failed_tests == 0):
            return
        text = self._build_text(pkg) + pkg.run_tail.text()
        if end is not None:
            why = end or "the output stream ended"
            text += "[vmtasks] package %s did not finish: %s.\n" % (pkg.name, why)
        self._errors.append(PackageError(pkg.name, text, pkg.build_failed))
        self._emit(TestEvent("package-fail", pkg.name, "", elapsed=elapsed or 0.0, output=text))

    def _build_text(self, pkg: _Package) -> str:
        """Compiler/vet output explaining a build failure of ``pkg`` ("" if none)."""
        if pkg.failed_build:
            tail = self._build_output.get(pkg.failed_build)
            return tail.text() if tail is not None else ""
        if not pkg.build_failed:
            return ""
        # go < 1.24 prints build errors as raw "# path" blocks. Prefer blocks about this
        # package; else blocks about plain (non-test) packages, likely dependencies that
        # broke this one.
        own = [b for path, _, b in self._raw_blocks if path == pkg.name]
        chosen = own or [b for _, is_test, b in self._raw_blocks if not is_test]
        return "".join(b.text() for b in chosen)

    def _emit(self, event: TestEvent) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception as exc:  # a UI bug must not lose the results
            self.callback_errors.append(exc)
            if len(self.callback_errors) == 1:
                warnings.warn(
                    "SuiteStream on_event callback raised %r; further errors are only collected "
                    "in SuiteStream.callback_errors" % (exc,),
                    RuntimeWarning,
                    stacklevel=2,
                )
