"""Prepared images: what identifies one, what it is called, which are stale, who builds it.

A prepared image is a clone of the base on which the config's ``setup`` (and ``prepare``)
steps already ran. Its name carries a hash of everything that decides its content, so a
changed input means a different name and an old image is never taken for a new one:

    <prefix>-prepared-<hash>         stopped image: clones of it boot cold, setup skipped
    <prefix>-prepared-<hash>-s<N>    suspended image for VM slot N: clones of it resume
    <prefix>-building-<hash>[-s<N>]  a build in progress, renamed (``tart rename``) to the
                                     prepared name only when complete, so a killed build
                                     never looks finished

One suspended image per slot, because a saved state is tied to the MAC address it was saved
with: clones of one suspended image share its MAC, and Tart gives a second VM started with
a MAC that is already running a new one, which drops its saved state (a cold boot).

The inputs behind each hash are kept in ``<state dir>/images/<name>.json`` so a rebuild can
say which input changed. ``BuildLock`` makes two runs that need the same missing image build
it once. This module runs on the host only and calls ``tart`` through the driver.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import socket
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, TypeVar, Union

from vmtasks.guest.atomic import write_atomic
from vmtasks.guest.errors import Cancelled, StateError

FORMAT_VERSION = 1
"""Bump when the way an image is built changes in a way the other inputs do not show."""

HASH_LENGTH = 12

Entry = TypeVar("Entry")


# --- identity and hash -----------------------------------------------------------------

def image_inputs(identity: Mapping[str, Any], setup: Sequence[Any], prepare: Sequence[Any],
                 bundle_digest: str, version: int = FORMAT_VERSION) -> Dict[str, Any]:
    """The inputs an image hash covers, as stored beside the image (plain JSON data)."""
    return {
        "version": version,
        "base": dict(identity),
        "setup": list(setup),
        "prepare": list(prepare),
        "bundle": bundle_digest,
    }


def hash_inputs(inputs: Mapping[str, Any]) -> str:
    """The short hex hash of ``image_inputs(...)``: canonical JSON, so stable across runs."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:HASH_LENGTH]


def image_hash(identity: Mapping[str, Any], setup: Sequence[Any], prepare: Sequence[Any],
               bundle_digest: str, version: int = FORMAT_VERSION) -> str:
    """Short hex hash of everything that decides a prepared image's content; any change to
    an input changes it."""
    return hash_inputs(image_inputs(identity, setup, prepare, bundle_digest, version))


def bundle_digest(bundle: bytes, exclude: Iterable[str] = ("config.json",)) -> str:
    """Digest of a tar.gz tool bundle's member names and contents, not their dates.

    ``run.tool_bundle()`` stamps every member with a time, so hashing its bytes would give a
    new image on every run. ``config.json`` is left out by default: it holds per-run
    settings (the test filter, ``keep``), which do not change what setup installs.
    """
    skip = set(exclude)
    digest = hashlib.sha256()
    with tarfile.open(fileobj=io.BytesIO(bundle), mode="r:*") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name not in skip),
                         key=lambda m: m.name)
        for member in members:
            handle = tar.extractfile(member)
            data = handle.read() if handle is not None else b""
            digest.update(member.name.encode("utf-8") + b"\0")
            digest.update(str(len(data)).encode() + b"\0" + data)
    return digest.hexdigest()[:HASH_LENGTH]


def explain_change(old_inputs: Optional[Mapping[str, Any]], new_inputs: Mapping[str, Any]) -> str:
    """One line naming which inputs differ between two ``image_inputs(...)``."""
    if not old_inputs:
        return "no earlier prepared image is recorded"
    changes: List[str] = []
    if old_inputs.get("version") != new_inputs.get("version"):
        changes.append("the image format version changed ({} -> {})".format(
            old_inputs.get("version"), new_inputs.get("version")))
    changes += _base_changes(old_inputs.get("base") or {}, new_inputs.get("base") or {})
    for key, title in (("setup", "setup"), ("prepare", "prepare")):
        changes += _step_changes(title, list(old_inputs.get(key) or []), list(new_inputs.get(key) or []))
    if old_inputs.get("bundle") != new_inputs.get("bundle"):
        changes.append("the guest tool bundle changed ({} -> {})".format(
            old_inputs.get("bundle"), new_inputs.get("bundle")))
    known = {"version", "base", "setup", "prepare", "bundle"}
    for key in sorted((set(old_inputs) | set(new_inputs)) - known):
        if old_inputs.get(key) != new_inputs.get(key):
            changes.append("{} changed".format(key))
    return "; ".join(changes) if changes else "no input changed"


