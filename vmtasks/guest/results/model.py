"""The result model: what a suite run produced, whatever produced it.

One :class:`Summary` per ``go test -json`` stream (built by :class:`~.stream.SuiteStream`),
merged across VMs by :func:`merge`, completed with the tests that never ran by
:func:`mark_not_run`, rendered by :func:`verdict_line` (and by the JUnit writer and the
console). Nothing here parses, prints or writes files.

Statuses of a test: ``pass``, ``fail``, ``skip``; ``interrupted`` (it was running when the
run was stopped on purpose, Ctrl-C: neither passed nor failed, never rerun as a failure);
``notrun`` (the suite listed it, no stream ever reported it); ``flaky`` (it failed, then
passed when run again alone on a fresh VM: see :func:`with_retries`).

Counting follows gotestsum: the verdict line counts every test **and subtest** (a failing
subtest fails its parent too, so both count as failures); :attr:`Summary.total`,
``passed``/``failed``/``skipped`` count top-level tests, which is what the progress line
shows. Package errors (build failure, ``TestMain`` exiting non-zero, a package that never
finished) are *errors*, never folded into "failed".

Imported inside the guest (Python 3.9, standard library only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..gotest import TestId

PASS = "pass"
FAIL = "fail"
SKIP = "skip"
INTERRUPTED = "interrupted"
NOTRUN = "notrun"
RUNNING = "running"  # only while a stream is being parsed
FLAKY = "flaky"  # failed, then passed on a fresh VM (only after with_retries)

# Below this a test is not worth listing as "slow" (a fast passing run lists none).
SLOW_THRESHOLD = 0.5


def format_duration(seconds: float) -> str:
    """Format a duration for humans: ``"0.42s"``, ``"12.30s"``, ``"1m05s"``, ``"2h03m04s"``.

    Under a minute it shows hundredths of a second; from a minute on it rounds to whole
    seconds. Negative, NaN or infinite input is shown as ``"0.00s"``.
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


@dataclass
class TestResult:
    """The outcome of one test or subtest.

    ``name`` is go's name (``TestA`` or ``TestA/sub_case``). ``output`` is the tail of the
    lines go attributed to this test and its subtests, in print order, with go's own
    ``=== RUN`` / ``--- FAIL`` framing (bounded: see :mod:`.stream`; the run record keeps
    everything). ``elapsed`` is go's time in seconds. ``unreported`` is True when go never
    reported a result and vmtasks decided the status (stream ended, package timed out,
    Ctrl-C, VM lost). ``vm`` names the VM that ran it (set by :func:`merge`), ``started``
    is the wall clock (epoch seconds, from go's ``Time``) of its ``run`` event, or None.
    ``attachments``: the evidence of a failure copied into the run record (vmtasks/guest/evidence.py).
    """

    __test__ = False  # not a pytest test class despite the name

    package: str
    name: str
    status: str
    elapsed: float = 0.0
    output: str = ""
    subtests: List["TestResult"] = field(default_factory=list)
    unreported: bool = False
    vm: str = ""
    started: Optional[float] = None
    attachments: List[str] = field(default_factory=list)  # evidence files copied out of the VM (paths)
    attempts: List["TestResult"] = field(default_factory=list)  # every run of a retried test, in order
    ran_after: List[str] = field(default_factory=list)  # an attempt: the tests its VM ran before it

    @property
    def is_subtest(self) -> bool:
        """True for ``TestA/sub`` style names."""
        return "/" in self.name

    @property
    def key(self) -> TestId:
        """What identifies a test across runs and VMs (the queue's and the listing's too)."""
        return TestId(self.package, self.name)

    def walk(self) -> Iterable["TestResult"]:
        """Yield this result, then its subtests depth-first (parent before children)."""
        yield self
        for sub in self.subtests:
            for r in sub.walk():
                yield r


