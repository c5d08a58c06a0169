"""scripts/bench_isolate.py's arithmetic (issue 20's bound for --isolate, the medians, the
run record and summary parsing), on made-up numbers and a made-up run record: no VM."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench_isolate  # noqa: E402
import bench_queue  # noqa: E402

T0 = 1_800_000_000.0


def test_isolation_bound_is_the_even_split_of_tests_each_with_its_vm():
    # 15 tests, 25 s of work, R = 2 s, 2 VMs: (25 + 15 x 2) / 2 = 27.5 beats 6 + 2; + 1 s of the run's own.
    assert bench_isolate.isolation_bound(25.0, 6.0, 15, 2.0, 2, 1.0) == pytest.approx(28.5)


def test_isolation_bound_is_the_longest_test_with_its_vm_when_that_is_larger():
    # 9 + 1 = 10 beats (10 + 2 x 1) / 2 = 6.
    assert bench_isolate.isolation_bound(10.0, 9.0, 2, 1.0, 2, 0.5) == pytest.approx(10.5)


def test_isolation_bound_without_recycle_cost_is_the_plain_queue_bound():
    assert bench_isolate.isolation_bound(25.0, 6.0, 15, 0.0, 2, 1.0) == \
        pytest.approx(bench_isolate.shared_bound(25.0, 6.0, 0.0, 2, 1.0))


def test_shared_bound_and_per_test_difference():
    assert bench_isolate.shared_bound(25.0, 6.0, 4.0, 2, 1.5) == pytest.approx(1.5 + 4.0 + 12.5)
    assert bench_isolate.shared_bound(10.0, 8.0, 4.0, 2, 1.5) == pytest.approx(1.5 + 4.0 + 8.0)
    assert bench_isolate.added_per_test(40.0, 16.0, 15) == pytest.approx(1.6)


def test_recycle_floor_is_the_smaller_median():
    assert bench_isolate.recycle_floor({"cold": [3.0, 1.0, 2.0], "resume": [5.0, 0.5, 4.0]}) == ("cold", 2.0)
    assert bench_isolate.recycle_floor({"cold": [4.0, 1.0, 3.0, 2.0]}) == ("cold", 2.5)
    assert bench_isolate.recycle_floor({"cold": [3.0, 3.0], "resume": [1.0, 1.2, 9.0]}) == ("resume", 1.2)
    with pytest.raises(ValueError):
        bench_isolate.recycle_floor({"cold": []})


def test_isolation_note_from_the_summary():
    summary = ("DONE 3 tests in 9.1s\n"
               "  isolation: 3 tests on 3 fresh VMs, about 2.4s per test for its VM (clone to teardown) beyond "
               "the test itself\n  report: /x/report.html\n")
    note, seconds = bench_isolate.isolation_note(summary)
    assert note.startswith("isolation: 3 tests on 3 fresh VMs") and seconds == pytest.approx(2.4)
    assert bench_isolate.isolation_note("isolation: 18 tests, 1.25 s per test\n")[1] == pytest.approx(1.25)
    assert bench_isolate.isolation_note("isolation: 18 tests on fresh VMs\n") == ("isolation: 18 tests on fresh VMs",
                                                                                  None)
    assert bench_isolate.isolation_note("DONE 3 tests in 9.1s\n") == (None, None)


def _time(seconds: float) -> str:
    """A go test -json Time: RFC 3339 with nanoseconds, UTC."""
    return datetime.fromtimestamp(T0 + seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"


def _record(tmp_path: Path) -> Path:
    """An --isolate --vms 2 run of three tests, one VM each: A (4 s) and B (2 s) start at
    once, C (1 s) on a third VM once B's is gone. Every VM: 1.5 s clone to its test, 0.5 s
    from its test to the end of its teardown."""
    record = tmp_path / "record"
    stages = [{"stage": "preflight", "started": T0 - 0.5, "seconds": 0.3}]
    for vm, clone, test, start, end in (("t1", 0.0, "TestA", 1.5, 5.5), ("t2", 0.0, "TestB", 1.5, 3.5),
                                        ("t3", 4.0, "TestC", 5.5, 6.5)):
        stages += [{"vm": vm, "stage": "clone", "started": T0 + clone, "seconds": 0.2},
                   {"vm": vm, "stage": "teardown", "started": T0 + end + 0.1, "seconds": 0.4}]
        lines = [{"Time": _time(start), "Action": "run", "Test": test},
                 {"Time": _time(start + 0.1), "Action": "output", "Test": test, "Output": "=== RUN\n"},
                 {"Time": _time(start + 0.2), "Action": "run", "Test": test + "/sub"},
                 {"Time": _time(start + 0.3), "Action": "pass", "Test": test + "/sub", "Elapsed": 0.1},
                 {"Time": _time(end), "Action": "pass", "Test": test, "Elapsed": end - start}]
        (record / vm).mkdir(parents=True)
        (record / vm / "suite-output.txt").write_text("not json\n" + "".join(json.dumps(x) + "\n" for x in lines))
    (record / "stages.json").write_text(json.dumps(stages))
    return record


def test_a_run_record_taken_apart_and_bounded(tmp_path):
    row = bench_queue.analyze({"total": 8.0, "record": str(_record(tmp_path))}, 2)
    assert row["tests"] == 3  # the subtests are not tests of their own
    assert row["work"] == pytest.approx(7.0) and row["longest"] == pytest.approx(4.0)
    assert row["vm_fixed"] == pytest.approx(2.0)  # 1.5 s before its test + 0.5 s after, every VM
    assert row["run_fixed"] == pytest.approx(1.0)  # 8 s of wall, the VMs live from 0 to 7
    shared = dict(row, total=7.0)  # the same numbers as a shared run: bound 1 + 2 + max(4, 3.5)
    derived = bench_isolate.derive({"cold": [2.2, 2.0, 1.9]}, [shared], [row], 2)
    assert derived["recycle"] == pytest.approx(2.0) and derived["recycle_from"] == "cold"
    # 1 + max(4 + 2, (7 + 3 x 2) / 2) = 7.5
    assert row["bound"] == pytest.approx(7.5) and row["ratio"] == pytest.approx(8.0 / 7.5)
    assert shared["bound"] == pytest.approx(7.0) and shared["ratio"] == pytest.approx(1.0)
    assert derived["isolated"]["bound"] == pytest.approx(7.5)
    assert derived["added_per_test"] == pytest.approx(1.0 / 3)
    assert derived["goal_met"] is True  # 1.067x <= 1.10x
    assert derived["note_per_test"] is None and derived["note_runs"] == 0


def test_derive_takes_medians_over_runs_and_judges_the_goal():
    def run(total, note=None):
        return {"total": total, "work": 20.0, "longest": 4.0, "tests": 10, "run_fixed": 1.0, "vm_fixed": 2.0,
                "load": 2.0, "note_per_test": note}

    # R = 1: bound = 1 + max(5, (20 + 10) / 2) = 16 for every isolated run.
    isolated = [run(16.0, 1.5), run(20.0, 2.5), run(17.0, None)]
    shared = [run(13.0), run(15.0), run(14.0)]
    derived = bench_isolate.derive({"cold": [1.0, 1.0, 1.0]}, shared, isolated, 2)
    assert derived["isolated"]["total"] == pytest.approx(17.0)
    assert derived["isolated"]["ratio"] == pytest.approx(17.0 / 16.0)
    assert derived["added_per_test_runs"] == pytest.approx([0.3, 0.5, 0.3])
    assert derived["added_per_test"] == pytest.approx(0.3)
    assert derived["note_per_test"] == pytest.approx(2.0) and derived["note_runs"] == 2
    assert derived["goal_met"] is True
    slow = bench_isolate.derive({"cold": [1.0]}, shared[:1], [run(18.0)], 2)
    assert slow["isolated"]["ratio"] == pytest.approx(18.0 / 16.0) and slow["goal_met"] is False


def test_slots_idle():
    # Two slots from 0 to 10: lives of 10, 4 and 5 s leave 1 s empty.
    assert bench_isolate.slots_idle([(0.0, 10.0), (0.0, 4.0), (5.0, 10.0)], 2) == pytest.approx(1.0)
    # Three VMs at once on two slots (a clone during a test): negative.
    assert bench_isolate.slots_idle([(0.0, 10.0), (0.0, 10.0), (8.0, 10.0)], 2) == pytest.approx(-2.0)


def test_a_clone_made_ahead_holds_no_slot(tmp_path):
    """With clone-ahead, a VM's slot time starts at its boot: t3 is cloned at 2 s while t2's
    test runs and boots at 4.5 s, once t2 is gone; the slots are then never over-full."""
    record = _record(tmp_path)
    stages = json.loads((record / "stages.json").read_text())
    for vm, clone, boot in (("t1", 0.0, 0.3), ("t2", 0.0, 0.3), ("t3", 2.0, 4.5)):
        for s in stages:
            if s.get("vm") == vm and s["stage"] == "clone":
                s["started"] = T0 + clone
        stages.append({"vm": vm, "stage": "boot", "started": T0 + boot, "seconds": 0.5})
    (record / "stages.json").write_text(json.dumps(stages))
    row = bench_queue.analyze({"total": 8.0, "record": str(record)}, 2)
    bench_isolate.IsolateBench.slot_times(row)
    assert row["per_vm"]["t3"]["slot_start"] == pytest.approx(T0 + 4.5)
    # Slot time outside the tests: t1 and t2 1.2 s + 0.5 s, t3 1.0 s + 0.5 s.
    assert row["vm_held"] == pytest.approx((1.7 + 1.7 + 1.5) / 3)
    assert row["vm_clone"] == pytest.approx(0.2)
    spans = [(v["slot_start"], v["teardown_end"]) for v in row["per_vm"].values()]
    assert bench_isolate.slots_idle(spans, 2) >= 0  # from clone starts it would be below zero
    derived = bench_isolate.derive({"cold": [1.0]}, [dict(row, total=7.0)], [dict(row, slot_idle=0.0)], 2)
    assert derived["extra_per_vm"] == pytest.approx((1.7 + 1.7 + 1.5) / 3 - 1.0)
