"""Prepared images: pay for the guest's setup once, not on every run.

``invoke vm-prepare`` (or ``test-vm --prepare`` when the image is missing) clones the base,
boots it, runs the config's ``setup`` and ``prepare`` steps, removes the build's key, flushes
the guest's disks, stops it and renames it to ``<prefix>-prepared-<hash>``. The hash covers
what decides the image's content (vmtasks/lifecycle/images.py): the base image's identity, the setup
and prepare steps, the guest-side tool bundle and a format version. A run whose hash
matches an existing image clones it and skips the setup steps; a stale one is never used.

Safety: the build runs under a temporary name (``<prefix>-building-<hash>``) with a lease
like any run's VM, so a build killed at any point leaves nothing a later run takes for a
finished image (the sweep removes it); a lock per hash makes two runs that need the same
missing image build it once (the other waits, and says so).
"""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from vmtasks.settings.factory import task_command

from . import images
from .vm import tool_bundle


@dataclass(frozen=True)
class ImagePlan:
    hash: str
    name: str  # the finished image's name
    building: str  # the build's temporary name
    inputs: Dict[str, Any]
    exists: bool
    why: str  # why it must be (re)built: which input changed, or "no image yet"


def image_plan(parts, listed=None, bundle: Optional[bytes] = None) -> ImagePlan:
    """The prepared image this config needs, and whether it exists. ``bundle``: the run's
    tool bundle, when it has one already."""
    cfg = parts.cfg
    identity = dict(parts.backend.image_identity(cfg.vm.base), vm_cpu=cfg.vm.cpu, vm_memory=cfg.vm.memory)
    digest_of_bundle = images.bundle_digest(bundle if bundle is not None else tool_bundle(cfg))
    inputs = images.image_inputs(identity, cfg.setup, cfg.prepare, digest_of_bundle)
    digest = images.hash_inputs(inputs)
    prefix = cfg.vm.name_prefix
    listing = parts.backend.list_vms() if listed is None else listed
    exists = images.find_prepared(listing, prefix, digest) is not None
    why = ""
    if not exists:
        last = images.latest_record(parts.ledger.state_dir, prefix)
        why = images.explain_change(last["inputs"], inputs) if last else "no prepared image built yet"
    return ImagePlan(digest, images.prepared_name(prefix, digest), images.building_name(prefix, digest),
                     inputs, exists, why)


OTHER_CONFIG_MAX_AGE = 30 * 24 * 3600.0  # another config's image is stale after this (or --max-age)


def stale(parts, listed=None, max_age: Optional[float] = None,
          now: Optional[float] = None) -> Tuple[List[Tuple[Any, str]], List[str]]:
    """Prepared images of this prefix that no config on this machine can use, each with
    why, and notes on the ones kept. Every image of this config's current hash is kept; an
    image whose record names another config file that still exists is that config's to
    judge (two configs or two checkouts sharing a prefix) and is kept until it is older
    than ``max_age`` (default :data:`OTHER_CONFIG_MAX_AGE`). An image with no record of its
    config (built by an older vmtasks) is judged by this config's hash alone."""
    prefix = parts.cfg.vm.name_prefix
    listing = parts.backend.list_vms() if listed is None else listed
    try:
        current: Optional[str] = image_plan(parts, listing).hash
    except Exception:  # noqa: BLE001 - the base is gone: keep the newest recorded image
        last = images.latest_record(parts.ledger.state_dir, prefix)
        current = last["hash"] if last else None
    if current is None:
        return [], []
    now = time.time() if now is None else now
    bound = OTHER_CONFIG_MAX_AGE if max_age is None else max_age
    ours = images.config_identity(parts.cfg.source)
    doomed: List[Tuple[Any, str]] = []
    kept: List[str] = []
    for vm in images.stale_images(listing, prefix, current):
        record = images.load_record(parts.ledger.state_dir, vm.name) or {}
        owner = record.get("config") if isinstance(record.get("config"), str) else ""
        if not owner or owner == ours:
            doomed.append((vm, "stale prepared image (this config now needs {})".format(current)))
        elif not os.path.isfile(owner):
            doomed.append((vm, "prepared image of config {}, which is gone".format(owner)))
        else:
            built = record.get("built_at")
            age = now - built if isinstance(built, (int, float)) else None
            if age is not None and age > bound:
                doomed.append((vm, "prepared image of config {}, built {:.0f} days ago".format(owner, age / 86400)))
            else:
                kept.append("kept: {} was made by config {}, which may still use it; remove it with: "
                            "invoke cleanup-orphans --prepared --config {}".format(vm.name, owner, shlex.quote(owner)))
    return doomed, kept


def clean(reporter, parts, dry_run: bool, max_age: Optional[float] = None) -> int:
    """Remove stale prepared images and abandoned builds; 1 if one could not be removed."""
    prefix = parts.cfg.vm.name_prefix
    listing = parts.backend.list_vms()
    doomed, kept = stale(parts, listing, max_age)
    doomed += [(vm, "abandoned build") for vm in images.abandoned_builds(listing, prefix, parts.ledger.state_dir)]
    for line in kept:
        reporter.info("  " + line)
    code = 0
    for vm, why in doomed:
        reporter.info("  {} {}: {}".format("would remove" if dry_run else "removing", vm.name, why))
        if dry_run:
            continue
        try:
            parts.backend.remove(vm.name, parts.cfg.timeouts.teardown)
            images.remove_record(parts.ledger.state_dir, vm.name)
        except Exception as exc:  # noqa: BLE001 - reported, the others still go
            reporter.error("{}: {}".format(vm.name, getattr(exc, "message", exc)))
            code = 1
    if not doomed:
        reporter.info("no stale prepared images")
    return code


def doctor_checks(parts, listing) -> List[tuple]:
    """vm-doctor: each prepared image with its hash, disk use, and whether it is stale."""
    prefix = parts.cfg.vm.name_prefix
    found = images.prepared_images(listing, prefix)
    if not found:
        return [("prepared", "ok", "no prepared images (`{}` builds one)".format(
            task_command(parts.cfg, "vm-prepare")), "")]
    try:
        current = image_plan(parts, listing).hash
    except Exception:  # noqa: BLE001
        current = ""
    out = []
    for image in found:
        used = parts.backend.image_disk_gb(image.name)
        size = " {:.1f} GB".format(used) if used is not None else ""
        if image.hash == current:
            out.append(("prepared", "ok", "{} (hash {}, current){}".format(image.name, image.hash, size), ""))
        else:
            out.append(("prepared", "warn", "{} is stale (hash {}, config needs {}){}".format(
                image.name, image.hash, current or "?", size), parts.cleanup_command + " --prepared"))
    return out
