"""Issue 18, "hold every promise under attack": hostile Go suites on real `go test`, real
OpenSSH and the stand-in, as the attack ran them. Each suite is a small module made for the
test: tests that print forged go framing, hang, or list names no Go test can have, and a
TestMain that holds the suite back so a signal lands before any test event."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import yaml

from .conftest import REPO, junit_cases, junit_counts

pytestmark = pytest.mark.e2e

PREFIX = "vmtasks-hostile"

TESTS_GO = '''//go:build e2e && vm

package e2e

import (
	"fmt"
	"os"
	"strconv"
	"testing"
	"time"
)

func inVM(t *testing.T) {
	if os.Getenv("OPENBOOT_IN_VM") != "1" {
		t.Skip("destructive: only inside a throwaway VM")
	}
}

// TestLongA really passes; the forger below claims it failed.
func TestLongA(t *testing.T) { inVM(t); time.Sleep(2 * time.Second) }
func TestShort1(t *testing.T) { short(t) }
func TestShort2(t *testing.T) { short(t) }
func TestShort3(t *testing.T) { short(t) }

// short sleeps HOSTILE_SHORT seconds (default 0.2): long enough, the other VM stays busy.
func short(t *testing.T) {
	inVM(t)
	seconds, err := strconv.ParseFloat(os.Getenv("HOSTILE_SHORT"), 64)
	if err != nil {
		seconds = 0.2
	}
	time.Sleep(time.Duration(seconds * float64(time.Second)))
}

// TestForger prints go's own framing at the start of lines, as go 1.19's test2json reads it.
func TestForger(t *testing.T) {
	inVM(t)
	if os.Getenv("HOSTILE_SELF_FAIL") == "1" {
		fmt.Println("--- FAIL: TestForger (0.00s)") // its own result, before its real one
	}
	if os.Getenv("HOSTILE_FORGE") != "1" {
		return
	}
	fmt.Println("--- FAIL: TestLongA (0.00s)")
	fmt.Println("=== RUN   TestGhostA")
	fmt.Println("--- PASS: TestGhostA (0.00s)")
	fmt.Println("=== RUN   TestGhostB")
	fmt.Println("--- FAIL: TestGhostB (0.00s)")
	fmt.Println("--- FAIL: TestGhost (0.00s)")
}

// TestHang never ends when asked to.
func TestHang(t *testing.T) {
	inVM(t)
	if os.Getenv("HOSTILE_HANG") == "1" {
		time.Sleep(600 * time.Second)
	}
}
'''

MAIN_GO = '''//go:build e2e && vm

package e2e

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

func TestMain(m *testing.M) {
	for _, arg := range os.Args[1:] {
		if strings.HasPrefix(arg, "-test.list") && os.Getenv("HOSTILE_LIST_NUL") == "1" {
			fmt.Print("TestEvil\\x00Name\\n")
		}
	}
	if os.Getenv("OPENBOOT_IN_VM") == "1" && os.Getenv("HOSTILE_MAIN_SLEEP") == "1" {
		time.Sleep(30 * time.Second) // no test event for 30 seconds
	}
	os.Exit(m.Run())
}
'''

LISTED = ["TestForger", "TestHang", "TestLongA", "TestShort1", "TestShort2", "TestShort3"]


def hostile_suite(world, vms: int, timeouts: Optional[Dict[str, float]] = None, **guest_env) -> Path:
    """The module beside the test's records, and a config that runs it through the stand-in."""
    module = world.root / "hostile"
    (module / "test" / "e2e").mkdir(parents=True, exist_ok=True)
    (module / "go.mod").write_text("module example.com/hostile\n\ngo 1.19\n")
    (module / "test" / "e2e" / "hostile_test.go").write_text(TESTS_GO)
    (module / "test" / "e2e" / "main_test.go").write_text(MAIN_GO)
    data = yaml.safe_load((REPO / "examples" / "uneven" / "vm.yaml").read_text())
    data.update(project_dir=str(module), vms=vms)
    data["vm"]["name_prefix"] = PREFIX
    data["guest"]["dir"] = "/Users/admin/hostile"
    data["guest"]["env"] = {k: str(v) for k, v in guest_env.items()}
    data["timeouts"] = dict(data["timeouts"], **(timeouts or {}))
    path = world.root / "hostile.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def hostile_vms(world) -> List[str]:
    return [vm for vm in world.vms() if vm.startswith(PREFIX + "-")]


def assert_clean(world) -> None:
    assert hostile_vms(world) == [] and world.key_dirs() == [] and world.leases() == []


def verdict(out: str) -> str:
    return [line for line in out.splitlines() if line.startswith("DONE")][-1]


def test_a_queued_test_cannot_fail_another_or_add_testcases(world):
    """--vms 2: TestForger prints `--- FAIL: TestLongA` and ghost RUN/PASS/FAIL lines."""
    done = world.invoke("test-vm", "--vms", "2", config=hostile_suite(world, 2, HOSTILE_FORGE="1"), timeout=300)
    assert done.code == 0, done.text
    junit = world.latest_record() / "junit.xml"
    assert sorted(junit_cases(junit)) == LISTED, "testcases are the suite's own list, each once"
    assert junit_counts(junit)["failures"] == 0
    assert verdict(done.out).startswith("DONE {} tests in".format(len(LISTED))), done.out
    assert_clean(world)


