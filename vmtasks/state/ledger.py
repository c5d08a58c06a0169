"""Who owns which VM: leases in a per-user state directory shared by all checkouts.

A run writes its lease (atomically, durably) *before* it clones and removes it *after*
teardown, so a VM with our prefix whose lease names a dead owner is an orphan. "Dead" must be
proved: the owner's PID is gone, is a zombie, or was reused (its start time differs from the
lease's). Anything we cannot read or cannot judge counts as alive, because a wrong "dead"
deletes someone's VM.

One run may own several VMs: one lease per VM, all with the same run id and PID; each VM
has its own key dir (a kept VM's key must outlive its siblings' teardown).
While a run waits for a child command that creates state (``tart clone``), it records that
child (``note_child``), so a sweep after a ``kill -9`` of the run can wait for the child to end
before it decides about the VM the child is making.

Layout of the state directory::

    leases/<vm>.json     the lease (one per VM)
    children/<vm>.json   the in-flight child command of the VM's run, if any
    keys/<run-id>/       the run's SSH key (shared by all VMs of the run)
    unleased.json        when a sweep first saw each VM with our prefix and no lease
"""

from __future__ import annotations

import dataclasses
import errno
import getpass
import json
import os
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from vmtasks.guest.atomic import write_atomic, write_hint
from vmtasks.guest.errors import StateError

STATE_DIR_HINT = "fix its permissions or point VMTASKS_STATE_DIR / OPENBOOT_VM_STATE_DIR elsewhere"


def default_state_dir(environ: Mapping[str, str]) -> Path:
    if environ.get("VMTASKS_STATE_DIR"):
        return Path(environ["VMTASKS_STATE_DIR"]).expanduser()
    base = environ.get("XDG_STATE_HOME") or os.path.join(environ.get("HOME") or str(Path.home()), ".local", "state")
    return Path(base) / "vmtasks"


# -- process liveness ----------------------------------------------------------

GONE, ZOMBIE, RUNNING, UNKNOWN = "gone", "zombie", "running", "unknown"


def probe_process(pid: int) -> Tuple[str, Optional[str]]:
    """``(state, start token)`` of ``pid``: state is ``gone``, ``zombie`` (it has exited,
    only its exit status is left), ``running`` (token set) or ``unknown`` (we could not
    tell: callers must then treat it as alive)."""
    if pid <= 0:
        return GONE, None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return GONE, None
    except PermissionError:
        pass  # it exists, owned by someone else
    except OSError:
        return UNKNOWN, None
    if os.path.isdir("/proc/self"):
        return _probe_proc(pid)
    return _probe_ps(pid)


def _probe_proc(pid: int) -> Tuple[str, Optional[str]]:
    """Linux: ``/proc/PID/stat``; fields after the parenthesised command name (which may
    itself hold spaces or parentheses): state first, starttime (field 22) twentieth."""
    try:
        with open("/proc/{}/stat".format(pid)) as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return GONE, None
    except (OSError, IndexError):
        return UNKNOWN, None
    if len(fields) < 20:
        return UNKNOWN, None
    if fields[0] in ("Z", "X"):
        return ZOMBIE, None
    return RUNNING, "linux:" + fields[19]


