"""Parse the ``go test -json`` stream coming back from the VM and report on it.

The e2e suite runs inside the guest as ``go test -json -tags=e2e,vm ./test/e2e/...``
and the host receives the remote process's output as arbitrary text chunks
(not line aligned, possibly with stderr and shell noise mixed in).  This module
turns that stream into live progress callbacks, a final :class:`Summary`, a
JUnit XML report, per-test duration history and ``-run`` regexes for reruns.

It is imported inside a macOS guest whose ``python3`` is 3.9, so it is plain
stdlib Python that runs on 3.9 (no ``match``, no ``X | Y`` at runtime).

Decisions worth knowing (details in each docstring):

* Counting: every count (:attr:`SuiteStream.counts`, :class:`Summary` totals,
  JUnit attributes) counts **top-level tests** only.  Subtests are tracked too,
  each with its own status, and appear nested under their parent in
  :attr:`TestResult.subtests`.
* Output: a test's :attr:`TestResult.output` is every line go attributed to the
  test *or any of its subtests*, in the order go printed them (so a failing
  parent shows why its subtest failed).
* Tests still running when their package ends (``go test -timeout`` panic) or
  when the stream ends (guest crash, lost connection) become ``"fail"`` with
  :attr:`TestResult.interrupted` set and a ``[vmtasks]`` note in their output.
* A failing package whose failure is not explained by a failing test (build
  error, ``TestMain`` exiting non-zero, package never finished) is a
  *package failure*: :attr:`Summary.package_failures` and a JUnit ``<error>``.
"""

from __future__ import annotations

import codecs
import datetime
import io
import json
import math
import os
import re
import tempfile
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

__all__ = [
    "Counts",
    "DurationStat",
    "DurationStore",
    "PackageResult",
    "Summary",
    "SuiteStream",
    "TestEvent",
    "TestResult",
    "failed_tests",
    "format_duration",
    "go_quote_meta",
    "rerun_regex",
    "write_junit",
]

PASS = "pass"
FAIL = "fail"
SKIP = "skip"
RUNNING = "running"

# "# example.com/pkg [example.com/pkg.test]": header of a compiler/vet error
# block that go (before 1.24) writes to stderr.
_BUILD_HEADER = re.compile(r"^# (\S+)(.*)$")
# "FAIL\texample.com/pkg [build failed]": go's verdict for a package that did
# not build.  Raw text before go 1.21, an "output" event since.
_PKG_BUILD_FAIL = re.compile(r"^FAIL\s+(\S+)\s+\[(build failed|setup failed)\]\s*$")
_TIME = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"([Zz]|[+-]\d{2}:?\d{2})?$"
)
# Framing lines go prints around a test's own output.
_FRAMING = re.compile(r"^\s*(=== (RUN|PAUSE|CONT|NAME)|--- (PASS|FAIL|SKIP|BENCH):)")


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """Format a duration for humans: ``"0.42s"``, ``"12.30s"``, ``"1m05s"``, ``"2h03m04s"``.

    Under a minute it shows hundredths of a second; from a minute on it rounds
    to whole seconds.  Negative, NaN or infinite input is shown as ``"0.00s"``.
    """
    try:
        s = float(seconds)
    except (TypeError, ValueError):
        s = 0.0
    if not math.isfinite(s) or s < 0:
        s = 0.0
    if round(s, 2) < 60:
        return "%.2fs" % s
    whole = int(round(s))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return "%dh%02dm%02ds" % (hours, minutes, secs)
    return "%dm%02ds" % (minutes, secs)


def _parse_time(value: Any) -> Optional[float]:
    """Parse go's RFC 3339 (nanosecond) timestamp to epoch seconds, or None.

    ``datetime.fromisoformat`` on 3.9 rejects both ``Z`` and nine fractional
    digits, hence the hand-rolled parser.
    """
    if not isinstance(value, str):
        return None
    m = _TIME.match(value.strip())
    if not m:
        return None
    year, month, day, hour, minute, sec = (int(g) for g in m.groups()[:6])
    frac = m.group(7) or ""
    zone = m.group(8)
    if not zone or zone in ("Z", "z"):
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
        base = datetime.datetime(year, month, day, hour, minute, sec, tzinfo=tz)
    except ValueError:
        return None
    return base.timestamp() + (float("0." + frac) if frac else 0.0)