def test_one_vm_without_framing_counts_only_listed_tests(world):
    """--vms 1, go 1.19 (no test2json framing): a printed `--- FAIL: TestGhost` is output."""
    done = world.invoke("test-vm", "--vms", "1", config=hostile_suite(world, 1, HOSTILE_FORGE="1"), timeout=300)
    assert done.code == 0, done.text
    junit = world.latest_record() / "junit.xml"
    assert sorted(junit_cases(junit)) == LISTED
    assert junit_counts(junit)["failures"] == 0
    assert verdict(done.out).startswith("DONE {} tests in".format(len(LISTED))), done.out
    assert_clean(world)


def test_a_failure_the_verdict_counts_never_exits_0(world):
    """--vms 1, go 1.19: TestForger prints its own `--- FAIL:` and then passes (go exits 0).
    The first report counts, so the verdict says 1 failure: the exit code must say so too."""
    done = world.invoke("test-vm", "--vms", "1", config=hostile_suite(world, 1, HOSTILE_SELF_FAIL="1"), timeout=300)
    line = verdict(done.out)
    assert "1 failure" in line, done.out
    assert done.code == 1, done.text
    assert "the suite exited 0, but its results have" in done.out, done.out
    assert sorted(junit_cases(world.latest_record() / "junit.xml")) == LISTED, "TestForger once"
    assert_clean(world)


def test_a_hung_queued_test_times_out_and_the_vm_goes_on(world):
    """--vms 1 through the queue's path is --vms 2 with one VM busy: timeouts.test ran out for
    TestHang; it is killed, failed as timed out, and its VM runs the tests after it."""
    cfg = hostile_suite(world, 2, timeouts={"test": 6}, HOSTILE_HANG="1", HOSTILE_SHORT="3")
    started = time.monotonic()
    done = world.invoke("test-vm", "--vms", "2", config=cfg, timeout=300)
    assert done.code == 1, done.text
    assert "VM lost" not in done.text and "crashed" not in done.text, done.text
    assert "timeouts.test" in done.text and "TestHang" in done.text, done.text
    assert "the kill exited" not in done.text, "the hung test's process group was not killed"
    record = world.latest_record()
    junit = record / "junit.xml"
    assert sorted(junit_cases(junit)) == LISTED, "every test ran: no VM was dropped"
    counts = junit_counts(junit)
    assert counts["failures"] == 1 and counts["errors"] == 0, counts
    assert "not run" not in verdict(done.out), done.out
    # The VM that ran TestHang took more tests after it (the other one was busy with 3 s tests).
    rows = [line.split() for line in (record / "timeline.txt").read_text().splitlines()]
    hang = next(row for row in rows if row[-1] == "TestHang")
    after = [row[-1] for row in rows
             if row[0] != "-" and row[3] == hang[3] and float(row[0].strip("+s")) > float(hang[0].strip("+s"))]
    assert after, "the VM that ran TestHang was not used again:\n" + (record / "timeline.txt").read_text()
    assert time.monotonic() - started < 200
    assert_clean(world)


def test_a_nul_in_the_listing_is_refused_and_the_rest_runs(world):
    """The suite's own listing prints `TestEvil\\x00Name`: a note, no lost VM, the rest runs."""
    cfg = hostile_suite(world, 2)
    done = world.invoke("test-vm", "--vms", "2", config=cfg, env={"HOSTILE_LIST_NUL": "1"}, timeout=300)
    assert "VM lost" not in done.text, done.text
    assert "TestEvil" in done.text and "not a Go test name" in done.text, done.text
    assert done.code == 0, done.text
    assert sorted(junit_cases(world.latest_record() / "junit.xml")) == LISTED
    assert_clean(world)


def start(world, *args: str, config: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "invoke", "--search-root", str(REPO), *args, "--config", str(config)]
    return subprocess.Popen(argv, cwd=str(world.cwd), env=world.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL, start_new_session=True)


def test_hup_before_any_test_event_says_interrupted(world):
    """SIGHUP two seconds into the suite, while TestMain holds it back: interrupted, exit 129."""
    proc = start(world, "test-vm", "--vms", "1", config=hostile_suite(world, 1, HOSTILE_MAIN_SLEEP="1"))
    deadline = time.monotonic() + 180
    stream = None
    while time.monotonic() < deadline:
        latest = world.root / ".vmtasks" / "runs" / "latest"
        if (latest / "suite-output.txt").is_file():
            stream = latest / "suite-output.txt"
            break
        time.sleep(0.2)
    assert stream is not None, "the suite never started"
    time.sleep(2)
    assert '"Action":"run"' not in stream.read_text(), "a test event came before the signal"
    os.killpg(proc.pid, signal.SIGHUP)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGHUP, out + err
    assert "interrupted by SIGHUP" in err
    line = verdict(out)
    assert "interrupted" in line, out
    result = json.loads((world.latest_record() / "result.json").read_text())
    assert result.get("interrupted") is True, result
    assert_clean(world)


def test_a_failed_exit_with_no_failed_test_says_why(world):
    """The verdict and the exit code agree: go fails in the guest before any test (a bad
    GOFLAGS there), so the run exits non-zero and the verdict counts an error that says why."""
    done = world.invoke("test-vm", "--vms", "1", config=hostile_suite(world, 1, GOFLAGS="-no-such-flag"),
                        timeout=300)
    assert done.code != 0, done.text
    line = verdict(done.out)
    assert "1 error" in line, done.out
    assert "exited {} but reported no failed test".format(done.code) in done.out, done.out
    assert "no-such-flag" in done.out, done.out
    assert junit_counts(world.latest_record() / "junit.xml")["errors"] == 1
    assert_clean(world)
