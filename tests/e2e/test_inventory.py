"""``invoke vm-list`` and ``invoke vm-login`` (issue 12, as Test Kitchen's list and login):
a kept VM is listed with its run and state, a login with its run key works over real
OpenSSH, and ``cleanup-orphans --include-kept`` removes it."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

import pytest

from .conftest import PREFIX, REPO

pytestmark = pytest.mark.e2e


def _invoke_with_input(world, args: List[str], text: str, timeout: float = 60) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "invoke", "--search-root", str(REPO), *args, "--config",
            str(world.default_config())]
    return subprocess.run(argv, cwd=str(world.cwd), env=world.env, input=text, capture_output=True, text=True,
                          timeout=timeout)


def _rows(stdout: str) -> Dict[str, List[str]]:
    """vm-list's table: VM name -> its cells (split on runs of two or more spaces)."""
    import re

    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines and lines[0].split()[:2] == ["VM", "RUN"], stdout
    return {cells[0]: cells for cells in (re.split(r"\s{2,}", line.strip()) for line in lines[1:])}


def _lease(world, vm: str) -> dict:
    return json.loads((world.state / "leases" / (vm + ".json")).read_text())


@pytest.fixture
def kept(world):
    """A finished run whose VM was kept: (world, vm name, run id)."""
    done = world.invoke("test-vm-run", "--test=TestShellRC", "--keep=always")
    assert done.code == 0, done.text
    vms = world.ephemeral_vms()
    assert len(vms) == 1, vms
    run_id = world.latest_record().name
    yield world, vms[0], run_id
    world.invoke("cleanup-orphans", "--include-kept")


def test_vm_list_shows_the_kept_vm_with_its_run_and_state(kept):
    world, vm, run_id = kept
    listed = world.invoke("vm-list")
    assert listed.code == 0, listed.text
    rows = _rows(listed.out)
    assert set(rows) == {vm}, listed.out
    name, run, owner, state, age, address = rows[vm]
    assert run == run_id
    # keep_for (default 24 h) bounds its life; vm-list says when it ends
    # suspended once its tests were over: it holds no VM slot
    assert state in ("kept, expires in 24.0h (suspended)", "kept, expires in 23.9h (suspended)"), state
    assert address == _lease(world, vm)["ip"] and address.startswith("127.")
    assert "pid {}".format(_lease(world, vm)["pid"]) in owner
    assert age.endswith(("m", "h", "d"))


def test_vm_list_names_the_owning_user(kept):
    world, vm, _ = kept
    rows = _rows(world.invoke("vm-list").out)
    owner = rows[vm][2]
    assert owner.startswith(getpass.getuser() + "@"), owner


def test_vm_login_by_run_and_by_vm_name_works(kept):
    world, vm, run_id = kept
    for target in (run_id, vm):
        # vm-login takes no command: like `ssh host`, it reads the session from stdin.
        done = _invoke_with_input(world, ["vm-login", target], "echo login-ok-$((6 * 7)); whoami; exit 3\n")
        assert "login-ok-42" in done.stdout, done.stdout + done.stderr
        assert "admin" in done.stdout
        assert done.returncode == 3, "the session's exit code should come home"
    # The user's own ssh setup is never touched.
    assert not (world.home / ".ssh").exists()


