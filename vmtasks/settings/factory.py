"""One place builds what every task needs from a loaded config: the backend, the ledger,
run records, the process runner, the printed clean-up command. Tasks never construct these
themselves, so test-vm, cleanup-orphans, vm-doctor and build agree on every path."""

from __future__ import annotations

import importlib
import os
import shlex
from pathlib import Path
from typing import List, Mapping, Optional

from vmtasks.guest import config
from vmtasks.guest.config import BACKEND_MODULES
from vmtasks.lifecycle.backend import Owner
from vmtasks.state.ledger import Ledger, default_state_dir
from vmtasks.state.records import RunRecord
from vmtasks.transport.proc import Runner


class Parts:
    def __init__(self, cfg, reporter, environ: Optional[Mapping[str, str]] = None, driver=None) -> None:
        """``driver``: the backend's command driver to use instead of its own (tests pass one
        with a fake process runner)."""
        self.cfg = cfg
        self.reporter = reporter
        self.environ = os.environ if environ is None else environ
        self.ledger = Ledger(state_dir(cfg, self.environ), backend=cfg.backend, cleanup=cleanup_command(cfg))
        self.records_root = Path(cfg.records.dir)
        self.record = None  # the run record commands are logged to, once a run has one
        self.runner = Runner(on_command=self._log_command)
        self.backend = make_backend(cfg, self.runner, driver)
        self.cleanup_command = cleanup_command(cfg)

    def new_record(self, run_id: str):
        return RunRecord(self.records_root, run_id)

    def runner_for(self, record) -> Runner:
        """The runner every command goes through (tart, rsync, go, build steps): each one is
        logged to ``record``'s commands.log."""
        self.record = record
        return self.runner

    def _log_command(self, argv, code, seconds) -> None:
        if self.record is not None:
            self.record.command_ran("host", " ".join(shlex.quote(a) for a in argv), code, seconds)

    def check_host_paths(self) -> None:
        config.check_host_paths(self.cfg)

    def owner(self, run_id: str) -> Owner:
        return Owner.this_process(run_id)

    @property
    def sync_excludes(self) -> List[str]:
        """The config's excludes, plus the run records when they live inside the project
        (a run must not ship earlier runs' logs into the guest)."""
        excludes = list(self.cfg.sync.excludes)
        project = Path(self.cfg.project_dir)
        # Shortest first, so /.vmtasks covers /.vmtasks/runs.
        for path in sorted((self.records_root, Path(self.cfg.suite.durations).parent), key=lambda p: len(str(p))):
            try:
                rel = path.resolve().relative_to(project.resolve())
            except ValueError:
                continue
            pattern = "/" + rel.as_posix()
            covered = any(pattern == e or pattern.startswith(e.rstrip("/") + "/") for e in excludes)
            if str(rel) != "." and not covered:
                excludes.append(pattern)
        return excludes


def state_dir(cfg, environ: Mapping[str, str]) -> Path:
    """The per-user state dir (leases, keys): config `state_dir` (env VMTASKS_VM_STATE_DIR),
    else VMTASKS_STATE_DIR, else $XDG_STATE_HOME/vmtasks, else ~/.local/state/vmtasks."""
    if cfg.state_dir:
        return Path(cfg.state_dir).expanduser()
    return default_state_dir(environ)


def make_backend(cfg, runner: Runner, driver=None):
    """The backend the config names: its module (``config.BACKEND_MODULES``) builds it."""
    module = importlib.import_module(BACKEND_MODULES[cfg.backend])
    return module.backend_from_config(cfg, runner, driver)


def task_command(cfg, task: str) -> str:
    """``invoke <task ...> --config <the config that was used>``: works when pasted anywhere
    (at the repository root without --config it would find another config, or none)."""
    command = "invoke " + task
    if cfg.source and not cfg.source.startswith("<"):
        command += " --config " + shlex.quote(str(Path(cfg.source).resolve()))
    return command


def cleanup_command(cfg) -> str:
    """``invoke cleanup-orphans`` with the config that was used: works when pasted anywhere."""
    return task_command(cfg, "cleanup-orphans")