@dataclass
class PackageResult:
    """A Go package seen in the stream.

    ``status`` is ``pass``, ``fail``, ``skip`` (no test files), ``interrupted`` or
    ``running`` (only before the stream is closed). ``elapsed`` is go's package time, None
    if go never reported it. ``output`` is the tail of the package-level output (lines not
    attributed to a test: ``PASS``/``FAIL`` lines, ``TestMain`` prints).
    """

    name: str
    status: str
    elapsed: Optional[float] = None
    output: str = ""
    build_failed: bool = False


@dataclass
class PackageError:
    """A package that failed without a failing test to explain it: an *error*.

    A build or setup failure (``build_failed``), ``TestMain`` exiting non-zero, a panic
    outside any test, or a package that never finished. ``text`` is go's explanation
    (compiler output, the package's last lines). ``vm`` is set by :func:`merge`.
    """

    package: str
    text: str
    build_failed: bool = False
    vm: str = ""


@dataclass
class Counts:
    """Test counts, live (:attr:`SuiteStream.counts`) or final (:attr:`Summary.counts`).

    ``passed``/``failed``/``skipped``/``interrupted``/``notrun`` and ``running`` count
    top-level tests (``running`` includes paused parallel ones); ``subtests`` counts the
    subtests that finished; ``errors`` counts package errors.
    """

    passed: int = 0
    failed: int = 0
    skipped: int = 0
    running: int = 0
    interrupted: int = 0
    notrun: int = 0
    errors: int = 0
    subtests: int = 0
    flaky: int = 0


@dataclass
class Totals:
    """Tests and subtests together (the verdict line's numbers, as gotestsum counts)."""

    tests: int = 0
    skipped: int = 0
    failed: int = 0
    interrupted: int = 0
    flaky: int = 0


