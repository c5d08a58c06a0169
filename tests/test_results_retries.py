"""The results model under --retries: the verdict of a retried test (passed, failed, flaky),
the order-dependence note, and that the model's counts, the verdict line, JUnit and
result.json's attempts agree."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET

from vmtasks.guest import results
from vmtasks.guest.results import FAIL, FLAKY, PASS, Summary, TestResult

PKG = "example.com/e2e"


def result(name, status, vm="vm1", started=0.0, output=""):
    return TestResult(PKG, name, status, elapsed=0.5, output=output or "{} {}\n".format(name, status), vm=vm,
                      started=started)


def first_pass() -> Summary:
    """vm1 ran A, then B (failed: A polluted it); vm2 ran C (broken)."""
    rs = [result("TestA", PASS, "vm1", 1.0), result("TestB", FAIL, "vm1", 2.0),
          result("TestC", FAIL, "vm2", 1.5)]
    return Summary(results=rs, failures=[rs[1], rs[2]])


def retry(name, status, vm):
    return vm, Summary(results=[result(name, status, vm, 10.0)], failures=[])


def retried() -> Summary:
    return results.with_retries(first_pass(), {
        (PKG, "TestB"): [retry("TestB", PASS, "r1")],
        (PKG, "TestC"): [retry("TestC", FAIL, "r2"), retry("TestC", FAIL, "r3")],
    })


def junit_cases(summary):
    buf = io.BytesIO()
    counts = results.write_junit(summary, buf)
    cases = [(c.get("name"), "fail" if c.find("failure") is not None else "pass")
             for c in ET.fromstring(buf.getvalue()).iter("testcase")]
    return counts, cases


def test_failed_then_passed_on_a_fresh_vm_is_flaky():
    summary = retried()
    by_name = {r.name: r for r in summary.results}
    assert by_name["TestB"].status == FLAKY and by_name["TestB"].vm == "r1"
    assert [a.status for a in by_name["TestB"].attempts] == [FAIL, PASS]
    assert by_name["TestC"].status == FAIL
    assert [(a.status, a.vm) for a in by_name["TestC"].attempts] == [(FAIL, "vm2"), (FAIL, "r2"), (FAIL, "r3")]
    assert by_name["TestA"].attempts == []
    assert results.failed_tests(summary) == ["TestC"], "--rerun-failed takes only the final failures"
    assert [r.name for r in summary.flaky] == ["TestB"]


def test_counts_verdict_junit_and_attempts_agree():
    summary = retried()
    counts = summary.counts
    assert (counts.passed, counts.failed, counts.flaky) == (1, 1, 1)
    assert results.verdict_line(summary, 3.0) == "DONE 3 tests, 1 flaky, 1 failure in 3.0s"
    assert not summary.exit_ok, "the broken test still fails the run"
    junit, cases = junit_cases(summary)
    assert cases == [("TestA", "pass"), ("TestB", "fail"), ("TestB", "pass"),
                     ("TestC", "fail"), ("TestC", "fail"), ("TestC", "fail")]
    assert junit["tests"] == len(cases) and junit["failures"] == 4
    attempts = results.attempts_data(summary)
    assert {name: [a["result"] for a in tries] for name, tries in attempts.items()} == \
        {"TestB": ["fail", "pass"], "TestC": ["fail", "fail", "fail"]}
    assert [a["vm"] for a in attempts["TestC"]] == ["vm2", "r2", "r3"]
    # Each test's final verdict, read back from JUnit, is the model's.
    final = {}
    for name, status in cases:
        final[name] = "flaky" if final.get(name) == "fail" and status == "pass" else \
            (final[name] if final.get(name) == "flaky" else status)
    assert sorted(final.items()) == sorted((r.name, r.status) for r in summary.results)


def test_only_flaky_is_ok_and_the_note_names_the_tests_that_ran_before():
    summary = results.with_retries(first_pass(), {(PKG, "TestB"): [retry("TestB", PASS, "r1")],
                                                  (PKG, "TestC"): [retry("TestC", PASS, "r2")]})
    assert summary.exit_ok and summary.failures == []
    notes = results.retry_notes(summary)
    assert "flaky TestB: passed alone; failed on vm1 after TestA: order-dependent?" in notes
    assert "flaky TestC: failed on vm2, passed on a fresh VM (r2)" in notes


def test_a_retry_that_never_reported_the_test_is_a_failed_attempt():
    summary = results.with_retries(first_pass(), {(PKG, "TestC"): [("r1", None)]})
    test_c = next(r for r in summary.results if r.name == "TestC")
    assert test_c.status == FAIL and [a.status for a in test_c.attempts] == [FAIL, FAIL]
    assert "did not report" in test_c.attempts[1].output


def test_no_retries_changes_nothing():
    summary = first_pass()
    assert results.with_retries(summary, {}) is summary
    assert "flaky" not in results.verdict_line(summary, 1.0)


def test_the_durations_history_keeps_a_flaky_tests_passing_time():
    history = results.History()
    assert history.record(retried()) == 3
    assert history.samples(PKG, "TestB") == [0.5]