def _as_seconds(value: Any) -> Optional[float]:
    """Return ``value`` as a finite, non-negative float, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    f = float(value)
    if not math.isfinite(f) or f < 0:
        return None
    return f


def _atomic_write(path: Union[str, "os.PathLike[str]"], data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and ``os.replace``.

    Readers see either the old file or the complete new one, never a partial
    write.  Missing parent directories are created.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------
# Result data
# --------------------------------------------------------------------------


@dataclass
class TestResult:
    """The outcome of one test or subtest.

    ``name`` is go's name (``TestA`` or ``TestA/sub_case``).  ``output`` holds
    the lines go attributed to this test and to its subtests, in print order,
    including go's own ``=== RUN`` / ``--- FAIL`` framing lines.  ``elapsed``
    is go's reported time in seconds (for interrupted tests: the time from its
    ``run`` event to the end, or 0.0 if the stream had no timestamps).
    ``interrupted`` is True when the test never reported a result and was
    marked failed by :class:`SuiteStream`.
    """

    __test__ = False  # not a pytest test class despite the name

    package: str
    name: str
    status: str
    elapsed: float = 0.0
    output: str = ""
    subtests: List["TestResult"] = field(default_factory=list)
    interrupted: bool = False

    @property
    def is_subtest(self) -> bool:
        """True for ``TestA/sub`` style names."""
        return "/" in self.name

    @property
    def key(self) -> str:
        """``package::name``, the key :class:`DurationStore` uses."""
        return DurationStore.key(self.package, self.name)

    def walk(self) -> Iterable["TestResult"]:
        """Yield this result, then its subtests depth-first (parent before children)."""
        yield self
        for sub in self.subtests:
            for r in sub.walk():
                yield r


@dataclass
class PackageResult:
    """A Go package seen in the stream.

    ``status`` is ``"pass"``, ``"fail"``, ``"skip"`` (no test files) or
    ``"running"`` (only before :meth:`SuiteStream.close`).  ``elapsed`` is go's
    package time, None if go never reported it.  ``output`` is the package-level
    output (lines not attributed to any test, such as ``PASS``/``FAIL`` lines,
    ``TestMain`` prints or a panic outside tests).
    """

    name: str
    status: str
    elapsed: Optional[float] = None
    output: str = ""
    build_failed: bool = False


@dataclass
class TestEvent:
    """A state change reported to ``SuiteStream(on_event=...)``.

    ``kind`` is ``"run"``, ``"pass"``, ``"fail"``, ``"skip"`` or
    ``"package-fail"``.  For test kinds ``test`` is the test name and
    ``subtest`` tells whether it is a subtest (UIs that only show top-level
    tests filter on it).  ``output`` is the test's output so far (empty for
    ``"run"``); for ``"package-fail"`` it is the package's failure text (build
    errors etc.) and ``test`` is ``""``.  ``result`` is a snapshot
    :class:`TestResult` (with its finished subtests) for ``"pass"``,
    ``"fail"`` and ``"skip"``, None for the other kinds.
    """

    __test__ = False

    kind: str
    package: str
    test: str = ""
    elapsed: float = 0.0
    output: str = ""
    subtest: bool = False
    interrupted: bool = False
    result: Optional[TestResult] = None


@dataclass
class Counts:
    """Live top-level test counts; ``running`` includes paused parallel tests."""

    passed: int = 0
    failed: int = 0
    skipped: int = 0
    running: int = 0

    @property
    def done(self) -> int:
        """Tests that finished (passed + failed + skipped)."""
        return self.passed + self.failed + self.skipped


@dataclass
class Summary:
    """Final outcome of a suite run (see :meth:`SuiteStream.summary`).

    ``results`` are the finished top-level tests in start order, each with its
    subtests nested.  ``failures`` are the failed top-level tests in the order
    they failed.  ``package_failures`` maps package -> failure text for
    packages that failed without a failing test (build errors, ``TestMain``
    failure, package that never finished).  ``elapsed`` is the suite's wall
    time taken from the events' timestamps (last minus first); if the stream
    had fewer than two timestamps it falls back to the sum of the packages'
    elapsed times.  ``raw_output`` holds the lines that were not JSON events.
    """

    results: List[TestResult] = field(default_factory=list)
    failures: List[TestResult] = field(default_factory=list)
    package_failures: Dict[str, str] = field(default_factory=dict)
    packages: Dict[str, PackageResult] = field(default_factory=dict)
    elapsed: float = 0.0
    raw_output: List[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Number of top-level tests that finished."""
        return len(self.results)

    @property
    def passed(self) -> int:
        return sum(1 for r in self.results if r.status == PASS)

    @property
    def failed(self) -> int:
        return sum(1 for r in self.results if r.status == FAIL)

    @property
    def skipped(self) -> int:
        return sum(1 for r in self.results if r.status == SKIP)

    @property
    def exit_ok(self) -> bool:
        """True when no test failed and no package failed.

        This judges the stream only: combine it with the remote command's exit
        status (an empty stream is "ok" here).
        """
        return not self.failures and not self.package_failures and self.failed == 0

    def slowest(self, n: int = 5) -> List[TestResult]:
        """The ``n`` slowest top-level tests, slowest first."""
        return sorted(self.results, key=lambda r: r.elapsed, reverse=True)[: max(n, 0)]

    def all_results(self) -> List[TestResult]:
        """Every finished test and subtest, flattened depth-first."""
        out: List[TestResult] = []
        for r in self.results:
            out.extend(r.walk())
        return out

    def headline(self) -> str:
        """One line such as ``"12 passed, 1 failed, 2 skipped in 1m05s"``."""
        text = "%d passed, %d failed" % (self.passed, self.failed)
        if self.skipped:
            text += ", %d skipped" % self.skipped
        if self.package_failures:
            text += ", %d package error%s" % (
                len(self.package_failures),
                "" if len(self.package_failures) == 1 else "s",
            )
        return text + " in " + format_duration(self.elapsed)