@dataclass
class Summary:
    """Final outcome of a suite run (one stream, or several merged).

    ``results`` are the top-level tests with a final status, in start order, subtests
    nested. ``failures`` are the failed top-level tests in the order they failed (never
    interrupted or not-run ones). ``package_errors`` are the packages that failed without
    a failing test. ``elapsed`` is wall time from the events' timestamps (``started`` to
    ``finished``, epoch seconds) or, without timestamps, the sum of the packages' times.
    ``raw_output`` is the tail of the lines that were not go events and ``raw_lines``
    how many there were. ``duplicates`` lists the ``(package, name)`` of top-level tests
    that more than one part of a :func:`merge` reported (each test should run once).
    """

    results: List[TestResult] = field(default_factory=list)
    failures: List[TestResult] = field(default_factory=list)
    package_errors: List[PackageError] = field(default_factory=list)
    packages: Dict[str, PackageResult] = field(default_factory=dict)
    elapsed: float = 0.0
    raw_output: List[str] = field(default_factory=list)
    raw_lines: int = 0
    started: Optional[float] = None
    finished: Optional[float] = None
    duplicates: List[Tuple[str, str]] = field(default_factory=list)

    @property
    def package_failures(self) -> Dict[str, str]:
        """Package -> failure text of its package errors (joined if it had several)."""
        out: Dict[str, str] = {}
        for e in self.package_errors:
            out[e.package] = out[e.package] + e.text if e.package in out else e.text
        return out

    def _count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def total(self) -> int:
        """Number of top-level tests with a final status (not-run ones included)."""
        return len(self.results)

    @property
    def passed(self) -> int:
        return self._count(PASS)

    @property
    def failed(self) -> int:
        return self._count(FAIL)

    @property
    def skipped(self) -> int:
        return self._count(SKIP)

    @property
    def flaky(self) -> List[TestResult]:
        """Top-level tests that failed, then passed on a fresh VM (see :func:`with_retries`)."""
        return [r for r in self.results if r.status == FLAKY]

    @property
    def interrupted(self) -> List[TestResult]:
        """Top-level tests stopped by an interruption (Ctrl-C): neither passed nor failed."""
        return [r for r in self.results if r.status == INTERRUPTED]

    @property
    def not_run(self) -> List[TestResult]:
        """Top-level tests the suite listed that no stream reported (see :func:`mark_not_run`)."""
        return [r for r in self.results if r.status == NOTRUN]

    @property
    def errors(self) -> int:
        """Number of package errors."""
        return len(self.package_errors)

    @property
    def counts(self) -> Counts:
        """The final :class:`Counts` (``running`` is always 0)."""
        subtests = sum(1 for r in self.results for s in r.walk() if s is not r)
        return Counts(self.passed, self.failed, self.skipped, 0, len(self.interrupted),
                      len(self.not_run), self.errors, subtests, len(self.flaky))

    @property
    def exit_ok(self) -> bool:
        """True when every test that ran passed or skipped, and nothing else went wrong.

        False for a failed test, a package error, an interrupted or not-run test, or a
        test reported twice; a flaky test is ok here (``--fail-on-flaky`` is the caller's).
        This judges the results only: combine it with the remote
        command's exit status (an empty stream is "ok" here).
        """
        return not (self.failures or self.package_errors or self.duplicates
                    or any(r.status in (FAIL, INTERRUPTED, NOTRUN) for r in self.results))

    def slowest(self, n: int = 5, threshold: float = SLOW_THRESHOLD) -> List[TestResult]:
        """The ``n`` slowest top-level tests that took at least ``threshold`` seconds, slowest first."""
        ran = [r for r in self.results if r.status != NOTRUN and r.elapsed >= threshold]
        return sorted(ran, key=lambda r: r.elapsed, reverse=True)[: max(n, 0)]

    @property
    def totals(self) -> "Totals":
        """gotestsum's totals: every test and subtest that ran (not-run ones are not)."""
        totals = Totals()
        for r in self.all_results():
            if r.status == NOTRUN:
                continue
            totals.tests += 1
            if r.status == SKIP:
                totals.skipped += 1
            elif r.status == FAIL:
                totals.failed += 1
            elif r.status == INTERRUPTED:
                totals.interrupted += 1
            elif r.status == FLAKY:
                totals.flaky += 1
        return totals

    def all_results(self) -> List[TestResult]:
        """Every test and subtest, flattened depth-first."""
        out: List[TestResult] = []
        for r in self.results:
            out.extend(r.walk())
        return out

    def headline(self) -> str:
        """One line such as ``"12 passed, 1 failed, 2 skipped in 1m05s"`` (top-level tests)."""
        text = "%d passed, %d failed" % (self.passed, self.failed)
        if self.skipped:
            text += ", %d skipped" % self.skipped
        if self.flaky:
            text += ", %d flaky" % len(self.flaky)
        if self.interrupted:
            text += ", %d interrupted" % len(self.interrupted)
        if self.not_run:
            text += ", %d not run" % len(self.not_run)
        if self.package_errors:
            text += ", " + _plural(len(self.package_errors), "package error")
        return text + " in " + format_duration(self.elapsed)


def _plural(n: int, word: str) -> str:
    return "%d %s%s" % (n, word, "" if n == 1 else "s")


def _verdict_seconds(seconds: float) -> str:
    s = float(seconds) if isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0 else 0.0
    return "%.1fs" % s if s < 59.95 else format_duration(s)


