"""The reporter: plain lines when piped, a live view under a real pseudo-terminal, guest
text made visible, the summary on stdout rendered once, and whole lines from many threads."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional

import pytest

from vmtasks.guest.visible import visible
from vmtasks.ui.report import Reporter, format_clock, format_seconds, timeline_text, vm_shares

REPO = Path(__file__).resolve().parent.parent
ESC = "\x1b"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# What a hostile or merely colourful guest prints: colour, clear screen, set the window title,
# form feed.
GUEST_ESCAPES = "\x1b[31mred\x1b[2J\x1b]0;pwned\x07\x0c"


@dataclass
class FakeTest:
    name: str
    status: str
    elapsed: float = 0.0
    output: str = ""
    vm: str = ""
    started: Optional[float] = None
    package: str = "example.com/suite"
    subtests: List["FakeTest"] = field(default_factory=list)


@dataclass
class FakeSummary:
    """The results model's shape (results.Summary): its tests, package failures and counts."""

    results: List[FakeTest]
    package_failures: Dict[str, str] = field(default_factory=dict)

    @property
    def counts(self):
        return fake_counts(self.results)


def fake_counts(tests):
    by = Counter(t.status for t in tests)
    return SimpleNamespace(passed=by["pass"], failed=by["fail"], skipped=by["skip"], interrupted=by["interrupted"],
                           notrun=by["notrun"])


def verdict(summary, seconds):
    return "DONE {} tests in {:.1f}s".format(len(summary.results) if summary else 0, seconds)


def piped(**kwargs):
    err, out = io.StringIO(), io.StringIO()
    return Reporter(stderr=err, stdout=out, env={}, **kwargs), err, out


# -- plain mode ------------------------------------------------------------------
def test_piped_progress_is_plain_lines_with_deadlines():
    reporter, err, out = piped()
    reporter.run_started("r1", ["VM vm-1 from base"])
    reporter.stage_started("vm-1", "boot", 60)
    reporter.stage_finished("vm-1", "boot", 12.3, "ok")
    reporter.stage_started("vm-1", "suite", 1800)
    reporter.test_started("vm-1", "TestA")
    reporter.test_finished("vm-1", "TestA", "pass", 0.25)
    reporter.test_finished("vm-1", "TestB", "fail", 1.5, "want 1\ngot 2\n")
    reporter.stage_finished("vm-1", "suite", 2.0, "failed")
    reporter.stage_finished("vm-1", "build", 0, "skipped")
    reporter.close()
    text = err.getvalue()
    assert not ANSI.search(text) and ESC not in text
    assert text.splitlines() == [
        "run r1",
        "  VM vm-1 from base",
        "-> boot (deadline 60s)",
        "   boot ok 12.30s",
        "-> suite (deadline 30m)",
        "   PASS TestA (0.25s)",
        "   FAIL TestB (1.50s)",
        "      want 1",
        "      got 2",
        "   suite FAILED 2.00s",
        "   build skipped",
    ]
    assert out.getvalue() == ""


def test_quiet_shows_only_failures_errors_and_the_summary():
    reporter, err, out = piped(quiet=True)
    reporter.run_started("r1", ["plan"])
    reporter.stage_started("vm-1", "boot", 60)
    reporter.stage_finished("vm-1", "boot", 1, "ok")
    reporter.info("syncing")
    reporter.test_finished("vm-1", "TestA", "pass", 0.1)
    reporter.test_finished("vm-1", "TestB", "fail", 0.1, "boom")
    reporter.test_finished("vm-1", "TestC", "interrupted", 0.1)
    reporter.stage_finished("vm-1", "suite", 1, "interrupted")
    reporter.error("stage 'suite' failed")
    reporter.run_done(FakeSummary([FakeTest("TestA", "pass")]), 3, verdict)
    assert err.getvalue().splitlines() == [
        "   FAIL TestB (0.10s)", "      boom", "   INTERRUPTED TestC (0.10s)",
        "   suite INTERRUPTED 1.00s", "error: stage 'suite' failed"]
    assert "DONE 1 tests in 3.0s" in out.getvalue()