def test_login_argv_runs_a_command_over_real_ssh(kept):
    world, vm, run_id = kept
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from vmtasks.guest import config\n"
        "from vmtasks.settings import factory\n"
        "from vmtasks.ui import inventory\n"
        "from vmtasks.ui.report import Reporter\n"
        "cfg = config.load(Path(sys.argv[1]))\n"
        "print(json.dumps(inventory.login(factory.Parts(cfg, Reporter()), sys.argv[2]).argv))\n"
    )
    made = subprocess.run([sys.executable, "-c", code, str(world.default_config()), run_id], cwd=str(world.cwd),
                          env=dict(world.env, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    argv = json.loads(made.stdout)
    assert argv[0] == "ssh" and argv[-1] == "admin@" + _lease(world, vm)["ip"]
    assert "BatchMode=yes" in argv and "IdentitiesOnly=yes" in argv
    ran = subprocess.run(argv + ["true"], capture_output=True, text=True, timeout=30, env=world.env,
                         stdin=subprocess.DEVNULL)
    assert ran.returncode == 0, ran.stderr
    probe = subprocess.run(argv + ["cat", ".gosuite-ran/TestShellRC"], capture_output=True, text=True, timeout=30,
                           env=world.env, stdin=subprocess.DEVNULL)
    assert "OPENBOOT_IN_VM=1" in probe.stdout, "not the VM the run used: " + probe.stderr


def test_vm_login_unknown_target_is_a_clear_error(kept):
    world, _, _ = kept
    done = _invoke_with_input(world, ["vm-login", "no-such-run"], "")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "no-such-run" in done.stderr and "vm-list" in done.stderr


def test_cleanup_include_kept_removes_the_kept_vm(kept):
    world, vm, _ = kept
    removed = world.invoke("cleanup-orphans", "--include-kept")
    assert removed.code == 0, removed.text
    world.assert_nothing_left()
    listed = world.invoke("vm-list")
    assert listed.code == 0 and "no {}-* VMs".format(PREFIX) in listed.out, listed.text
    login = _invoke_with_input(world, ["vm-login", vm], "")
    assert login.returncode != 0 and "Traceback" not in login.stderr


def test_vm_list_shows_a_running_run_as_live(world):
    slow = world.write_config(name="slow.yaml", guest={"env": {"GOSUITE_SLEEP": "30"}})
    argv = [sys.executable, "-m", "invoke", "--search-root", str(REPO), "test-vm-run", "--test=TestSlow",
            "--config", str(slow)]
    proc = subprocess.Popen(argv, cwd=str(world.cwd), env=world.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        rows = {}
        while time.monotonic() < deadline and proc.poll() is None:
            listed = world.invoke("vm-list", config=slow)
            rows = _rows(listed.out) if listed.out.startswith("VM") else {}
            if rows and any(r[5] != "-" for r in rows.values()):
                break
            time.sleep(0.5)
        assert len(rows) == 1, rows
        (cells,) = rows.values()
        assert cells[3] == "live", cells
        assert "pid {}".format(proc.pid) in cells[2], cells
    finally:
        os.killpg(proc.pid, 2)
        proc.wait(timeout=120)
    world.assert_nothing_left()


def test_vm_list_shows_hostile_vm_names_as_text(world):
    """A VM named with escape sequences (retitle the window, clear the screen) and a newline:
    vm-list shows them as visible characters, on one row."""
    hostile = PREFIX + "-\x1b]0;pwned\x07\x1b[2J\x9b31m\nTestFake"
    made = world.tart("clone", "tahoe-base", hostile)
    assert made.returncode == 0, made.stderr
    try:
        listed = world.invoke("vm-list")
        assert listed.code == 0, listed.text
        assert "\x1b" not in listed.out and "\x07" not in listed.out and "\x9b" not in listed.out
        rows = _rows(listed.out)
        assert list(rows) == [PREFIX + "-^[]0;pwned\\x07^[[2J\\x9b31m\\nTestFake"], listed.out
    finally:
        world.tart("delete", hostile)


def test_an_expired_kept_vm_is_removed_without_include_kept(kept):
    world, vm, _ = kept
    lease_path = world.state / "leases" / (vm + ".json")
    lease = json.loads(lease_path.read_text())
    assert lease["keep_until"] > time.time() + 23 * 3600
    swept = world.invoke("cleanup-orphans")
    assert swept.code == 0 and vm in world.vms(), swept.text  # not expired: kept
    lease["keep_until"] = time.time() - 60  # as if its day had passed
    lease_path.write_text(json.dumps(lease))
    assert "expired" in world.invoke("vm-list").out
    swept = world.invoke("cleanup-orphans")
    assert swept.code == 0 and "past its keep_for" in swept.err, swept.text
    world.assert_nothing_left()


def test_a_kept_vm_is_suspended_and_holds_no_slot(kept):
    """The host runs 2 VMs at most: with a kept (suspended) VM, a new run still gets both
    slots at once; vm-login then resumes the kept VM and finds what its test left."""
    world, vm, _ = kept
    assert world.tart("get", vm, "--format", "json").stdout.count('"suspended"') == 1
    done = world.invoke("test-vm", "--vms", "2", env={"TART_STANDIN_MAX_VMS": "2"})
    assert done.code == 0, done.text
    assert "waiting for a slot" not in done.text, done.text
    session = _invoke_with_input(world, ["vm-login", vm], "cat .gosuite-ran/TestShellRC; exit 0\n")
    assert "OPENBOOT_IN_VM=1" in session.stdout, session.stdout + session.stderr
    assert "resuming kept VM " + vm in session.stderr, session.stderr
