"""Many VMs, one run (the test queue), end to end through the stand-in with the uneven
sample suite (examples/uneven): every test exactly once, merged counts, exit codes, a guest
killed mid-run, Ctrl-C, and static --shard partitions for CI matrices."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
import yaml

from .conftest import REPO, junit_cases, junit_counts, top_level_results

pytestmark = pytest.mark.e2e

UNEVEN = REPO / "examples" / "uneven"
PREFIX = "vmtasks-uneven"


def suite_list() -> List[str]:
    """The suite's own list of top-level tests (the ground truth the queue must cover)."""
    done = subprocess.run(["go", "test", "-list", ".*", "-tags=e2e,vm", "./test/e2e/..."], cwd=str(UNEVEN),
                          capture_output=True, text=True, timeout=120, check=True)
    return sorted(line for line in done.stdout.splitlines() if line.startswith("Test"))


def uneven_config(world, scale: str, **env) -> Path:
    data = yaml.safe_load((UNEVEN / "vm.yaml").read_text())
    data["project_dir"] = str(UNEVEN)
    data["guest"]["env"] = dict(data["guest"]["env"], UNEVEN_SCALE=scale, **env)
    path = world.root / "uneven.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def uneven_vms(world) -> List[str]:
    return [vm for vm in world.vms() if vm.startswith(PREFIX + "-")]


def test_two_vms_run_every_test_exactly_once(world):
    done = world.invoke("test-vm", "--vms", "2", config=uneven_config(world, "0.3"), timeout=300)
    assert done.code == 0, done.text
    record = world.latest_record()
    cases = junit_cases(record / "junit.xml")
    assert sorted(cases) == suite_list(), "JUnit names must be the suite's own list, each once"
    assert len(cases) == len(set(cases))
    streams = sorted(record.glob("*/suite-output.txt"))
    assert len(streams) == 2, "each VM keeps its own raw output"
    per_vm = [top_level_results(path) for path in streams]
    assert all(sum(c.values()) > 0 for c in per_vm), "both VMs must have run tests: {}".format(per_vm)
    counts = junit_counts(record / "junit.xml")
    assert counts["tests"] == sum(sum(c.values()) for c in per_vm)
    assert counts["failures"] == sum(c["fail"] for c in per_vm) == 0
    # The verdict counts subtests too, as gotestsum does (TestWithSubtests has 3).
    assert "DONE {} tests".format(len(cases) + 3) in done.out, done.out
    assert uneven_vms(world) == [] and world.key_dirs() == [] and world.leases() == []


def test_a_red_run_exits_1_and_counts_the_failure(world):
    done = world.invoke("test-vm", "--vms", "2", config=uneven_config(world, "0.1", UNEVEN_FAIL="TestMediumC"),
                        timeout=300)
    assert done.code == 1, done.text
    counts = junit_counts(world.latest_record() / "junit.xml")
    assert counts["failures"] == 1 and counts["tests"] == len(suite_list())
    assert "TestMediumC" in done.text
    assert uneven_vms(world) == [] and world.leases() == []


def start(world, *args, config: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "invoke", "--search-root", str(REPO), *args, "--config", str(config)]
    return subprocess.Popen(argv, cwd=str(world.cwd), env=world.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL, start_new_session=True)


def wait_for_tests_on_both(world, timeout: float = 120) -> List[str]:
    """The two VMs once each has started a test (its raw stream has a `run` event)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = world.root / ".vmtasks" / "runs" / "latest"
        busy = [p.name for p in sorted(record.glob("*")) if (p / "suite-output.txt").is_file()
                and '"Action":"run"' in (p / "suite-output.txt").read_text()]
        if len(busy) == 2:
            return busy
        time.sleep(0.2)
    raise AssertionError("the two VMs never both started tests")


def test_killing_one_guest_mid_run_moves_its_queue_to_the_other(world):
    proc = start(world, "test-vm", "--vms", "2", config=uneven_config(world, "1"))
    victim, survivor = wait_for_tests_on_both(world)
    assert world.tart("stop", victim).returncode == 0  # the guest dies under the run
    out, err = proc.communicate(timeout=300)
    text = out + err
    assert proc.returncode == 1, text
    assert "VM lost" in text, text
    record = world.latest_record()
    cases = junit_cases(record / "junit.xml")
    assert sorted(cases) == suite_list(), "every test reported once, the lost one as failed"
    counts = junit_counts(record / "junit.xml")
    assert counts["failures"] + counts["errors"] == 1, counts  # only the test the dead VM was running
    ran_on_survivor = top_level_results(record / survivor / "suite-output.txt")
    assert sum(ran_on_survivor.values()) >= len(cases) - 3, "the survivor did not take the rest of the queue"
    assert uneven_vms(world) == [] and world.key_dirs() == [] and world.leases() == []


def test_ctrl_c_stops_handing_out_tests_and_leaves_nothing(world):
    proc = start(world, "test-vm", "--vms", "2", config=uneven_config(world, "1"))
    wait_for_tests_on_both(world)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "interrupted by SIGINT" in err
    assert uneven_vms(world) == [] and world.key_dirs() == [] and world.leases() == []


def run_shard(world, shard: str) -> List[str]:
    """`invoke test-vm-inner --shard K/N` here, as a CI job does on its fresh runner (the
    uneven suite only sleeps and writes under HOME, which is the test's own)."""
    done = inner_shard(world, shard)
    assert done.returncode == 0, done.stdout + done.stderr
    names = []
    for line in done.stdout.splitlines():
        event = json.loads(line) if line.startswith("{") else {}
        if event.get("Action") in ("pass", "fail", "skip") and event.get("Test") and "/" not in event["Test"]:
            names.append(event["Test"])
    return names


def test_static_shards_cover_the_list_exactly_once(world):
    (world.root / "durations.json").write_text("{}")
    first, second = run_shard(world, "1/2"), run_shard(world, "2/2")
    assert first and second
    assert sorted(first + second) == suite_list(), "the two shards must cover the suite exactly once"
    assert not set(first) & set(second)


def inner_shard(world, shard: str):
    """`invoke test-vm-inner --shard <shard>` as a CI job runs it; the finished process."""
    data = yaml.safe_load((UNEVEN / "vm.yaml").read_text())
    data["guest"]["dir"] = str(UNEVEN)
    data["suite"]["durations"] = str(world.root / "durations.json")
    cfg = world.root / "inner.json"
    cfg.write_text(json.dumps(data))
    env = dict(world.env, OPENBOOT_IN_VM="1", OPENBOOT_VM_CONFIG=str(cfg), UNEVEN_SCALE="0.01")
    return subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(REPO), "test-vm-inner",
                           "--shard", shard, "--json-output"], cwd=str(world.cwd), env=env, capture_output=True,
                          text=True, timeout=300)


def test_shard_refuses_an_empty_or_huge_n_and_empty_shards_pass(world):
    empty = inner_shard(world, "")  # an unset CI matrix variable
    assert empty.returncode == 2 and "--shard is empty" in empty.stderr and '"Action"' not in empty.stdout
    huge = inner_shard(world, "1/10000000000")
    assert huge.returncode == 2 and "more than 100000" in huge.stderr
    count = len(suite_list())
    past = inner_shard(world, "{}/100000".format(count + 1))  # more jobs than tests: nothing to do, and it says so
    assert past.returncode == 0, past.stderr
    assert "0 of {} tests".format(count) in past.stderr and "are empty" in past.stderr
    assert '"Action":"run"' not in past.stdout.replace(" ", "")