def test_waiting_is_shown_once_per_change_not_per_retry():
    reporter, err, _ = piped()
    for _ in range(5):
        reporter.vm_waiting("vm-1", "host at its VM limit")
    reporter.vm_waiting("vm-1", "orchard: pending")
    reporter.vm_waiting("vm-1", "orchard: pending")
    assert err.getvalue().splitlines() == ["   waiting: host at its VM limit", "   waiting: orchard: pending"]


def test_lines_name_their_vm_once_there_are_two():
    reporter, err, _ = piped(vms=2)
    reporter.stage_started("vm-1", "boot", 60)
    reporter.test_finished("vm-2", "TestA", "pass", 1)
    assert err.getvalue().splitlines() == ["[vm-1] -> boot (deadline 60s)", "[vm-2]    PASS TestA (1.00s)"]
    # Without `vms`, labels start with the second VM.
    reporter, err, _ = piped()
    reporter.vm_added("vm-1", label="a")
    reporter.info("x")
    reporter.vm_added("vm-2", label="b")
    reporter.stage_started("vm-2", "clone")
    assert err.getvalue().splitlines() == ["x", "[b] -> clone"]


def test_verbose_prints_the_finished_line_after_its_own_raw_output():
    reporter, err, _ = piped(verbose=True)
    reporter.raw_output("vm-1", "=== RUN   TestA\n    a_test.go:9: hel")
    reporter.raw_output("vm-1", "lo\n--- FAIL: TestA (0.10s)")  # no newline yet
    reporter.test_finished("vm-1", "TestA", "fail", 0.1, "    a_test.go:9: hello\n")
    lines = err.getvalue().splitlines()
    assert lines == ["=== RUN   TestA", "    a_test.go:9: hello", "--- FAIL: TestA (0.10s)",
                     "   FAIL TestA (0.10s)"], "raw output must come first, and the output not twice"
    quiet_raw, err2, _ = piped()
    quiet_raw.raw_output("vm-1", "=== RUN   TestA\n")
    assert err2.getvalue() == "", "raw output without --verbose"


def test_kept_vm_commands_are_never_wrapped():
    reporter, err, _ = piped()
    attach = "ssh -i /very/long/" + "x" * 150 + "/id_ed25519 -o UserKnownHostsFile=/k admin@10.0.0.2"
    reporter.vm_kept("vm-1", attach, "tart stop vm-1; tart delete vm-1")
    lines = err.getvalue().splitlines()
    assert "  attach:   " + attach in lines
    assert "  clean up: tart stop vm-1; tart delete vm-1" in lines


# -- guest text ------------------------------------------------------------------
def test_guest_escapes_arrive_visible_and_markup_is_literal():
    reporter, err, out = piped(verbose=True)
    reporter.test_started("vm-1", "Test" + GUEST_ESCAPES)
    reporter.raw_output("vm-1", GUEST_ESCAPES + "\n[bold red]not markup[/]\n")
    reporter.test_finished("vm-1", "Test" + GUEST_ESCAPES, "fail", 1, GUEST_ESCAPES)
    reporter.package_failed("vm-1", "pkg" + GUEST_ESCAPES, GUEST_ESCAPES)
    reporter.error("console tail:\n" + GUEST_ESCAPES)
    reporter.run_done(FakeSummary([FakeTest("Test" + GUEST_ESCAPES, "fail", 1, GUEST_ESCAPES)],
                                  {"pkg" + GUEST_ESCAPES: GUEST_ESCAPES}), 1, verdict)
    # stderr: the raw line, the FAIL line, the package's name and output, the error; stdout:
    # the slow list, the failure's name and output, the package's name and output.
    for text, times in ((err.getvalue(), 5), (out.getvalue(), 5)):
        data = text.encode()
        assert b"\x1b" not in data and b"\x07" not in data and b"\x0c" not in data
        assert data.count(visible(GUEST_ESCAPES).encode()) == times, text
    assert "[bold red]not markup[/]" in err.getvalue()


