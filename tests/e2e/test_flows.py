"""The main flows, for real: invoke -> stand-in tart -> guest sshd -> rsync -> go test."""

from __future__ import annotations

import json

import pytest

from .conftest import BASE, junit_cases, junit_counts

pytestmark = pytest.mark.e2e

ALL_TOP_LEVEL = {"TestShellRC", "TestDotfilesDirs", "TestDefaultsWrite", "TestPackages", "TestExampleFailure",
                 "TestSlow"}


def test_full_suite_runs_in_the_guest_and_leaves_nothing(world):
    done = world.invoke("test-vm")
    assert done.code == 0, done.text
    record = world.latest_record()
    counts = junit_counts(record / "junit.xml")
    assert counts["failures"] == 0 and counts["tests"] >= len(ALL_TOP_LEVEL)
    assert ALL_TOP_LEVEL <= set(junit_cases(record / "junit.xml"))
    # The tests' side effects stayed in the guest: nothing in the host's HOME.
    assert not (world.home / ".zshrc").exists()
    assert not (world.home / ".gosuite-ran").exists()
    stages = [s["stage"] for s in json.loads((record / "stages.json").read_text())]
    assert stages == ["preflight", "sweep", "image", "list", "clone", "boot", "ip+ssh", "key", "setup", "sync", "suite",
                      "teardown"]
    world.assert_nothing_left()
    assert world.vms() == [BASE]
    # Secrets: the user's ~/.ssh is never written, the key never lands in the record.
    assert not (world.home / ".ssh").exists()
    for path in record.iterdir():
        assert b"PRIVATE KEY" not in path.read_bytes(), path


def test_tests_really_ran_inside_with_in_vm_set(world):
    done = world.invoke("test-vm", "--keep")  # a bare --keep means always
    assert done.code == 0, done.text
    vms = world.ephemeral_vms()
    assert len(vms) == 1
    assert "attach:" in done.err and "clean up:" in done.err
    assert "suspended: it holds no VM slot" in done.err, done.err
    world.resume(vms[0])
    ran = world.tart("exec", vms[0], "sh", "-c", "ls .gosuite-ran && cat .gosuite-ran/TestShellRC && cat .zshrc")
    assert ran.returncode == 0, ran.stderr
    assert "TestDefaultsWrite" in ran.stdout and "OPENBOOT_IN_VM=1" in ran.stdout
    assert "brew shellenv" in ran.stdout
    # The run is over: a plain sweep lists the kept VM but leaves it; --include-kept removes it.
    sweep = world.invoke("cleanup-orphans")
    assert sweep.code == 0 and world.ephemeral_vms() == vms, sweep.text
    sweep = world.invoke("cleanup-orphans", "--include-kept")
    assert sweep.code == 0, sweep.text
    world.assert_nothing_left()


def test_failing_test_exit_code_comes_home(world):
    cfg = world.write_config(guest={"env": {"GOSUITE_FAIL": "1"}})
    done = world.invoke("test-vm", config=cfg)
    assert done.code == 1, done.text
    assert "TestExampleFailure" in done.err and "intentional failure" in done.err
    record = world.latest_record()
    counts = junit_counts(record / "junit.xml")
    assert counts["failures"] == 1
    result = json.loads((record / "result.json").read_text())
    assert result["failed_tests"] == ["TestExampleFailure"] and result["exit_code"] == 1
    world.assert_nothing_left()
    # --rerun-failed runs only that test (which passes now that the env is back to normal).
    world.write_config()
    again = world.invoke("test-vm", "--rerun-failed")
    assert "rerunning the tests that failed in run " + record.name in again.err, again.err
    assert again.code == 0, again.text
    assert set(junit_cases(world.latest_record() / "junit.xml")) == {"TestExampleFailure"}
    world.assert_nothing_left()


def test_run_exactly_two_tests(world):
    done = world.invoke("test-vm-run", "--test=TestShellRC|TestDefaultsWrite")
    assert done.code == 0, done.text
    assert set(junit_cases(world.latest_record() / "junit.xml")) == {"TestShellRC", "TestDefaultsWrite"}
    world.assert_nothing_left()


def test_old_test_knob_limits_test_vm(world):
    done = world.invoke("test-vm", env={"OPENBOOT_VM_TEST": "TestPackages/brew\\|cask_\\[x\\]"})
    assert done.code == 0, done.text
    cases = set(junit_cases(world.latest_record() / "junit.xml"))
    assert "TestPackages" in cases and "TestShellRC" not in cases
    world.assert_nothing_left()


def test_hostile_test_name_is_never_interpreted(world):
    """Each alternative would create a file named pwned* if any shell layer interpreted it:
    on the host (in the invoking directory) or in the guest (in the admin's home)."""
    name = ("^TestShellRC$|$(touch pwned1)|`touch pwned2`|x'; touch pwned3; echo '"
            '|"; touch pwned4; "|a\nb; touch pwned5|${IFS}touch${IFS}pwned6')
    done = world.invoke("test-vm-run", "--test=" + name, "--keep=always")
    vms = world.ephemeral_vms()
    try:
        assert done.code == 0, done.text
        assert not list(world.cwd.glob("pwned*")) and not list(world.home.glob("pwned*"))
        world.resume(vms[0])
        guest = world.tart("exec", vms[0], "sh", "-c", "ls -a /Users/admin /Users/admin/gosuite")
        assert guest.returncode == 0 and "pwned" not in guest.stdout
        # ...and the regex reached go test intact: exactly the one test it names ran.
        assert set(junit_cases(world.latest_record() / "junit.xml")) == {"TestShellRC"}
    finally:
        world.invoke("cleanup-orphans", "--include-kept")
    world.assert_nothing_left()


def test_inner_task_refuses_on_the_host(world):
    done = world.invoke("test-vm-inner")
    assert done.code != 0
    assert "VMTASKS_IN_VM=1 (or OPENBOOT_IN_VM=1) is not set" in done.err and "nothing was run" in done.err
    assert not (world.home / ".gosuite-ran").exists()
    done = world.invoke("test-vm-inner-run", "--test=TestShellRC")
    assert done.code != 0 and "VMTASKS_IN_VM=1 (or OPENBOOT_IN_VM=1) is not set" in done.err


def test_dry_run_creates_nothing(world):
    before = world.vms()
    done = world.invoke("test-vm", "--dry-run")
    assert done.code == 0, done.text
    # The plan is the command's result: on stdout, walked from the same stage table as a run.
    assert "tart clone tahoe-base vmtasks-example-" in done.out and "rsync" in done.out
    assert done.out.index("preflight") < done.out.index("sweep") < done.out.index("clone") < \
        done.out.index("teardown")
    assert world.vms() == before
    world.assert_nothing_left()


def test_doctor_fails_without_base_image_and_passes_with_it(world, tmp_path):
    done = world.invoke("vm-doctor")
    assert done.code == 0, done.text
    assert "stand-in" in done.err and "fail " not in done.err
    empty = tmp_path / "empty-tart-home"
    empty.mkdir()
    done = world.invoke("vm-doctor", env={"TART_HOME": str(empty)})
    assert done.code == 1
    # The hint is the one that works where the tool runs: the stand-in cannot pull.
    assert "base image" in done.err and "tart create tahoe-base" in done.err and "tart pull" not in done.err


def test_missing_base_image_fails_before_any_vm(world):
    done = world.invoke("test-vm", env={"OPENBOOT_VM_BASE": "no-such-base"})
    assert done.code != 0
    assert "no-such-base" in done.err and "tart create no-such-base" in done.err
    world.assert_nothing_left()
    assert not (world.state / "keys").exists() or world.key_dirs() == []