def verdict_line(summary: Summary, seconds: float, stopped_by: str = "") -> str:
    """The run's last line, in gotestsum's style.

    ``DONE 101 tests, 3 skipped, 1 flaky, 2 failures, 1 error in 12.3s``, with ``, 2 interrupted``
    and ``, 4 not run`` when non-zero, ``DONE 0 tests in 0.0s`` when nothing ran. Tests,
    skips and failures count subtests too (as gotestsum does); errors are package errors;
    ``seconds`` is the wall time to show (the caller's clock: suite or whole run).
    ``stopped_by`` names the signal that stopped the run: a run stopped when no test was
    running says ``, interrupted (SIGHUP)``, never a plain ``DONE 0 tests``.
    """
    totals = summary.totals
    tests, skipped, failures, interrupted = totals.tests, totals.skipped, totals.failed, totals.interrupted
    parts = ["DONE " + _plural(tests, "test")]
    if skipped:
        parts.append("%d skipped" % skipped)
    if totals.flaky:
        parts.append("%d flaky" % totals.flaky)
    if failures:
        parts.append(_plural(failures, "failure"))
    if summary.package_errors:
        parts.append(_plural(len(summary.package_errors), "error"))
    if interrupted:
        parts.append("%d interrupted" % interrupted)
    if summary.not_run:
        parts.append("%d not run" % len(summary.not_run))
    if stopped_by and not interrupted:
        parts.append("interrupted (%s)" % stopped_by)
    return ", ".join(parts) + " in " + _verdict_seconds(seconds)


def failed_tests(summary: Summary) -> List[str]:
    """Names of the failed top-level tests, in failure order, without duplicates.

    Only real failures: interrupted and not-run tests are not included (rerunning them as
    "failed" would be a lie), nor package errors, which have no test name: check
    ``summary.package_errors`` before deciding that nothing failed.
    """
    seen = set()
    names = []
    for r in summary.failures:
        if r.status == FAIL and r.name not in seen:
            seen.add(r.name)
            names.append(r.name)
    return names


def _with_vm(result: TestResult, vm: str) -> TestResult:
    return replace(result, vm=vm, subtests=[_with_vm(s, vm) for s in result.subtests])


def _merge_package(a: PackageResult, b: PackageResult) -> PackageResult:
    order = [RUNNING, FAIL, INTERRUPTED, PASS, SKIP]  # worst first
    status = a.status if order.index(a.status) <= order.index(b.status) else b.status
    if a.elapsed is None and b.elapsed is None:
        elapsed = None
    else:
        elapsed = (a.elapsed or 0.0) + (b.elapsed or 0.0)
    return PackageResult(a.name, status, elapsed, a.output + b.output, a.build_failed or b.build_failed)


def merge(parts: Sequence[Tuple[str, Summary]]) -> Summary:
    """One summary from several VMs' summaries: ``parts`` is a list of ``(vm_name, Summary)``.

    Every result (and package error) gets ``vm`` set to the VM that reported it; results
    are ordered by their ``started`` time (tests without one keep their order, after the
    others). Counts are the sums of the parts'. A top-level test that two parts report is
    listed in :attr:`Summary.duplicates` (and makes :attr:`Summary.exit_ok` false): the
    queue promises each test runs once.
    """
    results: List[TestResult] = []
    failures: List[TestResult] = []
    errors: List[PackageError] = []
    packages: Dict[str, PackageResult] = {}
    raw: List[str] = []
    raw_lines = 0
    reported_by: Dict[Tuple[str, str], str] = {}
    duplicates: List[Tuple[str, str]] = []
    starts: List[float] = []
    ends: List[float] = []
    for vm, part in parts:
        mapped = {}
        for r in part.results:
            tagged = _with_vm(r, vm)
            mapped[id(r)] = tagged
            results.append(tagged)
            if r.status == NOTRUN:
                continue
            first = reported_by.setdefault(r.key, vm)
            if first != vm and r.key not in duplicates:
                duplicates.append(r.key)
        failures.extend(mapped.get(id(r)) or _with_vm(r, vm) for r in part.failures)
        errors.extend(replace(e, vm=vm) for e in part.package_errors)
        for name, pkg in part.packages.items():
            packages[name] = _merge_package(packages[name], pkg) if name in packages else pkg
        raw.extend(part.raw_output)
        raw_lines += part.raw_lines
        for key in part.duplicates:
            if key not in duplicates:
                duplicates.append(key)
        if part.started is not None:
            starts.append(part.started)
        if part.finished is not None:
            ends.append(part.finished)
    timed = sorted((r for r in results if r.started is not None), key=lambda r: r.started)  # type: ignore
    results = timed + [r for r in results if r.started is None]
    if starts and ends and max(ends) > min(starts):
        elapsed = max(ends) - min(starts)
    else:
        elapsed = max((p.elapsed for _, p in parts), default=0.0)
    return Summary(results=results, failures=failures, package_errors=errors, packages=packages,
                   elapsed=elapsed, raw_output=raw, raw_lines=raw_lines,
                   started=min(starts) if starts else None, finished=max(ends) if ends else None,
                   duplicates=sorted(duplicates))