# -- the summary -----------------------------------------------------------------
def two_vm_summary() -> FakeSummary:
    return FakeSummary(results=[
        FakeTest("TestLong", "pass", 10.0, vm="vm-1", started=100.0),
        FakeTest("TestFail", "fail", 2.0, "want 1\ngot 2", vm="vm-2", started=100.0,
                 subtests=[FakeTest("TestFail/a", "pass", 0.5), FakeTest("TestFail/b", "fail", 1.0)]),
        FakeTest("TestQuick", "pass", 0.01, vm="vm-2", started=102.0),
        FakeTest("TestCut", "interrupted", 3.0, "signal: interrupt", vm="vm-2", started=103.0),
        FakeTest("TestNever", "notrun"),
    ], package_failures={"example.com/broken": "broken.go:3: undefined: x"})


def test_summary_goes_to_stdout_and_equals_the_record(tmp_path):
    reporter, err, out = piped()
    reporter.stage_started("vm-1", "boot", 60)
    path = tmp_path / "summary.txt"
    text = reporter.run_done(two_vm_summary(), 42.0, verdict, record_dir="/records/r1",
                             extra_lines=["junit: /records/r1/junit.xml"], summary_path=path)
    assert "e2e results" not in err.getvalue() and "DONE" not in err.getvalue()
    assert out.getvalue() == "\n" + text
    assert path.read_text() == text
    assert text == reporter.render_summary_text(two_vm_summary(), 42.0, verdict, "/records/r1",
                                                ["junit: /records/r1/junit.xml"])
    lines = text.splitlines()
    assert lines[-1] == "DONE 5 tests in 42.0s", "the verdict is the last line"
    assert lines[-3:-1] == ["record: /records/r1", "junit: /records/r1/junit.xml"]
    for row in ("tests        5 (+ 2 subtests = 7, the verdict's count)", "passed       2", "failed       1",
                "skipped      0", "interrupted  1",
                "not run      1", "errors       1 (package or build)", "subtests     2 (1 passed, 1 failed)",
                "suite time   10.00s", "total time   42.00s"):
        assert row in lines, row


def test_summary_lists_failures_interrupted_not_run_and_errors_apart():
    text = Reporter(stderr=io.StringIO(), stdout=io.StringIO(), env={}).render_summary_text(
        two_vm_summary(), 42.0, "verdict")
    fail = text.index("--- FAIL: TestFail (2.00s, vm-2, started +0.00s)")
    assert text[fail:].splitlines()[1:4] == ["    want 1", "    got 2", "    --- FAIL: TestFail/b (1.00s)"]
    assert "--- INTERRUPTED: TestCut (3.00s, vm-2, started +3.00s)\n    signal: interrupt" in text
    assert "FAIL: TestCut" not in text
    assert "--- NOT RUN: TestNever" in text
    assert "--- ERROR package example.com/broken\n    broken.go:3: undefined: x" in text


def test_many_not_run_tests_fold_into_one_line_and_the_vm_table_stays_aligned():
    names = ["TestN%02d" % i for i in range(23)]
    long_vm = "openboot-ephemeral-20261205-060351-5ccd-1"
    tests = [FakeTest("TestRan", "pass", 1.0, vm=long_vm, started=1.0),
             FakeTest("TestAlso", "pass", 1.0, vm="vm-2", started=1.0)] + [FakeTest(n, "notrun", 0) for n in names]
    text = Reporter(stderr=io.StringIO(), stdout=io.StringIO(), env={}).render_summary_text(
        FakeSummary(tests), 5, "v")
    assert text.count("--- NOT RUN") == 1, text
    assert "--- NOT RUN: 23 tests: " + ", ".join(names[:10]) + " +13 more (all in junit.xml)" in text
    table = text[text.index("per VM"):].splitlines()[:3]
    columns = {line.index(" 1 ") for line in table[1:]}
    assert len(columns) == 1 and table[0].index("tests") + len("tests") == columns.pop() + 2, table


