"""Three runs at once on one machine, plus a sweep started while they run: all pass, none
loses its VM. The host allows 2 running macOS guests, so the third run waits for a slot."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from .conftest import REPO

pytestmark = pytest.mark.e2e


def test_three_runs_and_a_sweep(world):
    cfg = world.write_config(guest={"env": {"GOSUITE_SLEEP": "3"}})
    env = dict(world.env, TART_STANDIN_MAX_VMS="2")
    argv = [sys.executable, "-m", "invoke", "--search-root", str(REPO), "test-vm", "--config", str(cfg)]
    runs = [subprocess.Popen(argv, cwd=str(world.cwd), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, stdin=subprocess.DEVNULL) for _ in range(3)]
    # A sweep while they run must not touch any of them.
    deadline = time.monotonic() + 60
    while len(world.ephemeral_vms()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    sweep = world.invoke("cleanup-orphans", env={"TART_STANDIN_MAX_VMS": "2"})
    assert sweep.code == 0, sweep.text
    assert "removing vm" not in sweep.err, sweep.err
    outputs = [run.communicate(timeout=300) for run in runs]
    for run, (_, err) in zip(runs, outputs):
        assert run.returncode == 0, err
    waited = [err for _, err in outputs if "waiting for a slot" in err]
    assert waited, "no run had to wait although only 2 VMs may run at once"
    records = [p for p in (world.root / ".vmtasks" / "runs").iterdir() if p.is_dir() and not p.is_symlink()]
    assert len(records) == 3
    for record in records:
        assert json.loads((record / "result.json").read_text())["exit_code"] == 0
    world.assert_nothing_left()


def test_a_sweep_from_another_state_dir_never_kills_a_live_run(world):
    """Two checkouts (two users, two state dirs) share one TART_HOME. While checkout A's run
    is in its suite, checkout B's cleanup-orphans and B's own run (whose start-up sweep sees
    A's VM without a lease in B's ledger) must leave A's running VM alone."""
    cfg = world.write_config(guest={"env": {"GOSUITE_SLEEP": "6"}})
    argv = [sys.executable, "-m", "invoke", "--search-root", str(REPO), "test-vm-run", "--test=TestSlow",
            "--config", str(cfg)]
    a = subprocess.Popen(argv, cwd=str(world.cwd), env=world.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not world.ephemeral_vms() and time.monotonic() < deadline:
        time.sleep(0.1)
    other_state = world.root / "other-checkout-state"
    b_env = {"VMTASKS_STATE_DIR": str(other_state)}
    sweep = world.invoke("cleanup-orphans", "--include-unleased", env=b_env)
    assert sweep.code == 0, sweep.text
    assert "removing vm" not in sweep.err, sweep.err
    b = world.invoke("test-vm-run", "--test=TestShellRC", env=b_env)
    assert b.code == 0, b.text
    out, err = a.communicate(timeout=300)
    assert a.returncode == 0, err
    world.assert_nothing_left()
