"""Who owns which VM: leases in a per-user state directory shared by all checkouts.

A run writes its lease (atomically) *before* it clones and removes it *after* teardown, so
a VM with our prefix and no live owner is an orphan. "Live" means the owner's PID exists
and its start time matches the lease: a recycled PID does not keep a dead run's VM alive.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional

from .errors import PreflightError


def default_state_dir(environ: Mapping[str, str]) -> Path:
    if environ.get("VMTASKS_STATE_DIR"):
        return Path(environ["VMTASKS_STATE_DIR"]).expanduser()
    base = environ.get("XDG_STATE_HOME") or os.path.join(environ.get("HOME") or str(Path.home()), ".local", "state")
    return Path(base) / "vmtasks"


def process_start_time(pid: int) -> Optional[str]:
    """An opaque token for when ``pid`` started, or None if no such process."""
    try:
        with open("/proc/{}/stat".format(pid)) as fh:
            # Field 22 (starttime) comes after the parenthesised command name.
            return "linux:" + fh.read().rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
    except (OSError, IndexError):
        return None
    try:  # macOS: no /proc
        out = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return "ps:" + out if out else None


@dataclass(frozen=True)
class Lease:
    vm: str
    run_id: str
    pid: int
    pid_start: str
    host: str
    key_dir: str
    keep: bool
    created: float
    base: str = ""
    ip: str = ""

    def owner_alive(self) -> bool:
        if self.host != socket.gethostname():
            return True  # another machine's run: we cannot judge it, so never touch it
        return process_start_time(self.pid) == self.pid_start


class Ledger:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.leases_dir = state_dir / "leases"
        self.keys_dir = state_dir / "keys"

    def ensure(self) -> None:
        """Create the state dirs (0700) or fail with a clear pre-flight error."""
        try:
            for d in (self.state_dir, self.leases_dir, self.keys_dir):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
            probe = self.leases_dir / ".write-test-{}".format(os.getpid())
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise PreflightError(
                "state directory {} is not writable: {}".format(self.state_dir, exc.strerror or exc),
                "fix its permissions or point VMTASKS_STATE_DIR / OPENBOOT_VM_STATE_DIR elsewhere",
            ) from None

    def key_dir_for(self, run_id: str) -> Path:
        return self.keys_dir / run_id

    def _path(self, vm: str) -> Path:
        return self.leases_dir / (vm + ".json")

    def lease_path(self, vm: str) -> Path:
        return self._path(vm)

    def new_lease(self, vm: str, run_id: str, keep: bool, base: str) -> Lease:
        pid = os.getpid()
        return Lease(vm=vm, run_id=run_id, pid=pid, pid_start=process_start_time(pid) or "",
                     host=socket.gethostname(), key_dir=str(self.key_dir_for(run_id)),
                     keep=keep, created=time.time(), base=base)

    def write(self, lease: Lease) -> None:
        """Atomic write: a reader sees the old lease or the new one, never half of one."""
        path = self._path(lease.vm)
        tmp = path.with_name(".{}.{}.tmp".format(path.name, os.getpid()))
        try:
            with open(tmp, "w") as fh:
                json.dump(asdict(lease), fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise PreflightError(
                "cannot record the lease for {} in {}: {}".format(lease.vm, self.leases_dir, exc.strerror or exc),
                "free disk space or fix permissions of the state directory, then retry",
            ) from None

    def read(self, vm: str) -> Optional[Lease]:
        return self._load(self._path(vm))

    def _load(self, path: Path) -> Optional[Lease]:
        try:
            data = json.loads(path.read_text())
            return Lease(**data)
        except (OSError, ValueError, TypeError):
            return None

    def all(self) -> Dict[str, Lease]:
        out: Dict[str, Lease] = {}
        if self.leases_dir.is_dir():
            for path in sorted(self.leases_dir.glob("*.json")):
                lease = self._load(path)
                if lease is not None:
                    out[lease.vm] = lease
        return out

    def corrupt_leases(self) -> List[Path]:
        if not self.leases_dir.is_dir():
            return []
        return [p for p in self.leases_dir.glob("*.json") if self._load(p) is None]

    def remove(self, vm: str) -> None:
        try:
            self._path(vm).unlink()
        except FileNotFoundError:
            pass

    def key_dirs(self) -> List[Path]:
        if not self.keys_dir.is_dir():
            return []
        return sorted(p for p in self.keys_dir.iterdir() if p.is_dir())