def test_failures_name_their_package_when_there_are_several():
    summary = FakeSummary([FakeTest("TestA", "fail", 1, package="example.com/a"),
                           FakeTest("TestA", "pass", 1, package="example.com/b")])
    text = Reporter(stderr=io.StringIO(), stdout=io.StringIO(), env={}).render_summary_text(summary, 1, "v")
    assert "--- FAIL: TestA (1.00s, example.com/a)" in text


def test_slow_tests_hide_the_ones_under_the_threshold():
    text = Reporter(stderr=io.StringIO(), stdout=io.StringIO(), env={}).render_summary_text(
        two_vm_summary(), 42.0, "verdict")
    slow = text[text.index("slowest"):].splitlines()
    assert slow[:3] == ["slowest (over 0.5s):", "     10.00s  TestLong  [vm-1]", "      2.00s  TestFail  [vm-2]"]
    assert "TestQuick" not in text
    fast = FakeSummary([FakeTest("TestA", "pass", 0.0), FakeTest("TestB", "pass", 0.2)])
    assert "slowest" not in Reporter(stderr=io.StringIO(), stdout=io.StringIO(), env={}).render_summary_text(
        fast, 1, "v")


def test_per_vm_balance_busy_and_idle():
    shares = {s.vm: s for s in vm_shares(two_vm_summary())}
    # Window: 100 .. 110 (TestLong). vm-2 ran 100-102, 102-102.01, 103-106: busy 5.01 s.
    assert (shares["vm-1"].tests, shares["vm-1"].busy, shares["vm-1"].idle) == (1, 10.0, 0.0)
    assert shares["vm-2"].tests == 3
    assert shares["vm-2"].busy == pytest.approx(5.01)
    assert shares["vm-2"].idle == pytest.approx(4.99)
    assert (shares["vm-2"].first, shares["vm-2"].last) == (0.0, 6.0)
    text = Reporter(stderr=io.StringIO(), stdout=io.StringIO(), env={}).render_summary_text(
        two_vm_summary(), 42.0, "verdict")
    assert re.search(r"^  vm-2 +3 +5\.01s +4\.99s +\+0\.00s \.\. \+6\.00s$", text, re.M), text
    one_vm = FakeSummary([FakeTest("TestA", "pass", 1.0, vm="vm-1", started=1.0)])
    assert "per VM" not in Reporter(stderr=io.StringIO(), stdout=io.StringIO(), env={}).render_summary_text(
        one_vm, 1, "v")


def test_overlapping_tests_count_once_in_busy_time():
    summary = FakeSummary([FakeTest("A", "pass", 4.0, vm="v", started=0.0),
                           FakeTest("B", "pass", 4.0, vm="v", started=2.0),
                           FakeTest("C", "pass", 1.0, vm="w", started=0.0)])
    shares = {s.vm: s for s in vm_shares(summary)}
    assert shares["v"].busy == 6.0 and shares["w"].idle == 5.0


def test_timeline_says_which_vm_ran_which_test_and_when():
    lines = timeline_text(two_vm_summary()).splitlines()
    names = [line.split()[-1] for line in lines]
    assert names == ["TestFail", "TestLong", "TestQuick", "TestCut", "TestNever"]
    assert lines[3].split()[:4] == ["+3.00s", "3.00s", "INTERRUPTED", "vm-2"]
    assert lines[4].split()[:3] == ["-", "0.00s", "NOT"]


def test_run_done_without_a_summary_still_gives_the_verdict():
    reporter, _, out = piped()
    text = reporter.run_done(None, 5, verdict, record_dir="/r")
    assert text.splitlines() == ["record: /r", "DONE 0 tests in 5.0s"]
    assert out.getvalue() == "\n" + text


def test_durations():
    assert [format_seconds(s) for s in (0.421, 12.3, 65, 7384, -1)] == [
        "0.42s", "12.30s", "1m05s", "2h03m04s", "0.00s"]
    assert [format_clock(s) for s in (12.7, 60, 119, 125, 1800, 3720)] == [
        "12s", "60s", "119s", "2m05s", "30m", "1h02m"]


