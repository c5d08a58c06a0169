"""Prepared images on Tart (``TartBackend``'s ``PreparedImages`` capability): what identifies
a base image, how much disk an image takes, and the suspended slot copies a run resumes.
The generic side (names, hashes, the build lock, records) is vmtasks/lifecycle/images.py and
vmtasks/lifecycle/prepare.py."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from vmtasks.guest.errors import Cancelled, PreflightError, StageError, VmtasksError
from vmtasks.lifecycle import images
from vmtasks.lifecycle.backend import sleep_or_cancel
from vmtasks.lifecycle.pipeline import Stage, StageRunner

from .cli import Tart

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


class SlotContext:
    """What one slot copy's stages share (``deadline``, ``stage_status``: the StageRunner's)."""

    def __init__(self, slot: int, final: str, temp: str, replace: bool) -> None:
        self.slot, self.final, self.temp, self.replace = slot, final, temp, replace
        self.proc: Optional[subprocess.Popen] = None
        self.deadline = 0.0
        self.stage_status: Optional[str] = None
        self.stage_note = ""


def slot_stages(services, tart: Tart, plan) -> List[Stage]:
    """One suspended slot copy, as a stage table (walked by the same StageRunner as a VM)."""
    cfg = services.cfg

    def clone(ctx: SlotContext) -> None:
        if ctx.replace:  # a slot image whose state is gone: replace it
            tart.delete(ctx.final)
        tart.clone(plan.name, ctx.temp, timeout=max(1.0, ctx.deadline - time.monotonic()), cancel=services.cancel)

    def boot(ctx: SlotContext) -> None:
        with open(services.record.path("suspend-{}.log".format(ctx.slot)), "wb") as log:
            ctx.proc = tart.start(ctx.temp, log, suspendable=True)
        while not tart.exec(ctx.temp, ["true"], timeout=30, cancel=services.cancel).ok:  # the agent is up: booted
            if ctx.proc.poll() is not None or time.monotonic() > ctx.deadline:
                raise StageError("boot", ctx.temp, "the slot image did not come up to be suspended",
                                 "see suspend-{}.log in the run record".format(ctx.slot))
            sleep_or_cancel(0.2, services.cancel)

    def suspend(ctx: SlotContext) -> None:
        if not tart.suspend(ctx.temp):
            raise StageError("suspend", ctx.temp, "this Tart cannot suspend VMs (needs macOS 14+)",
                             "runs boot the prepared image cold")
        assert ctx.proc is not None  # the boot stage started it
        try:
            code = ctx.proc.wait(timeout=max(0.0, ctx.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            # Saving a large VM's memory can outlast timeouts.teardown: no slot image then
            # (the caller stops and deletes the half-saved VM).
            raise StageError("suspend", ctx.temp, "suspending took longer than {:g}s (timeouts.teardown)".format(
                cfg.timeouts.teardown), "raise timeouts.teardown for a VM with much memory; runs boot the "
                "prepared image cold meanwhile") from None
        state = (tart.get(ctx.temp) or {}).get("State")
        if code != 0 or state != "suspended":
            raise StageError("suspend", ctx.temp, "suspending failed (`tart run` exited {}, state {})".format(
                code, state), "runs boot the prepared image cold; see suspend-{}.log".format(ctx.slot))

    def seal(ctx: SlotContext) -> None:
        tart.rename(ctx.temp, ctx.final)
        images.save_record(services.ledger.state_dir, ctx.final, plan.inputs, services.run_id, config=cfg.source)

    return [
        Stage("clone", "clone the prepared image", clone, "clone",
              lambda ctx: ["tart clone {} {}".format(plan.name, ctx.temp)]),
        Stage("boot", "boot it suspendable, wait for the guest agent", boot, "boot",
              lambda ctx: ["tart run --suspendable --no-graphics {}  &".format(ctx.temp)]),
        Stage("suspend", "suspend it, wait for its state to be saved", suspend, "teardown",
              lambda ctx: ["tart suspend {}".format(ctx.temp)]),
        Stage("seal", "rename it into the slot's name", seal, None,
              lambda ctx: ["tart rename {} {}".format(ctx.temp, ctx.final)]),
    ]


def build_suspended_slots(services, tart: Tart, plan, count: int) -> List[str]:
    """Where Tart can suspend (macOS 14+): one suspended copy of the prepared image per VM
    slot, ``<image>-s1`` .. ``-sN``, so a run resumes instead of cold-booting. A saved state
    is tied to its MAC address, so two VMs resumed at once need one each: slot N serves the
    run's N-th VM. Each is booted from the stopped image (a fresh MAC), left to come up,
    suspended and renamed into place (``slot_stages``, each stage timed, recorded and its
    errors converted by the StageRunner); nothing of a failed attempt is kept, and a host
    that cannot suspend just gets no slot images (runs boot cold). ``services``: a
    ``vm.VmServices``. Returns the names made."""
    cfg, ledger = services.cfg, services.ledger
    prefix = cfg.vm.name_prefix
    made: List[str] = []
    listing = {vm.name: vm for vm in services.backend.list_vms()}
    stages = slot_stages(services, tart, plan)
    for slot in range(1, count + 1):
        final = images.prepared_name(prefix, plan.hash, slot)
        if final in listing and listing[final].state == "suspended":
            continue
        temp = images.building_name(prefix, plan.hash, slot)
        ctx = SlotContext(slot, final, temp, replace=final in listing)
        runner = StageRunner(cfg, services.reporter, services.record, temp, services.cancel)
        ledger.write(ledger.new_lease(temp, services.run_id, keep=False, base=plan.name))
        try:
            for stage in stages:
                runner.run(stage, ctx)
            made.append(final)
        except VmtasksError as exc:
            services.reporter.warn("no suspended image for slot {}: {}".format(slot, exc.message))
            try:
                if ctx.proc is not None and ctx.proc.poll() is None:
                    tart.stop(temp, timeout=30)
                tart.delete(temp)
            except VmtasksError as again:
                services.reporter.warn("{} is left (the sweep removes it): {}".format(temp, again.message))
            if isinstance(exc, Cancelled):
                raise
            break  # the next slot would fail the same way
        finally:
            ledger.remove(temp)
    return made
