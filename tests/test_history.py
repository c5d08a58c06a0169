"""Tests for vmtasks.guest.results.history: durations across runs and the estimate the scheduler reads."""

from __future__ import annotations

import json
import os

import pytest

from vmtasks.guest.errors import StateError
from vmtasks.guest.results import History, Summary, TestResult
from vmtasks.guest.results.history import UNKNOWN, percentile

A = "example.com/e2e/a"
B = "example.com/e2e/b"


def run(*results: TestResult) -> Summary:
    return Summary(results=list(results))


def test_round_trip_records_only_what_go_timed(tmp_path):
    path = tmp_path / "state" / ".vmtasks" / "durations.json"
    history = History.load(path)
    assert len(history) == 0 and history.samples(A, "TestBoot") == []
    recorded = history.record(run(
        TestResult(A, "TestBoot", "fail", 2.0),
        TestResult(A, "TestPar2", "pass", 3.0),
        TestResult(A, "TestSkipMe", "skip", 9.0),  # skips are near zero, not representative
        TestResult(A, "TestHang", "fail", 50.0, unreported=True),  # vmtasks decided: duration unknown
        TestResult(A, "TestStop", "interrupted", 40.0, unreported=True),
        TestResult(A, "TestNever", "notrun", 0.0, unreported=True),
        TestResult(A, "TestNaN", "pass", float("nan")),
    ))
    assert recorded == 2
    assert history.record([
        TestResult(A, "TestPar2", "pass", 6.0),
        TestResult(A, "TestPar2/sub", "pass", 99.0),  # subtests run inside their parent
        TestResult(B, "TestPar2", "pass", 1.0),
    ]) == 2
    history.save()
    again = History.load(path)
    assert again.samples(A, "TestPar2") == [3.0, 6.0]
    assert again.estimate(A, "TestPar2") == 6.0  # p85 of two samples is the larger one
    assert again.estimate(A, "TestBoot") == 2.0
    assert again.estimate(B, "TestPar2") == 1.0  # per package
    assert not again.known(A, "TestSkipMe") and not again.known(A, "TestPar2/sub")
    assert not again.known(A, "TestHang") and not again.known(A, "TestStop")
    assert again.tests() == [(A, "TestBoot"), (A, "TestPar2"), (B, "TestPar2")]
    data = json.loads(path.read_text())
    assert data["version"] == 2 and data["tests"]["%s::TestPar2" % A] == [3.0, 6.0]
    assert sorted(os.listdir(str(path.parent))) == ["durations.json"]  # no temp leftovers


def test_estimate_is_p85_of_a_window_so_one_spike_does_not_move_it():
    history = History()
    for _ in range(9):
        history.record([TestResult(A, "TestX", "pass", 10.0)])
    history.record([TestResult(A, "TestX", "pass", 300.0)])  # one stalled run
    assert history.estimate(A, "TestX") == 10.0
    history.record([TestResult(A, "TestX", "pass", 12.0)])  # usually-slower runs do count
    history.record([TestResult(A, "TestX", "pass", 12.0)])
    assert history.estimate(A, "TestX") == 12.0
    # the window forgets the old speed: after KEEP runs at 2 s, it is 2 s
    for _ in range(10):
        history.record([TestResult(A, "TestX", "pass", 2.0)])
    assert history.samples(A, "TestX") == [2.0] * 10 and history.estimate(A, "TestX") == 2.0


@pytest.mark.parametrize("samples,expected", [
    ([5.0], 5.0), ([1.0, 2.0], 2.0), ([3.0, 1.0, 2.0], 3.0),
    ([float(i) for i in range(1, 11)], 9.0), ([float(i) for i in range(1, 21)], 17.0),
])
def test_percentile_nearest_rank(samples, expected):
    assert percentile(samples) == expected


def test_unknown_tests_get_the_median_of_known_estimates():
    history = History()
    assert history.estimate(A, "TestNew") == UNKNOWN == 1.0  # nothing known
    history.record([TestResult(A, "TestA", "pass", 2.0), TestResult(A, "TestB", "pass", 8.0),
                    TestResult(A, "TestC", "pass", 30.0)])
    assert history.estimate(A, "TestNew") == 8.0
    history.record([TestResult(A, "TestD", "pass", 10.0)])
    assert history.estimate(B, "TestNew") == 9.0  # even count: mean of the middle two
    assert history.typical() == 9.0