# --------------------------------------------------------------------------
# Stream parser
# --------------------------------------------------------------------------


class _Node:
    """Mutable per-test state while the stream is parsed."""

    __slots__ = (
        "package", "name", "parent", "children", "lines", "seq",
        "started", "status", "elapsed", "interrupted",
    )

    def __init__(self, package: str, name: str, parent: Optional["_Node"], seq: int, started: Optional[float]):
        self.package = package
        self.name = name
        self.parent = parent
        self.children: List[_Node] = []
        self.lines: List[str] = []
        self.seq = seq
        self.started = started
        self.status = RUNNING
        self.elapsed = 0.0
        self.interrupted = False

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
    """Mutable per-package state."""

    __slots__ = ("name", "status", "elapsed", "lines", "failed_tests", "failed_build", "build_failed", "failure")

    def __init__(self, name: str):
        self.name = name
        self.status = RUNNING
        self.elapsed: Optional[float] = None
        self.lines: List[str] = []
        self.failed_tests = 0
        self.failed_build = ""  # FailedBuild field (go >= 1.24)
        self.build_failed = False
        self.failure: Optional[str] = None


class SuiteStream:
    """Incremental parser for ``go test -json`` output received in arbitrary chunks.

    Feed it text (or bytes, decoded as UTF-8) with :meth:`feed` as it arrives
    and call :meth:`close` when the remote process ends.  Partial lines are
    buffered; ``\\r\\n`` line ends are accepted.  Lines that are not JSON events
    (build errors on stderr, remote shell noise) are kept in
    :attr:`raw_output` and never raise.

    Both go 1.19 (no ``start`` action, build errors as raw text followed by a
    raw ``FAIL\\tpkg [build failed]`` line) and newer go (``start``,
    ``build-output``/``build-fail`` events, ``FailedBuild``) are understood.
    Events from several packages may be interleaved.

    Counting: :attr:`counts`, :attr:`running` and the summary count
    **top-level tests only**; subtests are tracked with their own status and
    nested under their parent in the results.  ``on_event`` still fires for
    subtests (with ``TestEvent.subtest=True``).

    ``on_event(event)`` is called after the state has been updated for: a test
    started (``"run"``), passed, failed, skipped, and a package failure not
    attributable to a test (``"package-fail"``).  An exception raised by the
    callback is caught and appended to :attr:`callback_errors` (the first one
    also raises a ``RuntimeWarning``) so that a UI bug cannot lose the run's
    results.

    Tests still running when their package reports its result (the go test
    ``-timeout`` panic ends a package without reporting the running tests) or
    when :meth:`close` is called are marked ``"fail"`` with
    ``interrupted=True`` and a ``[vmtasks]`` note appended to their output.
    """

    def __init__(self, on_event: Optional[Callable[[TestEvent], Any]] = None):
        self._on_event = on_event
        self.callback_errors: List[BaseException] = []
        self._parts: List[str] = []
        self._decoder: Optional[codecs.IncrementalDecoder] = None
        self._closed = False
        self._seq = 0
        self._events = 0
        self._first_time: Optional[float] = None
        self._last_time: Optional[float] = None
        self._active: Dict[Tuple[str, str], _Node] = {}
        self._last: Dict[Tuple[str, str], _Node] = {}
        self._top: List[_Node] = []
        self._failures: List[_Node] = []
        self._packages: Dict[str, _Package] = {}
        self._package_failures: Dict[str, str] = {}
        self._build_output: Dict[str, List[str]] = {}
        self._raw_blocks: List[Tuple[str, bool, List[str]]] = []
        self._block: Optional[List[str]] = None
        self._raw: List[str] = []
        self._passed = 0
        self._failed = 0
        self._skipped = 0

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
            self._parts.append(chunk)
            return
        self._parts.append(chunk)
        data = "".join(self._parts)
        lines = data.split("\n")
        tail = lines.pop()
        self._parts = [tail] if tail else []
        for line in lines:
            self._line(line)

    def close(self, reason=None) -> None:
        """End of stream: parse a trailing partial line and fail whatever is unfinished.

        Running tests become interrupted failures; packages that never reported
        a result become failed (and a package failure if no test of theirs
        failed).  Calling it twice is harmless.
        """
        if self._closed:
            return
        if self._decoder is not None:
            rest = self._decoder.decode(b"", final=True)
            if rest:
                self._parts.append(rest)
        if self._parts:
            line = "".join(self._parts)
            self._parts = []
            self._line(line)
        self._block = None
        for pkg in list(self._packages.values()):
            if pkg.status == RUNNING:
                self._finish_package(pkg, FAIL, None, self._last_time, stream_ended=True)
        # Tests can only be active in a known package, but stay defensive.
        if self._active:
            self._interrupt(list(self._active.values()), self._last_time, "the output stream ended")
        self._closed = True

    # ---- live state ----------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def counts(self) -> Counts:
        """Top-level tests passed/failed/skipped so far, and running now."""
        running = sum(1 for n in self._active.values() if n.parent is None)
        return Counts(self._passed, self._failed, self._skipped, running)

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
        return len(self._raw)

    @property
    def raw_output(self) -> List[str]:
        """The non-JSON lines (without line ends), in arrival order."""
        return list(self._raw)

    @property
    def events(self) -> int:
        """How many JSON events were parsed."""
        return self._events

    @property
    def package_failures(self) -> Dict[str, str]:
        """Package -> failure text, for packages that failed without a failing test."""
        return dict(self._package_failures)

    # ---- summary -------------------------------------------------------

    def summary(self) -> Summary:
        """Build the :class:`Summary` of what has finished so far (call after :meth:`close`).

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
            p.name: PackageResult(p.name, p.status, p.elapsed, "".join(p.lines), p.build_failed)
            for p in self._packages.values()
        }
        if self._first_time is not None and self._last_time is not None and self._last_time > self._first_time:
            elapsed = self._last_time - self._first_time
        else:
            elapsed = sum(p.elapsed or 0.0 for p in self._packages.values())
        return Summary(
            results=results,
            failures=failures,
            package_failures=dict(self._package_failures),
            packages=packages,
            elapsed=elapsed,
            raw_output=list(self._raw),
        )

    def _result(self, node: _Node) -> TestResult:
        return TestResult(
            package=node.package,
            name=node.name,
            status=node.status,
            elapsed=node.elapsed,
            output="".join(node.lines),
            subtests=[self._result(c) for c in node.children if c.status != RUNNING],
            interrupted=node.interrupted,
        )

    # ---- line handling -------------------------------------------------

    def _line(self, line: str) -> None:
        if line.endswith("\r"):
            line = line[:-1]
        event = self._decode(line)
        if event is None:
            self._raw_line(line)
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
        self._raw.append(line)
        m = _BUILD_HEADER.match(line)
        if m:
            block = [line + "\n"]
            # A "[pkg.test]" suffix means the error is in that package's test
            # build; without it, the error is in a package others may import.
            self._raw_blocks.append((m.group(1), "[" in m.group(2), block))
            self._block = block
            return
        m = _PKG_BUILD_FAIL.match(line)
        if m:
            self._block = None
            pkg = self._package(m.group(1))
            if pkg.status == RUNNING:
                pkg.lines.append(line + "\n")
                pkg.build_failed = True
                self._finish_package(pkg, FAIL, None, self._last_time)
            return
        if self._block is not None and line.strip():
            self._block.append(line + "\n")
        else:
            self._block = None

    def _event(self, ev: Dict[str, Any]) -> None:
        self._events += 1
        action = ev["Action"]
        t = _parse_time(ev.get("Time"))
        if t is not None:
            if self._first_time is None or t < self._first_time:
                self._first_time = t
            if self._last_time is None or t > self._last_time:
                self._last_time = t
        output = ev.get("Output") or ""
        if action in ("build-output", "build-fail"):
            path = ev.get("ImportPath")
            if path and action == "build-output":
                self._build_output.setdefault(path, []).append(output)
            return
        pkg_name = ev.get("Package") or ""
        test = ev.get("Test") or ""
        if not test:
            if action in ("start", "output", PASS, FAIL, SKIP):
                self._package_event(self._package(pkg_name), action, ev, output, t)
            return
        pkg = self._package(pkg_name)
        if action == "run":
            self._start(pkg, test, t)
        elif action == "cont":
            if (pkg.name, test) not in self._active:
                self._start(pkg, test, t)
        elif action == "output":
            node = self._active.get((pkg.name, test)) or self._last.get((pkg.name, test))
            if node is None:
                pkg.lines.append(output)
            else:
                self._append(node, output)
        elif action in (PASS, FAIL, SKIP, "bench"):
            status = PASS if action == "bench" else action
            self._finish(pkg, test, status, _as_seconds(ev.get("Elapsed")), t)
        # "start" with a test, "pause", and actions added by later go
        # versions carry nothing we track.

    def _package_event(self, pkg: _Package, action: str, ev: Dict[str, Any], output: str, t: Optional[float]) -> None:
        if action == "output":
            pkg.lines.append(output)
        elif action in (PASS, FAIL, SKIP):
            failed_build = ev.get("FailedBuild")
            if failed_build:
                pkg.failed_build = failed_build
                pkg.build_failed = True
            self._finish_package(pkg, action, _as_seconds(ev.get("Elapsed")), t)

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
        # The parent's "run" was never seen (stream joined late): stand one in;
        # its own pass/fail event, if it comes, finishes it.
        return self._start(pkg, parts[0], t)

    def _append(self, node: _Node, text: str) -> None:
        n: Optional[_Node] = node
        while n is not None:
            n.lines.append(text)
            n = n.parent

    def _finish(self, pkg: _Package, name: str, status: str, elapsed: Optional[float], t: Optional[float]) -> None:
        key = (pkg.name, name)
        node = self._active.get(key)
        if node is None:
            node = self._start(pkg, name, t)
        del self._active[key]
        node.status = status
        if elapsed is None:
            elapsed = (t - node.started) if (t is not None and node.started is not None and t >= node.started) else 0.0
        node.elapsed = elapsed
        self._settle(node)

    def _settle(self, node: _Node) -> None:
        """Count a node that just finished and report it."""
        if node.parent is None:
            if node.status == PASS:
                self._passed += 1
            elif node.status == SKIP:
                self._skipped += 1
            else:
                self._failed += 1
                self._failures.append(node)
                self._packages[node.package].failed_tests += 1
        if self._on_event is None:
            return
        result = self._result(node)
        self._emit(
            TestEvent(
                node.status,
                node.package,
                node.name,
                elapsed=node.elapsed,
                output=result.output,
                subtest=node.parent is not None,
                interrupted=node.interrupted,
                result=result,
            )
        )

    def _interrupt(self, nodes: List[_Node], t: Optional[float], why: str, extra: str = "") -> None:
        """Mark still-running ``nodes`` as failed: subtests before parents, roots in start order."""
        nodes = sorted(nodes, key=lambda n: (n.root().seq, -n.depth(), n.seq))
        for node in nodes:
            self._active.pop((node.package, node.name), None)
            node.status = FAIL
            node.interrupted = True
            if t is not None and node.started is not None and t >= node.started:
                node.elapsed = t - node.started
            note = "[vmtasks] %s did not report a result before %s; marked as failed.\n" % (node.name, why)
            if node.lines and not node.lines[-1].endswith("\n"):
                note = "\n" + note
            # The package output goes once per tree: on the outermost
            # interrupted test (its parent, if any, is not being interrupted).
            top = node.parent is None or node.parent.status != RUNNING
            self._append(node, note + (extra if top else ""))
            self._settle(node)

    # ---- packages ------------------------------------------------------

    def _finish_package(
        self,
        pkg: _Package,
        status: str,
        elapsed: Optional[float],
        t: Optional[float],
        stream_ended: bool = False,
    ) -> None:
        if pkg.status != RUNNING:
            return
        running = [n for n in self._active.values() if n.package == pkg.name]
        if running:
            if stream_ended:
                why = "the output stream ended (guest crash, lost connection or killed go test?)"
                extra = ""
            else:
                why = "package %s ended (go test -timeout panic or crash?)" % pkg.name
                extra = "".join(pkg.lines)
                if extra:
                    extra = "[vmtasks] package output:\n" + extra
            self._interrupt(running, t, why, extra)
        pkg.status = FAIL if stream_ended else status
        pkg.elapsed = elapsed
        if pkg.status != FAIL:
            return
        build = self._build_text(pkg)
        if not (pkg.build_failed or pkg.failed_tests == 0):
            return
        text = build + "".join(pkg.lines)
        if stream_ended:
            text += "[vmtasks] package %s did not finish before the output stream ended.\n" % pkg.name
        pkg.failure = text
        self._package_failures[pkg.name] = text
        self._emit(TestEvent("package-fail", pkg.name, "", elapsed=elapsed or 0.0, output=text))

    def _build_text(self, pkg: _Package) -> str:
        """Compiler/vet output explaining a build failure of ``pkg`` ("" if none)."""
        if pkg.failed_build:
            return "".join(self._build_output.get(pkg.failed_build, []))
        if not pkg.build_failed:
            pkg.build_failed = any(_PKG_BUILD_FAIL.match(line.rstrip("\n")) for line in pkg.lines)
        if not pkg.build_failed:
            return ""
        # Go < 1.24 prints build errors as raw "# path" blocks.  Prefer blocks
        # about this package; else blocks about plain (non-test) packages,
        # which are likely dependencies that broke this one.
        own = [b for path, _, b in self._raw_blocks if path == pkg.name]
        chosen = own or [b for _, is_test, b in self._raw_blocks if not is_test]
        return "".join("".join(b) for b in chosen)

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


# --------------------------------------------------------------------------
# JUnit XML
# --------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")
_XML_FORBIDDEN = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(text: str) -> str:
    """Make ``text`` storable in XML 1.0.

    ANSI colour/terminal escape sequences are removed; any other character XML
    1.0 forbids (control characters, lone surrogates, U+FFFE/U+FFFF) is
    replaced by a visible ``\\xNN`` / ``\\uNNNN`` escape.
    """
    text = _ANSI.sub("", text)

    def esc(m: "re.Match[str]") -> str:
        c = ord(m.group(0))
        return "\\x%02x" % c if c < 0x100 else "\\u%04x" % c

    return _XML_FORBIDDEN.sub(esc, text)


def _skip_reason(output: str) -> str:
    """The last line a skipped test logged (its ``t.Skip`` message), else ``"Skipped"``."""
    for line in reversed(output.splitlines()):
        if line.strip() and not _FRAMING.match(line):
            return line.strip()
    return "Skipped"


def _secs(value: float) -> str:
    return "%.3f" % (value if math.isfinite(value) and value > 0 else 0.0)


def write_junit(
    summary: Summary,
    path: Union[str, "os.PathLike[str]"],
    suite_name: str = "vmtasks",
    include_subtests: bool = False,
) -> Dict[str, int]:
    """Write ``summary`` as JUnit XML (Jenkins/GitLab flavour) atomically to ``path``.

    Layout: ``<testsuites name=suite_name>`` holding one ``<testsuite>`` per Go
    package (first-seen order) with ``<testcase classname=package name=test>``.
    A failed test has ``<failure message="Failed">`` holding its output, a
    skipped one ``<skipped message=reason/>``; passed/skipped tests keep their
    output in ``<system-out>``; package-level output goes to the suite's
    ``<system-out>``.

    By default the testcases are the **top-level tests**, so ``tests``,
    ``failures`` and ``skipped`` equal the summary's counts (subtest output is
    inside the parent's output).  A package failure (build error, TestMain
    failure...) becomes one extra testcase named ``[build failed]`` or
    ``[package failed]`` holding an ``<error>``: it is counted in ``errors``
    and in ``tests`` (JUnit's ``tests`` includes errors), so
    ``tests == summary.total + len(summary.package_failures)``; this keeps
    build failures visible in CI UIs that only look at testcases.

    With ``include_subtests=True`` every subtest is a testcase too and all
    attributes count testcases (they then exceed the summary's top-level
    counts).  In every case the attributes equal the number of matching
    elements in the file.  Text is sanitized so the file always parses.
    Returns the root counts ``{"tests", "failures", "errors", "skipped"}``.
    """
    by_package: Dict[str, List[TestResult]] = {}
    for name in summary.packages:
        by_package[name] = []
    for name in summary.package_failures:
        by_package.setdefault(name, [])
    for r in summary.results:
        by_package.setdefault(r.package, []).append(r)

    root = ET.Element("testsuites")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for pkg_name, top in by_package.items():
        pkg = summary.packages.get(pkg_name)
        failure_text = summary.package_failures.get(pkg_name)
        if not top and failure_text is None:
            continue  # no tests here ([no test files], filtered out by -run)
        cases: List[TestResult] = []
        for r in top:
            cases.extend(r.walk() if include_subtests else [r])
        suite = ET.SubElement(root, "testsuite")
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        for r in cases:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=_xml_text(pkg_name),
                name=_xml_text(r.name),
                time=_secs(r.elapsed),
            )
            counts["tests"] += 1
            out = _xml_text(r.output)
            if r.status == FAIL:
                counts["failures"] += 1
                ET.SubElement(case, "failure", message="Failed").text = out
            else:
                if r.status == SKIP:
                    counts["skipped"] += 1
                    ET.SubElement(case, "skipped", message=_xml_text(_skip_reason(r.output)))
                if out:
                    ET.SubElement(case, "system-out").text = out
        if failure_text is not None:
            build = pkg.build_failed if pkg is not None else "[build failed]" in failure_text
            case = ET.SubElement(
                suite,
                "testcase",
                classname=_xml_text(pkg_name),
                name="[build failed]" if build else "[package failed]",
                time=_secs(pkg.elapsed or 0.0) if pkg is not None else "0.000",
            )
            counts["tests"] += 1
            counts["errors"] += 1
            ET.SubElement(
                case, "error", message="build failed" if build else "package failed"
            ).text = _xml_text(failure_text)
        if pkg is not None and pkg.elapsed is not None:
            suite_time = pkg.elapsed
        else:
            suite_time = sum(r.elapsed for r in top)
        suite.set("name", _xml_text(pkg_name))
        for k in ("tests", "failures", "errors", "skipped"):
            suite.set(k, str(counts[k]))
            totals[k] += counts[k]
        suite.set("time", _secs(suite_time))
        if pkg is not None and pkg.output:
            ET.SubElement(suite, "system-out").text = _xml_text(pkg.output)

    root.set("name", _xml_text(suite_name))
    for k in ("tests", "failures", "errors", "skipped"):
        root.set(k, str(totals[k]))
    root.set("time", _secs(summary.elapsed))
    tree = ET.ElementTree(root)
    if hasattr(ET, "indent"):
        ET.indent(tree, space="  ")
    buf = io.BytesIO()
    tree.write(buf, encoding="utf-8", xml_declaration=True)
    _atomic_write(path, buf.getvalue() + b"\n")
    return totals


# --------------------------------------------------------------------------
# Durations across runs, reruns
# --------------------------------------------------------------------------


@dataclass
class DurationStat:
    """Duration history of one test: moving average, last value and observation count."""

    ema: float
    last: float
    count: int


class DurationStore:
    """Per-test durations accumulated across runs, kept in one JSON file.

    Keys are ``package::TestName`` (top-level tests only).  Each entry keeps an
    exponential moving average (``alpha`` weight for the newest run; the first
    observation sets it), the last duration and the number of observations.
    Only passed and genuinely failed tests are recorded: skipped tests (near
    zero, not representative) and interrupted ones (duration unknown) are not.

    The file also keeps ``last_failed``: the top-level failing test names of the
    last :class:`Summary` given to :meth:`record`, for ``--rerun-failed``.

    File format::

        {"version": 1, "alpha": 0.3,
         "tests": {"example.com/e2e::TestBoot": {"ema": 12.5, "last": 11.9, "count": 4}},
         "last_failed": ["TestBoot"]}
    """

    VERSION = 1

    def __init__(self, path: Optional[Union[str, "os.PathLike[str]"]] = None, alpha: float = 0.3):
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.path = os.fspath(path) if path is not None else None
        self.alpha = alpha
        self.tests: Dict[str, DurationStat] = {}
        self.last_failed: List[str] = []

    @staticmethod
    def key(package: str, name: str) -> str:
        """The store key for a test: ``package::name``."""
        return "%s::%s" % (package, name)

    @classmethod
    def load(cls, path: Union[str, "os.PathLike[str]"], alpha: float = 0.3) -> "DurationStore":
        """Load the store at ``path``; a missing, unreadable or corrupt file gives an empty store.

        Individually malformed entries are dropped, the rest kept.
        """
        store = cls(path, alpha)
        try:
            with open(os.fspath(path), "r", encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            return store
        if not isinstance(data, dict):
            return store
        tests = data.get("tests")
        if isinstance(tests, dict):
            for key, entry in tests.items():
                if not isinstance(key, str) or not isinstance(entry, dict):
                    continue
                ema = _as_seconds(entry.get("ema"))
                last = _as_seconds(entry.get("last"))
                count = entry.get("count")
                if ema is None or isinstance(count, bool) or not isinstance(count, int) or count < 1:
                    continue
                store.tests[key] = DurationStat(ema, ema if last is None else last, count)
        failed = data.get("last_failed")
        if isinstance(failed, list):
            store.last_failed = [n for n in failed if isinstance(n, str) and n]
        return store

    def record(self, results: Union[Summary, Iterable[TestResult]]) -> int:
        """Add one run's durations; returns how many tests were recorded.

        Accepts a :class:`Summary` (then ``last_failed`` is also replaced by
        :func:`failed_tests` of it) or an iterable of top-level
        :class:`TestResult` (subtests in it are ignored).
        """
        if isinstance(results, Summary):
            self.last_failed = failed_tests(results)
            items: Iterable[TestResult] = results.results
        else:
            items = results
        recorded = 0
        for r in items:
            if r.is_subtest or r.interrupted or r.status not in (PASS, FAIL):
                continue
            value = _as_seconds(r.elapsed)
            if value is None:
                continue
            key = self.key(r.package, r.name)
            stat = self.tests.get(key)
            if stat is None:
                self.tests[key] = DurationStat(value, value, 1)
            else:
                stat.ema = self.alpha * value + (1 - self.alpha) * stat.ema
                stat.last = value
                stat.count += 1
            recorded += 1
        return recorded

    def get(self, name: str, default: Optional[float] = None) -> Optional[float]:
        """Expected duration (the moving average) of a test, or ``default``.

        ``name`` is a ``package::TestName`` key, or a bare ``TestName``: then
        the sum over every package that has a test of that name is returned,
        which is what ``go test -run '^TestName$' ./...`` costs.
        """
        stat = self.tests.get(name)
        if stat is not None:
            return stat.ema
        if "::" in name:
            return default
        suffix = "::" + name
        found = [s.ema for k, s in self.tests.items() if k.endswith(suffix)]
        return sum(found) if found else default

    def count(self, name: str) -> int:
        """How many runs were recorded for the ``package::TestName`` key."""
        stat = self.tests.get(name)
        return stat.count if stat is not None else 0

    def __len__(self) -> int:
        return len(self.tests)

    def __contains__(self, name: object) -> bool:
        return name in self.tests

    def save(self, path: Optional[Union[str, "os.PathLike[str]"]] = None) -> None:
        """Write the store atomically to ``path`` (default: the path it was loaded from)."""
        target = os.fspath(path) if path is not None else self.path
        if target is None:
            raise ValueError("DurationStore.save() needs a path")
        data = {
            "version": self.VERSION,
            "alpha": self.alpha,
            "tests": {
                k: {"ema": round(s.ema, 6), "last": round(s.last, 6), "count": s.count}
                for k, s in sorted(self.tests.items())
            },
            "last_failed": list(self.last_failed),
        }
        _atomic_write(target, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8"))
        self.path = target


def failed_tests(summary: Summary) -> List[str]:
    """Names of the failed top-level tests, in failure order, without duplicates.

    Package failures (build errors) have no test name and are not included:
    check ``summary.package_failures`` before deciding that nothing failed.
    """
    seen = set()
    names = []
    for r in summary.failures:
        if r.status == FAIL and r.name not in seen:
            seen.add(r.name)
            names.append(r.name)
    return names


_GO_META = frozenset("\\.+*?()|[]{}^$")


def go_quote_meta(text: str) -> str:
    """Escape ``text`` for Go's RE2 syntax like Go's ``regexp.QuoteMeta``.

    Only ``\\.+*?()|[]{}^$`` are escaped; everything else (``-``, ``#``,
    spaces, non-ASCII letters...) stays literal.  The result means the same
    literal in Python's ``re``.
    """
    return "".join("\\" + c if c in _GO_META else c for c in text)


def rerun_regex(names: Iterable[str]) -> str:
    """A ``go test -run`` regex matching exactly these top-level test names.

    Returns ``^(TestA|TestB)$`` with each name escaped by :func:`go_quote_meta`
    (duplicates dropped, order kept).  Subtests of the selected tests still
    run.  The same names in other packages match too (``-run`` is per name).

    Raises ValueError for an empty list (an empty ``-run`` would run
    everything) and for names containing ``/``, which ``go test -run`` treats as
    a subtest level separator.
    """
    unique: List[str] = []
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError("rerun_regex: empty test name")
        if "/" in name:
            raise ValueError("rerun_regex: %r is not a top-level test name" % name)
        if name not in unique:
            unique.append(name)
    if not unique:
        raise ValueError("rerun_regex: no test names given")
    return "^(" + "|".join(go_quote_meta(n) for n in unique) + ")$"


# TEMPORARY shims until the results package lands.
def merge(parts):
    out = Summary()
    for vm, summary in parts:
        for r in summary.results:
            r.vm = vm
        out.results += summary.results
        out.failures += summary.failures
        out.package_failures.update(summary.package_failures)
        out.elapsed += summary.elapsed
    out.not_run = []
    return out


def mark_not_run(summary, expected):
    seen = {(r.package, r.name) for r in summary.results}
    summary.not_run = [e for e in expected if e not in seen]


def verdict_line(summary, seconds):
    return "DONE {} tests, {} skipped, {} failures in {:.1f}s".format(summary.total, summary.skipped, summary.failed, seconds)


class History(DurationStore):
    @classmethod
    def load(cls, path, alpha=0.3):
        try:
            return super().load(path, alpha)
        except Exception:
            return cls(path)

    def estimate(self, package, name):
        return self.get(self.key(package, name), 1.0) or 1.0

    def record(self, summary):
        return super().record(summary.results)