def _base_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
    if old.get("name") != new.get("name"):
        return ["the base image changed ({} -> {})".format(old.get("name"), new.get("name"))]
    fields = ["{} {} -> {}".format(key, old.get(key), new.get(key))
              for key in sorted(set(old) | set(new)) if key != "name" and old.get(key) != new.get(key)]
    if not fields:
        return []
    return ["the base image {} changed ({})".format(new.get("name"), ", ".join(fields))]


def _step_changes(title: str, old: List[Any], new: List[Any]) -> List[str]:
    changes = []
    for index in range(max(len(old), len(new))):
        number = index + 1
        if index >= len(old):
            changes.append("{} step {} added: {!r}".format(title, number, new[index]))
        elif index >= len(new):
            changes.append("{} step {} removed: {!r}".format(title, number, old[index]))
        elif old[index] != new[index]:
            changes.append("{} step {} changed: {!r} -> {!r}".format(title, number, old[index], new[index]))
    return changes


# --- names -------------------------------------------------------------------------------

PREPARED = "prepared"
BUILDING = "building"
_TAIL = re.compile(r"([0-9a-f]{%d})(?:-s([1-9][0-9]*))?" % HASH_LENGTH)


@dataclass(frozen=True)
class ImageName:
    """A parsed prepared or building image name."""

    kind: str  # PREPARED or BUILDING
    hash: str
    slot: Optional[int] = None  # a suspended image's VM slot, None for the stopped image


def _name(prefix: str, kind: str, image_hash: str, slot: Optional[int]) -> str:
    if not re.fullmatch(r"[0-9a-f]{%d}" % HASH_LENGTH, image_hash):
        raise ValueError("not an image hash: {!r}".format(image_hash))
    if slot is not None and slot < 1:
        raise ValueError("VM slots count from 1, got {}".format(slot))
    name = "{}-{}-{}".format(prefix, kind, image_hash)
    return name if slot is None else "{}-s{}".format(name, slot)


def prepared_name(prefix: str, image_hash: str, slot: Optional[int] = None) -> str:
    """``<prefix>-prepared-<hash>``, or ``...-s<slot>`` for the suspended image of a VM slot."""
    return _name(prefix, PREPARED, image_hash, slot)


def building_name(prefix: str, image_hash: str, slot: Optional[int] = None) -> str:
    """The temporary name a build clones to; ``tart rename`` it to ``prepared_name`` when done."""
    return _name(prefix, BUILDING, image_hash, slot)


def _parse(prefix: str, kind: str, name: str) -> Optional[ImageName]:
    head = "{}-{}-".format(prefix, kind)
    if not name.startswith(head):
        return None
    match = _TAIL.fullmatch(name[len(head):])
    if not match:
        return None
    return ImageName(kind, match.group(1), int(match.group(2)) if match.group(2) else None)


def parse_prepared(prefix: str, name: str) -> Optional[ImageName]:
    """The hash and slot of a prepared image name of this prefix, else None."""
    return _parse(prefix, PREPARED, name)


def parse_building(prefix: str, name: str) -> Optional[ImageName]:
    """The hash and slot of a build-in-progress name of this prefix, else None."""
    return _parse(prefix, BUILDING, name)


# --- listings ------------------------------------------------------------------------------
# A listing is what ``Tart.list()`` returns (VmInfo rows) or plain names.

def _entry_name(entry: Any) -> str:
    return entry if isinstance(entry, str) else str(entry.name)


@dataclass(frozen=True)
class PreparedImage:
    name: str
    hash: str
    slot: Optional[int]
    state: str  # from the listing: stopped, suspended, running ("" for a plain name)


def prepared_images(listing: Iterable[Any], prefix: str) -> List[PreparedImage]:
    """Every prepared image of this prefix in the listing, by name (for vm-doctor)."""
    found = []
    for entry in listing:
        parsed = parse_prepared(prefix, _entry_name(entry))
        if parsed is not None:
            found.append(PreparedImage(_entry_name(entry), parsed.hash, parsed.slot,
                                       str(getattr(entry, "state", ""))))
    return sorted(found, key=lambda image: image.name)