# -- live rows (a fake clock) --------------------------------------------------------
def test_live_rows_compute_elapsed_at_each_refresh():
    now = [1000.0]
    reporter = Reporter(stderr=io.StringIO(), stdout=io.StringIO(), env={}, clock=lambda: now[0])
    reporter.stage_started("vm-1", "boot", 60)
    assert reporter.live_rows() == ["boot 0s / 60s"]
    now[0] += 12.4  # no event in between
    assert reporter.live_rows() == ["boot 12s / 60s"]
    reporter.stage_finished("vm-1", "boot", 12.4, "ok")
    reporter.stage_started("vm-1", "suite", 1800)
    for name in ("TestA", "TestB", "TestC", "TestD", "TestE"):
        reporter.test_started("vm-1", name)
    reporter.test_finished("vm-1", "TestA", "pass", 1)
    reporter.test_finished("vm-1", "TestB", "fail", 1)
    now[0] += 75
    assert reporter.live_rows() == [
        "suite 75s / 30m  passed 1  failed 1  skipped 0  running: TestC, TestD, TestE"]
    reporter.test_started("vm-1", "TestF")
    assert reporter.live_rows()[0].endswith("running: TestC, TestD, TestE +1")


def test_queue_rows_show_counts_and_the_running_test_against_its_deadline():
    now = [0.0]
    reporter = Reporter(stderr=io.StringIO(), stdout=io.StringIO(), env={}, clock=lambda: now[0], vms=2)
    reporter.vm_added("openboot-vm-1", label="vm1")
    reporter.stage_started("openboot-vm-1", "tests", None)
    reporter.test_started("openboot-vm-1", "TestA", 2700)
    now[0] = 4
    reporter.test_finished("openboot-vm-1", "TestA", "pass", 4)
    reporter.test_started("openboot-vm-1", "TestB", 2700)
    now[0] = 16
    assert reporter.live_rows() == ["vm1  tests 16s  passed 1  failed 0  skipped 0  running: TestB 12s / 45m"]


def test_live_rows_for_several_vms_name_them():
    now = [0.0]
    reporter = Reporter(stderr=io.StringIO(), stdout=io.StringIO(), env={}, clock=lambda: now[0], vms=2)
    reporter.vm_added("openboot-vm-1", label="vm1")
    reporter.vm_added("openboot-vm-2", label="vm2")
    reporter.stage_started("openboot-vm-1", "clone", 300)
    reporter.vm_waiting("openboot-vm-2", "no VM slot")
    now[0] = 3
    assert reporter.live_rows() == ["vm1  clone 3s / 5m", "vm2  not started  waiting: no VM slot"]


# -- threads -------------------------------------------------------------------------
def test_concurrent_events_do_not_interleave_lines(tmp_path):
    stream = open(tmp_path / "err.txt", "w", encoding="utf-8")
    reporter = Reporter(stderr=stream, stdout=io.StringIO(), env={}, vms=8)
    barrier = threading.Barrier(8)
    output = "\n".join("line {} of a long failure output ".format(i) * 3 for i in range(20))

    def worker(index: int) -> None:
        vm = "vm-{}".format(index)
        barrier.wait()
        for test in range(25):
            reporter.test_finished(vm, "Test{}".format(test), "fail", 0.1, output)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stream.close()
    lines = (tmp_path / "err.txt").read_text().splitlines()
    assert len(lines) == 8 * 25 * 21
    for start in range(0, len(lines), 21):
        block = lines[start:start + 21]
        vm = re.match(r"\[(vm-\d)\]    FAIL Test\d+ \(0\.10s\)$", block[0]).group(1)
        assert block[1:] == ["[{}]       ".format(vm) + "line {} of a long failure output ".format(i) * 3
                             for i in range(20)]



