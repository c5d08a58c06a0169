"""--retries end to end through the stand-in (examples/uneven): a failed test runs again
alone on a fresh VM. A test polluted by an earlier one on the same machine ends flaky with
its polluter named; a broken test fails on two different VMs; JUnit, result.json, tests.json,
the summary and the verdict agree; nothing is left behind."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import pytest

from .test_queue import uneven_config, uneven_vms

pytestmark = pytest.mark.e2e

POLLUTE = dict(UNEVEN_POLLUTER="TestShort01", UNEVEN_POLLUTED="TestShort02", UNEVEN_FAIL="TestShort03")


def junit_attempts(path: Path) -> Dict[str, List[str]]:
    """Test name -> the result of each of its testcases, in file order."""
    out: Dict[str, List[str]] = defaultdict(list)
    for case in ET.parse(str(path)).getroot().iter("testcase"):
        error = case.find("error")
        lost = error is not None and error.get("message") == "VM lost"
        out[case.get("name") or ""].append("fail" if case.find("failure") is not None else "lost" if lost else "pass")
    return dict(out)


def check_agreement(done, record: Path) -> dict:
    """JUnit, result.json, tests.json, the summary and the verdict say the same thing."""
    result = json.loads((record / "result.json").read_text())
    junit = junit_attempts(record / "junit.xml")
    final = {name: ("flaky" if "pass" in tries and "fail" in tries else "fail" if "fail" in tries else tries[-1])
             for name, tries in junit.items()}
    lost = sum(tries.count("lost") for tries in junit.values())
    flaky = sorted(n for n, v in final.items() if v == "flaky")
    failed = sorted(n for n, v in final.items() if v == "fail")
    assert sorted(result["flaky_tests"]) == flaky
    assert sorted(result["failed_tests"]) == failed
    assert result["tests_run"] == len(junit)
    for name, tries in result["attempts"].items():
        assert [t["result"] for t in tries] == junit[name], name
    tests = json.loads((record / "tests.json").read_text())["tests"]
    assert sorted(t["name"] for t in tests if t["status"] == "flaky") == flaky
    assert sorted(t["name"] for t in tests if t["status"] == "fail") == failed
    verdict = "DONE {} tests{}{}{} in".format(
        len(junit), ", {} flaky".format(len(flaky)) if flaky else "",
        ", {} failure{}".format(len(failed), "" if len(failed) == 1 else "s") if failed else "",
        ", {} {} lost".format(lost, "retry" if lost == 1 else "retries") if lost else "")
    assert verdict in done.out, done.out
    assert verdict in (record / "summary.txt").read_text()
    return result


def test_one_vm_retry_tells_flaky_from_broken(world):
    config = uneven_config(world, "0.05", **POLLUTE)
    done = world.invoke("test-vm-run", "--test", "TestShort0[123]$", "--vms", "1", "--retries", "1",
                        config=config, timeout=400)
    assert done.code == 1, done.text
    record = world.latest_record()
    result = check_agreement(done, record)
    assert result["failed_tests"] == ["TestShort03"] and result["flaky_tests"] == ["TestShort02"]
    first_vm = result["vms"][0]
    polluted, broken = result["attempts"]["TestShort02"], result["attempts"]["TestShort03"]
    assert [t["result"] for t in polluted] == ["fail", "pass"]
    assert [t["result"] for t in broken] == ["fail", "fail"]
    # Each retry on its own fresh VM: never the suite's VM, never one another retry used.
    retry_vms = [polluted[1]["vm"], broken[1]["vm"]]
    assert len(set(retry_vms)) == 2 and first_vm not in retry_vms, result
    assert len(result["vms"]) == 3
    assert "flaky TestShort02: passed alone; failed on {} after TestShort01: order-dependent?".format(
        first_vm) in done.out, done.out
    world.assert_nothing_left()
    assert uneven_vms(world) == []


def test_queue_retry_goes_to_a_fresh_vm(world):
    config = uneven_config(world, "0.05", UNEVEN_FAIL="TestShort03")
    done = world.invoke("test-vm-run", "--test", "TestShort0[1234]$", "--vms", "2", "--retries", "1",
                        config=config, timeout=400)
    assert done.code == 1, done.text
    result = check_agreement(done, world.latest_record())
    assert result["failed_tests"] == ["TestShort03"] and result["flaky_tests"] == []
    tries = result["attempts"]["TestShort03"]
    assert [t["result"] for t in tries] == ["fail", "fail"]
    assert tries[0]["vm"] != tries[1]["vm"] and tries[1]["vm"].endswith("-r1"), tries
    world.assert_nothing_left()
    assert uneven_vms(world) == []


def test_a_flaky_test_passes_the_run_unless_fail_on_flaky(world):
    config = uneven_config(world, "0.05", UNEVEN_POLLUTER="TestShort01", UNEVEN_POLLUTED="TestShort02")
    done = world.invoke("test-vm-run", "--test", "TestShort0[12]$", "--vms", "1", "--retries", "1",
                        config=config, timeout=400)
    assert done.code == 0, done.text
    assert check_agreement(done, world.latest_record())["flaky_tests"] == ["TestShort02"]
    done = world.invoke("test-vm-run", "--test", "TestShort0[12]$", "--vms", "1", "--retries", "1",
                        "--fail-on-flaky", config=config, timeout=400)
    assert done.code == 1, done.text
    assert "--fail-on-flaky" in done.text
    world.assert_nothing_left()
    assert uneven_vms(world) == []


def ctrl_c_while_cloning(world, proc, vm_suffix: str) -> None:
    """Hold the clone of the VM whose name ends with ``vm_suffix`` in flight (take the
    stand-in's storage lock, Tart's global flock on TART_HOME, as soon as that VM's lease
    appears, before its clone can), then Ctrl-C as a terminal sends it: SIGINT to the whole
    process group. The lock goes a second later, so the clone can end."""
    import fcntl
    import os
    import signal

    home = os.open(world.env["TART_HOME"], os.O_RDONLY | os.O_DIRECTORY)
    try:
        deadline = time.monotonic() + 120
        while not list((world.state / "leases").glob("*{}.json".format(vm_suffix))):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.005)
        fcntl.flock(home, fcntl.LOCK_EX)
        children = world.state / "children"
        while not (children.is_dir() and list(children.iterdir())):  # the run waits for its clone
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(1.0)
    finally:
        fcntl.flock(home, fcntl.LOCK_UN)
        os.close(home)


def stage_of(record: Path, vm_suffix: str, stage: str) -> List[dict]:
    return [s for s in json.loads((record / "stages.json").read_text())
            if s.get("vm", "").endswith(vm_suffix) and s.get("stage") == stage]


def test_ctrl_c_while_a_retry_vm_is_being_cloned_leaves_nothing(world):
    """One VM: the retry's `tart clone` is in flight when Ctrl-C comes: the run stops, the
    clone ends, nothing stays, no further retry starts."""
    from .test_queue import start

    config = uneven_config(world, "0.05", UNEVEN_FAIL="TestShort03")
    proc = start(world, "test-vm-run", "--test", "TestShort0[13]$", "--vms", "1", "--retries", "2", config=config)
    ctrl_c_while_cloning(world, proc, "-r1")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "retry 1 of 2" in err, err
    clone = stage_of(world.latest_record(), "-r1", "clone")
    assert clone and clone[0]["status"] != "ok", clone
    assert "-r2" not in out + err, "no retry starts after Ctrl-C"
    world.assert_nothing_left()
    assert uneven_vms(world) == []


def test_ctrl_c_while_a_queue_retry_is_cloned_beside_a_running_vm_leaves_nothing(world):
    """--vms 2: TestShort03 failed, its VM is torn down and the retry's VM is being cloned on
    the freed slot while the other VM still runs TestLongA; Ctrl-C (to the process group)
    stops both: the clone ends, the running test is interrupted, nothing stays (no VM in
    `tart list`, no key, no lease)."""
    from .test_queue import start

    config = uneven_config(world, "3", UNEVEN_FAIL="TestShort03")
    proc = start(world, "test-vm-run", "--test", "TestLongA$|TestShort0[13]$", "--vms", "2", "--retries", "1",
                 config=config)
    ctrl_c_while_cloning(world, proc, "-r1")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    record = world.latest_record()
    clone = stage_of(record, "-r1", "clone")
    assert clone and clone[0]["status"] != "ok", clone
    assert stage_of(record, "-r1", "boot") == [], "the retry VM never booted"
    tests = {t["name"]: t["status"] for t in json.loads((record / "tests.json").read_text())["tests"]}
    assert tests.get("TestLongA") == "interrupted", tests  # the other VM was still running it
    world.assert_nothing_left()
    assert uneven_vms(world) == []


def test_ctrl_c_while_an_isolated_vm_is_cloned_ahead_leaves_nothing(world):
    """--isolate --vms 1: while t1 runs its test, t2 is being cloned ahead; Ctrl-C stops
    both: t2 never boots, nothing stays, and no t3 is made."""
    from .test_queue import start

    config = uneven_config(world, "3")
    proc = start(world, "test-vm-run", "--test", "TestShort0[123]$", "--vms", "1", "--isolate", config=config)
    ctrl_c_while_cloning(world, proc, "-t2")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    record = world.latest_record()
    clone = stage_of(record, "-t2", "clone")
    assert clone and clone[0]["status"] != "ok", clone
    assert stage_of(record, "-t2", "boot") == [], "the VM cloned ahead never booted"
    assert stage_of(record, "-t1", "boot"), "t1 had its slot"
    assert "-t3" not in out + err
    world.assert_nothing_left()
    assert uneven_vms(world) == []


def test_replay_reproduces_an_order_dependent_failure(world):
    """--replay RUN: one fresh VM runs the tests that VM ran, in the same order, each as its own
    invocation; the polluted test fails again after its polluter, and the summary says so."""
    config = uneven_config(world, "0.05", UNEVEN_POLLUTER="TestShort01", UNEVEN_POLLUTED="TestShort02")
    first = world.invoke("test-vm-run", "--test", "TestShort0[12]$", "--vms", "1", config=config, timeout=400)
    assert first.code == 1 and "TestShort02" in first.out, first.text
    run_id = world.latest_record().name
    again = world.invoke("test-vm", "--replay", run_id, config=config, timeout=400)
    assert again.code == 1, again.text
    assert "replaying {}: TestShort01, TestShort02".format(run_id) in again.err, again.text
    assert "replay of {} (2 tests, the same order); reproduced: TestShort02".format(run_id) in again.out, again.out
    record = world.latest_record()
    tests = json.loads((record / "tests.json").read_text())["tests"]
    ran = [t["name"] for t in sorted(tests, key=lambda t: t["started"] or 0)]
    assert ran == ["TestShort01", "TestShort02"]  # exactly those, in that order, nothing else
    missing = world.invoke("test-vm", "--replay", run_id + ":vm7", config=config)
    assert missing.code == 2 and "has no VM 'vm7'" in missing.err, missing.text
    assert uneven_vms(world) == [] and world.key_dirs() == [] and world.leases() == []


def test_isolate_runs_every_test_on_its_own_fresh_vm(world):
    """--isolate: the polluted test passes (nothing ran before it on its VM), only the broken
    one fails; every test had a VM of its own, and the summary says what that cost per test."""
    config = uneven_config(world, "0.05", **POLLUTE)
    done = world.invoke("test-vm-run", "--test", "TestShort0[123]$", "--vms", "2", "--isolate",
                        config=config, timeout=400)
    assert done.code == 1, done.text
    record = world.latest_record()
    tests = json.loads((record / "tests.json").read_text())["tests"]
    status = {t["name"]: t["status"] for t in tests}
    assert status == {"TestShort01": "pass", "TestShort02": "pass", "TestShort03": "fail"}, status
    vms = [t["vm"] for t in tests]
    assert len(set(vms)) == 3 and all(vm.rsplit("-", 1)[1].startswith("t") for vm in vms), vms
    assert "isolation: 3 tests on 3 fresh VMs" in done.out and "per test for its VM" in done.out, done.out
    assert "DONE 3 tests, 1 failure" in done.out
    # VMs are recycled per slot: the third VM was cloned while a first one still ran its test,
    # and booted only once that one had given its slot back; never more than 2 at once.
    spans = vm_spans(record)
    order = sorted(spans, key=lambda vm: spans[vm]["boot"])
    third, firsts = spans[order[2]], [spans[vm] for vm in order[:2]]
    assert third["clone"] < max(s["end"] for s in firsts), spans
    assert third["boot"] >= min(s["end"] for s in firsts), spans
    assert most_running(spans) <= 2, spans
    assert uneven_vms(world) == [] and world.key_dirs() == [] and world.leases() == []


def test_a_vm_kept_for_a_failure_stops_taking_tests(world):
    """--keep=on-failure with --vms 2: the VM where a test failed stays as the failure left it
    (it takes no more tests; the other VM runs the rest) and is kept, suspended."""
    config = uneven_config(world, "0.05", UNEVEN_FAIL="TestShort01")
    done = world.invoke("test-vm", "--vms", "2", "--keep=on-failure", config=config, timeout=400)
    assert done.code == 1, done.text
    tests = json.loads((world.latest_record() / "tests.json").read_text())["tests"]
    failed = next(t for t in tests if t["name"] == "TestShort01")
    after = [t["name"] for t in tests if t["vm"] == failed["vm"] and (t["started"] or 0) > failed["started"]]
    assert after == [], after
    assert sorted(t["name"] for t in tests if "/" not in t["name"]) == sorted(
        t["name"] for t in tests if "/" not in t["name"] and t["status"] in ("pass", "fail"))  # every test ran
    assert "it takes no more tests" in done.err and "kept VM " + failed["vm"] in done.text, done.text
    kept = uneven_vms(world)
    assert kept == [failed["vm"]], kept
    assert world.tart("get", kept[0], "--format", "json").stdout.count('"suspended"') == 1
    cleaned = world.invoke("cleanup-orphans", "--include-kept", config=config)
    assert cleaned.code == 0 and uneven_vms(world) == [], cleaned.text
    assert world.key_dirs() == [] and world.leases() == []


def vm_spans(record: Path) -> Dict[str, Dict[str, float]]:
    """Per VM, from stages.json: when its clone started, when its boot started (it took a
    slot) and when its teardown ended (it gave the slot back), wall clock."""
    spans: Dict[str, Dict[str, float]] = defaultdict(dict)
    for s in json.loads((record / "stages.json").read_text()):
        vm = s.get("vm")
        if not vm:
            continue
        if s["stage"] == "clone":
            spans[vm]["clone"] = s["started"]
        elif s["stage"] == "boot":
            spans[vm]["boot"] = s["started"]
        elif s["stage"] == "teardown":
            spans[vm]["end"] = s["started"] + s["seconds"]
    return dict(spans)


def most_running(spans: Dict[str, Dict[str, float]]) -> int:
    """The most VMs that held a slot (boot to the end of teardown) at the same moment."""
    edges = sorted([(s["boot"], 1) for s in spans.values() if "boot" in s] +
                   [(s["end"], -1) for s in spans.values() if "boot" in s], key=lambda e: (e[0], e[1]))
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


def test_queue_retry_starts_as_soon_as_a_slot_frees(world):
    """--vms 2 --retries 1: TestShort03 fails on the VM that ran the short tests; that VM ends
    its share and is torn down while the other still runs TestLongA (4 s), and the retry's
    fresh VM is cloned at once on the freed slot: before the last shared VM's teardown ends.
    Never more than 2 VMs hold a slot."""
    config = uneven_config(world, "1", UNEVEN_FAIL="TestShort03")
    done = world.invoke("test-vm-run", "--test", "TestLongA$|TestShort0[13]$", "--vms", "2", "--retries", "1",
                        config=config, timeout=400)
    assert done.code == 1, done.text
    record = world.latest_record()
    result = check_agreement(done, record)
    assert result["failed_tests"] == ["TestShort03"]
    tries = result["attempts"]["TestShort03"]
    assert [t["result"] for t in tries] == ["fail", "fail"] and tries[1]["vm"].endswith("-r1"), tries
    spans = vm_spans(record)
    shared = {vm: s for vm, s in spans.items() if not vm.endswith("-r1")}
    assert len(shared) == 2, spans
    last_shared_end = max(s["end"] for s in shared.values())
    retry = spans[tries[1]["vm"]]
    assert retry["clone"] < last_shared_end, "the retry waited for the whole first pass: {}".format(spans)
    assert most_running(spans) <= 2, spans
    world.assert_nothing_left()
    assert uneven_vms(world) == []


def test_a_vm_lost_mid_retry_is_a_lost_attempt_not_a_failure(world):
    """The retry's guest dies while its test runs (`tart stop` under the run): that attempt is
    `lost`, the test goes back on the list and runs again on another fresh VM; the verdict,
    the summary, JUnit (an error "VM lost") and result.json say so; nothing is left."""
    from .test_queue import start

    config = uneven_config(world, "6", UNEVEN_FAIL="TestShort03")
    proc = start(world, "test-vm-run", "--test", "TestShort0[13]$", "--vms", "1", "--retries", "2", config=config)
    deadline = time.monotonic() + 240
    victim = None
    while victim is None:  # the retry's VM, once its test has started (it leaves a mark, then sleeps 3 s)
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        for lease in (world.state / "leases").glob("*-r1.json"):
            name = lease.name[:-len(".json")]
            if world.tart("exec", name, "test", "-e", "/Users/admin/.uneven-ran/TestShort03").returncode == 0:
                victim = name
        time.sleep(0.1)
    assert world.tart("stop", victim).returncode == 0  # the retry's guest dies under its test
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    record = world.latest_record()
    result = check_agreement(_Done(out, err), record)
    tries = result["attempts"]["TestShort03"]
    assert [t["result"] for t in tries] == ["fail", "lost", "fail"], tries
    assert tries[1]["vm"] == victim and tries[2]["vm"].endswith("-r2"), tries
    assert "DONE 2 tests, 1 failure, 1 retry lost in" in out, out
    assert "lost retry of TestShort03 on {}".format(victim) in out, out
    assert "failed TestShort03 on every attempt that ran (2 of 3)" in out, out
    assert result["failed_tests"] == ["TestShort03"]
    world.assert_nothing_left()
    assert uneven_vms(world) == []


class _Done:
    """What check_agreement reads of a finished command started with start()."""

    def __init__(self, out: str, err: str) -> None:
        self.out, self.err = out, err
