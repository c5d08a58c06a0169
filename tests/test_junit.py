"""Tests for vmtasks.guest.results.junit: targets, errors for package failures / not run /
interrupted, subtests, merged counts."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET

import pytest
from test_results import A, B, C, Clock, ev, mixed_stream, parse, run_test

from vmtasks.guest.errors import StateError
from vmtasks.guest.results import PackageError, SuiteStream, Summary, mark_not_run, merge, write_junit


def counts(el: ET.Element) -> dict:
    return {k: int(el.get(k)) for k in ("tests", "failures", "errors", "skipped")}


def consistent(root: ET.Element) -> None:
    """Every count attribute equals the number of matching elements, per suite and in total."""
    for el in [root] + root.findall("testsuite"):
        got = counts(el)
        assert got["tests"] == len(el.findall(".//testcase"))
        assert got["failures"] == len(el.findall(".//testcase/failure"))
        assert got["errors"] == len(el.findall(".//testcase/error"))
        assert got["skipped"] == len(el.findall(".//testcase/skipped"))


def test_writes_to_text_and_binary_file_objects(tmp_path):
    _, summary, _ = parse(mixed_stream())
    path = tmp_path / "j.xml"
    totals = write_junit(summary, path)
    text, binary = io.StringIO(), io.BytesIO()
    assert write_junit(summary, text) == totals == write_junit(summary, binary)
    assert text.getvalue().encode("utf-8") == binary.getvalue() == path.read_bytes()
    with open(str(tmp_path / "t.xml"), "w", encoding="utf-8") as fh:
        write_junit(summary, fh)
    assert (tmp_path / "t.xml").read_bytes() == path.read_bytes()
    consistent(ET.fromstring(binary.getvalue()))


def test_path_write_failure_is_a_state_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StateError):
        write_junit(Summary(), blocker / "out" / "junit.xml")


def test_package_errors_not_run_and_interrupted_are_errors(tmp_path):
    c = Clock()
    s = ev(c, "start", A) + run_test(c, A, "TestOK", "pass", [])
    s += ev(c, "run", A, "TestStopped") + ev(c, "output", A, "TestStopped", "=== RUN   TestStopped\n")
    stream = SuiteStream()
    stream.feed(s)
    stream.close("interrupted")
    summary = mark_not_run(stream.summary(), [(A, "TestOK"), (A, "TestStopped"), (A, "TestLater"), (B, "TestOther")])
    summary.package_errors.append(PackageError(C, "c.go:1: syntax error\n", build_failed=True))
    out = io.BytesIO()
    totals = write_junit(summary, out)
    root = ET.fromstring(out.getvalue())
    consistent(root)
    assert totals == counts(root) == {"tests": 5, "failures": 0, "errors": 4, "skipped": 0}
    errors = {(case.get("classname"), case.get("name")): case.find("error").get("message")
              for case in root.iter("testcase") if case.find("error") is not None}
    assert errors == {(A, "TestStopped"): "interrupted", (A, "TestLater"): "not run",
                      (B, "TestOther"): "not run", (C, "[build failed]"): "build failed"}
    later = root.find(".//testcase[@name='TestLater']/error")
    assert "did not run" in later.text


def test_subtests_offered_when_asked():
    _, summary, _ = parse(mixed_stream())
    flat, nested = io.BytesIO(), io.BytesIO()
    top = write_junit(summary, flat)
    every = write_junit(summary, nested, include_subtests=True)
    assert top["tests"] == summary.total + summary.errors
    assert every["tests"] == len(summary.all_results()) + summary.errors == top["tests"] + 3
    for data in (flat, nested):
        consistent(ET.fromstring(data.getvalue()))
    names = [c.get("name") for c in ET.fromstring(nested.getvalue()).iter("testcase")]
    assert "TestBoot/disk/nvme" in names and "TestBoot/disk/nvme" not in [
        c.get("name") for c in ET.fromstring(flat.getvalue()).iter("testcase")]


def test_merged_junit_counts_equal_the_sum_of_the_parts():
    _, one, _ = parse(mixed_stream())
    c = Clock()
    _, two, _ = parse(run_test(c, B, "TestMore", "fail", ["    nope"]) + ev(c, "fail", B, "", elapsed=1))
    parts = [("vm-1", one), ("vm-2", two)]
    sums = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for _, part in parts:
        for k, v in write_junit(part, io.BytesIO(), include_subtests=True).items():
            sums[k] += v
    out = io.BytesIO()
    assert write_junit(merge(parts), out, include_subtests=True) == sums
    root = ET.fromstring(out.getvalue())
    consistent(root)
    names = [(case.get("classname"), case.get("name")) for case in root.iter("testcase")]
    assert len(names) == len(set(names))  # each test once
