"""Prepared images through the stand-in (issue 13): built once, used by the next runs with
their setup stage skipped, rebuilt (saying why) when a setup step changes, never taken from
a killed build, built once by two runs that need it at the same time, and cleaned when stale."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from .conftest import PREFIX, REPO

pytestmark = pytest.mark.e2e

# A setup step that costs time, so "setup skipped" is visible in the record.
SLOW_SETUP = ["sleep 1.5", "python3 -c 'import invoke' 2>/dev/null || PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip "
              "install --user --quiet --disable-pip-version-check 'invoke>=2,<3'"]


def all_images(world):
    """Prepared images, stopped ones and their suspended per-slot copies (`-sN`)."""
    return sorted(vm for vm in world.vms() if vm.startswith(PREFIX + "-prepared-"))


def images(world):
    """The stopped prepared images (one per hash)."""
    return [vm for vm in all_images(world) if not re.search(r"-s\d+$", vm)]


def builds(world):
    return sorted(vm for vm in world.vms() if vm.startswith(PREFIX + "-building-"))


def stage_seconds(record, name):
    return sum(s["seconds"] for s in json.loads((record / "stages.json").read_text()) if s["stage"] == name)


@pytest.fixture
def cleanup_images(world):
    yield
    for vm in all_images(world) + builds(world):
        world.tart("stop", vm)
        world.tart("delete", vm)


def test_prepare_once_then_runs_skip_setup_and_a_changed_step_rebuilds(world, cleanup_images):
    cfg = world.write_config(setup=SLOW_SETUP)
    built = world.invoke("vm-prepare", config=cfg)
    assert built.code == 0, built.text
    assert "no prepared image built yet" in built.err, built.err
    assert len(images(world)) == 1 and builds(world) == []
    assert all_images(world) == [images(world)[0], images(world)[0] + "-s1"]  # one VM: one suspended copy
    assert "DONE prepared image " + images(world)[0] in built.out
    again = world.invoke("vm-prepare", config=cfg)
    assert again.code == 0 and "up to date" in again.err, again.text

    run = world.invoke("test-vm-run", "--test=TestShellRC", config=cfg)
    assert run.code == 0, run.text
    assert "using " + images(world)[0] in run.err
    record = world.latest_record()
    assert stage_seconds(record, "setup") < 1.0, "setup ran although the image is prepared"
    world.assert_nothing_left()

    # A plain run (--no-prepared) pays for the setup steps again.
    plain = world.invoke("test-vm-run", "--test=TestShellRC", "--no-prepared", config=cfg)
    assert plain.code == 0, plain.text
    assert stage_seconds(world.latest_record(), "setup") >= 1.5

    # A changed setup step: the old image is stale, never used; --prepare rebuilds and says why.
    old = images(world)
    cfg = world.write_config(setup=["sleep 1.4"] + SLOW_SETUP[1:])
    stale = world.invoke("test-vm-run", "--test=TestShellRC", config=cfg)
    assert stale.code == 0 and "using " + old[0] not in stale.err, stale.text
    assert "setup step 1 changed" in stale.err, stale.err
    rebuilt = world.invoke("test-vm-run", "--test=TestShellRC", "--prepare", config=cfg)
    assert rebuilt.code == 0, rebuilt.text
    assert "building prepared image" in rebuilt.err and "setup step 1 changed" in rebuilt.err
    assert len(images(world)) == 2
    new = [name for name in images(world) if name not in old]
    # The stale clean-up removes only the stale one.
    swept = world.invoke("cleanup-orphans", "--prepared", config=cfg)
    assert swept.code == 0, swept.text
    assert images(world) == new
    assert all(name.startswith(new[0]) for name in all_images(world)), all_images(world)
    world.assert_nothing_left()


def start(world, *args, config, env=None):
    argv = [sys.executable, "-m", "invoke", "--search-root", str(REPO), *args, "--config", str(config)]
    return subprocess.Popen(argv, cwd=str(world.cwd), env=dict(world.env, **(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, start_new_session=True)


@pytest.mark.parametrize("marker", ["-> clone", "-> boot", "$ sleep 1.5", "-> seal"])
def test_a_killed_build_leaves_nothing_a_later_run_uses(world, cleanup_images, marker):
    cfg = world.write_config(setup=SLOW_SETUP)
    proc = start(world, "vm-prepare", config=cfg, env={"TART_STANDIN_STOP_DELAY": "2"})
    lines = []
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        lines.append(line)
        if marker in line or time.monotonic() > deadline:
            break
    assert any(marker in line for line in lines), "".join(lines)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # Whatever the build left has its temporary name: no finished image appeared.
    assert images(world) == [], world.vms()
    run = world.invoke("test-vm-run", "--test=TestShellRC", config=cfg)
    assert run.code == 0, run.text
    assert "using " + PREFIX + "-prepared-" not in run.err
    # The dead build's VM is an orphan like any other (its lease names a dead owner).
    world.invoke("cleanup-orphans", config=cfg)
    assert builds(world) == [] and images(world) == []
    world.assert_nothing_left()


def test_two_runs_needing_the_same_image_build_it_once(world, cleanup_images):
    cfg = world.write_config(setup=SLOW_SETUP)
    runs = [start(world, "test-vm-run", "--test=TestShellRC", "--prepare", config=cfg) for _ in range(2)]
    outs = [run.communicate(timeout=300) for run in runs]
    for run, (_, err) in zip(runs, outs):
        assert run.returncode == 0, err
    errs = [err for _, err in outs]
    assert sum("building prepared image" in err for err in errs) == 1, errs
    assert any("waiting for run" in err for err in errs), errs
    assert all("using " + PREFIX + "-prepared-" in err or "built meanwhile" in err or "built " in err
               for err in errs), errs
    assert len(images(world)) == 1
    world.assert_nothing_left()


def test_suspended_slot_images_resume_and_a_refused_state_falls_back_to_a_cold_boot(world, cleanup_images):
    """Where Tart can suspend, vm-prepare leaves one suspended copy per VM slot; a run's N-th
    VM resumes slot N's copy (one saved state per MAC), gets this run's key after the resume,
    and says which path it took; a refused saved state boots cold and still passes."""
    cfg = world.write_config(setup=SLOW_SETUP, vms=2)
    built = world.invoke("vm-prepare", config=cfg)
    assert built.code == 0, built.text
    slots = [name for name in all_images(world) if name.endswith(("-s1", "-s2"))]
    assert len(slots) == 2, world.tart("list").stdout
    states = json.loads(world.tart("list", "--format", "json").stdout)
    assert {row["Name"]: row["State"] for row in states if row["Name"] in slots} == {s: "suspended" for s in slots}

    run = world.invoke("test-vm-run", "--test=TestShellRC|TestDefaultsWrite", config=cfg)
    assert run.code == 0, run.text
    assert run.err.count("resumed (" + PREFIX + "-prepared-") == 2, run.err
    world.assert_nothing_left()

    refused = world.invoke("test-vm-run", "--test=TestShellRC", config=cfg, env={"TART_STANDIN_REFUSE_RESTORE": "1"})
    assert refused.code == 0, refused.text
    assert "cold boot: the saved state was refused" in refused.err, refused.err
    world.assert_nothing_left()
    # The slot images themselves are untouched by the runs that cloned them.
    states = json.loads(world.tart("list", "--format", "json").stdout)
    assert {row["Name"]: row["State"] for row in states if row["Name"] in slots} == {s: "suspended" for s in slots}


def test_prepared_clean_up_leaves_another_configs_image(world, cleanup_images):
    """Two configs (two checkouts) share a prefix and a state dir: the sweep of one never
    takes the other's prepared image as stale while that config exists and the image is young."""
    a = world.write_config("a.yaml", setup=SLOW_SETUP)
    b = world.write_config("b.yaml", setup=["sleep 1.4"] + SLOW_SETUP[1:])
    assert world.invoke("vm-prepare", config=a).code == 0
    a_image = images(world)
    assert world.invoke("vm-prepare", config=b).code == 0
    b_image = [name for name in images(world) if name not in a_image]
    assert len(a_image) == 1 and len(b_image) == 1
    swept = world.invoke("cleanup-orphans", "--prepared", config=b)
    assert swept.code == 0, swept.text
    assert images(world) == sorted(a_image + b_image), swept.text
    assert "kept: " + a_image[0] in swept.err and str(a) in swept.err, swept.err
    # Past --max-age it goes, and so does it once its config is gone.
    dry = world.invoke("cleanup-orphans", "--prepared", "--max-age", "0", "--dry-run", config=b)
    assert "would remove " + a_image[0] in dry.err, dry.text
    a.unlink()
    swept = world.invoke("cleanup-orphans", "--prepared", config=b)
    assert swept.code == 0 and "which is gone" in swept.err, swept.text
    assert images(world) == b_image
    assert all(name.startswith(b_image[0]) for name in all_images(world)), all_images(world)


