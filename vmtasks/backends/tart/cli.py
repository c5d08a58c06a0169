"""The Tart driver: the only module that runs ``tart``.

It codes to the documented command-line contract (exit codes, JSON fields), not to one
implementation, so the same code drives real Tart on a Mac and the Linux stand-in.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from dataclasses import dataclass
from typing import IO, List, Optional, Sequence

from vmtasks.guest.errors import VmtasksError
from vmtasks.transport.proc import Result, Runner

# Tart's exit codes (see shared/design/tart-cli.md).
EXIT_RUNTIME = 1  # other runtime errors; also "VM is running" on delete
EXIT_MISSING_OR_STATE = 2  # does not exist / is not running / is already running
EXIT_USAGE = 64

INSTALL_HINT = "install Tart: brew install cirruslabs/cli/tart (no Mac? put scripts/ first on PATH for the stand-in)"


@dataclass(frozen=True)
class VmInfo:
    name: str
    running: bool
    state: str
    source: str
    size_gb: float = 0.0


def _agent_not_ready(result: Result) -> bool:
    text = result.stderr.lower()
    return result.returncode == EXIT_RUNTIME and ("agent" in text or "control socket" in text)


class TartError(VmtasksError):
    """A ``tart`` command failed."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str, hint: str = "") -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
        super().__init__(
            "`{}` exited {}: {}".format(" ".join(self.argv), returncode, detail[:500]), hint
        )


