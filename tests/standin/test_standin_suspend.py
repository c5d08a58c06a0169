"""Suspend, resume and rename, as Tart 2.32 does them (see scripts/README.md)."""

from __future__ import annotations

import json
import time

import pytest

from .conftest import ssh_banner, wait_until

pytestmark = pytest.mark.standin

SUSPEND_LINES = ("pausing VM to take a snapshot...\ncreating a snapshot...\n"
                 "snapshot created successfully! shutting down the VM...\n")
RESUME_LINES = "restoring VM state from a snapshot...\nresuming VM...\n"


def suspend(tart, name: str, **start) -> None:
    """Boot ``name`` with --suspendable, leave a file in its home, suspend it."""
    run = tart.start(name, ssh=False, flags=("--suspendable",), **start)
    tart.exec_ok(name, "sh", "-c", "echo kept > ~/before-suspend")
    done = tart("suspend", name)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")  # returns at once, silent
    assert run.wait() == 0, run.stderr
    assert run.stdout == SUSPEND_LINES


def test_suspend_keeps_the_state_and_run_resumes_it(tart, base):
    tart.ok("clone", base, "vm")
    suspend(tart, "vm")
    rows = {r["Name"]: r for r in json.loads(tart.ok("list", "--format", "json"))}
    assert (rows["vm"]["Running"], rows["vm"]["State"]) == (False, "suspended")
    info = json.loads(tart.ok("get", "vm", "--format", "json"))
    assert (info["Running"], info["State"]) == (False, "suspended")
    assert "suspended" in tart.ok("list").splitlines()[-1]
    saved = json.loads(tart.saved_state("vm").read_text())
    assert saved["macAddress"] == tart.mac("vm")  # a saved state is tied to its MAC
    for command in (["ip", "--resolver", "agent", "vm"], ["exec", "vm", "true"]):
        assert tart(*command).returncode != 0  # suspended is not running
    # ...but Tart's default resolver reads the DHCP leases, and the suspended VM's lease lasts.
    stale = tart("ip", "vm")
    assert stale.returncode == 0 and stale.stdout.startswith("127."), stale

    # The resume skips the boot delay; its output says which path it took.
    resumed = tart.start("vm", env={"TART_STANDIN_BOOT_DELAY": "5"}, ssh=True)
    assert time.monotonic() - resumed.started < 3
    assert resumed.stdout == RESUME_LINES
    assert tart.exec_ok("vm", "cat", "/Users/admin/before-suspend") == "kept\n"
    assert not tart.saved_state("vm").exists() and tart.state("vm") == "running"  # consumed

    # A resumed VM is suspendable without the flag (Tart: a suspended VM runs suspendable).
    assert tart.ok("suspend", "vm") == ""
    assert resumed.wait() == 0 and resumed.stdout == RESUME_LINES + SUSPEND_LINES
    assert tart.state("vm") == "suspended"

    # Stopped after a resume, the next run boots cold: the state was consumed.
    again = tart.start("vm", ssh=False)
    assert again.stdout == RESUME_LINES
    tart.ok("stop", "vm")
    assert again.wait() == 0
    cold = tart.start("vm", ssh=False)
    assert "restoring" not in cold.stdout
    tart.ok("stop", "vm")
    assert cold.wait() == 0 and tart.state("vm") == "stopped"


def test_resume_delay_knob_and_boot_delays_do_not_apply(tart, base):
    suspend(tart, base)
    env = {"TART_STANDIN_RESUME_DELAY": "1", "TART_STANDIN_BOOT_DELAY": "30",
           "TART_STANDIN_SSHD_DELAY": "30", "TART_STANDIN_AGENT_DELAY": "30"}
    run = tart.spawn_run(base, env=env)
    tart.wait_running(run)
    early = tart("ip", "--resolver", "agent", base)
    assert (early.returncode, early.stderr) == (1, "no IP address found (also make sure that Guest agent for "
                                                   "Tart is running inside of a VM)\n")
    assert tart("ip", base).returncode == 0  # the dhcp resolver answers from the old lease at once
    done = tart("ip", "--resolver", "agent", "--wait", "10", base, timeout=20)
    assert done.returncode == 0, done.stderr
    ip = done.stdout.strip()
    assert 0.9 <= time.monotonic() - run.started < 10
    assert wait_until(lambda: ssh_banner(ip), 3)  # sshd and agent were up when suspended
    assert tart.exec_ok(base, "cat", "before-suspend") == "kept\n"
    tart.ok("stop", base)
    assert run.wait() == 0
    bad = tart("run", "--no-graphics", base, env={"TART_STANDIN_RESUME_DELAY": "-1"})
    assert bad.returncode == 1 and "TART_STANDIN_RESUME_DELAY" in bad.stderr


def test_suspend_without_suspendable_fails_the_run_like_tart(tart, base):
    run = tart.start(base, ssh=False)
    done = tart("suspend", base)
    assert (done.returncode, done.stderr) == (0, "")  # tart suspend only sends SIGUSR1
    assert run.wait() == 1
    assert run.stdout == ("Failed to suspend the VM: Invalid virtual machine configuration. "
                          "Unsupported console device in configuration.\n")
    assert tart.state(base) == "stopped" and not tart.saved_state(base).exists()


