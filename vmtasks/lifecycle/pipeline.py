"""One stage table, one runner.

A run is a table of stages (``RUN_STAGES`` on the host, ``VM_STAGES`` per VM, defined in
vmtasks/lifecycle/run.py and vmtasks/lifecycle/vm.py). Each entry has a name, the function that does it, the
``timeouts`` key that bounds it, and a one-line description with the commands it runs.
``StageRunner`` is the only code that times a stage, records it, reports it and turns its
errors into a ``StageError``; ``--dry-run`` walks the same tables, so the plan lists the
stages the run takes (tests/test_run.py checks the order; each stage's commands are its
own ``commands`` text, or what the machine says it runs). Nothing here is module-level
state: several VMs' pipelines run at once.
"""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

from vmtasks.guest.errors import (
    Cancelled,
    CommandTimeout,
    Interrupted,
    NoLongerNeeded,
    RemoteTimeout,
    StageError,
    VmtasksError,
    describe_unexpected,
)


@dataclass(frozen=True)
class Stage:
    name: str
    describe: str  # one line for --dry-run and the docs
    run: Callable[[Any], Any]
    deadline: Optional[str] = None  # the `timeouts` key bounding it
    commands: Callable[[Any], List[str]] = lambda ctx: []  # what --dry-run prints under it
    enabled: Callable[[Any], bool] = lambda ctx: True
    hint: str = ""  # what to do when it fails, if the error has no hint of its own
    cancellable: bool = True  # teardown is not: it runs however the run is stopping


class StageRunner:
    """Times, records, reports each stage and converts its errors, for one pipeline (the
    run's own stages, or one VM's)."""

    def __init__(self, cfg, reporter, record, vm: str, cancel: threading.Event,
                 console_tail: Callable[[], List[str]] = lambda: []) -> None:
        self.cfg = cfg
        self.reporter = reporter
        self.record = record
        self.vm = vm
        self.cancel = cancel
        self.console_tail = console_tail
        self.current = ""
        self.interrupted_at = ""  # the stage a signal stopped

    def seconds_for(self, stage: Stage) -> Optional[float]:
        return getattr(self.cfg.timeouts, stage.deadline) if stage.deadline else None

    def run(self, stage: Stage, ctx) -> Any:
        seconds = self.seconds_for(stage)
        ctx.deadline = time.monotonic() + seconds if seconds is not None else float("inf")
        self.current = stage.name
        started_wall, started = time.time(), time.monotonic()
        shown = "" if self.vm == "host" else self.vm
        self.reporter.stage_started(shown, stage.name, seconds)
        status, note = "ok", ""
        try:
            if stage.cancellable and self.cancel.is_set():
                raise Cancelled("the run is stopping")
            return stage.run(ctx)
        except NoLongerNeeded:
            status, note = "skipped", "no tests left for this VM"
            raise
        except (Interrupted, Cancelled):
            status = "interrupted"
            self.interrupted_at = stage.name
            raise
        except StageError as exc:
            status = "failed"
            exc.record_path = str(self.record.dir)
            raise
        except (CommandTimeout, RemoteTimeout) as exc:
            status = "failed"
            raise self._stage_error(stage, "timed out: {}".format(exc.message),
                                    "raise timeouts.{} in the config if the stage is just slow".format(
                                        stage.deadline or stage.name),
                                    exc.output.splitlines()[-15:] if exc.output else None) from None
        except VmtasksError as exc:
            status = "failed"
            err = self._stage_error(stage, exc.message, exc.hint or stage.hint)
            err.exit_code = exc.exit_code  # a config error found in a stage is still exit 2
            raise err from None
        except Exception as exc:  # a bug or an untranslated library error: keep its traceback
            status = "failed"
            text = traceback.format_exc()
            where = self.record.note_traceback(self.vm, stage.name, text)
            if getattr(self.reporter, "verbose", False):
                self.reporter.error(text.rstrip())
            raise self._stage_error(stage, "unexpected error: " + describe_unexpected(exc),
                                    "this is a bug in vmtasks; the traceback is in " + where) from None
        finally:
            elapsed = time.monotonic() - started
            if status == "ok" and getattr(ctx, "stage_status", None):
                status, note = ctx.stage_status, getattr(ctx, "stage_note", "")
                ctx.stage_status = None
            self.record.stage_done(stage.name, started_wall, elapsed, status,
                                   vm="" if self.vm == "host" else self.vm)
            self.reporter.stage_finished(shown, stage.name, elapsed, status, note)

    def _stage_error(self, stage: Stage, message: str, hint: str, tail: Optional[List[str]] = None) -> StageError:
        err = StageError(stage.name, self.vm, message, hint, tail if tail is not None else self.console_tail())
        err.record_path = str(self.record.dir)
        return err


def plan_lines(stages: List[Stage], ctx, cfg) -> List[str]:
    """The dry-run text of a stage table: each enabled stage, its deadline and commands."""
    lines = []
    for stage in stages:
        if not stage.enabled(ctx):
            continue
        seconds = getattr(cfg.timeouts, stage.deadline) if stage.deadline else None
        limit = "  (deadline {:g}s)".format(seconds) if seconds is not None else ""
        lines.append("  {:<9} {}{}".format(stage.name, stage.describe, limit))
        for command in stage.commands(ctx):
            lines.append("            $ " + command)
    return lines
