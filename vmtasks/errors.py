"""Domain errors. Only the task layer turns them into an exit code and a message."""

from __future__ import annotations

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
    """The configuration is invalid (raised before any VM exists)."""


class PreflightError(VmtasksError):
    """A pre-flight check failed (raised before any VM exists)."""


class TartError(VmtasksError):
    """A ``tart`` command failed."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str, hint: str = "") -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
        super().__init__(
            "`{}` exited {}: {}".format(" ".join(self.argv), returncode, detail), hint
        )


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
        if exit_code is not None:
            self.exit_code = exit_code
        super().__init__("stage '{}' failed for VM {}: {}".format(stage, vm, message), hint)

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
        import signal

        self.signum = signum
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        where = " during stage '{}'".format(stage) if stage else ""
        super().__init__("interrupted by {}{}".format(name, where))


class NotInVm(VmtasksError):
    """An in-VM (destructive) task was started outside a throwaway VM."""

    exit_code = 2