def find_prepared(listing: Iterable[Entry], prefix: str, image_hash: str,
                  slot: Optional[int] = None) -> Optional[Entry]:
    """The listing's entry for this prepared image (stopped one, or the slot's suspended
    one), else None. A slot image whose state was lost shows ``stopped``: still usable,
    it boots cold."""
    wanted = prepared_name(prefix, image_hash, slot)
    for entry in listing:
        if _entry_name(entry) == wanted:
            return entry
    return None


def stale_images(listing: Iterable[Entry], prefix: str, image_hash: str) -> List[Entry]:
    """Prepared images of this prefix built from other inputs than ``image_hash``: the ones
    ``cleanup-orphans --prepared`` removes. Every image of the current hash (stopped and per
    slot) is kept. With no current hash at hand (the base is gone), pass the newest recorded
    one: ``latest_record(state_dir, prefix)["hash"]``."""
    stale = []
    for entry in listing:
        parsed = parse_prepared(prefix, _entry_name(entry))
        if parsed is not None and parsed.hash != image_hash:
            stale.append(entry)
    return stale


def leftover_builds(listing: Iterable[Entry], prefix: str) -> List[Entry]:
    """Building-name VMs of this prefix. One whose ``BuildLock.holder`` is None belongs to a
    build that died (killed, crashed): delete it. One with a live holder is in progress."""
    return [entry for entry in listing if parse_building(prefix, _entry_name(entry)) is not None]


def abandoned_builds(listing: Iterable[Entry], prefix: str,
                     state_dir: Union[str, "os.PathLike[str]"]) -> List[Entry]:
    """The leftover builds no live process is building (no holder of their hash's lock):
    safe to stop and delete. A build killed with kill -9 leaves exactly these."""
    abandoned = []
    for entry in leftover_builds(listing, prefix):
        parsed = parse_building(prefix, _entry_name(entry))
        if parsed is not None and BuildLock.holder(state_dir, parsed.hash) is None:
            abandoned.append(entry)
    return abandoned


# --- records of the inputs -----------------------------------------------------------------

def images_dir(state_dir: Union[str, "os.PathLike[str]"]) -> Path:
    return Path(state_dir) / "images"


def record_path(state_dir: Union[str, "os.PathLike[str]"], name: str) -> Path:
    return images_dir(state_dir) / (name + ".json")