def _probe_ps(pid: int) -> Tuple[str, Optional[str]]:
    """macOS (no /proc): ``ps -o stat=,lstart=``; a state starting with ``Z`` is a zombie.
    The token is ``ps:`` + the start time, as leases written before this check hold it."""
    try:
        done = subprocess.run(["ps", "-o", "stat=,lstart=", "-p", str(pid)], capture_output=True,
                              text=True, timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN, None
    words = done.stdout.strip().split(None, 1)
    if done.returncode != 0 and not words:
        return GONE, None
    if len(words) < 2:
        return UNKNOWN, None
    if words[0].startswith("Z"):
        return ZOMBIE, None
    return RUNNING, "ps:" + words[1].strip()


def process_start_time(pid: int) -> Optional[str]:
    """An opaque token for when ``pid`` started, or None if it is gone, a zombie, or we
    cannot tell."""
    state, token = probe_process(pid)
    return token if state == RUNNING else None


def process_alive(pid: int, pid_start: str, host: str = "", this_host: Optional[str] = None,
                  stored: Callable[[str], str] = str) -> bool:
    """True unless ``pid`` on ``host`` is proved dead: gone, a zombie, or a different
    process now (start time differs). Another host's process, a process we cannot probe, and
    a recorded start time that is empty all count as alive. ``stored``: how ``host`` and
    ``pid_start`` were written down (an Orchard VM keeps them shell-safe), applied to this
    host's values before comparing. The one liveness rule of leases, records and VM owners."""
    if host and host != stored(this_host or socket.gethostname()):
        return True  # another machine's run: we cannot judge it, so never touch it
    state, token = probe_process(pid)
    if state in (GONE, ZOMBIE):
        return False
    if state == UNKNOWN or not pid_start:
        return True
    return stored(token or "") == pid_start


def current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry (a container): the uid says enough
        return str(os.getuid())


def owner_stamp(pid: Optional[int] = None) -> Dict[str, Any]:
    """This process (or ``pid``) as a record owner: ``{"pid", "pid_start", "host"}``."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "pid_start": process_start_time(pid) or "", "host": socket.gethostname()}


# -- leases ----------------------------------------------------------------------

# Every version wrote these; a lease without one is not ours to judge (left alone, reported).
REQUIRED = ("vm", "run_id", "pid", "pid_start", "host", "key_dir", "keep", "created")


@dataclass(frozen=True)
class Lease:
    vm: str
    run_id: str
    pid: int
    pid_start: str
    host: str
    key_dir: str
    keep: bool = False
    created: float = 0.0
    base: str = ""
    ip: str = ""
    user: str = ""  # who started the run (vm-list: two users share one Mac)
    backend: str = ""  # "tart" or "orchard": where the VM lives (older leases: unknown)
    cleanup: str = ""  # the `invoke cleanup-orphans --config ...` line of the run's own config
    keep_until: float = 0.0  # a kept VM: when its keep_for runs out (epoch seconds; 0: not recorded)

    def owner_alive(self) -> bool:
        return process_alive(self.pid, self.pid_start, self.host)

    @classmethod
    def from_dict(cls, data: Any) -> "Lease":
        """Build from a lease file's JSON. Unknown fields are ignored (a newer version may
        add some); missing or mistyped required ones raise ``ValueError`` saying which."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        missing = [name for name in REQUIRED if name not in data]
        if missing:
            raise ValueError("missing field(s): " + ", ".join(missing))
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if not isinstance(values["pid"], int) or isinstance(values["pid"], bool):
            raise ValueError("field pid is not an integer: {!r}".format(values["pid"])[:200])
        for name in ("vm", "run_id", "pid_start", "host", "key_dir", "base", "ip", "user", "backend", "cleanup"):
            if name in values and not isinstance(values[name], str):
                raise ValueError("field {} is not a string".format(name))
        for name in ("created", "keep_until"):
            if name in values and (isinstance(values[name], bool) or not isinstance(values[name], (int, float))):
                raise ValueError("field {} is not a number".format(name))
        if "keep" in values and not isinstance(values["keep"], bool):
            raise ValueError("field keep is not true/false")
        return cls(**values)


@dataclass(frozen=True)
class Unreadable:
    """A lease file we could not read: its VM is left alone, the file is reported."""

    path: Path
    vm: str  # from the file name
    reason: str


@dataclass(frozen=True)
class Child:
    """An in-flight child command of a run (``tart clone``), recorded by ``note_child``."""

    vm: str
    pid: int
    pid_start: str
    host: str
    argv: Tuple[str, ...] = ()
    started: float = 0.0

    def alive(self) -> bool:
        return process_alive(self.pid, self.pid_start, self.host)

    def command(self) -> str:
        return " ".join(shlex.quote(a) for a in self.argv) or "pid {}".format(self.pid)


@dataclass
class Scan:
    """Every lease file of a ledger: the readable ones by VM, and the others."""

    leases: Dict[str, Lease]
    unreadable: List[Unreadable]


def _state_error(what: str, path: Path, exc: OSError, hint: str = "") -> StateError:
    return StateError("{} {}: {}".format(what, path, exc.strerror or exc), hint or write_hint(exc))


