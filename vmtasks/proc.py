"""The process runner: the one place that starts host subprocesses.

Drivers take a runner so unit tests can pass a fake that records argv lists and returns
canned results; end-to-end tests use this real one.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import IO, List, Mapping, Optional, Sequence


@dataclass(frozen=True)
class Result:
    argv: List[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class CommandTimeout(Exception):
    def __init__(self, argv: Sequence[str], timeout: float, output: str = "") -> None:
        super().__init__("`{}` did not finish within {:g}s".format(" ".join(argv), timeout))
        self.argv = list(argv)
        self.timeout = timeout
        self.output = output


class Runner:
    """Runs commands without a shell, capturing text output."""

    def __init__(self, env: Optional[Mapping[str, str]] = None) -> None:
        self.env = dict(env) if env is not None else None

    def run(self, argv: Sequence[str], *, timeout: Optional[float] = None,
            input: Optional[str] = None) -> Result:
        try:
            proc = subprocess.run(
                list(argv), input=input, capture_output=True, text=True, timeout=timeout,
                env=self.env, stdin=None if input is not None else subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise CommandTimeout(argv, timeout or 0, output_text(exc.stdout) + output_text(exc.stderr)) from None
        return Result(list(argv), proc.returncode, proc.stdout, proc.stderr)

    def spawn(self, argv: Sequence[str], log: IO[bytes]) -> "subprocess.Popen[bytes]":
        """Start a long-lived command in its own session (so a Ctrl-C aimed at us does not
        reach it directly; we stop it ourselves), output to ``log``."""
        return subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, env=self.env,
        )


def output_text(data) -> str:
    """Output captured by a timed-out subprocess: bytes, str or None."""
    if isinstance(data, bytes):
        return data.decode("utf-8", errors="replace")
    return data or ""


def which(name: str, path: Optional[str] = None) -> Optional[str]:
    import shutil

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