@pytest.mark.parametrize("content", [
    "", "{", "not json", "[]", "null", '"x"', '{"tests": []}', b"\xff\xfe\x00garbage",
])
def test_corrupt_file_is_an_empty_history(tmp_path, content):
    path = tmp_path / "d.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    history = History.load(path)
    assert len(history) == 0
    history.record([TestResult(A, "TestA", "pass", 1.0)])
    history.save()
    assert History.load(path).estimate(A, "TestA") == 1.0


def test_bad_entries_dropped_old_format_read_odd_paths_survive(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"tests": {
        "a::TestGood": [1.0, 2.0, 3.0],
        "a::TestMixed": [1.0, "2", None, -1, True, 4.0],
        "a::TestOld": {"ema": 2.5, "last": 1.0, "count": 3},  # version 1 entry
        "a::TestOldBad": {"ema": -1},
        "a::TestEmpty": [],
        "a::TestStr": "2",
        "NoSeparator": [1.0],
    }}))
    history = History.load(path)
    assert history.tests() == [("a", "TestGood"), ("a", "TestMixed"), ("a", "TestOld")]
    assert history.samples("a", "TestMixed") == [1.0, 4.0]
    assert history.estimate("a", "TestOld") == 2.5
    assert len(History.load(tmp_path)) == 0  # a directory
    assert len(History.load(tmp_path / "missing" / "d.json")) == 0


def test_save_failure_is_a_state_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    history = History(blocker / "sub" / "durations.json")
    history.record([TestResult(A, "TestA", "pass", 1.0)])
    with pytest.raises(StateError) as err:
        history.save()
    assert "durations" in err.value.message and err.value.hint
    with pytest.raises(ValueError):
        History().save()


def test_a_deeply_nested_file_is_not_a_crash_and_is_kept_aside(tmp_path):
    """200 000 levels of nesting: the json parser recurses; the history never raises on content."""
    path = tmp_path / "durations.json"
    bad = "[" * 200000 + "]" * 200000
    path.write_text(bad)
    history = History.load(path)
    assert len(history) == 0 and "RecursionError" in history.problem
    note = History.update(path, run(TestResult(A, "TestBoot", "pass", 2.0)))
    assert "moved to" in note and str(path) + ".corrupt" in note
    assert (tmp_path / "durations.json.corrupt").read_text() == bad  # the bad copy is kept for a person
    assert History.load(path).samples(A, "TestBoot") == [2.0] and History.load(path).problem == ""


@pytest.mark.parametrize("content,words", [(b"\xff\xfe not utf-8", "not JSON"), (b"[1, 2]", "no \"tests\""),
                                           (b"{\"tests\": [", "not JSON")])
def test_a_corrupt_file_is_reported_not_silently_replaced(tmp_path, content, words):
    path = tmp_path / "durations.json"
    path.write_bytes(content)
    note = History.update(path, run(TestResult(A, "TestBoot", "pass", 1.0)))
    assert words in note and (tmp_path / "durations.json.corrupt").read_bytes() == content


def test_a_missing_file_is_the_first_run_not_a_problem(tmp_path):
    path = tmp_path / "new" / "durations.json"
    assert History.update(path, run(TestResult(A, "TestBoot", "pass", 1.0))) == ""
    assert History.load(path).samples(A, "TestBoot") == [1.0]


def _updater(path: str, worker: int, count: int) -> None:
    for i in range(count):
        History.update(path, run(TestResult(A, "TestW%dN%d" % (worker, i), "pass", 1.0)))


def test_concurrent_updates_lose_nothing(tmp_path):
    """Several runs finishing at once each add their tests: every one is in the file after."""
    import multiprocessing

    path = str(tmp_path / "durations.json")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_updater, args=(path, w, 25)) for w in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(History.load(path)) == 6 * 25
