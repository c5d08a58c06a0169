"""Run records: ``.vmtasks/runs/<run-id>/`` with stage timings, console logs, raw suite
output, JUnit, summary and the resolved config; a ``latest`` pointer; the last N kept.

Two promises. ``create()`` (called by pre-flight, before any VM exists) either makes the
record or raises a ``StateError`` naming the directory and the fix. After that, no write
raises: a read-only or full disk is noted in ``problems`` (one line per file, the first
failure) and the run carries on, so teardown still runs and the run can end with
"run record incomplete: ...".

A record names its owner (PID + start time, the ledger's liveness check), and ``prune``
never removes a record whose owner is alive: two runs with ``keep_last: 1`` do not delete
each other's live record. One run may drive several VMs: each gets a subfolder
(``vm_dir(vm)``) for its console log and raw output.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

from vmtasks.guest.atomic import write_atomic
from vmtasks.guest.errors import StateError

from .ledger import owner_stamp, process_alive

OWNER_FILE = "owner.json"


def _create_hint(root: Path, exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full: free space (`df -h {}`) or set records.dir in the config elsewhere".format(root)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "{} is not writable: fix its permissions or set records.dir in the config to a writable " \
               "directory".format(root)
    return "check records.dir in the config ({})".format(root)


class RecordStream:
    """A file in the record written as output arrives (raw suite output): ``write`` never
    raises; on the first failure (disk full) it stops writing, notes the problem and counts
    what it dropped."""

    def __init__(self, path: Path, on_problem, record_exists: bool = True, key: str = "") -> None:
        self.path = path
        self.key = key or path.name  # what ``problems`` is deduplicated by
        self.written = 0
        self.dropped = 0
        self.failed = False
        self._on_problem = on_problem
        self._fh = None
        if not record_exists:
            self.failed = True
            on_problem(self.key, "{} not written: the run record was not created".format(path))
            return
        try:
            self._fh = open(str(path), "ab")
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        self.failed = True
        fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fh.close()
            except OSError:
                pass  # the buffered tail is lost; the problem is already noted below
        self._on_problem(self.key, "{} stopped after {} bytes: {}".format(
            self.path, self.written, exc.strerror or exc))

    def write(self, text: str) -> None:
        data = text.encode("utf-8", errors="backslashreplace")
        if self._fh is None:
            self.dropped += len(data)
            return
        try:
            self._fh.write(data)
            self.written += len(data)
        except OSError as exc:
            self.dropped += len(data)
            self._fail(exc)

    def flush(self) -> None:
        if self._fh is not None:
            try:
                self._fh.flush()
            except OSError as exc:
                self._fail(exc)

    def close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except OSError as exc:
                self._fail(exc)

    def __enter__(self) -> "RecordStream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class RunRecord:
    def __init__(self, root: Path, run_id: str) -> None:
        self.root = Path(root)
        self.run_id = run_id
        self.dir = self.root / run_id
        self.stages: List[Dict[str, Any]] = []
        self.owner = owner_stamp()
        self.meta: Dict[str, Any] = {"run_id": run_id, "started": time.time(), "owner": self.owner}
        self.problems: List[str] = []
        self._problem_files: Set[str] = set()
        self.created = False
        self._lock = threading.Lock()

    # -- creation: the one step that may raise ---------------------------------
    def create(self, config_json: str) -> None:
        """Make the record (its owner and the resolved config in it) and point ``latest``
        at it. Raises ``StateError`` naming the directory and the fix."""
        staging = self.root / ".{}.new".format(self.run_id)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if self.dir.is_dir():  # a fixed run id used again (the benchmark): reuse it
                target = self.dir
            else:
                # Built aside and renamed into place, so a concurrent prune never sees a
                # record without its owner.
                staging.mkdir()
                target = staging
            write_atomic(target / OWNER_FILE, json.dumps(self.owner))
            write_atomic(target / "config.json", config_json)
            if target is staging:
                os.rename(str(staging), str(self.dir))
        except (OSError, StateError) as exc:
            shutil.rmtree(str(staging), ignore_errors=True)
            if isinstance(exc, StateError):
                raise StateError("cannot create the run record in {}: {}".format(self.root, exc.message),
                                 exc.hint.replace("point the setting elsewhere", "set records.dir in the config "
                                                  "to a writable directory")) from None
            raise StateError("cannot create the run record in {}: {}".format(self.root, exc.strerror or exc),
                             _create_hint(self.root, exc)) from None
        self.created = True
        gitignore = self.root.parent / ".gitignore"
        try:
            if not gitignore.exists():
                write_atomic(gitignore, "# vmtasks run records and benchmarks\n*\n")
        except (OSError, StateError) as exc:
            self.note_problem(".gitignore", getattr(exc, "message", None) or str(exc))
        if self.stages:  # stages timed before the record existed (pre-flight)
            self._write_json("stages.json", self.stages)
        self._point_latest()

    # -- files ------------------------------------------------------------------
    def path(self, name: str) -> Path:
        return self.dir / name

    def vm_dir(self, vm: str) -> Path:
        """The subfolder for one VM's console log and raw output (made if it can be)."""
        path = self.dir / vm
        if self.created:
            try:
                path.mkdir(exist_ok=True)
            except OSError as exc:
                self.note_problem(vm + "/", "cannot create {}: {}".format(path, exc.strerror or exc))
        return path

    def _file(self, name: str, vm: Optional[str]) -> Path:
        return (self.vm_dir(vm) if vm else self.dir) / name

    @staticmethod
    def _key(name: str, vm: Optional[str]) -> str:
        return "{}/{}".format(vm, name) if vm else name

    def write_text(self, name: str, text: str, vm: Optional[str] = None) -> bool:
        """Write a whole file into the record, atomically; never raises. False (and a line
        in ``problems``) when it could not."""
        if not self.created:
            return False
        try:
            write_atomic(self._file(name, vm), text)
            return True
        except StateError as exc:
            self.note_problem(self._key(name, vm), exc.message)
            return False

    def open_stream(self, name: str, vm: Optional[str] = None) -> RecordStream:
        """A file in the record written piece by piece (big outputs); see ``RecordStream``."""
        return RecordStream(self._file(name, vm), self.note_problem, record_exists=self.created,
                            key=self._key(name, vm))

    def note_problem(self, name: str, text: str) -> None:
        """Note that a record file could not be written (the first problem per file)."""
        if name not in self._problem_files:
            self._problem_files.add(name)
            self.problems.append(text)

    def incomplete(self) -> str:
        """"run record incomplete: ..." when some file could not be written, else ""."""
        if not self.problems:
            return ""
        more = " (and {} more)".format(len(self.problems) - 1) if len(self.problems) > 1 else ""
        return "run record incomplete: {}{}".format(self.problems[0], more)

    def append_line(self, name: str, line: str) -> None:
        """Append one line to a log in the record (commands.log, errors.log); never raises.
        Thread-safe: several VMs' pipelines log at once."""
        if not self.created:
            return
        with self._lock:
            try:
                with open(str(self.dir / name), "a", encoding="utf-8") as fh:
                    fh.write(line if line.endswith("\n") else line + "\n")
            except OSError as exc:
                self.note_problem(name, "cannot write {}: {}".format(self.dir / name, exc.strerror or exc))

    def command_ran(self, vm: str, text: str, code: Optional[int], seconds: float) -> None:
        """Log one tart/ssh/rsync/go command line and how it ended to commands.log."""
        self.append_line("commands.log", "{} [{}] {} in {:.3f}s: {}".format(
            time.strftime("%H:%M:%S"), vm, "exit {}".format(code) if code is not None else "no exit status",
            seconds, text))

    def note_traceback(self, vm: str, stage: str, text: str) -> str:
        """Keep an unexpected error's traceback in errors.log; returns where it is."""
        self.append_line("errors.log", "--- {} stage {} at {}\n{}".format(
            vm, stage, time.strftime("%Y-%m-%d %H:%M:%S"), text.rstrip()))
        return str(self.dir / "errors.log")

    def copy_streams(self, target: Path, name: str, vms: List[Optional[str]]) -> str:
        """Concatenate each VM's copy of ``name`` into ``target`` (--jsonfile); never raises:
        returns what went wrong, or ""."""
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(str(target), "wb") as out:
                for vm in vms:
                    try:
                        with open(str(self._file(name, vm)), "rb") as src:
                            shutil.copyfileobj(src, out)
                    except FileNotFoundError:
                        continue
        except OSError as exc:
            return "cannot write {}: {}".format(target, exc.strerror or exc)
        return ""

    # -- stages and result --------------------------------------------------------
    def stage_done(self, name: str, started: float, elapsed: float, status: str, vm: str = "") -> None:
        entry: Dict[str, Any] = {"stage": name, "started": started, "seconds": round(elapsed, 4), "status": status}
        if vm:
            entry["vm"] = vm
        with self._lock:  # several VMs finish stages at once
            self.stages.append(entry)
            self._write_json("stages.json", self.stages)

    def seconds(self, stage: str) -> float:
        return sum(s["seconds"] for s in self.stages if s["stage"] == stage)

    def total_seconds(self) -> float:
        return time.time() - self.meta["started"]

    def finish(self, **fields: Any) -> None:
        self.meta.update(fields)
        self.meta["finished"] = time.time()
        if self.problems:
            self.meta["record_problems"] = list(self.problems)
        self._write_json("result.json", self.meta)

    def _write_json(self, name: str, data: Any) -> None:
        self.write_text(name, json.dumps(data, indent=2, default=str))

    def _point_latest(self) -> None:
        latest = self.root / "latest"
        tmp = self.root / ".latest.{}.tmp".format(os.getpid())
        try:
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            tmp.symlink_to(self.run_id)
            os.replace(str(tmp), str(latest))
        except OSError as exc:
            self.note_problem("latest", "cannot point {} at this run: {}".format(latest, exc.strerror or exc))

    # -- pruning ------------------------------------------------------------------
    def prune(self, keep_last: int) -> None:
        """Keep the newest ``keep_last`` records; never remove this run's or one whose
        owner is alive (a concurrent run). Never raises."""
        if keep_last <= 0:
            return
        try:
            entries = list(self.root.iterdir())
            runs = sorted((p for p in entries if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")),
                          key=lambda p: p.name)
            stale_staging = [p for p in entries if p.name.startswith(".") and p.name.endswith(".new") and p.is_dir()]
        except OSError:
            return  # pruning is housekeeping: the next run tries again
        for old in runs[:-keep_last] + stale_staging:
            if old.name != self.run_id and not record_owner_alive(old, self.owner):
                shutil.rmtree(str(old), ignore_errors=True)


def record_owner_alive(record_dir: Path, me: Optional[Dict[str, Any]] = None) -> bool:
    """True if the run that wrote ``record_dir`` may still be running: its owner process is
    alive and is not ``me`` (the pruning run's own process, whose earlier runs are over: one
    process runs one run at a time, with all of its VMs in one record). A record without an
    owner file (older versions) or with a broken one counts as finished."""
    try:
        owner = json.loads((Path(record_dir) / OWNER_FILE).read_text(encoding="utf-8"))
        pid, pid_start, host = int(owner["pid"]), str(owner.get("pid_start", "")), str(owner.get("host", ""))
        if me is not None and (pid, pid_start, host) == (me["pid"], me["pid_start"], me["host"]):
            return False
        return process_alive(pid, pid_start, host)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: keep it
    except (ValueError, TypeError, KeyError, AttributeError):
        return False