def test_isolated_and_retry_vms_resume_from_the_slot_copies_one_after_another(world, cleanup_images):
    """--isolate --retries with suspended slot copies: every fresh VM resumes (none boots
    cold), and each slot's copy serves several VMs of the run in turn (a clone of a suspended
    VM keeps the copy's saved state and MAC, and the copy stays suspended: the next VM of
    that slot is started only once the previous one is torn down, so no two run with one MAC)."""
    cfg = world.write_config(setup=SLOW_SETUP, vms=2, guest={"env": {"GOSUITE_FAIL": "1"}})
    built = world.invoke("vm-prepare", config=cfg)
    assert built.code == 0, built.text
    slots = sorted(name for name in all_images(world) if name.endswith(("-s1", "-s2")))
    assert len(slots) == 2, world.tart("list").stdout

    run = world.invoke("test-vm-run", "--test=TestShellRC|TestDefaultsWrite|TestDotfilesDirs|TestExampleFailure",
                       "--isolate", "--retries", "1", config=cfg, timeout=400)
    assert run.code == 1, run.text
    resumed = re.findall(r"resumed \((" + re.escape(PREFIX) + r"-prepared-\S+-s\d)\)", run.err)
    assert len(resumed) == 5, run.err  # 4 tests on their own VMs, and one retry
    assert sorted(set(resumed)) == slots and max(resumed.count(s) for s in slots) >= 3, resumed
    assert "cold boot" not in run.err, run.err
    assert "failed TestExampleFailure on every attempt (2)" in run.out, run.out
    world.assert_nothing_left()
    states = json.loads(world.tart("list", "--format", "json").stdout)
    assert {row["Name"]: row["State"] for row in states if row["Name"] in slots} == {s: "suspended" for s in slots}