class Tart:
    name = "tart"  # the backend it drives (the sweep takes a driver or a backend)

    def __init__(self, runner: Optional[Runner] = None, binary: str = "tart") -> None:
        self.runner = runner or Runner()
        self.binary = binary

    def _argv(self, *args: str) -> List[str]:
        return [self.binary, *args]

    def _run(self, *args: str, timeout: Optional[float] = 120, input: Optional[str] = None,
             cancel=None, on_start=None) -> Result:
        kwargs = {"cancel": cancel} if cancel is not None else {}
        if on_start is not None:
            kwargs["on_start"] = on_start
        return self.runner.run(self._argv(*args), timeout=timeout, input=input, **kwargs)

    def _check(self, result: Result, hint: str = "") -> Result:
        if not result.ok:
            raise TartError(result.argv, result.returncode, result.stderr or result.stdout, hint)
        return result

    def version(self) -> str:
        result = self._run("--version", timeout=30)
        return result.stdout.strip() if result.ok else ""

    def list(self) -> List[VmInfo]:
        """All local VMs (``tart list --format json``, OCI cache entries left out)."""
        result = self._check(self._run("list", "--format", "json", timeout=60))
        try:
            rows = json.loads(result.stdout or "[]")
        except ValueError:
            raise TartError(result.argv, 0, "unparseable JSON: " + result.stdout[:200],
                            "check that `tart` on PATH is Tart 2.x") from None
        vms = []
        for row in rows:
            if str(row.get("Source", "local")).lower() != "local":
                continue
            running = bool(row.get("Running", False)) or row.get("State") == "running"
            size = row.get("Size", 0)
            vms.append(VmInfo(
                name=str(row.get("Name", "")),
                running=running,
                state=str(row.get("State", "running" if running else "stopped")),
                source=str(row.get("Source", "local")),
                size_gb=float(size) if isinstance(size, (int, float)) else 0.0,
            ))
        return vms

    def get(self, name: str) -> Optional[dict]:
        result = self._run("get", name, "--format", "json", timeout=60)
        if not result.ok:
            return None
        try:
            return json.loads(result.stdout)
        except ValueError:
            return None

    def clone(self, source: str, name: str, timeout: float, cancel=None, on_start=None) -> None:
        self._check(self._run("clone", source, name, timeout=timeout, cancel=cancel, on_start=on_start),
                    "check disk space (`df -h ~/.tart`) and that base image {} exists".format(source))

    def set(self, name: str, *, cpu: Optional[int] = None, memory: Optional[int] = None,
            random_mac: bool = False) -> None:
        args = ["set", name]
        if cpu:
            args += ["--cpu", str(cpu)]
        if memory:
            args += ["--memory", str(memory)]
        if random_mac:
            # A fresh MAC avoids reusing a previous clone's 24 h DHCP lease (stale IPs).
            args.append("--random-mac")
        if len(args) > 2:
            self._check(self._run(*args, timeout=60))

    def run_argv(self, name: str, suspendable: bool = False) -> List[str]:
        # --suspendable only where we mean to suspend: it drops audio and entropy devices.
        return self._argv("run", "--no-graphics", *(["--suspendable"] if suspendable else []), name)

    def start(self, name: str, log: IO[bytes], suspendable: bool = False) -> "subprocess.Popen[bytes]":
        """``tart run`` stays in the foreground until the VM stops: spawn it in its own
        session, its console captured to ``log``."""
        return self.runner.spawn(self.run_argv(name, suspendable), log)

    def suspend(self, name: str) -> bool:
        """``tart suspend`` (macOS 14+, a VM run with --suspendable): asks the run to save
        the VM's state and exit. False when this Tart cannot (exit 64: no such command) or
        the VM is not running (exit 2); whether the state was saved, the run's exit and
        ``tart get``'s State say."""
        result = self._run("suspend", name, timeout=60)
        if result.returncode in (EXIT_MISSING_OR_STATE, EXIT_USAGE):
            return False
        self._check(result)
        return True

    def ip(self, name: str, timeout: float = 30, cancel=None) -> Optional[str]:
        """The VM's IPv4 address, or None while it has none yet (exit 1)."""
        result = self._run("ip", name, timeout=timeout, cancel=cancel)
        if result.ok and result.stdout.strip():
            return result.stdout.strip().splitlines()[0].strip()
        return None

    def exec(self, name: str, argv: Sequence[str], *, stdin: Optional[str] = None,
             timeout: Optional[float] = 120, cancel=None) -> Result:
        """Run ``argv`` in the guest through the guest agent (no shell); exit code passed through."""
        args = ["exec"] + (["-i"] if stdin is not None else []) + [name, *argv]
        return self._run(*args, timeout=timeout, input=stdin, cancel=cancel)

    @staticmethod
    def agent_not_ready(result: Result) -> bool:
        """True when ``tart exec`` failed only because the guest agent is not up yet."""
        return _agent_not_ready(result)

    def stop(self, name: str, timeout: float = 30) -> bool:
        """Stop a VM. False when it was not running (exit 2); raises on other failures."""
        result = self._run("stop", "--timeout", str(int(timeout)), name, timeout=timeout + 30)
        if result.returncode == EXIT_MISSING_OR_STATE:
            return False
        self._check(result)
        return True

    def stop_command(self, name: str) -> str:
        """``stop`` as a person pastes it."""
        return "{} stop {}".format(shlex.quote(self.binary), shlex.quote(name))

    def remove_command(self, name: str) -> str:
        """Stop, then delete, as a person pastes it."""
        return "{0}; {1} delete {2}".format(self.stop_command(name), shlex.quote(self.binary), shlex.quote(name))

    def rename(self, name: str, new_name: str) -> None:
        """``tart rename``: how a finished prepared image gets its final name at once (a
        build killed before this leaves only its temporary name). Tart never replaces NEW."""
        self._check(self._run("rename", name, new_name, timeout=60),
                    "`tart delete {}` first if an old image has that name".format(new_name))

    def delete(self, name: str) -> bool:
        """Delete a stopped VM. False when it did not exist (exit 2); raises otherwise."""
        result = self._run("delete", name, timeout=120)
        if result.returncode == EXIT_MISSING_OR_STATE:
            return False
        self._check(result, "stop it first: tart stop {}".format(name))
        return True