def test_refuse_knobs(tart, base):
    run = tart.start(base, ssh=False, flags=("--suspendable",), env={"TART_STANDIN_REFUSE_SUSPEND": "1"})
    tart.ok("suspend", base)
    assert run.wait() == 1 and run.stdout.startswith("Failed to suspend the VM: ")
    assert tart.state(base) == "stopped"
    suspend(tart, base)
    refused = tart("run", "--no-graphics", base, env={"TART_STANDIN_REFUSE_RESTORE": "1"}, timeout=30)
    assert refused.returncode == 1 and "failed to restore" in refused.stderr
    assert tart.state(base) == "suspended"  # kept: without the knob it resumes
    resumed = tart.start(base, ssh=False, env={"TART_STANDIN_REFUSE_RESTORE": "0"})
    assert resumed.stdout == RESUME_LINES
    tart.ok("stop", base)
    assert resumed.wait() == 0
    bad = tart("run", "--no-graphics", base, env={"TART_STANDIN_REFUSE_RESTORE": "maybe"})
    assert bad.returncode == 1 and "TART_STANDIN_REFUSE_RESTORE" in bad.stderr


def test_suspend_errors(tart, base):
    stopped = tart("suspend", base)
    assert (stopped.returncode, stopped.stderr) == (2, 'VM "base" is not running\n')
    missing = tart("suspend", "nope")
    assert (missing.returncode, missing.stderr) == (2, 'the specified VM "nope" does not exist\n')
    suspend(tart, base)
    twice = tart("suspend", base)  # suspended is not running
    assert (twice.returncode, twice.stderr) == (2, 'VM "base" is not running\n')
    usage = tart("suspend")
    assert usage.returncode == 64 and "Missing expected argument '<name>'" in usage.stderr
    failing = tart("suspend", base, env={"TART_STANDIN_FAIL": "suspend"})
    assert failing.returncode == 1 and "simulated failure" in failing.stderr


def test_stop_of_a_suspended_vm_drops_the_state(tart, base):
    suspend(tart, base)
    done = tart("stop", base)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert tart.state(base) == "stopped" and not tart.saved_state(base).exists()
    assert tart("stop", base).returncode == 2  # now it is simply not running


def test_new_mac_refuses_the_restore_until_stop_drops_the_state(tart, base):
    suspend(tart, base)
    tart.ok("set", base, "--random-mac")  # Tart's set keeps the saved state...
    assert tart.state(base) == "suspended"
    refused = tart("run", "--no-graphics", base, timeout=30)  # ...which then no longer restores
    assert refused.returncode == 1
    assert refused.stdout == "restoring VM state from a snapshot...\n"
    assert 'VZErrorDomain Code=12' in refused.stderr and "invalid argument" in refused.stderr
    assert tart.state(base) == "suspended" and not tart.running(base)
    tart.ok("stop", base)  # the way out: drop the state, then boot cold
    cold = tart.start(base, ssh=False)
    assert "restoring" not in cold.stdout
    assert tart.exec_ok(base, "cat", "before-suspend") == "kept\n"  # the disk is kept
    tart.ok("stop", base)
    assert cold.wait() == 0


@pytest.mark.parametrize("change", [["--cpu", "6"], ["--memory", "16384"]])
def test_new_cpu_or_memory_refuses_the_restore(tart, base, change):
    suspend(tart, base)
    saved = json.loads(tart.saved_state(base).read_text())
    assert (saved["cpuCount"], saved["memorySize"]) == (4, 8 * 1024 ** 3)
    tart.ok("set", base, *change)
    refused = tart("run", "--no-graphics", base, timeout=30)
    assert refused.returncode == 1 and "failed to restore" in refused.stderr
    assert tart.state(base) == "suspended"


def test_clones_of_a_suspended_vm_keep_state_and_mac(tart, base):
    tart.ok("clone", base, "plain")
    assert tart.mac("plain") != tart.mac(base)  # a stopped source: new MAC
    suspend(tart, base)
    tart.ok("clone", base, "c1")
    tart.ok("clone", base, "c2")
    assert tart.mac("c1") == tart.mac("c2") == tart.mac(base)
    assert tart.state("c1") == tart.state("c2") == "suspended"

    first = tart.start("c1", ssh=False)
    assert first.stdout == RESUME_LINES
    # The same MAC is running: Tart gives the second a new MAC, which drops its state.
    second = tart.start("c2", ssh=False)
    assert second.stdout == ("There is already a running VM with the same MAC address!\n"
                             "Resetting VM to assign a new MAC address...\n")
    assert tart.mac("c2") != tart.mac("c1") and not tart.saved_state("c2").exists()
    assert tart.exec_ok("c2", "cat", "before-suspend") == "kept\n"
    assert tart.state(base) == "suspended"  # the source is untouched
    for name, run in (("c1", first), ("c2", second)):
        tart.ok("stop", name)
        assert run.wait() == 0


def test_rename(tart, base):
    tart.ok("clone", base, "old")
    assert tart.ok("rename", "old", "new") == ""
    assert tart.ok("list", "-q").split() == ["base", "new"]
    suspend(tart, "new")
    tart.ok("rename", "new", "renamed")  # the saved state moves with the VM
    assert tart.state("renamed") == "suspended"
    run = tart.start("renamed", ssh=False)
    assert run.stdout == RESUME_LINES
    running = tart("rename", "renamed", "other")
    assert (running.returncode, running.stderr) == (1, 'VM "renamed" is running\n')
    tart.ok("stop", "renamed")
    assert run.wait() == 0

    missing = tart("rename", "nope", "x")
    assert missing.returncode == 64
    assert missing.stderr.startswith("Error: failed to rename a non-existent local VM: nope\nUsage: tart")
    taken = tart("rename", "renamed", base)
    assert taken.returncode == 64 and taken.stderr.startswith(
        "Error: failed to rename VM renamed, target VM base already exists, delete it first!\n")
    slash = tart("rename", "renamed", "a/b")
    assert slash.returncode == 64
    assert slash.stderr.startswith("Error: <new-name> should be a local name\nUsage: tart rename")
    assert tart("rename", "renamed").returncode == 64
    assert tart.ok("list", "-q").split() == ["base", "renamed"]
