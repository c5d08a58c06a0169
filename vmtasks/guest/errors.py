"""The one error family. Every failure the tool expects is a ``VmtasksError``: a message
that says what failed and a hint that says what to do next. Driver modules (``tart``,
``ssh``, ``ledger``, ``records``, ``orchard``, ``config``) translate their library errors
(OSError, subprocess timeouts, paramiko, YAML, HTTP) into this family at their own boundary;
one renderer at the edge (the task layer) shows them. Anything else is a bug: it still tears
down, and its traceback goes to the run record.

Imported inside the guest (Python 3.9, standard library only).
"""

from __future__ import annotations

import signal
from typing import Optional, Sequence


class VmtasksError(Exception):
    """Base error: a message that says what failed and a hint that says what to do next."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def render(self) -> str:
        text = self.message
        if self.hint:
            text += "\n  next: " + self.hint
        return text


class ConfigError(VmtasksError):
    """The configuration or the command line is invalid (raised before any VM exists).
    Exit code 2, as for any usage error."""

    exit_code = 2


class PreflightError(VmtasksError):
    """A pre-flight check failed (raised before any VM exists)."""


class CommandTimeout(VmtasksError):
    """A host command (``tart``, ``rsync``, a build step) did not finish within its deadline."""

    def __init__(self, argv: Sequence[str], timeout: float, output: str = "") -> None:
        self.argv = list(argv)
        self.timeout = timeout
        self.output = output
        super().__init__("`{}` did not finish within {:g}s".format(" ".join(self.argv), timeout),
                         "raise the stage's timeout in the config if it is just slow")


class CommandFailed(VmtasksError):
    """A host command could not be started (not found, permission denied)."""


class SshError(VmtasksError):
    """The SSH connection to a guest could not be opened or was lost."""


class RemoteTimeout(VmtasksError):
    """A command in the guest did not finish within its deadline."""

    def __init__(self, command: str, timeout: float, output: str = "") -> None:
        self.command = command
        self.timeout = timeout
        self.output = output
        super().__init__("remote command did not finish within {:g}s".format(timeout),
                         "raise the stage's timeout in the config if it is just slow")


class StateError(VmtasksError):
    """The state directory (leases, keys) or the run records cannot be written or read."""


class BackendError(VmtasksError):
    """The VM backend (an Orchard controller) refused or failed a request."""


class StageError(VmtasksError):
    """A lifecycle stage failed: names the stage, the VM, the tail of its output."""

    def __init__(
        self,
        stage: str,
        vm: str,
        message: str,
        hint: str = "",
        tail: Sequence[str] = (),
        exit_code: Optional[int] = None,
    ) -> None:
        self.stage = stage
        self.vm = vm
        self.tail = list(tail)
        self.record_path = ""
        self.reason = message
        if exit_code is not None:
            self.exit_code = exit_code
        where = "on the host" if vm == "host" else "for VM " + vm
        super().__init__("stage '{}' failed {}: {}".format(stage, where, message), hint)

    def render(self) -> str:
        text = self.message
        if self.tail:
            text += "\n  last output:\n" + "\n".join("    " + line for line in self.tail)
        if self.record_path:
            text += "\n  run record: " + self.record_path
        if self.hint:
            text += "\n  next: " + self.hint
        return text


class Interrupted(VmtasksError):
    """The run got SIGINT, SIGTERM or SIGHUP; exit code is 128 + signal number."""

    def __init__(self, signum: int, stage: str = "") -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        where = " during stage '{}'".format(stage) if stage else ""
        super().__init__("interrupted by {}{}".format(name, where))


# --- control flow: how a run stops, not what failed ----------------------------------------


class Cancelled(VmtasksError):
    """The run is stopping (a signal, or another part of the run failed): stop waiting.
    Every method that waits raises it promptly once the run's cancel event is set."""


class NoLongerNeeded(VmtasksError):
    """A VM still waiting for a slot when the other VMs have taken every test."""

    exit_code = 0


class NoSlot(StageError):
    """No room to run the VM within the backend's wait (a host's VM limit): with several VMs,
    its tests go to the others."""


class NotInVm(VmtasksError):
    """An in-VM (destructive) task was started outside a throwaway VM."""

    exit_code = 2


def describe_unexpected(exc: BaseException) -> str:
    """One line for an exception that is not ours (a bug, or an untranslated library error)."""
    return "{}: {}".format(type(exc).__name__, exc)
