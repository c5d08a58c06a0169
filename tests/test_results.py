"""Tests for vmtasks.guest.results: go test -json stream parsing, JUnit, reruns."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import asdict
from typing import List, Optional

import pytest

from vmtasks.guest.results import (
    PackageError,
    SuiteStream,
    Summary,
    TestEvent,
    TestResult,
    failed_tests,
    format_duration,
    go_quote_meta,
    mark_not_run,
    merge,
    rerun_regex,
    verdict_line,
    write_junit,
)

A = "example.com/e2e/a"
B = "example.com/e2e/b"
C = "example.com/e2e/c"


class Clock:
    """Hands out increasing go-style timestamps, 0.25 s apart."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        ms = self.n * 250
        return "2024-05-01T10:%02d:%02d.%03d123456+02:00" % (ms // 60000, (ms // 1000) % 60, ms % 1000)


def ev(clock: Optional[Clock], action: str, pkg: str, test: str = "", output: Optional[str] = None,
       elapsed: Optional[float] = None, **extra: object) -> str:
    """One go test -json line (fields in go's order)."""
    d: dict = {}
    if clock is not None:
        d["Time"] = clock()
    d["Action"] = action
    d["Package"] = pkg
    if test:
        d["Test"] = test
    if elapsed is not None:
        d["Elapsed"] = elapsed
    if output is not None:
        d["Output"] = output
    d.update(extra)
    return json.dumps(d, ensure_ascii=False) + "\n"


def run_test(clock: Clock, pkg: str, name: str, status: str, lines: List[str], elapsed: float = 0.5) -> str:
    """Events for one test that runs to completion."""
    out = ev(clock, "run", pkg, name) + ev(clock, "output", pkg, name, "=== RUN   %s\n" % name)
    for line in lines:
        out += ev(clock, "output", pkg, name, line + "\n")
    out += ev(clock, "output", pkg, name, "--- %s: %s (%.2fs)\n" % (status.upper(), name, elapsed))
    return out + ev(clock, status, pkg, name, elapsed=elapsed)


def mixed_stream() -> str:
    """A go 1.19 style stream: two packages interleaved, subtests, skip, parallel
    tests, a build failure on stderr and shell noise."""
    c = Clock()
    s = "Last login: Wed May  1 10:00:00 on ttys000\n"
    s += ev(c, "run", A, "TestBoot") + ev(c, "output", A, "TestBoot", "=== RUN   TestBoot\n")
    s += run_test(c, B, "TestNet", "pass", ["    net_test.go:9: dhcp ok"], 1.5)
    s += ev(c, "output", A, "TestBoot", "    boot_test.go:12: booted \u2713\n")
    s += ev(c, "run", A, "TestBoot/disk") + ev(c, "output", A, "TestBoot/disk", "=== RUN   TestBoot/disk\n")
    s += ev(c, "output", A, "TestBoot/disk", "    boot_test.go:20: disk missing\n")
    s += ev(c, "run", A, "TestBoot/disk/nvme") + \
        ev(c, "output", A, "TestBoot/disk/nvme", "=== RUN   TestBoot/disk/nvme\n")
    s += ev(c, "output", A, "TestBoot/disk/nvme", "    --- PASS: TestBoot/disk/nvme (0.10s)\n")
    s += ev(c, "pass", A, "TestBoot/disk/nvme", elapsed=0.1)
    s += ev(c, "output", A, "TestBoot/disk", "    --- FAIL: TestBoot/disk (0.20s)\n")
    s += ev(c, "fail", A, "TestBoot/disk", elapsed=0.2)
    s += ev(c, "run", A, "TestBoot/net") + ev(c, "output", A, "TestBoot/net", "=== RUN   TestBoot/net\n")
    s += ev(c, "output", A, "TestBoot/net", "    boot_test.go:30: no network in CI\n")
    s += ev(c, "output", A, "TestBoot/net", "    --- SKIP: TestBoot/net (0.00s)\n")
    s += ev(c, "skip", A, "TestBoot/net", elapsed=0)
    s += ev(c, "output", A, "TestBoot", "--- FAIL: TestBoot (2.00s)\n")
    s += ev(c, "fail", A, "TestBoot", elapsed=2.0)
    s += run_test(c, A, "TestSkipMe", "skip", ["    skip_test.go:5: needs a GPU"], 0)
    # two parallel tests
    for name in ("TestPar1", "TestPar2"):
        s += ev(c, "run", A, name) + ev(c, "output", A, name, "=== RUN   %s\n" % name)
        s += ev(c, "output", A, name, "=== PAUSE %s\n" % name) + ev(c, "pause", A, name)
    s += ev(c, "cont", A, "TestPar1") + ev(c, "output", A, "TestPar1", "=== CONT  TestPar1\n")
    s += ev(c, "cont", A, "TestPar2") + ev(c, "output", A, "TestPar2", "=== CONT  TestPar2\n")
    s += ev(c, "output", A, "TestPar2", "--- PASS: TestPar2 (3.00s)\n") + ev(c, "pass", A, "TestPar2", elapsed=3.0)
    s += ev(c, "output", A, "TestPar1", "--- FAIL: TestPar1 (4.00s)\n") + ev(c, "fail", A, "TestPar1", elapsed=4.0)
    s += ev(c, "output", B, "", "PASS\n") + ev(c, "output", B, "", "ok  \t%s\t1.600s\n" % B)
    s += ev(c, "pass", B, "", elapsed=1.6)
    s += ev(c, "output", A, "", "FAIL\n") + ev(c, "output", A, "", "FAIL\t%s\t7.000s\n" % A)
    s += ev(c, "fail", A, "", elapsed=7.0)
    # go 1.19: the compiler's complaint on stderr, go's verdict as raw text
    s += "# %s [%s.test]\n" % (C, C)
    s += "c/c_test.go:3:27: undefined: vm.Boot\n"
    s += "FAIL\t%s [build failed]\n" % C
    return s


def parse(data: str, chunks: Optional[List[int]] = None) -> tuple:
    events: List[TestEvent] = []
    stream = SuiteStream(events.append)
    if chunks is None:
        stream.feed(data)
    else:
        pos = 0
        for size in chunks:
            stream.feed(data[pos:pos + size])
            pos += size
        stream.feed(data[pos:])
    stream.close()
    return stream, stream.summary(), events


def snapshot(stream: SuiteStream, summary: Summary, events: List[TestEvent]) -> tuple:
    return (asdict(summary), [asdict(e) for e in events], asdict(stream.counts), stream.raw_lines)


# --------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------


def test_whole_stream_counts_and_results():
    stream, summary, events = parse(mixed_stream())
    # top-level tests only: TestNet, TestBoot, TestSkipMe, TestPar1, TestPar2
    assert (summary.total, summary.passed, summary.failed, summary.skipped) == (5, 2, 2, 1)
    c = stream.counts
    assert (c.passed, c.failed, c.skipped, c.running) == (2, 2, 1, 0)
    assert [r.name for r in summary.results] == ["TestBoot", "TestNet", "TestSkipMe", "TestPar1", "TestPar2"]
    assert [r.name for r in summary.failures] == ["TestBoot", "TestPar1"]
    assert summary.package_failures.keys() == {C}
    assert not summary.exit_ok
    by_name = {r.name: r for r in summary.results}
    assert by_name["TestNet"].package == B and by_name["TestNet"].elapsed == 1.5
    assert by_name["TestPar2"].status == "pass" and by_name["TestPar2"].elapsed == 3.0
    # shell noise and the build failure are kept as raw lines
    assert stream.raw_lines == 4
    assert summary.raw_output[0].startswith("Last login")
    assert summary.packages[A].status == "fail" and summary.packages[A].elapsed == 7.0
    assert summary.packages[B].status == "pass"
    assert summary.packages[C].build_failed


def test_subtests_nested_with_own_status():
    _, summary, events = parse(mixed_stream())
    boot = summary.results[0]
    assert boot.name == "TestBoot" and boot.status == "fail"
    assert [(s.name, s.status) for s in boot.subtests] == [("TestBoot/disk", "fail"), ("TestBoot/net", "skip")]
    disk = boot.subtests[0]
    assert [(s.name, s.status, s.elapsed) for s in disk.subtests] == [("TestBoot/disk/nvme", "pass", 0.1)]
    # a test's output includes its subtests' lines, in print order
    assert boot.output.splitlines() == [
        "=== RUN   TestBoot",
        "    boot_test.go:12: booted \u2713",
        "=== RUN   TestBoot/disk",
        "    boot_test.go:20: disk missing",
        "=== RUN   TestBoot/disk/nvme",
        "    --- PASS: TestBoot/disk/nvme (0.10s)",
        "    --- FAIL: TestBoot/disk (0.20s)",
        "=== RUN   TestBoot/net",
        "    boot_test.go:30: no network in CI",
        "    --- SKIP: TestBoot/net (0.00s)",
        "--- FAIL: TestBoot (2.00s)",
    ]
    assert "TestBoot/net" not in disk.output and "disk missing" in disk.output
    assert [r.name for r in summary.all_results()][:5] == [
        "TestBoot", "TestBoot/disk", "TestBoot/disk/nvme", "TestBoot/net", "TestNet"]
    # events fire for subtests too, flagged
    finished = [(e.kind, e.test, e.subtest) for e in events if e.kind != "run"]
    assert finished[:6] == [
        ("pass", "TestNet", False),
        ("pass", "TestBoot/disk/nvme", True),
        ("fail", "TestBoot/disk", True),
        ("skip", "TestBoot/net", True),
        ("fail", "TestBoot", False),
        ("skip", "TestSkipMe", False),
    ]
    fail_event = [e for e in events if e.kind == "fail" and e.test == "TestBoot"][0]
    assert "disk missing" in fail_event.output
    # terminal events carry a result snapshot; other kinds don't
    assert fail_event.result == boot
    assert all(e.result is None for e in events if e.kind in ("run", "package-fail"))
    assert [e.result.name for e in events if e.kind == "pass"][:2] == ["TestNet", "TestBoot/disk/nvme"]


def test_skip():
    _, summary, events = parse(mixed_stream())
    skip = [r for r in summary.results if r.name == "TestSkipMe"][0]
    assert skip.status == "skip" and "needs a GPU" in skip.output
    assert [e.test for e in events if e.kind == "skip" and not e.subtest] == ["TestSkipMe"]


def test_build_failure_go119_raw_lines():
    _, summary, events = parse(mixed_stream())
    text = summary.package_failures[C]
    assert "undefined: vm.Boot" in text and "[build failed]" in text and text.startswith("# " + C)
    pkg_events = [e for e in events if e.kind == "package-fail"]
    assert [(e.package, e.test) for e in pkg_events] == [(C, "")]
    assert pkg_events[0].output == text


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 4096])
def test_fixed_size_chunks_match_whole_feed(size):
    data = mixed_stream()
    whole = snapshot(*parse(data))
    assert snapshot(*parse(data, [size] * (len(data) // size))) == whole


def test_every_split_point_gives_same_result():
    c = Clock()
    data = (
        "noise\r\n"
        + run_test(c, A, "TestX", "fail", ["    x_test.go:1: \u00fcber \U0001F600"])
        + ev(c, "run", A, "TestY") + ev(c, "output", A, "TestY", "=== RUN   TestY\n")
        + ev(c, "run", A, "TestY/s") + ev(c, "pass", A, "TestY/s", elapsed=0.1)
        + ev(c, "pass", A, "TestY", elapsed=0.2)
        + ev(c, "fail", A, "", elapsed=1.0)
        + "trailing partial line without newline"
    )
    whole = snapshot(*parse(data))
    assert whole[0]["raw_output"] == ["noise", "trailing partial line without newline"]
    for i in range(len(data) + 1):
        assert snapshot(*parse(data, [i])) == whole, "split at %d" % i
    # also three-way splits around every JSON line boundary
    for i in range(0, len(data), 11):
        for j in range(i, len(data), 13):
            assert snapshot(*parse(data, [i, j - i])) == whole


def test_bytes_split_inside_multibyte_characters():
    data = mixed_stream()
    whole = snapshot(*parse(data))
    raw = data.encode("utf-8")
    events: List[TestEvent] = []
    stream = SuiteStream(events.append)
    for i in range(len(raw)):
        stream.feed(raw[i:i + 1])
    stream.close()
    assert snapshot(stream, stream.summary(), events) == whole


def test_interleaved_packages_same_test_name():
    c = Clock()
    s = ev(c, "start", A) + ev(c, "start", B)  # newer go emits "start"
    s += ev(c, "run", A, "TestSame") + ev(c, "run", B, "TestSame") + ev(c, "run", B, "TestOther")
    s += ev(c, "output", B, "TestSame", "from b\n") + ev(c, "output", A, "TestSame", "from a\n")
    stream = SuiteStream()
    stream.feed(s)
    assert stream.running == ["TestSame", "TestSame", "TestOther"]
    assert stream.running_tests == [(A, "TestSame"), (B, "TestSame"), (B, "TestOther")]
    assert stream.counts.running == 3
    stream.feed(ev(c, "fail", B, "TestSame", elapsed=1) + ev(c, "pass", A, "TestSame", elapsed=2))
    assert stream.running == ["TestOther"]
    stream.feed(ev(c, "pass", B, "TestOther", elapsed=1) + ev(c, "pass", A, "", elapsed=2) +
                ev(c, "fail", B, "", elapsed=3))
    stream.close()
    summary = stream.summary()
    got = {(r.package, r.name): (r.status, r.output) for r in summary.results}
    assert got == {(A, "TestSame"): ("pass", "from a\n"), (B, "TestSame"): ("fail", "from b\n"),
                   (B, "TestOther"): ("pass", "")}
    assert summary.package_failures == {}  # B failed because of a test
    assert [(f.package, f.name) for f in summary.failures] == [(B, "TestSame")]


def test_running_at_close_becomes_failed():
    c = Clock()
    s = run_test(c, A, "TestDone", "pass", [])
    s += ev(c, "run", A, "TestHang") + ev(c, "output", A, "TestHang", "=== RUN   TestHang\n")
    s += ev(c, "run", A, "TestHang/inner") + ev(c, "output", A, "TestHang/inner", "waiting for guest")  # no newline
    events: List[TestEvent] = []
    stream = SuiteStream(events.append)
    stream.feed(s)
    assert stream.running == ["TestHang"] and stream.counts.running == 1
    stream.close()
    assert stream.counts.running == 0 and stream.running == []
    summary = stream.summary()
    hang = summary.results[1]
    assert (hang.name, hang.status, hang.unreported) == ("TestHang", "fail", True)
    assert hang.subtests[0].status == "fail" and hang.subtests[0].unreported
    assert "waiting for guest\n[vmtasks] TestHang/inner did not report a result" in hang.output
    assert "output stream ended" in hang.output
    assert hang.elapsed == pytest.approx(0.75)  # from its run event to the last event
    assert [f.name for f in summary.failures] == ["TestHang"]
    assert [(e.kind, e.test, e.unreported) for e in events[-2:]] == [
        ("fail", "TestHang/inner", True), ("fail", "TestHang", True)]
    # the package never finished, but a test explains it: not a package failure
    assert summary.package_failures == {} and summary.packages[A].status == "fail"
    assert not summary.exit_ok and summary.failed == 1


def test_timeout_panic_fails_running_tests_at_package_end():
    # go test -timeout: the panic is attributed to the running test and the
    # package fails without any fail event for the tests that were running.
    c = Clock()
    s = ev(c, "run", A, "TestSlow") + ev(c, "run", A, "TestSlow/inner")
    s += ev(c, "output", A, "TestSlow/inner", "panic: test timed out after 10m0s\n")
    s += ev(c, "output", A, "", "FAIL\t%s\t600.010s\n" % A) + ev(c, "fail", A, "", elapsed=600.01)
    s += run_test(c, B, "TestLater", "pass", []) + ev(c, "pass", B, elapsed=0.1)
    stream, summary, events = parse(s)
    assert [(r.name, r.status, r.unreported) for r in summary.results] == [
        ("TestSlow", "fail", True), ("TestLater", "pass", False)]
    out = summary.results[0].output
    assert "panic: test timed out" in out and "package %s ended" % A in out
    assert out.count("[vmtasks] package output:") == 1
    assert summary.package_failures == {}


def test_testmain_failure_is_package_failure():
    c = Clock()
    s = ev(c, "output", A, "", "setup failed: no VM\n") + ev(c, "output", A, "", "FAIL\t%s\t0.01s\n" % A)
    s += ev(c, "fail", A, "", elapsed=0.01)
    s += ev(c, "output", B, "", "?   \t%s\t[no test files]\n" % B) + ev(c, "skip", B, "", elapsed=0)
    stream, summary, events = parse(s)
    assert summary.total == 0
    assert summary.package_failures == {A: "setup failed: no VM\nFAIL\t%s\t0.01s\n" % A}
    assert not summary.packages[A].build_failed
    assert summary.packages[B].status == "skip"
    assert [e.kind for e in events] == ["package-fail"]
    assert not summary.exit_ok


def test_package_that_never_finished_is_package_failure():
    c = Clock()
    stream, summary, events = parse(ev(c, "start", A) + ev(c, "output", A, "", "connecting...\n"))
    assert A in summary.package_failures
    assert "did not finish" in summary.package_failures[A]
    assert [e.kind for e in events] == ["package-fail"]


def test_build_failure_newer_go_events():
    c = Clock()
    ip = "%s [%s.test]" % (C, C)
    s = json.dumps({"ImportPath": ip, "Action": "build-output", "Output": "# %s\n" % ip}) + "\n"
    s += json.dumps({"ImportPath": ip, "Action": "build-output", "Output": "c/c_test.go:3:11: undefined: y\n"}) + "\n"
    s += json.dumps({"ImportPath": ip, "Action": "build-fail"}) + "\n"
    s += ev(c, "start", C) + ev(c, "output", C, "", "FAIL\t%s [build failed]\n" % C)
    s += ev(c, "fail", C, "", elapsed=0, FailedBuild=ip)
    stream, summary, events = parse(s)
    assert stream.raw_lines == 0
    assert summary.package_failures[C] == "# %s\nc/c_test.go:3:11: undefined: y\nFAIL\t%s [build failed]\n" % (ip, C)
    assert summary.packages[C].build_failed
    assert [e.kind for e in events] == ["package-fail"]


def test_build_failure_go121_json_verdict_with_stderr_errors():
    # go 1.21-1.23: compiler errors on stderr (raw), verdict as JSON events
    c = Clock()
    s = "# example.com/e2e/vmlib\nvmlib/vm.go:7:2: syntax error\n"
    s += ev(c, "output", A, "", "FAIL\t%s [build failed]\n" % A) + ev(c, "fail", A, "", elapsed=0)
    s += ev(c, "output", B, "", "FAIL\t%s [build failed]\n" % B) + ev(c, "fail", B, "", elapsed=0)
    _, summary, _ = parse(s)
    # a broken dependency explains both packages
    for pkg in (A, B):
        assert "vmlib/vm.go:7:2: syntax error" in summary.package_failures[pkg]
        assert summary.packages[pkg].build_failed


def test_build_failure_raw_picks_own_block():
    s = "# %s [%s.test]\na_test.go:1: bad a\n" % (A, A)
    s += "# %s [%s.test]\nb_test.go:1: bad b\n" % (B, B)
    s += "FAIL\t%s [build failed]\nFAIL\t%s [build failed]\n" % (B, A)
    _, summary, _ = parse(s)
    assert "bad a" in summary.package_failures[A] and "bad b" not in summary.package_failures[A]
    assert "bad b" in summary.package_failures[B] and "bad a" not in summary.package_failures[B]


def test_garbage_never_crashes():
    c = Clock()
    junk = [
        "", "{", "}", "{not json}", "[1, 2]", "{}", '{"Action": 5}', "null",
        '{"Action": "run"}', '{"Action": "output", "Package": 7, "Test": ["x"], "Output": 3}',
        '{"Action": "pass", "Package": "p", "Test": "TestZ", "Elapsed": "soon", "Time": "yesterday"}',
        '{"Action": "fail", "Package": "p", "Test": "TestN", "Elapsed": NaN}',
        '{"Action": "attr", "Package": "p", "Test": "TestZ", "Key": "k", "Value": "v"}',
        '{"Action": "bench", "Package": "p", "Test": "BenchmarkX", "Output": "x"}',
        '{"Action": "pass", "Package": "p", "Test": "Orphan/sub"}',
        "\x00\x1b[31mred\x1b[0m",
    ]
    data = "\r\n".join(junk) + "\r\n" + run_test(c, A, "TestOK", "pass", []).replace("\n", "\r\n")
    stream, summary, _ = parse(data)
    names = {(r.package, r.name): r.status for r in summary.results}
    assert names[(A, "TestOK")] == "pass"
    assert names[("p", "TestZ")] == "pass" and names[("p", "TestN")] == "fail"
    assert names[("p", "BenchmarkX")] == "pass"
    # a subtest whose parent's "run" was never seen gets a stand-in parent,
    # failed at close because it never reported
    orphan = [r for r in summary.results if r.name == "Orphan"][0]
    assert (orphan.status, orphan.unreported) == ("fail", True)
    assert [(s.name, s.status) for s in orphan.subtests] == [("Orphan/sub", "pass")]
    assert summary.results[[r.name for r in summary.results].index("TestOK")].output.endswith("(0.50s)\n")
    assert stream.raw_lines == 10


def test_callback_errors_do_not_lose_results():
    def boom(event: TestEvent) -> None:
        raise RuntimeError("ui bug")

    stream = SuiteStream(boom)
    with pytest.warns(RuntimeWarning, match="ui bug"):
        stream.feed(run_test(Clock(), A, "TestA", "pass", []) + ev(None, "pass", A, elapsed=1))
    stream.close()
    assert stream.summary().passed == 1
    assert len(stream.callback_errors) == 2 and isinstance(stream.callback_errors[0], RuntimeError)
    with pytest.raises(RuntimeError):
        stream.feed("more")
    stream.close()  # idempotent


def test_elapsed_from_timestamps_or_package_sum():
    _, summary, _ = parse(mixed_stream())
    n = mixed_stream().count('"Time"')
    assert summary.elapsed == pytest.approx((n - 1) * 0.25, abs=1e-3)
    # no timestamps (cached results): sum of package elapsed
    s = run_test(None, A, "TestA", "pass", []) + ev(None, "pass", A, elapsed=1.25)  # type: ignore[arg-type]
    s += ev(None, "pass", B, elapsed=2.5)
    _, summary, _ = parse(s)
    assert summary.elapsed == 3.75


def test_summary_helpers():
    _, summary, _ = parse(mixed_stream())
    assert [r.name for r in summary.slowest(2)] == ["TestPar1", "TestPar2"]
    assert summary.slowest(0) == []
    assert failed_tests(summary) == ["TestBoot", "TestPar1"]
    assert summary.headline() == "2 passed, 2 failed, 1 skipped, 1 package error in %s" % format_duration(
        summary.elapsed)
    ok = Summary(results=[TestResult(A, "TestA", "pass", 1.0)])
    assert ok.exit_ok and ok.total == 1


@pytest.mark.parametrize("secs,text", [
    (0, "0.00s"), (0.42, "0.42s"), (12.3, "12.30s"), (59.994, "59.99s"), (59.996, "1m00s"),
    (65, "1m05s"), (65.4, "1m05s"), (3599.6, "1h00m00s"), (3723, "1h02m03s"),
    (-1, "0.00s"), (float("nan"), "0.00s"),
])
def test_format_duration(secs, text):
    assert format_duration(secs) == text


# --------------------------------------------------------------------------
# JUnit
# --------------------------------------------------------------------------


def _junit_counts(el: ET.Element) -> dict:
    return {k: int(el.get(k)) for k in ("tests", "failures", "errors", "skipped")}


def test_junit_counts_match_summary(tmp_path):
    _, summary, _ = parse(mixed_stream())
    path = tmp_path / "out" / "junit.xml"
    totals = write_junit(summary, path)
    root = ET.parse(str(path)).getroot()
    assert root.tag == "testsuites" and root.get("name") == "vmtasks"
    got = _junit_counts(root)
    assert got == totals == {"tests": summary.total + 1, "failures": summary.failed,
                             "errors": len(summary.package_failures), "skipped": summary.skipped}
    cases = root.findall("./testsuite/testcase")
    assert len(cases) == got["tests"]
    assert len(root.findall("./testsuite/testcase/failure")) == got["failures"]
    assert len(root.findall("./testsuite/testcase/skipped")) == got["skipped"]
    assert len(root.findall("./testsuite/testcase/error")) == got["errors"]
    assert float(root.get("time")) == pytest.approx(summary.elapsed, abs=1e-3)
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert list(suites) == [A, B, C]
    for s in suites.values():
        assert _junit_counts(s)["tests"] == len(s.findall("testcase"))
    assert suites[A].get("time") == "7.000"
    boot = suites[A].find("testcase[@name='TestBoot']")
    assert boot.get("classname") == A and boot.get("time") == "2.000"
    assert boot.find("failure").get("message") == "Failed"
    assert "disk missing" in boot.find("failure").text
    skipped = suites[A].find("testcase[@name='TestSkipMe']/skipped")
    assert skipped.get("message") == "skip_test.go:5: needs a GPU"
    err = suites[C].find("testcase/error")
    assert suites[C].find("testcase").get("name") == "[build failed]"
    assert "undefined: vm.Boot" in err.text
    assert "ok  \t%s" % B in suites[B].find("system-out").text
    assert [p.name for p in tmp_path.joinpath("out").iterdir()] == ["junit.xml"]  # no temp leftovers


def test_junit_with_subtests_keeps_attributes_consistent(tmp_path):
    _, summary, _ = parse(mixed_stream())
    path = tmp_path / "junit.xml"
    totals = write_junit(summary, str(path), suite_name="e2e", include_subtests=True)
    root = ET.parse(str(path)).getroot()
    assert root.get("name") == "e2e"
    assert totals["tests"] == len(summary.all_results()) + 1
    assert len(list(root.iter("testcase"))) == totals["tests"]
    assert len(list(root.iter("failure"))) == totals["failures"] == 3  # TestBoot, TestBoot/disk, TestPar1
    assert len(list(root.iter("skipped"))) == totals["skipped"] == 2
    assert root.find(".//testcase[@name='TestBoot/disk/nvme']") is not None


def test_junit_forbidden_characters(tmp_path):
    nasty = "a\x00b\x07c\x1b[1;31mRED\x1b[0m d\x0be\ufffef\ud800g \U0001F600 <&>\"' \t\r\n"
    c = Clock()
    s = run_test(c, A, "TestNasty", "fail", [nasty.rstrip("\n")])
    s += ev(c, "run", A, "Test<&>\x01") + ev(c, "skip", A, "Test<&>\x01", elapsed=0)
    _, summary, _ = parse(s)
    path = tmp_path / "j.xml"
    write_junit(summary, path, suite_name="suite\x02")
    raw = path.read_bytes()
    root = ET.fromstring(raw)  # must parse
    text = root.find(".//failure").text
    assert "\\x00" in text and "\\x07" in text and "\\x0b" in text and "\\ufffe" in text and "\\ud800" in text
    assert "RED" in text and "\x1b" not in text and "[1;31m" not in text
    assert "\U0001F600 <&>\"'" in text
    assert root.find(".//testcase[@name='Test<&>\\x01']") is not None
    assert root.get("name") == "suite\\x02"


def test_junit_overwrites_atomically(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text("old")
    write_junit(Summary(), path)
    root = ET.parse(str(path)).getroot()
    assert _junit_counts(root) == {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    assert os.listdir(str(tmp_path)) == ["junit.xml"]


# --------------------------------------------------------------------------
# reruns (durations: tests/test_history.py)
# --------------------------------------------------------------------------


NAMES = ["TestA", "TestA_b", "TestÜber", "Test.Dot", "Test(x)+[y]{1}|z^$*?\\", "Test-dash #hash"]


def test_rerun_regex_matches_exactly():
    rx = rerun_regex(["TestA", "TestÜber", "TestA", "Test(x)+[y]{1}|z^$*?\\"])
    assert rx == "^(TestA|TestÜber|Test\\(x\\)\\+\\[y\\]\\{1\\}\\|z\\^\\$\\*\\?\\\\)$"
    pattern = re.compile(rx)
    matched = [n for n in NAMES + ["TestAB", "TestA/sub", "xTestA", "TestÜberX", "TestXDot", "Test(x)"]
               if pattern.search(n)]
    assert matched == ["TestA", "TestÜber", "Test(x)+[y]{1}|z^$*?\\"]
    dot = re.compile(rerun_regex(["Test.Dot"]))
    assert dot.search("Test.Dot") and not dot.search("TestXDot")
    assert go_quote_meta("Test-dash #hash ü") == "Test-dash #hash ü"  # RE2 needs no escape here
    for bad in ([], [""], ["TestA/sub"]):
        with pytest.raises(ValueError):
            rerun_regex(bad)


# --------------------------------------------------------------------------
# real go test -json
# --------------------------------------------------------------------------

GO = shutil.which("go") or ("/usr/bin/go" if os.path.exists("/usr/bin/go") else None)

GO_PKG_MAIN = r'''package vm
import ("fmt"; "testing")
func TestA(t *testing.T)      { fmt.Println("a ran") }
func TestAB(t *testing.T)     { fmt.Println("ab ran") }
func TestA_b(t *testing.T)    { fmt.Println("a_b ran") }
func TestÜber(t *testing.T)   { fmt.Println("uber ran") }
func TestFail(t *testing.T)   { t.Log("broken \x1b[31mred\x1b[0m"); t.Fail() }
func TestSkip(t *testing.T)   { t.Skip("not here") }
func TestSubs(t *testing.T) {
	t.Run("ok", func(t *testing.T) {})
	t.Run("bad one", func(t *testing.T) { t.Error("sub failed") })
	t.Run("par", func(t *testing.T) {
		for _, n := range []string{"x", "y"} {
			n := n
			t.Run(n, func(t *testing.T) { t.Parallel(); t.Log(n) })
		}
	})
}
'''
GO_PKG_BROKEN = "package broken\nimport \"testing\"\nfunc TestB(t *testing.T) { undefinedThing() }\n"


@pytest.fixture(scope="module")
def go_module(tmp_path_factory):
    if GO is None:
        pytest.skip("go not installed")
    root = tmp_path_factory.mktemp("gomod")
    (root / "go.mod").write_text("module example.com/e2e\n\ngo 1.19\n")
    (root / "vm").mkdir()
    (root / "vm" / "vm_test.go").write_text(GO_PKG_MAIN, encoding="utf-8")
    (root / "broken").mkdir()
    (root / "broken" / "broken_test.go").write_text(GO_PKG_BROKEN)
    home = tmp_path_factory.mktemp("gohome")
    env = dict(os.environ)
    env.update(GOCACHE=str(home / "cache"), GOPATH=str(home / "path"), HOME=str(home),
               GOFLAGS="-mod=mod", GO111MODULE="on", GOPROXY="off", GOTOOLCHAIN="local", CGO_ENABLED="0")
    return root, env


def go_test(go_module, *args: str) -> SuiteStream:
    root, env = go_module
    proc = subprocess.run([GO, "test", "-json", "-count=1", *args], cwd=str(root), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    stream = SuiteStream()
    data = proc.stdout
    for i in range(0, len(data), 97):  # bytes, in odd chunks
        stream.feed(data[i:i + 97])
    stream.close()
    return stream


def test_real_go_test_json(go_module, tmp_path):
    stream = go_test(go_module, "./...")
    summary = stream.summary()
    status = {r.name: r.status for r in summary.results}
    assert status == {"TestA": "pass", "TestAB": "pass", "TestA_b": "pass", "TestÜber": "pass",
                      "TestFail": "fail", "TestSkip": "skip", "TestSubs": "fail"}, summary.raw_output
    subs = [r for r in summary.results if r.name == "TestSubs"][0]
    assert [(s.name, s.status) for s in subs.subtests] == [
        ("TestSubs/ok", "pass"), ("TestSubs/bad_one", "fail"), ("TestSubs/par", "pass")]
    assert sorted(s.name for s in subs.subtests[2].subtests) == ["TestSubs/par/x", "TestSubs/par/y"]
    assert "sub failed" in subs.output
    assert list(summary.package_failures) == ["example.com/e2e/broken"]
    assert "undefinedThing" in summary.package_failures["example.com/e2e/broken"]
    assert not summary.exit_ok
    assert (stream.counts.passed, stream.counts.failed, stream.counts.skipped) == (4, 2, 1)
    path = tmp_path / "junit.xml"
    write_junit(summary, path)
    root = ET.parse(str(path)).getroot()
    assert _junit_counts(root) == {"tests": 8, "failures": 2, "errors": 1, "skipped": 1}
    assert len(list(root.iter("testcase"))) == 8


def test_real_go_test_run_with_rerun_regex(go_module):
    wanted = ["TestA", "TestÜber", "TestSubs"]
    stream = go_test(go_module, "-run", rerun_regex(wanted), "./vm")
    summary = stream.summary()
    assert sorted(r.name for r in summary.results) == sorted(wanted), summary.raw_output
    assert failed_tests(summary) == ["TestSubs"]
    # and feeding the failures back selects just those
    stream = go_test(go_module, "-run", rerun_regex(failed_tests(summary)), "./vm")
    assert [r.name for r in stream.summary().results] == ["TestSubs"]


# --------------------------------------------------------------------------
# guest output cannot forge results (issue 10 #16)
# --------------------------------------------------------------------------

FORGED = [
    "FAIL\t%s [build failed]" % A,
    "FAIL\t%s [build failed]" % C,
    "--- FAIL: TestInnocent (0.00s)",
    json.dumps({"Action": "fail", "Package": A, "Test": "TestInnocent", "Elapsed": 0}),
    json.dumps({"Action": "fail", "Package": A, "Elapsed": 0, "FailedBuild": A}),
]


def forged_stream() -> str:
    """go >= 1.20 shape: a test prints forged verdicts inside its own output; TestMain and
    a leaked goroutine print them at package level after the tests; one real failure."""
    c = Clock()
    s = ev(c, "start", A)
    s += run_test(c, A, "TestForger", "pass", FORGED)
    s += run_test(c, A, "TestInnocent", "pass", ["    fine"])
    s += run_test(c, A, "TestBad", "fail", ["    bad_test.go:3: really broken"])
    s += ev(c, "output", A, "", "FAIL\n")
    for line in FORGED:  # TestMain after m.Run(), or a goroutine that outlived its test
        s += ev(c, "output", A, "", line + "\n")
    s += ev(c, "output", A, "", "FAIL\t%s\t0.003s\n" % A) + ev(c, "fail", A, "", elapsed=0.003)
    # a package with no test at all whose TestMain prints a forged verdict, then exits 1
    s += ev(c, "start", B) + ev(c, "output", B, "", "FAIL\t%s [build failed]\n" % B)
    s += ev(c, "output", B, "", "FAIL\t%s\t0.001s\n" % B) + ev(c, "fail", B, "", elapsed=0.001)
    return s


def test_forged_lines_in_test_output_change_nothing():
    stream, summary, events = parse(forged_stream())
    status = {r.name: r.status for r in summary.results}
    assert status == {"TestForger": "pass", "TestInnocent": "pass", "TestBad": "fail"}
    assert failed_tests(summary) == ["TestBad"]
    # A failed because of TestBad: not a build error, whatever its TestMain printed
    assert A not in summary.package_failures and not summary.packages[A].build_failed
    assert C not in summary.packages and C not in summary.package_failures
    # B did fail without a failing test: a package error, but not a build failure
    assert list(summary.package_failures) == [B] and not summary.packages[B].build_failed
    assert [e.package for e in events if e.kind == "package-fail"] == [B]
    assert "--- FAIL: TestInnocent" in summary.results[0].output  # just text of TestForger
    assert stream.counts.failed == 1 and stream.counts.errors == 1


def test_forged_raw_verdict_for_a_running_package_is_noise():
    # A raw (non-JSON) build verdict naming a package whose binary is running cannot be go's
    c = Clock()
    s = ev(c, "run", A, "TestX") + ev(c, "output", A, "TestX", "=== RUN   TestX\n")
    s += "FAIL\t%s [build failed]\n" % A
    s += ev(c, "pass", A, "TestX", elapsed=0.1) + ev(c, "output", A, "", "ok  \t%s\t0.1s\n" % A)
    s += ev(c, "pass", A, "", elapsed=0.1)
    stream, summary, _ = parse(s)
    assert summary.package_failures == {} and summary.exit_ok
    assert summary.packages[A].status == "pass" and summary.results[0].status == "pass"
    assert stream.raw_lines == 1


GO_FORGER = r'''package forge
import ("fmt"; "os"; "testing"; "time")
func TestMain(m *testing.M) {
	code := m.Run()
	fmt.Println("FAIL\texample.com/forge/forge [build failed]")
	fmt.Println("FAIL\texample.com/forge/other [build failed]")
	fmt.Println(`{"Action":"fail","Package":"example.com/forge/forge","Test":"TestGhost","Elapsed":0}`)
	os.Exit(code)
}
func TestForger(t *testing.T) {
	fmt.Println("FAIL\texample.com/forge/forge [build failed]")
	fmt.Println(`{"Action":"fail","Package":"example.com/forge/forge","Test":"TestInnocent","Elapsed":0}`)
	fmt.Fprintln(os.Stderr, "FAIL\texample.com/forge/forge [build failed]")
	go func() { time.Sleep(50 * time.Millisecond); fmt.Println("FAIL\texample.com/forge/forge [build failed]") }()
}
func TestInnocent(t *testing.T) { time.Sleep(100 * time.Millisecond) }
func TestBad(t *testing.T) { t.Error("really broken") }
'''


def forge_module(tmp_path, source: str):
    """A module example.com/forge with one package, forge, whose test file is ``source``."""
    root = tmp_path / "forge"
    (root / "forge").mkdir(parents=True)
    (root / "go.mod").write_text("module example.com/forge\n\ngo 1.19\n")
    (root / "forge" / "forge_test.go").write_text(source)
    return root


def test_real_go_forger_cannot_add_a_build_failure(go_module, tmp_path):
    _, env = go_module
    root = forge_module(tmp_path, GO_FORGER)
    proc = subprocess.run([GO, "test", "-json", "-count=1", "./..."], cwd=str(root), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    stream = SuiteStream()
    stream.feed(proc.stdout)
    stream.close()
    summary = stream.summary()
    assert {r.name: r.status for r in summary.results} == {
        "TestForger": "pass", "TestInnocent": "pass", "TestBad": "fail"}, proc.stdout.decode()
    assert summary.package_failures == {}, proc.stdout.decode()
    assert failed_tests(summary) == ["TestBad"]
    assert not summary.packages["example.com/forge/forge"].build_failed


# --------------------------------------------------------------------------
# bounded memory (issue 10 #17)
# --------------------------------------------------------------------------


def test_output_tails_are_bounded_and_say_what_was_dropped():
    from vmtasks.guest.results.stream import TAIL_CHARS, TAIL_LINES

    c = Clock()
    s = ev(c, "run", A, "TestLoud")
    s += "".join(ev(c, "output", A, "TestLoud", "line %d\n" % i) for i in range(5000))
    s += "".join("noise %d\n" % i for i in range(1000))
    s += ev(c, "output", A, "TestLoud", "x" * 100000 + "\n")  # one huge line
    s += ev(c, "output", A, "TestLoud", "the end\n") + ev(c, "fail", A, "TestLoud", elapsed=1)
    stream, summary, _ = parse(s, [4096] * (len(s) // 4096))
    out = summary.results[0].output
    assert len(out) < TAIL_CHARS + 1000 and out.count("\n") <= TAIL_LINES + 1
    assert out.startswith("[vmtasks] ") and "earlier output lines not kept" in out
    assert out.endswith("the end\n") and "characters of this line not kept" in out
    assert stream.raw_lines == 1000 and len(summary.raw_output) == TAIL_LINES
    assert summary.raw_output[-1] == "noise 999"


def test_many_chatty_passing_tests_keep_little_each():
    from vmtasks.guest.results.stream import PASSED_CHARS, TAIL_CHARS

    c = Clock()
    line = "    chatter " + "c" * 500 + "\n"
    s = ""
    for i in range(300):
        status = "fail" if i == 7 else "pass"
        s += run_test(c, A, "Test%03d" % i, status, [line.rstrip("\n")] * 100 + ["    last words %d" % i])
    _, summary, _ = parse(s)
    passed = [r for r in summary.results if r.status == "pass"]
    assert len(passed) == 299
    assert all(len(r.output) <= PASSED_CHARS + 200 and "last words" in r.output for r in passed)
    failed = summary.failures[0]
    assert failed.name == "Test007" and len(failed.output) > PASSED_CHARS * 4
    assert len(failed.output) <= TAIL_CHARS + 200 and failed.output.endswith("--- FAIL: Test007 (0.50s)\n")


def test_an_endless_line_is_cut_not_kept():
    stream = SuiteStream()
    for _ in range(40):
        stream.feed("y" * 100000)  # 4 MB, no newline
    stream.feed("\n" + run_test(Clock(), A, "TestAfter", "pass", []))
    stream.close()
    summary = stream.summary()
    assert stream.raw_lines == 1 and len(summary.raw_output[0]) < 10000
    assert summary.raw_output[0].endswith("characters of this line not kept]")
    assert [r.name for r in summary.results] == ["TestAfter"]


def test_200_megabytes_of_guest_output_take_little_memory():
    import tracemalloc

    c = Clock()
    payload = "    log: " + "z" * 3900 + "\n"
    block = ev(c, "output", A, "TestLoud", payload) * 100
    block += ev(c, "output", A, "", payload) * 25  # package-level output
    block += ("raw shell noise " + "n" * 1000 + "\n") * 50
    block = block.encode("utf-8")
    total = 200 * 1024 * 1024
    stream = SuiteStream()
    stream.feed(ev(c, "start", A) + ev(c, "run", A, "TestLoud"))
    fed = 0
    tracemalloc.start()
    try:
        while fed < total:
            for i in range(0, len(block), 65536):
                stream.feed(block[i:i + 65536])
            fed += len(block)
        stream.feed(ev(c, "fail", A, "TestLoud", elapsed=9) + ev(c, "fail", A, "", elapsed=9))
        stream.close()
        summary = stream.summary()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print("peak %.1f MB for %d MB fed" % (peak / 2**20, fed // 2**20))
    assert peak < 20 * 1024 * 1024, "peak %.1f MB for %d MB fed" % (peak / 2**20, fed // 2**20)
    assert fed >= total and summary.results[0].status == "fail"
    assert stream.raw_lines == 50 * (fed // len(block))


# --------------------------------------------------------------------------
# counting and the verdict line (issue 12)
# --------------------------------------------------------------------------


def test_subtests_and_package_errors_are_counted():
    stream, summary, _ = parse(mixed_stream())
    # mixed_stream: 5 top-level tests, 3 subtests (TestBoot/disk, /disk/nvme, /net), one build error
    assert stream.counts.subtests == 3 and summary.counts.subtests == 3
    assert stream.counts.errors == 1 and summary.errors == 1 and summary.counts.errors == 1
    assert summary.package_errors[0].package == C and summary.package_errors[0].build_failed
    # a build failure alone: an error, not "failed 0" with nothing to show
    s = "# %s [%s.test]\nc_test.go:3: undefined: x\nFAIL\t%s [build failed]\n" % (C, C, C)
    stream, summary, _ = parse(s)
    assert (summary.failed, summary.errors, stream.counts.errors) == (0, 1, 1)
    assert not summary.exit_ok
    assert verdict_line(summary, 0.4) == "DONE 0 tests, 1 error in 0.4s"


def test_verdict_line_in_gotestsum_style():
    _, summary, _ = parse(mixed_stream())
    # every test and subtest counts (as gotestsum's DONE line): 5 + 3 = 8; skips TestSkipMe and
    # TestBoot/net; failures TestBoot, TestBoot/disk, TestPar1
    assert verdict_line(summary, 12.34) == "DONE 8 tests, 2 skipped, 3 failures, 1 error in 12.3s"
    assert verdict_line(Summary(), 0) == "DONE 0 tests in 0.0s"
    one = Summary(results=[TestResult(A, "TestA", "pass", 1.0)])
    assert verdict_line(one, 65.2) == "DONE 1 test in 1m05s"
    stopped = mark_not_run(Summary(results=[TestResult(A, "TestA", "interrupted", 1.0, unreported=True),
                                            TestResult(A, "TestB", "fail", 1.0)]),
                           [(A, "TestA"), (A, "TestB"), (A, "TestC"), (A, "TestD")])
    assert verdict_line(stopped, 3) == "DONE 2 tests, 1 failure, 1 interrupted, 2 not run in 3.0s"


def test_slowest_hides_fast_tests():
    _, summary, _ = parse(mixed_stream())
    assert [r.name for r in summary.slowest(10)] == ["TestPar1", "TestPar2", "TestBoot", "TestNet"]
    assert [r.name for r in summary.slowest(10, threshold=2.5)] == ["TestPar1", "TestPar2"]
    fast = Summary(results=[TestResult(A, "Test%d" % i, "pass", 0.01 * i) for i in range(6)])
    assert fast.slowest(5) == []  # a fast passing run lists no "slow" tests
    assert len(fast.slowest(5, threshold=0)) == 5


# --------------------------------------------------------------------------
# interrupted vs lost (issues 11, 12)
# --------------------------------------------------------------------------


def hanging_stream() -> str:
    c = Clock()
    s = ev(c, "start", A) + run_test(c, A, "TestDone", "fail", ["    broken"])
    s += ev(c, "run", A, "TestHang") + ev(c, "output", A, "TestHang", "=== RUN   TestHang\n")
    s += ev(c, "run", A, "TestHang/inner") + ev(c, "output", A, "TestHang/inner", "waiting for guest\n")
    s += ev(c, "start", B) + ev(c, "output", B, "", "connecting\n")  # B never reports a result
    return s


def test_close_interrupted_is_not_a_failure():
    events: List[TestEvent] = []
    stream = SuiteStream(events.append)
    stream.feed(hanging_stream())
    stream.close("interrupted")
    summary = stream.summary()
    hang = summary.results[1]
    assert (hang.name, hang.status, hang.unreported) == ("TestHang", "interrupted", True)
    assert hang.subtests[0].status == "interrupted" and "was interrupted" in hang.output
    assert [r.name for r in summary.interrupted] == ["TestHang"]
    assert [r.name for r in summary.failures] == ["TestDone"] and failed_tests(summary) == ["TestDone"]
    assert rerun_regex(failed_tests(summary)) == "^(TestDone)$"
    assert summary.package_failures == {}  # a package stopped on purpose is not an error
    assert summary.packages[B].status == "interrupted"
    c = stream.counts
    assert (c.passed, c.failed, c.interrupted, c.errors) == (0, 1, 1, 0)
    assert [(e.kind, e.test) for e in events[-2:]] == [("interrupted", "TestHang/inner"), ("interrupted", "TestHang")]
    assert not summary.exit_ok


def test_close_vm_lost_fails_running_tests_with_the_reason():
    stream = SuiteStream()
    stream.feed(hanging_stream())
    stream.close("VM lost")
    summary = stream.summary()
    hang = summary.results[1]
    assert (hang.status, hang.unreported) == ("fail", True)
    assert "did not report a result: VM lost" in hang.output
    assert failed_tests(summary) == ["TestDone", "TestHang"] and summary.interrupted == []
    assert "VM lost" in summary.package_failures[B]  # B never finished and no test explains it


def test_close_reason_is_checked():
    with pytest.raises(ValueError):
        SuiteStream().close("")


@pytest.mark.parametrize("start", [True, False], ids=["go1.20+", "go1.19"])
def test_one_stream_may_run_a_package_many_times(start):
    # the VM queue runs the test binary once per test: the same package starts again
    c = Clock()
    s = ""
    for name, status in (("TestA", "pass"), ("TestB", "fail"), ("TestC", "pass")):
        s += (ev(c, "start", A) if start else "") + run_test(c, A, name, status, [])
        s += ev(c, "output", A, "", "%s\t%s\t0.5s\n" % ("ok  " if status == "pass" else "FAIL", A))
        s += ev(c, "pass" if status == "pass" else "fail", A, "", elapsed=0.5)
    s += (ev(c, "start", A) if start else "") + ev(c, "output", A, "", "panic in TestMain\n")
    s += ev(c, "fail", A, "", elapsed=0.1)
    _, summary, _ = parse(s)
    assert [(r.name, r.status) for r in summary.results] == [("TestA", "pass"), ("TestB", "fail"), ("TestC", "pass")]
    assert [e.package for e in summary.package_errors] == [A]  # only the run that failed alone
    assert "panic in TestMain" in summary.package_errors[0].text
    assert "ok  " not in summary.package_errors[0].text  # only the failed run's own lines
    assert summary.packages[A].elapsed == pytest.approx(1.6)


# --------------------------------------------------------------------------
# not run, merge (issue 11)
# --------------------------------------------------------------------------


def test_mark_not_run():
    _, summary, _ = parse(mixed_stream())
    expected = [(A, "TestBoot"), (B, "TestNet"), (A, "TestGone"), (C, "TestBuild"), (A, "TestGone"), ("", "TestPar1")]
    marked = mark_not_run(summary, expected)
    assert [(r.package, r.name) for r in marked.not_run] == [(A, "TestGone"), (C, "TestBuild")]
    assert all(r.status == "notrun" and "did not run" in r.output for r in marked.not_run)
    assert marked.counts.notrun == 2 and marked.total == summary.total + 2
    assert summary.not_run == []  # the original is untouched
    assert failed_tests(marked) == failed_tests(summary)  # never rerun as failures
    ok = Summary(results=[TestResult(A, "TestA", "pass", 1.0)])
    assert ok.exit_ok and not mark_not_run(ok, [(A, "TestA"), (A, "TestB")]).exit_ok
    assert mark_not_run(ok, [(A, "TestA")]).exit_ok
    from vmtasks.guest.schedule import TestId

    assert [r.name for r in mark_not_run(ok, [TestId(A, "TestA"), TestId(A, "TestZ")]).not_run] == ["TestZ"]


def test_merge_tags_vm_and_time_and_sums_counts():
    c = Clock()
    one = run_test(c, A, "TestA", "pass", [], 1.0) + run_test(c, A, "TestB", "fail", [], 2.0)
    one += ev(c, "fail", A, "", elapsed=3.0)
    two = ev(c, "start", B) + run_test(c, B, "TestC", "pass", [], 1.0) + ev(c, "run", B, "TestD")
    _, s1, _ = parse(one)
    stream = SuiteStream()
    stream.feed(two)
    stream.close("VM lost")
    s2 = stream.summary()
    merged = merge([("vm-1", s1), ("vm-2", s2)])
    assert [(r.vm, r.name, r.status) for r in merged.results] == [
        ("vm-1", "TestA", "pass"), ("vm-1", "TestB", "fail"), ("vm-2", "TestC", "pass"), ("vm-2", "TestD", "fail")]
    starts = [r.started for r in merged.results]
    assert all(isinstance(t, float) for t in starts) and starts == sorted(starts)
    assert merged.results[0].started == pytest.approx(s1.started)
    for what in ("total", "passed", "failed", "skipped", "errors"):
        assert getattr(merged, what) == getattr(s1, what) + getattr(s2, what), what
    assert [(r.vm, r.name) for r in merged.failures] == [("vm-1", "TestB"), ("vm-2", "TestD")]
    assert merged.duplicates == [] and merged.elapsed == pytest.approx(merged.finished - merged.started)
    assert merged.started == s1.started and merged.finished == s2.finished


def test_merge_detects_a_test_reported_twice():
    a = Summary(results=[TestResult(A, "TestA", "pass", 1.0), TestResult(A, "TestB", "pass", 1.0)])
    b = Summary(results=[TestResult(A, "TestA", "fail", 1.0), TestResult(B, "TestB", "pass", 1.0)])
    b.failures = [b.results[0]]
    merged = merge([("vm-1", a), ("vm-2", b)])
    assert merged.duplicates == [(A, "TestA")] and not merged.exit_ok
    assert merge([("vm-1", a)]).duplicates == [] and merge([("vm-1", a)]).exit_ok
    # package errors from two VMs are both counted
    e = Summary(package_errors=[PackageError(C, "build failed\n", True)])
    both = merge([("vm-1", e), ("vm-2", e)])
    assert both.errors == 2 and [x.vm for x in both.package_errors] == ["vm-1", "vm-2"]
    assert verdict_line(both, 1) == "DONE 0 tests, 2 errors in 1.0s"


# --------------------------------------------------------------------------
# only listed tests count (issue 18 #1, #2): go before 1.20 has no framing
# --------------------------------------------------------------------------

GO_FRAMING_FORGER = r'''package forge
import ("fmt"; "testing"; "time")
func TestLongA(t *testing.T) { time.Sleep(20 * time.Millisecond) }
func TestForger(t *testing.T) {
	fmt.Println("--- FAIL: TestLongA (0.00s)")
	fmt.Println("=== RUN   TestGhostA")
	fmt.Println("--- PASS: TestGhostA (0.00s)")
	fmt.Println("=== RUN   TestGhostB")
	fmt.Println("--- FAIL: TestGhostB (0.00s)")
	fmt.Println("--- FAIL: TestGhost (0.00s)")
	fmt.Println("after the forgery")
}
'''
FORGE = "example.com/forge/forge"


@pytest.fixture
def framing_forger(go_module, tmp_path):
    return forge_module(tmp_path, GO_FRAMING_FORGER), go_module[1]


def _feed(data: bytes, expected) -> SuiteStream:
    stream = SuiteStream(expected=expected)
    for i in range(0, len(data), 97):
        stream.feed(data[i:i + 97])
    stream.close()
    return stream


def test_real_queued_test_cannot_report_other_tests(framing_forger, tmp_path):
    """As the queue runs one test: `go tool test2json` over the binary with -test.v (go 1.19
    has no -test.v=test2json); the stream of TestForger counts TestForger alone."""
    root, env = framing_forger
    binary = tmp_path / "forge.test"
    subprocess.run([GO, "test", "-c", "-o", str(binary), "./forge"], cwd=str(root), env=env, check=True, timeout=120)
    proc = subprocess.run([GO, "tool", "test2json", "-t", "-p", FORGE, str(binary), "-test.v",
                           "-test.paniconexit0", "-test.run=^TestForger$"], cwd=str(root / "forge"), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    assert proc.returncode == 0
    unfiltered = _feed(proc.stdout, None).summary()
    if not any(r.name == "TestGhostA" for r in unfiltered.results):
        pytest.skip("this go frames test2json output (>= 1.20): nothing to forge")
    stream = _feed(proc.stdout, [(FORGE, "TestForger")])
    summary = stream.summary()
    assert [(r.name, r.status) for r in summary.results] == [("TestForger", "pass")], proc.stdout.decode()
    assert summary.exit_ok and summary.failures == [] and stream.forged >= 4
    out = summary.results[0].output
    assert "--- FAIL: TestLongA" in out and "after the forgery" in out and "not counted" in out


def test_real_go_test_json_counts_only_listed_tests(framing_forger):
    """One VM: `go test -json` over the whole package; the host's listing decides what counts."""
    root, env = framing_forger
    proc = subprocess.run([GO, "test", "-json", "-count=1", "./..."], cwd=str(root), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    assert proc.returncode == 0
    summary = _feed(proc.stdout, [(FORGE, "TestForger"), (FORGE, "TestLongA")]).summary()
    assert sorted((r.name, r.status) for r in summary.results) == [("TestForger", "pass"), ("TestLongA", "pass")]
    assert summary.exit_ok and verdict_line(summary, 1).startswith("DONE 2 tests in")


def test_a_listed_test_reported_before_it_runs_or_after_it_ended_is_output():
    c = Clock()
    s = run_test(c, A, "TestA", "pass", [])
    s += ev(c, "run", A, "TestB") + ev(c, "output", A, "TestB", "=== RUN   TestB\n")
    # TestB prints go's framing for TestA (finished) and TestC (not started yet)
    s += ev(c, "run", A, "TestA") + ev(c, "output", A, "TestA", "=== RUN   TestA\n")
    s += ev(c, "fail", A, "TestA", elapsed=0) + ev(c, "fail", A, "TestC", elapsed=0)
    s += ev(c, "output", A, "TestB", "--- PASS: TestB (0.10s)\n") + ev(c, "pass", A, "TestB", elapsed=0.1)
    s += run_test(c, A, "TestC", "pass", [])
    s += ev(c, "pass", A, "", elapsed=1)
    stream = SuiteStream(expected=[(A, "TestA"), (A, "TestB"), (A, "TestC")])
    stream.feed(s)
    stream.close()
    summary = stream.summary()
    assert [(r.name, r.status) for r in summary.results] == [("TestA", "pass"), ("TestB", "pass"), ("TestC", "pass")]
    assert summary.exit_ok and stream.forged == 3
    assert summary.results[1].output.count("not counted") == 3  # said in TestB's output


def test_a_second_round_of_a_listed_test_still_counts():
    # -count=2: the same test runs again once nothing else runs; that is go's, not forged
    c = Clock()
    s = run_test(c, A, "TestA", "pass", []) + run_test(c, A, "TestA", "fail", [])
    stream = SuiteStream(expected=[(A, "TestA")])
    stream.feed(s)
    stream.close()
    assert [r.status for r in stream.summary().results] == ["pass", "fail"] and stream.forged == 0


# --------------------------------------------------------------------------
# the verdict and the exit code agree (issue 18 #2, #5)
# --------------------------------------------------------------------------

def test_a_failed_exit_without_a_failed_test_becomes_an_error_that_says_why():
    from vmtasks.guest.results import explain_exit

    c = Clock()
    stream = SuiteStream()
    stream.feed("go: parsing $GOFLAGS: unknown flag -x\n")
    stream.close()
    summary = explain_exit(stream.summary(), 1, "the suite", package="(suite)")
    assert not summary.exit_ok and summary.errors == 1
    text = summary.package_errors[0].text
    assert "the suite exited 1 but reported no failed test" in text and "unknown flag -x" in text
    assert verdict_line(summary, 1) == "DONE 0 tests, 1 error in 1.0s"
    # A failure the results already show, an exit 0, or no exit status at all: nothing added.
    failed = parse(run_test(c, A, "TestBad", "fail", []))[1]
    assert explain_exit(failed, 1, "x") is failed
    passed = parse(run_test(c, A, "TestOk", "pass", []))[1]
    assert explain_exit(passed, 0, "x") is passed and explain_exit(passed, -1, "x") is passed


def test_a_command_that_exits_before_any_test_gets_go_s_last_line_as_its_reason():
    from vmtasks.guest.results import no_test_reason

    c = Clock()
    stream = SuiteStream()
    stream.feed("pattern ./x/...: directory prefix x does not contain main module\n\n")
    stream.close()
    assert no_test_reason(stream.summary(), 1) == \
        "exited 1 before any test: pattern ./x/...: directory prefix x does not contain main module"
    assert no_test_reason(Summary(), 2) == "exited 2 before any test (no output)"
    passed = parse(run_test(c, A, "TestOk", "pass", []))[1]
    assert no_test_reason(passed, 1) == "" and no_test_reason(Summary(), 0) == ""


def test_a_run_stopped_before_any_test_says_interrupted():
    assert verdict_line(Summary(), 2.1, "SIGHUP") == "DONE 0 tests, interrupted (SIGHUP) in 2.1s"
    # A test that was running already says it: the count is enough.
    stopped = Summary(results=[TestResult("p", "TestA", "interrupted")])
    assert verdict_line(stopped, 1, "SIGINT") == "DONE 1 test, 1 interrupted in 1.0s"