def explain_exit(summary: Summary, exit_code: int, command: str, package: str = "") -> Summary:
    """A copy of ``summary`` whose verdict agrees with ``exit_code``, the exit status of the
    ``command`` that produced it.

    A command that exited non-zero while its results show no failed test, no package error
    and no interrupted test failed somewhere the results cannot see (``TestMain`` exiting 1
    after the tests, ``go vet``, a crash between tests, a tool error): that becomes a package
    error of ``package`` that says so, with the last raw lines, so the verdict, the JUnit
    file and the exit code agree. An exit status of 0 (or a negative one: none) changes
    nothing here; a failed test with exit 0 is the caller's to judge (:attr:`exit_ok`).
    """
    if exit_code <= 0 or summary.failures or summary.package_errors or summary.interrupted or \
            any(r.status == FAIL for r in summary.results):
        return summary
    text = "[vmtasks] {} exited {} but reported no failed test: the failure is outside any test " \
           "(TestMain, a crash between tests, or go itself); see its output in the run record.\n".format(
               command, exit_code)
    if summary.raw_output:
        text += "[vmtasks] its last lines that were not test events:\n" + \
            "".join(line + "\n" for line in summary.raw_output[-10:])
    return replace(summary, package_errors=list(summary.package_errors) + [PackageError(package, text)])


def no_test_reason(summary: Summary, exit_code: int, limit: int = 300) -> str:
    """One line for a command that exited non-zero before any test event: its exit status and
    its last line that was not an event (go's own reason: a wrong module root, a package that
    does not build). "" when a test reported, or the exit was 0."""
    if exit_code <= 0 or summary.results:
        return ""
    last = next((line.strip() for line in reversed(summary.raw_output) if line.strip()), "")
    last = last.replace("\t", " ").replace("\r", " ")
    if len(last) > limit:
        last = last[: limit - 3] + "..."
    return "exited {} before any test{}".format(exit_code, ": " + last if last else " (no output)")


def mark_not_run(summary: Summary, expected: Iterable[Tuple[str, str]]) -> Summary:
    """A copy of ``summary`` where every expected top-level test nobody reported is ``notrun``.

    ``expected`` holds :class:`vmtasks.guest.gotest.TestId` (``(package, name)`` pairs),
    typically from ``go test -list``.
    An empty package matches the name in any package. Not-run tests are counted
    (:attr:`Counts.notrun`), listed (:attr:`Summary.not_run`), make the run not ok, are
    never rerun as failures, and appear in JUnit as ``<error message="not run">``.
    """
    reported = {r.key for r in summary.results}
    names = {r.name for r in summary.results}
    added: List[TestResult] = []
    seen = set()
    for item in expected:
        package, name = item
        if (package, name) in seen:
            continue
        seen.add((package, name))
        if (package, name) in reported or (not package and name in names):
            continue
        output = "[vmtasks] %s was listed by the suite but never reported: it did not run.\n" % name
        added.append(TestResult(package, name, NOTRUN, output=output, unreported=True))
    return replace(summary, results=list(summary.results) + added)


def attempt_failed(summary: Optional[Summary], key: Tuple[str, str]) -> bool:
    """True when ``summary`` (one attempt's, or the first pass's) has top-level test ``key`` failed."""
    return summary is not None and any(r.key == key and r.status == FAIL for r in summary.results)


