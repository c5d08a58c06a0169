"""Issue 17 on the faithful stand-in: `tart ip` answers from the host's DHCP leases, so a
clone of a suspended slot image has an address before it has resumed (or when it never
will); a resume at the VM limit prints both restore lines before the limit error; the guest
agent answers only about 10 s after a cold boot; and Mac-host failures (Local Network
privacy, a locked keychain) are named, not timed out."""

from __future__ import annotations

import subprocess
import time

import pytest

from .conftest import AGENT_DELAY, BASE
from .test_prepared import SLOW_SETUP, all_images, cleanup_images, start  # noqa: F401 - fixture

pytestmark = pytest.mark.e2e


def prepared_with_slots(world, vms):
    cfg = world.write_config(setup=SLOW_SETUP, vms=vms)
    built = world.invoke("vm-prepare", config=cfg)
    assert built.code == 0, built.text
    assert len([n for n in all_images(world) if n[-3:-1] == "-s"]) == vms, world.vms()
    return cfg


def occupy(world, names):
    """Take the host's VM slots with plain VMs run by hand."""
    runs = []
    for name in names:
        world.tart("clone", BASE, name)
        runs.append(subprocess.Popen(["tart", "run", "--no-graphics", name], env=world.env, start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for name in names:
        deadline = time.monotonic() + 20
        while world.tart("ip", "--resolver", "arp", name).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
    return runs


def release(world, names, runs):
    for name, run in zip(names, runs):
        world.tart("stop", name)
        run.wait(timeout=30)
        world.tart("delete", name)


@pytest.mark.usefixtures("cleanup_images")
def test_a_resume_at_the_vm_limit_waits_for_a_slot_and_still_resumes(world):
    """Both slots taken: the resumed clone prints the restore lines, then the limit error. The
    driver must wait for a slot (not trust the slot's old lease, not take it for a refused
    state) and then resume a fresh clone of the slot image."""
    cfg = prepared_with_slots(world, 1)
    blockers = ["blocker-1", "blocker-2"]
    runs = occupy(world, blockers)
    try:
        proc = start(world, "test-vm-run", "--test=TestShellRC", config=cfg, env={AGENT_DELAY: "0.5"})
        time.sleep(6)
        assert proc.poll() is None, proc.communicate()[1]  # waiting, not failed on a stale address
        release(world, blockers[:1], runs[:1])
        out, err = proc.communicate(timeout=300)
    finally:
        release(world, blockers, runs)
    assert proc.returncode == 0, err
    assert "waiting for a slot" in err, err
    assert "resumed (" in err and "refused" not in err, err
    world.assert_nothing_left()


@pytest.mark.usefixtures("cleanup_images")
def test_a_refused_restore_falls_back_although_the_old_lease_answers(world):
    cfg = prepared_with_slots(world, 1)
    done = world.invoke("test-vm-run", "--test=TestShellRC", config=cfg, env={"TART_STANDIN_REFUSE_RESTORE": "1"})
    assert done.code == 0, done.text
    assert "cold boot: the saved state was refused" in done.err, done.err
    world.assert_nothing_left()


@pytest.mark.usefixtures("cleanup_images")
def test_two_runs_resuming_the_same_slot_each_use_their_own_vm(world):
    """Clones of one slot share its MAC, hence its lease and address: the second `tart run`
    gets a new MAC and boots cold; its driver must not connect to the first run's VM."""
    cfg = prepared_with_slots(world, 1)
    runs = [start(world, "test-vm-run", "--test=TestShellRC", config=cfg) for _ in range(2)]
    outs = [run.communicate(timeout=300) for run in runs]
    for run, (_, err) in zip(runs, outs):
        assert run.returncode == 0, err
    errs = [err for _, err in outs]
    assert sum("resumed (" in err for err in errs) >= 1, errs
    world.assert_nothing_left()


def test_the_driver_copes_with_the_real_agent_delay(world):
    done = world.invoke("test-vm-run", "--test=TestShellRC", env={AGENT_DELAY: ""})  # the stand-in's 10 s
    assert done.code == 0, done.text
    world.assert_nothing_left()


def test_local_network_privacy_is_named_early(world):
    started = time.monotonic()
    done = world.invoke("test-vm-run", "--test=TestShellRC", env={"TART_STANDIN_LOCAL_NETWORK_DENIED": "1"})
    assert done.code != 0
    assert "Local Network" in done.err and "stage 'ip+ssh' failed" in done.err, done.err
    assert time.monotonic() - started < 45  # not the 60 s boot timeout
    world.assert_nothing_left()


def test_a_locked_keychain_is_named(world):
    done = world.invoke("test-vm-run", "--test=TestShellRC", env={"TART_STANDIN_LOCKED_KEYCHAIN": "1"})
    assert done.code != 0
    assert "security unlock-keychain" in done.err and "keychain is locked" in done.err, done.err
    world.assert_nothing_left()