def save_record(state_dir: Union[str, "os.PathLike[str]"], name: str, inputs: Mapping[str, Any],
                run_id: str = "", config: str = "") -> Dict[str, Any]:
    """Store an image's inputs beside it (call once the image is complete, before or right
    after the rename); returns the record. ``config``: the config file that made it (a
    sweep of another config on this machine leaves the image to that one)."""
    record = {"name": name, "hash": hash_inputs(inputs), "inputs": dict(inputs),
              "built_at": time.time(), "built_by": run_id, "config": config_identity(config)}
    _ensure_dir(images_dir(state_dir))
    write_atomic(record_path(state_dir, name), json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def config_identity(source: str) -> str:
    """The absolute path of a config file as images record it ("" for built-in defaults)."""
    if not source or source.startswith("<"):
        return ""
    try:
        return str(Path(source).resolve())
    except OSError:
        return os.path.abspath(source)


def load_record(state_dir: Union[str, "os.PathLike[str]"], name: str) -> Optional[Dict[str, Any]]:
    """The stored record of an image, or None (never built here, or unreadable)."""
    try:
        record = json.loads(record_path(state_dir, name).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("inputs"), dict) else None


def remove_record(state_dir: Union[str, "os.PathLike[str]"], name: str) -> None:
    try:
        record_path(state_dir, name).unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StateError("cannot remove {}: {}".format(record_path(state_dir, name), exc.strerror or exc),
                         "fix the permissions of the state directory") from None


def latest_record(state_dir: Union[str, "os.PathLike[str]"], prefix: str) -> Optional[Dict[str, Any]]:
    """The newest record of a prepared image of this prefix: what the last build used, to
    explain what changed since (``explain_change(latest["inputs"], new_inputs)``)."""
    directory = images_dir(state_dir)
    if not directory.is_dir():
        return None
    newest: Optional[Dict[str, Any]] = None
    for path in directory.glob("*.json"):
        name = path.name[:-len(".json")]
        if parse_prepared(prefix, name) is None:
            continue
        record = load_record(state_dir, name)
        if record is not None and (newest is None or record.get("built_at", 0) > newest.get("built_at", 0)):
            newest = record
    return newest


def _ensure_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError("cannot create {}: {}".format(path, exc.strerror or exc),
                         "fix its permissions or point VMTASKS_STATE_DIR / OPENBOOT_VM_STATE_DIR elsewhere") from None


# --- the build lock --------------------------------------------------------------------------

class BuildLock:
    """One build per image hash at a time, across processes: ``flock`` on
    ``<state dir>/images/<hash>.lock`` (left in place, a few bytes each; delete one only
    while holding it).

    The holder writes who it is into the file; a waiter reads that and is told through
    ``on_wait("waiting for run X (pid N) to finish building image Y")``. The kernel frees the
    lock when its holder dies, kill -9 included, so a dead build never blocks anyone. After
    acquiring, look for the image again: the run you waited for may have built it.

        with BuildLock(state_dir, h, image=name, run_id=run.id, on_wait=ui.info):
            if find_prepared(backend.list_vms(), prefix, h) is None:
                build()
    """

    def __init__(self, state_dir: Union[str, "os.PathLike[str]"], image_hash: str, *, image: str = "",
                 run_id: str = "", on_wait: Optional[Callable[[str], None]] = None,
                 timeout: Optional[float] = None, poll: float = 0.1, cancel=None) -> None:
        self.path = images_dir(state_dir) / (image_hash + ".lock")
        self.image_hash = image_hash
        self.image = image or image_hash
        self.run_id = run_id
        self.on_wait = on_wait
        self.timeout = timeout
        self.poll = poll
        self.fd: Optional[int] = None
        self.waited = 0.0
        self.cancel = cancel  # a threading.Event: the run is stopping, stop waiting

    def __enter__(self) -> "BuildLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, waiting (and saying so once) while another run holds it."""
        _ensure_dir(self.path.parent)
        started = time.monotonic()
        told = False
        while True:
            fd = self._open()
            try:
                while not _try_lock(fd):
                    if not told and self.on_wait is not None:
                        time.sleep(min(self.poll, 0.05))  # let a fresh holder write who it is
                        self.on_wait(waiting_message(_read_holder(fd), self.image))
                    told = True
                    if self.timeout is not None and time.monotonic() - started >= self.timeout:
                        holder = _read_holder(fd)
                        raise StateError(
                            "gave up after {:g}s {}".format(self.timeout, waiting_message(holder, self.image)),
                            "if that run is stuck, stop it{}; a killed run frees the lock".format(
                                " (kill {})".format(holder["pid"]) if holder.get("pid") else ""))
                    if self.cancel is not None and self.cancel.wait(self.poll):
                        raise Cancelled("stopped waiting for the image build: the run is stopping")
                    elif self.cancel is None:
                        time.sleep(self.poll)
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed the file we waited on: lock the new one
        self.waited = time.monotonic() - started
        self.fd = fd
        info = {"run_id": self.run_id, "pid": os.getpid(), "host": socket.gethostname(),
                "image": self.image, "since": time.time()}
        data = json.dumps(info).encode("utf-8") + b"\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)

    def _open(self) -> int:
        try:
            return os.open(str(self.path), os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as exc:
            raise StateError("cannot open the build lock {}: {}".format(self.path, exc.strerror or exc),
                             "fix the permissions of the state directory") from None

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)  # no stale "who" for the next waiter to read
        except OSError:
            pass
        os.close(fd)  # closing drops the flock

    @staticmethod
    def holder(state_dir: Union[str, "os.PathLike[str]"], image_hash: str) -> Optional[Dict[str, Any]]:
        """Who holds the build lock of this hash right now (``{"run_id", "pid", "image", ...}``,
        possibly empty while the holder is still writing it), or None when no one does."""
        path = images_dir(state_dir) / (image_hash + ".lock")
        try:
            fd = os.open(str(path), os.O_RDWR)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError("cannot open the build lock {}: {}".format(path, exc.strerror or exc),
                             "fix the permissions of the state directory") from None
        try:
            if _try_lock(fd):
                return None  # closing below releases our probe
            return _read_holder(fd)
        finally:
            os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(str(path)).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _read_holder(fd: int) -> Dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def waiting_message(holder: Mapping[str, Any], image: str) -> str:
    """``waiting for run X (pid N) to finish building image Y``."""
    who = "run {}".format(holder["run_id"]) if holder.get("run_id") else "another run"
    if holder.get("pid"):
        who += " (pid {})".format(holder["pid"])
    return "waiting for {} to finish building image {}".format(who, holder.get("image") or image)
