"""Prepared images on Tart (``TartBackend``'s ``PreparedImages`` capability): what identifies
a base image, how much disk an image takes, and the suspended slot copies a run resumes.
The generic side (names, hashes, the build lock, records) is vmtasks/images.py and
vmtasks/prepare.py."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from . import images
from .backend import Cancelled
from .errors import PreflightError, StageError, VmtasksError
from .tart import Tart

# What `tart get` tells that decides a clone's content (or the config a clone inherits).
IDENTITY_FIELDS = ("OS", "Disk", "DiskFormat", "Size", "CPU", "Memory")


def base_identity(tart: Tart, base: str) -> Dict[str, Any]:
    """What identifies the base image's content, from ``tart get BASE --format json``.

    Kept: the name, ``OS``, ``Disk`` (GB), ``DiskFormat``, ``Size`` (allocated GB with three
    decimals, so about a MB of resolution) and ``CPU``/``Memory`` (a clone inherits them).
    Left out: ``Accessed`` (``tart list``; every clone of the base bumps it), ``Running`` and
    ``State`` (they change with use, not content), ``Display``.

    How far to trust it: ``Size`` moves whenever the base's disk is written (a boot of the
    base, a re-pull into the same name), ``Disk`` on a resize; a write that keeps the
    allocation within the same MB is missed. A base named by digest (``...@sha256:...``) is
    content-addressed and fully trustworthy by its name alone; for anything else, a forced
    rebuild (or a ``FORMAT_VERSION`` bump) is the answer to a doubt.
    """
    info = tart.get(base)
    if info is None:
        if "@sha256:" in base:
            return {"name": base}
        raise PreflightError(
            "base image '{}' is not a local VM (`tart get {}` failed)".format(base, base),
            "prepared images are built from a local base: tart clone ghcr.io/cirruslabs/tahoe-base:latest {} "
            "(or name the base by digest, NAME@sha256:...)".format(base))
    identity: Dict[str, Any] = {"name": base}
    for key in IDENTITY_FIELDS:
        if key in info:
            identity[key] = info[key]
    return identity


# --- disk use --------------------------------------------------------------------------------

@dataclass(frozen=True)
class DiskUse:
    name: str
    size_gb: float  # allocated on the host's disk (``tart get`` Size)
    disk_gb: int  # the guest's disk size
    state: str
    saved_state_gb: float  # state.vzvmsave of a suspended VM: Tart's Size does not count it

    @property
    def total_gb(self) -> float:
        return self.size_gb + self.saved_state_gb


def disk_use(tart: Tart, name: str, tart_home: Optional[Union[str, "os.PathLike[str]"]] = None) -> Optional[DiskUse]:
    """How much host disk a VM takes (for vm-doctor), or None if it does not exist.

    On APFS a clone shares its unchanged blocks with its source, so Sizes do not add up to
    what deleting them frees. The saved state is read from Tart's storage layout
    (``$TART_HOME/vms/<name>/state.vzvmsave``, TART_HOME defaulting to ``~/.tart``).
    """
    info = tart.get(name)
    if info is None:
        return None
    try:
        size_gb = float(info.get("Size", 0))
    except (TypeError, ValueError):
        size_gb = 0.0
    home = Path(tart_home) if tart_home else Path(os.environ.get("TART_HOME") or Path.home() / ".tart")
    try:
        saved = (home / "vms" / name / "state.vzvmsave").stat().st_blocks * 512
    except OSError:
        saved = 0
    disk = info.get("Disk", 0)
    return DiskUse(name=name, size_gb=size_gb, disk_gb=int(disk) if isinstance(disk, (int, float)) else 0,
                   state=str(info.get("State", "")), saved_state_gb=round(saved / 1e9, 3))


def build_suspended_slots(run, tart: Tart, plan, count: int) -> List[str]:
    """Where Tart can suspend (macOS 14+): one suspended copy of the prepared image per VM
    slot, ``<image>-s1`` .. ``-sN``, so a run resumes instead of cold-booting. A saved state
    is tied to its MAC address, so two VMs resumed at once need one each: slot N serves the
    run's N-th VM. Each is booted from the stopped image (a fresh MAC), left to come up,
    suspended and renamed into place; nothing of a failed attempt is kept, and a host that
    cannot suspend just gets no slot images (runs boot cold). Returns the names made."""

    from .machine_tart import sleep_or_cancel

    cfg, ledger = run.cfg, run.ledger
    prefix = cfg.vm.name_prefix
    made: List[str] = []
    listing = {vm.name: vm for vm in run.backend.list_vms()}
    for slot in range(1, count + 1):
        final = images.prepared_name(prefix, plan.hash, slot)
        if final in listing and listing[final].state == "suspended":
            continue
        temp = images.building_name(prefix, plan.hash, slot)
        ledger.write(ledger.new_lease(temp, run.run_id, keep=False, base=plan.name))
        proc = None
        try:
            if final in listing:  # a slot image whose state is gone: replace it
                tart.delete(final)
            tart.clone(plan.name, temp, timeout=cfg.timeouts.clone, cancel=run.cancel)
            with open(run.record.path("suspend-{}.log".format(slot)), "wb") as log:
                proc = tart.start(temp, log, suspendable=True)
            deadline = time.monotonic() + cfg.timeouts.boot
            while not tart.exec(temp, ["true"], timeout=30, cancel=run.cancel).ok:  # the agent is up: booted
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise StageError("prepare", temp, "the slot image did not come up to be suspended",
                                     "see suspend-{}.log in the run record".format(slot))
                sleep_or_cancel(0.2, run.cancel)
            if not tart.suspend(temp):
                raise StageError("prepare", temp, "this Tart cannot suspend VMs (needs macOS 14+)",
                                 "runs boot the prepared image cold")
            try:
                code = proc.wait(timeout=cfg.timeouts.teardown)
            except subprocess.TimeoutExpired:
                # Saving a large VM's memory can outlast timeouts.teardown: no slot image
                # then (the handler below stops and deletes the half-saved VM).
                raise StageError("prepare", temp, "suspending took longer than {:g}s (timeouts.teardown)".format(
                    cfg.timeouts.teardown), "raise timeouts.teardown for a VM with much memory; runs boot the "
                    "prepared image cold meanwhile") from None
            state = (tart.get(temp) or {}).get("State")
            if code != 0 or state != "suspended":
                raise StageError("prepare", temp, "suspending failed (`tart run` exited {}, state {})".format(
                    code, state), "runs boot the prepared image cold; see suspend-{}.log".format(slot))
            tart.rename(temp, final)
            images.save_record(ledger.state_dir, final, plan.inputs, run.run_id, config=cfg.source)
            made.append(final)
        except VmtasksError as exc:
            run.reporter.warn("no suspended image for slot {}: {}".format(slot, exc.message))
            try:
                if proc is not None and proc.poll() is None:
                    tart.stop(temp, timeout=30)
                tart.delete(temp)
            except VmtasksError as again:
                run.reporter.warn("{} is left (the sweep removes it): {}".format(temp, again.message))
            if isinstance(exc, Cancelled):
                raise
            break  # the next slot would fail the same way
        finally:
            ledger.remove(temp)
    return made