# -- real processes: a pseudo-terminal, pipes, CI --------------------------------------
DRIVER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from dataclasses import dataclass, field
    from vmtasks.ui.report import Reporter

    @dataclass
    class T:
        name: str; status: str; elapsed: float = 0.0; output: str = ""; vm: str = "vm-1"
        started: float = 1.0; package: str = "p"; subtests: list = field(default_factory=list)

    @dataclass
    class S:
        results: list; package_failures: dict = field(default_factory=dict)

        @property
        def counts(self):
            from types import SimpleNamespace
            n = lambda status: sum(t.status == status for t in self.results)  # noqa: E731
            return SimpleNamespace(passed=n("pass"), failed=n("fail"), skipped=n("skip"),
                                   interrupted=n("interrupted"), notrun=n("notrun"))

    guest = "Test\\x1b[31mred\\x1b]0;pwned\\x07"
    LONG = {long!r}
    reporter = Reporter(refresh_per_second=10)
    try:
        reporter.run_started("r1", ["one VM"])
        reporter.vm_added("vm-1")
        reporter.stage_started("vm-1", "boot", 60)
        time.sleep(float(sys.argv[1]))  # no event: the live view's clock must still move
        reporter.stage_finished("vm-1", "boot", float(sys.argv[1]), "ok")
        reporter.stage_started("vm-1", "suite", 1800)
        reporter.test_started("vm-1", guest)
        time.sleep(0.5)
        reporter.test_finished("vm-1", guest, "fail", 0.5, "out \\x1b[2J")
        reporter.stage_finished("vm-1", "suite", 0.5, "failed")
        reporter.vm_kept("vm-1", "ssh -i " + LONG + "/id_ed25519 admin@10.0.0.2", "tart delete vm-1")
        reporter.run_done(S([T(guest, "fail", 0.5, "out")]), 3.0, lambda s, t: "VERDICT 1 failed",
                          record_dir=LONG, extra_lines=["junit: " + LONG + "/junit.xml"])
    finally:
        reporter.close()
