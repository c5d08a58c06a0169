"""Fault matrix: a failure or a signal at each stage. For each: the exit code, the stage named
in the message, and nothing left behind (no VM in `tart list`, no key dir, no lease)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List

import pytest

from .conftest import PREFIX, REPO, TOTALS

pytestmark = pytest.mark.e2e


def expect_clean(world, scenario: str) -> None:
    vms, keys, leases = world.ephemeral_vms(), world.key_dirs(), world.leases()
    TOTALS.record(scenario, len(vms), len(keys), len(leases))
    assert (vms, keys, leases) == ([], [], []), "leaked after " + scenario


FAILURES = [
    # id, extra env, config sections, flags, exit code, text that must be in stderr
    ("preflight-missing-base", {"OPENBOOT_VM_BASE": "no-such-base"}, {}, [], 1, "stage 'preflight' failed"),
    ("preflight-missing-tart", {"PATH": "/usr/bin:/bin"}, {}, [], 1, "tart"),
    ("preflight-state-dir-unwritable", {"VMTASKS_STATE_DIR": "/proc/vmtasks-state"}, {}, [], 1,
     "stage 'preflight' failed"),
    ("preflight-bad-config", {}, {"timeouts": {"boot": "soon"}}, [], 2, "'timeouts.boot' must be a number"),
    ("clone-fails", {"TART_STANDIN_FAIL": "clone"}, {}, [], 1, "stage 'clone' failed"),
    ("run-fails", {"TART_STANDIN_FAIL": "run"}, {}, [], 1, "stage 'boot' failed"),
    ("ip-never", {"TART_STANDIN_BOOT_DELAY": "30"}, {}, ["--boot-timeout=2"], 1, "stage 'boot' failed"),
    ("sshd-never", {"TART_STANDIN_SSHD_DELAY": "30"}, {}, ["--boot-timeout=3"], 1, "stage 'ip+ssh' failed"),
    ("agent-never", {"TART_STANDIN_AGENT_DELAY": "30"}, {"timeouts": {"key": 2}}, [], 1, "stage 'key' failed"),
    ("setup-fails", {}, {"setup": ["echo setting up; exit 3"]}, [], 1, "stage 'setup' failed"),
    ("sync-fails", {}, {"guest": {"dir": "/proc/vmtasks-cannot-create"}}, [], 1, "stage 'sync' failed"),
    ("suite-fails", {}, {"guest": {"env": {"GOSUITE_FAIL": "1"}}}, [], 1, "TestExampleFailure"),
    ("guest-crash-mid-suite", {"TART_STANDIN_CRASH_AFTER": "6"}, {"guest": {"env": {"GOSUITE_SLEEP": "60"}}},
     [], 1, "stage 'suite' failed"),
]

RECOVERIES = [
    # slow but within deadlines: must pass
    ("ip-before-sshd", {"TART_STANDIN_SSHD_DELAY": "2"}, {}),
    ("agent-late", {"TART_STANDIN_AGENT_DELAY": "2"}, {}),
    ("boot-slow", {"TART_STANDIN_BOOT_DELAY": "1"}, {}),
]


@pytest.mark.parametrize("scenario,env,sections,flags,code,needle", FAILURES, ids=[f[0] for f in FAILURES])
def test_failure_at_each_stage(world, scenario, env, sections, flags, code, needle):
    cfg = world.write_config(**sections) if sections else None
    kwargs = {"config": cfg} if cfg else {}
    done = world.invoke("test-vm", *flags, env=env, timeout=240, **kwargs)
    assert done.code == code, done.text
    assert needle in done.err, done.err
    if "stage '" in needle and "preflight" not in needle:
        assert "next:" in done.err  # every stage error says what to do
    expect_clean(world, scenario)


@pytest.mark.parametrize("scenario,env,sections", RECOVERIES, ids=[r[0] for r in RECOVERIES])
def test_slow_stages_within_deadline_pass(world, scenario, env, sections):
    done = world.invoke("test-vm-run", "--test=TestShellRC", env=env, timeout=240)
    assert done.code == 0, done.text
    expect_clean(world, scenario)


def start_run(world, env: Dict[str, str], config=None, args=("test-vm",)) -> subprocess.Popen:
    argv = [sys.executable, "-m", "invoke", "--search-root", str(REPO), *args,
            "--config", str(config or world.default_config())]
    # Its own process group, as a terminal's foreground job: signals go to the whole group.
    return subprocess.Popen(argv, cwd=str(world.cwd), env=dict(world.env, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, start_new_session=True)


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 120) -> List[str]:
    """Read stderr until a line contains ``needle``; keep draining in the background after."""
    lines: List[str] = []
    found = threading.Event()

    def reader():
        for line in proc.stderr:
            lines.append(line)
            if needle in line:
                found.set()
        found.set()

    threading.Thread(target=reader, daemon=True).start()
    assert found.wait(timeout), "never saw {!r}: {}".format(needle, "".join(lines))
    assert any(needle in line for line in lines), "".join(lines)
    return lines


SIGNALS = [
    ("SIGINT-boot", signal.SIGINT, "-> boot", {"TART_STANDIN_BOOT_DELAY": "30"}, {}, "boot"),
    ("SIGTERM-boot", signal.SIGTERM, "-> boot", {"TART_STANDIN_BOOT_DELAY": "30"}, {}, "boot"),
    ("SIGINT-setup", signal.SIGINT, "$ sleep 30", {}, {"setup": ["sleep 30"]}, "setup"),
    ("SIGTERM-setup", signal.SIGTERM, "$ sleep 30", {}, {"setup": ["sleep 30"]}, "setup"),
    ("SIGHUP-setup", signal.SIGHUP, "$ sleep 30", {}, {"setup": ["sleep 30"]}, "setup"),
    ("SIGINT-suite", signal.SIGINT, "-> suite", {}, {"guest": {"env": {"GOSUITE_SLEEP": "60"}}}, "suite"),
    ("SIGTERM-suite", signal.SIGTERM, "-> suite", {}, {"guest": {"env": {"GOSUITE_SLEEP": "60"}}}, "suite"),
]


@pytest.mark.parametrize("scenario,signum,marker,env,sections,stage", SIGNALS, ids=[s[0] for s in SIGNALS])
def test_signal_during_long_stage(world, scenario, signum, marker, env, sections, stage):
    cfg = world.write_config(**sections) if sections else None
    proc = start_run(world, env, cfg)
    lines = wait_for_line(proc, marker)
    time.sleep(1.0)  # well inside the stage
    os.killpg(proc.pid, signum)  # as a terminal does: the whole foreground process group
    code = proc.wait(timeout=120)
    time.sleep(0.2)
    text = "".join(lines)
    assert code == 128 + signum, text
    assert "interrupted by {}".format(signal.Signals(signum).name) in text
    assert "stage '{}'".format(stage) in text, text
    expect_clean(world, scenario)


def test_kill_9_then_cleanup_orphans(world):
    proc = start_run(world, {}, world.write_config(guest={"env": {"GOSUITE_SLEEP": "60"}}))
    wait_for_line(proc, "-> suite")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # The killed run could not clean up: its VM, key and lease are there...
    assert len(world.ephemeral_vms()) == 1 and len(world.key_dirs()) == 1 and len(world.leases()) == 1
    dry = world.invoke("cleanup-orphans", "--dry-run")
    assert dry.code == 0 and "would remove vm" in dry.err, dry.text
    assert len(world.ephemeral_vms()) == 1
    # ...until the sweep, which sees the owner is dead.
    done = world.invoke("cleanup-orphans")
    assert done.code == 0, done.text
    expect_clean(world, "kill-9-then-cleanup")


def test_cleanup_orphans_of_one_config_removes_another_configs_dead_run(world):
    """Two configs share one state dir (round-1 F5, round-2): a run of config B (its own prefix)
    is killed; `cleanup-orphans` of config A proves it dead from the ledger and removes its VM,
    key and lease, instead of saying "no orphans"."""
    other = world.write_config("other.yaml", vm={"name_prefix": "vmtasks-other"},
                               guest={"env": {"GOSUITE_SLEEP": "60"}})
    proc = start_run(world, {}, other)
    wait_for_line(proc, "-> suite")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    theirs = [vm for vm in world.vms() if vm.startswith("vmtasks-other-")]
    assert len(theirs) == 1 and len(world.key_dirs()) == 1 and len(world.leases()) == 1
    done = world.invoke("cleanup-orphans")  # config A: the example's, prefix vmtasks-example
    assert done.code == 0, done.text
    assert "removing vm " + theirs[0] in done.err and "another config's VM" in done.err, done.text
    assert [vm for vm in world.vms() if vm.startswith("vmtasks-other-")] == []
    assert world.key_dirs() == [] and world.leases() == []


def test_second_ctrl_c_during_teardown_says_what_is_left(world):
    """Teardown is slowed by a slow `tart stop`; two more Ctrl-C abandon it, with a message
    naming the VM and how to remove it; the sweep then removes it."""
    proc = start_run(world, {"TART_STANDIN_STOP_DELAY": "5"},
                     world.write_config(guest={"env": {"GOSUITE_SLEEP": "60"}}))
    lines = wait_for_line(proc, "-> suite")
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(1.5)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    code = proc.wait(timeout=60)
    text = "".join(lines)
    assert code == 130, text
    assert "teardown in progress" in text, text
    assert "left behind: VM vmtasks-example-" in text and "invoke cleanup-orphans" in text, text
    assert len(world.ephemeral_vms()) <= 1 and len(world.leases()) == 1  # the sweep can find it
    done = world.invoke("cleanup-orphans")
    assert done.code == 0, done.text
    expect_clean(world, "second-ctrl-c-in-teardown")


def test_one_ctrl_c_during_teardown_is_noted_and_teardown_finishes(world):
    """The suite passed; a terminal's Ctrl-C (to the whole process group) lands while
    `tart stop` runs. The `tart` child has its own session, so it is not killed; the signal
    is noted, teardown finishes, and the exit code is the suite's."""
    proc = start_run(world, {"TART_STANDIN_STOP_DELAY": "3"}, args=("test-vm-run", "--test=TestShellRC"))
    lines = wait_for_line(proc, "-> teardown")
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    code = proc.wait(timeout=60)
    text = "".join(lines)
    assert code == 0, text
    assert "teardown in progress, noted" in text, text
    expect_clean(world, "one-ctrl-c-in-teardown")


def test_ctrl_c_during_the_start_up_sweep_exits_130(world):
    """An orphan whose `tart stop` is slow keeps the start-up sweep busy; Ctrl-C there is an
    interruption like any other (exit 130), and the orphan is still removed."""
    orphan = PREFIX + "-orphan-1"
    assert world.tart("clone", "tahoe-base", orphan).returncode == 0
    runner = subprocess.Popen(["tart", "run", "--no-graphics", orphan], env=world.env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dead = subprocess.Popen(["true"])
    dead.wait()
    leases = world.state / "leases"
    leases.mkdir(parents=True, exist_ok=True)
    (leases / (orphan + ".json")).write_text(json.dumps({
        "vm": orphan, "run_id": "orphan", "pid": dead.pid, "pid_start": "linux:1", "host": socket.gethostname(),
        "key_dir": str(world.state / "keys" / "orphan"), "keep": False, "created": time.time() - 60}))
    try:
        proc = start_run(world, {"TART_STANDIN_STOP_DELAY": "3"})
        lines = wait_for_line(proc, "-> orphan sweep")
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=60)
        assert code == 130, "".join(lines)
        expect_clean(world, "ctrl-c-in-sweep")
    finally:
        runner.kill()