def _ran_before(summary: Summary, first: TestResult) -> List[str]:
    """The top-level tests ``first``'s VM ran before it (by start time, else by order)."""
    same_vm = [r for r in summary.results if r.vm == first.vm and r.status != NOTRUN]
    if first.started is not None:
        return [r.name for r in same_vm if r.started is not None and r.started < first.started and r is not first]
    names = [r.name for r in same_vm]
    return names[:names.index(first.name)] if first.name in names else []


def _attempt(summary: Optional[Summary], key: Tuple[str, str], vm: str) -> TestResult:
    """One retry's result for ``key`` (a failure saying why when the retry did not report it)."""
    for r in (summary.results if summary is not None else []):
        if r.key == key:
            return _with_vm(r, vm)
    why = "".join(e.text for e in summary.package_errors) if summary is not None else ""
    return TestResult(key[0], key[1], FAIL, output="[vmtasks] the retry on {} did not report {}.\n{}".format(
        vm, key[1], why), unreported=True, vm=vm)


def with_retries(summary: Summary, retries: Dict[Tuple[str, str], List[Tuple[str, Optional[Summary]]]]) -> Summary:
    """A copy of ``summary`` where every retried test has its final verdict.

    ``retries`` maps a failed top-level test's ``(package, name)`` to its retries, in order,
    as ``(vm, summary of that retry)`` (None: the retry VM never ran it). The test becomes
    ``flaky`` when a retry passed (the passing run is its result), else stays ``fail`` with
    the last attempt's result. :attr:`TestResult.attempts` keeps every run (the first
    one's ``ran_after`` names the tests its VM ran before it); a flaky test leaves
    :attr:`Summary.failures`.
    """
    if not retries:
        return summary
    replaced: Dict[int, TestResult] = {}
    for r in summary.results:
        tries = retries.get(r.key)
        if r.status != FAIL or not tries:
            continue
        first = replace(r, ran_after=_ran_before(summary, r))
        attempts = [first] + [_attempt(s, r.key, vm) for vm, s in tries]
        passed = next((a for a in attempts[1:] if a.status == PASS), None)
        if passed is not None:
            final = replace(passed, status=FLAKY, attempts=attempts)
        else:
            last = next((a for a in reversed(attempts) if a.status == FAIL), first)
            final = replace(last, status=FAIL, attempts=attempts)
        replaced[id(r)] = final
    results = [replaced.get(id(r), r) for r in summary.results]
    failures = [replaced.get(id(r), r) for r in summary.failures if replaced.get(id(r), r).status != FLAKY]
    return replace(summary, results=results, failures=failures)


def retry_notes(summary: Summary, label=lambda vm: vm) -> List[str]:
    """One line per flaky test: where it failed and, when its VM had run other tests first,
    which ones (``passed alone; failed on vm2 after TestA, TestB: order-dependent?``); one
    per retried test that failed on every attempt, naming the VMs."""
    notes = []
    for r in summary.flaky:
        failed = [a for a in r.attempts if a.status == FAIL]
        first = failed[0] if failed else r
        where = label(first.vm) or "the VM"
        if first.ran_after:
            notes.append("flaky {}: passed alone; failed on {} after {}: order-dependent?".format(
                r.name, where, ", ".join(first.ran_after)))
        else:
            notes.append("flaky {}: failed on {}, passed on a fresh VM ({})".format(r.name, where, label(r.vm)))
    for r in summary.results:
        if r.status == FAIL and r.attempts:
            notes.append("failed {} on every attempt ({}): {}".format(
                r.name, len(r.attempts), ", ".join(label(a.vm) or "the VM" for a in r.attempts)))
    return notes


def attempts_data(summary: Summary) -> Dict[str, List[Dict[str, object]]]:
    """Every attempt of each retried test, for result.json: VM, start, seconds, result."""
    return {r.name: [{"vm": a.vm, "started": a.started, "seconds": round(a.elapsed or 0.0, 3), "result": a.status}
                     for a in r.attempts] for r in summary.results if r.attempts}