class Ledger:
    def __init__(self, state_dir: Path, backend: str = "", cleanup: str = "") -> None:
        self.state_dir = Path(state_dir)
        self.backend = backend  # written into new leases: a sweep from another config can judge them
        self.cleanup = cleanup
        self.leases_dir = self.state_dir / "leases"
        self.keys_dir = self.state_dir / "keys"
        self.children_dir = self.state_dir / "children"
        self.unleased_file = self.state_dir / "unleased.json"

    def ensure(self) -> None:
        """Create the state dirs (0700) or raise a ``StateError`` saying how to fix it."""
        try:
            for d in (self.state_dir, self.leases_dir, self.keys_dir, self.children_dir):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
            probe = self.leases_dir / ".write-test-{}".format(os.getpid())
            try:
                probe.write_text("ok")
            finally:
                try:  # a full disk creates the file and then fails the write: never leave it
                    probe.unlink()
                except FileNotFoundError:
                    pass
        except OSError as exc:
            hint = write_hint(exc) if exc.errno in (errno.ENOSPC, errno.EDQUOT) else STATE_DIR_HINT
            raise StateError("state directory {} is not writable: {}".format(
                self.state_dir, exc.strerror or exc), hint) from None

    def key_dir_for(self, run_id: str) -> Path:
        return self.keys_dir / run_id

    def lease_path(self, vm: str) -> Path:
        """Where ``vm``'s lease lives (for "clean up by hand" lines)."""
        return self.leases_dir / (vm + ".json")


    def new_lease(self, vm: str, run_id: str, keep: bool, base: str) -> Lease:
        """A lease for ``vm`` owned by this process (not written yet: call ``write``)."""
        stamp = owner_stamp()
        return Lease(vm=vm, run_id=run_id, pid=stamp["pid"], pid_start=stamp["pid_start"],
                     host=stamp["host"], key_dir=str(self.key_dir_for(run_id)),
                     keep=keep, created=time.time(), base=base, user=current_user(),
                     backend=self.backend, cleanup=self.cleanup)

    def write(self, lease: Lease) -> None:
        """Atomic and durable: a reader sees the old lease or the new one, never half of
        one, and it survives a crash of the machine. Raises ``StateError``."""
        try:
            write_atomic(self.lease_path(lease.vm), json.dumps(asdict(lease)), mode=0o600, durable=True)
        except StateError as exc:
            raise StateError("cannot record the lease for {} in {}: {}".format(
                lease.vm, self.leases_dir, exc.message.rsplit(": ", 1)[-1]), exc.hint) from None

    def read(self, vm: str) -> Optional[Lease]:
        """``vm``'s lease, or None when there is none or it cannot be read (see ``scan``)."""
        lease, _ = self._load(self.lease_path(vm))
        return lease

    def _load(self, path: Path) -> Tuple[Optional[Lease], str]:
        """The lease in ``path``, or None and why not ("" when the file does not exist)."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None, ""
        except (OSError, UnicodeDecodeError) as exc:
            return None, "cannot read: {}".format(getattr(exc, "strerror", None) or exc)
        try:
            lease = Lease.from_dict(json.loads(text))
        except ValueError as exc:
            return None, "not a valid lease: {}".format(str(exc)[:200])
        if lease.vm != path.name[:-len(".json")]:
            return None, "names VM {!r}, not the one in its file name".format(lease.vm[:100])
        return lease, ""

    def has_lease(self, vm: str) -> bool:
        """True if a lease file for ``vm`` exists, readable or not (or we cannot tell)."""
        try:
            os.stat(str(self.lease_path(vm)))
            return True
        except FileNotFoundError:
            return False
        except OSError:
            return True

    def scan(self) -> Scan:
        """Every lease file: readable leases by VM name, and the unreadable ones with why."""
        out = Scan({}, [])
        try:
            paths = sorted(self.leases_dir.glob("*.json")) if self.leases_dir.is_dir() else []
        except OSError as exc:
            raise _state_error("cannot list leases in", self.leases_dir, exc, STATE_DIR_HINT) from None
        for path in paths:
            lease, why = self._load(path)
            if lease is not None:
                out.leases[lease.vm] = lease
            elif why:  # a file that vanished meanwhile is a run that just ended
                out.unreadable.append(Unreadable(path, path.name[:-len(".json")], why))
        return out

    def all(self) -> Dict[str, Lease]:
        """The readable leases by VM name."""
        return self.scan().leases

    def remove(self, vm: str) -> None:
        """Remove ``vm``'s lease (and its child record); a missing one is fine."""
        for path in (self.lease_path(vm), self._child_path(vm)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise _state_error("cannot remove", path, exc) from None

    def release(self, vm: str) -> None:
        """The end of ``vm``'s ownership: remove its lease, and its key dir unless another
        lease still refers to it. Raises ``StateError``."""
        lease = self.read(vm)
        self.remove(vm)
        if lease is not None and lease.key_dir and not self.key_dir_in_use(lease.key_dir):
            self.remove_key_dir(Path(lease.key_dir))

    def key_dir_in_use(self, key_dir: str, scan: Optional[Scan] = None) -> bool:
        """True if a lease refers to ``key_dir``, or an unreadable lease might."""
        scan = scan or self.scan()
        name = Path(key_dir).name
        if any(Path(lease.key_dir) == Path(key_dir) for lease in scan.leases.values()):
            return True
        return any(name in u.vm for u in scan.unreadable)

    def remove_key_dir(self, key_dir: Path) -> None:
        try:
            shutil.rmtree(str(key_dir))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _state_error("cannot remove key dir", key_dir, exc) from None

    def key_dirs(self) -> List[Path]:
        try:
            if not self.keys_dir.is_dir():
                return []
            return sorted(p for p in self.keys_dir.iterdir() if p.is_dir())
        except OSError as exc:
            raise _state_error("cannot list key dirs in", self.keys_dir, exc, STATE_DIR_HINT) from None

    def forget_command(self, vm: str, key_dir: str = "") -> str:
        """The shell line that removes ``vm``'s lease (and ``key_dir`` if given), for a
        "clean up by hand" message after the VM itself is removed."""
        parts = []
        if key_dir:
            parts.append("rm -rf " + shlex.quote(str(key_dir)))
        parts.append("rm -f " + " ".join(shlex.quote(str(p)) for p in (self.lease_path(vm), self._child_path(vm))))
        return "; ".join(parts)

    # -- in-flight children -------------------------------------------------
    def _child_path(self, vm: str) -> Path:
        return self.children_dir / (vm + ".json")

    def note_child(self, vm: str, pid: int, argv: Sequence[str] = ()) -> Child:
        """Record that ``vm``'s run waits for child ``pid`` (e.g. ``tart clone``), so a sweep
        after this run dies waits for it. Not fsynced: if the machine crashes, the child
        dies with it. Raises ``StateError``."""
        state, token = probe_process(pid)
        child = Child(vm=vm, pid=pid, pid_start=token or "", host=socket.gethostname(),
                      argv=tuple(str(a) for a in argv), started=time.time())
        if state in (GONE, ZOMBIE):
            return child  # already over: nothing to wait for
        data = dict(asdict(child), argv=list(child.argv))
        try:
            self.children_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise _state_error("cannot create", self.children_dir, exc) from None
        write_atomic(self._child_path(vm), json.dumps(data), mode=0o600)
        return child

    def clear_child(self, vm: str) -> None:
        """The child of ``vm``'s run has ended. Best effort: a record left behind names a
        dead PID (or a reused one, told apart by its start time), which a sweep ignores."""
        try:
            self._child_path(vm).unlink()
        except OSError:
            pass

    def child(self, vm: str) -> Optional[Child]:
        """The recorded in-flight child of ``vm``'s run, if any (an unreadable record: None)."""
        try:
            data = json.loads(self._child_path(vm).read_text(encoding="utf-8"))
            return Child(vm=str(data["vm"]), pid=int(data["pid"]), pid_start=str(data.get("pid_start", "")),
                         host=str(data.get("host", "")), argv=tuple(str(a) for a in data.get("argv", ())),
                         started=float(data.get("started", 0.0)))
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None

    # -- unleased VMs: when a sweep first saw them ----------------------------------
    def unleased_first_seen(self, names: Sequence[str], now: float) -> Tuple[Dict[str, float], str]:
        """When a sweep first saw each of ``names`` (VMs with our prefix and no lease),
        recording ``now`` for new ones and forgetting VMs no longer there. Returns the times
        and a problem line ("" if none): when the file cannot be written, new VMs count
        as first seen now (so they are never old enough to remove)."""
        try:
            seen = json.loads(self.unleased_file.read_text(encoding="utf-8"))
            if not isinstance(seen, dict):
                seen = {}
        except (OSError, ValueError):
            seen = {}
        out: Dict[str, float] = {}
        for name in names:
            value = seen.get(name)
            out[name] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else now
        if out == seen:
            return out, ""
        try:
            write_atomic(self.unleased_file, json.dumps(out, indent=1, sort_keys=True), mode=0o600)
        except StateError as exc:
            return {name: (out[name] if name in seen else now) for name in names}, exc.message
        return out, ""