""")


# Longer than the 100-column terminal below, with the characters a wrapper breaks at.
LONG_PATH = "/Users/someone/src/openboot/.vmtasks/records/20261201-091155-ab12/" + "sub-dir/" * 6 + "end"


@pytest.fixture
def driver(tmp_path):
    path = tmp_path / "drive_reporter.py"
    path.write_text(DRIVER.format(repo=str(REPO), long=LONG_PATH))
    return path


def spawn_in_pty(driver, env_extra, seconds, stdout_to=None):
    """Run the driver on a 100-column pseudo-terminal (stdout to a file if ``stdout_to``:
    ``invoke test-vm | tee log`` with stderr still on the terminal)."""
    pexpect = pytest.importorskip("pexpect")
    env = {"PATH": "/usr/bin:/bin", "TERM": "xterm-256color", **env_extra}
    argv = [str(driver), str(seconds)]
    if stdout_to is not None:
        argv = ["-c", 'exec "$0" "$@" > "{}"'.format(stdout_to), sys.executable] + argv
    child = pexpect.spawn("/bin/sh" if stdout_to is not None else sys.executable, argv, env=env,
                          encoding="utf-8", timeout=60, dimensions=(24, 100))
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    return child.before


def test_live_view_under_a_pseudo_terminal_moves_without_events(driver):
    screen = spawn_in_pty(driver, {}, 2.6)
    assert ANSI.search(screen), "no live redraw on a terminal"
    seen = [int(s) for s in re.findall(r"boot (\d+)s / 60s", screen)]
    assert 0 in seen and 2 in seen, "elapsed time did not move between events: {}".format(sorted(set(seen)))
    assert re.search(r"suite \d+s / 30m.*running: " + re.escape(visible("Test\x1b[31mred")), screen)
    assert re.search(r"✓ boot 2\.60s", screen)
    assert "\x1b]0;pwned" not in screen and "\x1b[2J" not in screen and "\x07" not in screen
    assert "FAIL " + visible("Test\x1b[31mred\x1b]0;pwned\x07") + " (0.50s)" in screen
    assert "out " + visible("\x1b[2J") in screen
    assert "VERDICT 1 failed" in screen.rstrip().splitlines()[-1], "the verdict is the last line"
    assert screen.rindex("\x1b[?25h") < screen.index("e2e results"), "cursor shown again before the summary"
    # Paths and commands longer than the terminal are never broken by a line break.
    assert "  attach:   ssh -i " + LONG_PATH + "/id_ed25519 admin@10.0.0.2" in screen
    assert "record: " + LONG_PATH + "\r\n" in screen and "junit: " + LONG_PATH + "/junit.xml" in screen


def test_summary_piped_while_progress_is_live_on_the_terminal(driver, tmp_path):
    out = tmp_path / "stdout.txt"
    screen = spawn_in_pty(driver, {}, 1.2, stdout_to=out)
    assert re.search(r"boot \d+s / 60s", screen) and "e2e results" not in screen and "VERDICT" not in screen
    text = out.read_text()
    assert ESC not in text, "colour in the piped summary"
    assert text.splitlines()[1] == "e2e results" and text.splitlines()[-1] == "VERDICT 1 failed"
    assert "record: " + LONG_PATH + "\n" in text


def test_ci_on_a_terminal_gets_plain_lines(driver):
    screen = spawn_in_pty(driver, {"CI": "true"}, 0.3)
    assert ESC not in screen, "colour or redraw with CI set"
    assert "-> boot (deadline 60s)" in screen and "   boot ok 0.30s" in screen


def test_dumb_terminal_gets_plain_lines_not_a_redraw(driver):
    screen = spawn_in_pty(driver, {"TERM": "dumb"}, 0.3)
    assert "-> boot (deadline 60s)" in screen and "   boot ok 0.30s" in screen
    assert "\x1b[1A" not in screen and "\x1b[2K" not in screen, "cursor movement on a dumb terminal"


def test_piped_summary_on_stdout_progress_on_stderr(driver):
    done = subprocess.run([sys.executable, str(driver), "0.1"], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert ESC not in done.stdout and ESC not in done.stderr
    assert "-> boot (deadline 60s)" in done.stderr and "FAIL Test" in done.stderr
    assert "e2e results" not in done.stderr and "VERDICT" not in done.stderr
    assert "e2e results" in done.stdout and done.stdout.splitlines()[-1] == "VERDICT 1 failed"
    assert "-> boot" not in done.stdout


THREADS_DRIVER = textwrap.dedent("""
    import sys, threading
    sys.path.insert(0, {repo!r})
    from vmtasks.ui.report import Reporter

    reporter = Reporter(vms=4, refresh_per_second=50)
    def worker(index):
        vm = "vm-%d" % index
        reporter.vm_added(vm)
        reporter.stage_started(vm, "suite", 60)
        for test in range(200):
            reporter.test_started(vm, "Test%d" % test)
            reporter.test_finished(vm, "Test%d" % test, "pass", 0.01)
            reporter.vm_waiting(vm, "tick %d" % (test // 50))
        reporter.stage_finished(vm, "suite", 1, "ok")
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    reporter.close()
    print("ALL DONE", file=sys.stderr)
""")


def test_threads_and_the_live_refresh_do_not_deadlock(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    path = tmp_path / "threads.py"
    path.write_text(THREADS_DRIVER.format(repo=str(REPO)))
    child = pexpect.spawn(sys.executable, [str(path)], env={"PATH": "/usr/bin:/bin", "TERM": "xterm-256color"},
                          encoding="utf-8", timeout=90, dimensions=(24, 100))
    child.expect(pexpect.EOF)
    child.close()
    screen = child.before
    assert child.exitstatus == 0 and "ALL DONE" in screen, screen[-2000:]
    assert len(re.findall(r"\[vm-\d\]    PASS Test\d+ \(0\.01s\)\r\n", screen)) == 800
    assert len(re.findall(r"✓ \[vm-\d\] suite 1\.00s", screen)) == 4
