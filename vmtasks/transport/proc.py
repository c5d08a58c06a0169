"""The process runner: the one place that starts host subprocesses.

Drivers take a runner so unit tests can pass a fake that records argv lists and returns
canned results; end-to-end tests use this real one.

Every child runs in its own session. A terminal's Ctrl-C goes to the whole foreground
process group: a child in our group would die with it, including the ``tart stop`` that
teardown needs. In their own session they hear only us: we stop them ourselves when the run
is cancelled (``cancel``), and let teardown's commands finish.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, List, Mapping, Optional, Sequence

from vmtasks.guest.errors import Cancelled, CommandFailed, CommandTimeout


@dataclass(frozen=True)
class Result:
    argv: List[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class Runner:
    """Runs commands without a shell (unless asked), capturing text output.

    ``on_command(argv, returncode, seconds)`` is told about every finished command (the run
    record's ``commands.log``); ``on_child(pid)`` / ``on_child_done(pid)`` about long-lived
    children a caller may want to record (the ledger notes an in-flight ``tart clone``).
    """

    def __init__(self, env: Optional[Mapping[str, str]] = None,
                 on_command: Optional[Callable[[Sequence[str], int, float], None]] = None) -> None:
        self.env = dict(env) if env is not None else None
        self.on_command = on_command

    def run(self, argv: Sequence[str], *, timeout: Optional[float] = None, input: Optional[str] = None,
            cancel: Optional[threading.Event] = None, cwd: Optional[str] = None, shell: bool = False,
            env: Optional[Mapping[str, str]] = None,
            on_start: Optional[Callable[[int], None]] = None) -> Result:
        """Run to completion. ``cancel`` set: the child is stopped and ``Cancelled`` raised.
        ``timeout``: the child is killed and ``CommandTimeout`` raised with its output."""
        argv = [argv] if isinstance(argv, str) else list(argv)
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                argv[0] if shell else argv, shell=shell, cwd=cwd, text=True,
                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                env=dict(env) if env is not None else self.env,
            )
        except OSError as exc:
            raise CommandFailed("cannot start `{}`: {}".format(argv[0], exc.strerror or exc),
                                "check that it is installed and on PATH") from None
        if on_start is not None:
            on_start(proc.pid)
        pending_input = input
        try:
            while True:
                wait = 0.2 if cancel is not None else None
                if timeout is not None:
                    left = timeout - (time.monotonic() - started)
                    wait = left if wait is None else min(wait, left)
                try:
                    out, err = proc.communicate(pending_input, timeout=max(wait, 0) if wait is not None else None)
                    break
                except subprocess.TimeoutExpired:
                    pending_input = None  # communicate() already sent it
                    if cancel is not None and cancel.is_set():
                        out, err = _stop(proc)
                        raise Cancelled("stopped `{}`: the run is stopping".format(" ".join(argv))) from None
                    if timeout is not None and time.monotonic() - started >= timeout:
                        out, err = _stop(proc)
                        raise CommandTimeout(argv, timeout, (out or "") + (err or "")) from None
        finally:
            if proc.returncode is None:
                _stop(proc)
            if self.on_command is not None:
                self.on_command(argv, proc.returncode if proc.returncode is not None else -1,
                                time.monotonic() - started)
        return Result(argv, proc.returncode, out or "", err or "")

    def spawn(self, argv: Sequence[str], log: IO[bytes]) -> "subprocess.Popen[bytes]":
        """Start a long-lived command (``tart run``) in its own session, output to ``log``."""
        try:
            proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env=self.env,
            )
        except OSError as exc:
            raise CommandFailed("cannot start `{}`: {}".format(argv[0], exc.strerror or exc),
                                "check that it is installed and on PATH") from None
        if self.on_command is not None:
            self.on_command(list(argv) + ["&"], 0, 0.0)
        return proc


def _stop(proc: "subprocess.Popen[str]"):
    """Stop a child we started (its whole session): SIGTERM, then SIGKILL after 5 s."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except OSError:
            pass
        try:
            return proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        except ValueError:  # pipes already closed
            proc.wait(timeout=grace)
            return "", ""
    return "", ""


def which(name: str, path: Optional[str] = None) -> Optional[str]:
    return shutil.which(name, path=path)


def tail(text: str, lines: int = 15) -> List[str]:
    return [line for line in text.rstrip().splitlines()][-lines:]


def tail_file(path: Path, lines: int = 15) -> List[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            return tail(fh.read().decode("utf-8", errors="replace"), lines)
    except OSError:
        return []
