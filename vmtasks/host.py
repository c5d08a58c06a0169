"""Host-side glue between the Invoke tasks and the core: resolve config, build the objects,
run, show the result. Functions return exit codes; only ``tasks.py`` exits."""

from __future__ import annotations

import os
import shlex
import socket
import time
from pathlib import Path
from typing import Any, Dict, Optional

from . import config as config_mod
from . import sweep
from .config import Config
from .errors import ConfigError, StageError, VmtasksError
from .ledger import Ledger, default_state_dir
from .records import latest_run
from .tart import Tart
from .ui import Ui


def load_config(config_path: Optional[str], overrides: Dict[str, Any]) -> Config:
    cwd = Path.cwd()
    path = config_mod.find_config_file(config_path, os.environ, cwd)
    return config_mod.load(path, os.environ, overrides, cwd)


def ledger_for(cfg: Config) -> Ledger:
    state = Path(cfg.state_dir).expanduser() if cfg.state_dir else default_state_dir(os.environ)
    return Ledger(state)


def records_root(cfg: Config) -> Path:
    root = Path(cfg.records.dir).expanduser()
    return root if root.is_absolute() else Path.cwd() / root


def rerun_failed_regex(cfg: Config) -> str:
    """The `go test -run` regex for the tests that failed in the last recorded run."""
    import json

    from .results import rerun_regex

    last = latest_run(records_root(cfg))
    if last is None or not (last / "result.json").is_file():
        raise ConfigError("--rerun-failed: no recorded run in {}".format(records_root(cfg)),
                          "run `invoke test-vm` first")
    failed = json.loads((last / "result.json").read_text()).get("failed_tests") or []
    if not failed:
        raise ConfigError("--rerun-failed: the last run ({}) had no failed tests".format(last.name),
                          "nothing to rerun")
    return rerun_regex(failed)


def run_suite(ui: Ui, cfg: Config, test: Optional[str], dry_run: bool) -> int:
    from .run import RunRequest, VmRun, preflight

    tart = Tart()
    ledger = ledger_for(cfg)
    vm_run = VmRun(cfg, RunRequest(test=test), tart=tart, ledger=ledger, ui=ui,
                   records_root=records_root(cfg))
    if dry_run:
        show_plan(ui, vm_run)
        return 0
    started_wall, started = time.time(), time.monotonic()
    ui.stage_started("preflight")
    try:
        listed = preflight(cfg, tart, ledger)
    except VmtasksError as exc:
        ui.stage_finished("preflight", time.monotonic() - started, False)
        raise StageError("preflight", "(none created)", exc.message, exc.hint) from None
    elapsed = time.monotonic() - started
    ui.stage_finished("preflight", elapsed, True)
    vm_run.record.stage_done("preflight", started_wall, elapsed, "ok")  # on disk once the record is created
    sweep_orphans(ui, cfg, tart, ledger, dry_run=False, include_kept=False, quiet=True, listed=listed)
    ui.info("run {}: VM {} from {}{}".format(vm_run.run_id, vm_run.vm, cfg.vm.base,
                                            ", test regex {!r}".format(test) if test else ""))
    code = vm_run.execute()
    show_summary(ui, vm_run)
    return code


def show_plan(ui: Ui, vm_run) -> None:
    from . import ssh, sync
    from .run import inner_command

    cfg = vm_run.cfg
    q = shlex.quote
    ui.print("Plan for run {} (dry run: nothing is created)".format(vm_run.run_id), style="bold")
    ui.print("  config: {}  project: {}".format(cfg.source, cfg.project_dir))
    steps = [("pre-flight", "tart, rsync, ssh on PATH; `tart list` has {}".format(cfg.vm.base))]
    steps += [("build", "$ " + cmd) for cmd in cfg.build]
    steps += [
        ("sweep", "remove {}-* VMs whose owning run is gone".format(cfg.vm.name_prefix)),
        ("clone", "tart clone {} {}".format(q(cfg.vm.base), q(vm_run.vm))),
        ("boot", " ".join(q(a) for a in vm_run.tart.run_argv(vm_run.vm)) + "  (own session, console to the run record)"),
        ("IP + SSH", "tart ip {}; wait for sshd on port 22 (deadline {:g}s)".format(q(vm_run.vm), cfg.timeouts.boot)),
        ("key", "tart exec {} sh -c '<append run key to ~/.ssh/authorized_keys>'".format(q(vm_run.vm))),
    ]
    steps += [("setup", "$ " + s) for s in cfg.setup]
    key_dir = Path("<run key dir>")
    placeholder_key = ssh.RunKey(key_dir, key_dir / "id_ed25519", "", key_dir / "known_hosts")
    steps.append(("sync", " ".join(q(a) for a in sync.rsync_argv(
        Path(cfg.project_dir), cfg.vm.user, "<ip>", cfg.guest.dir, placeholder_key, cfg.sync.excludes, cfg.sync.compress))))
    steps.append(("suite", "ssh: " + inner_command(cfg, vm_run.request.test, True)))
    steps.append(("teardown", "keep={}: tart stop / tart delete {}, remove key".format(cfg.keep, q(vm_run.vm))))
    for stage, text in steps:
        ui.print("  {:<10} {}".format(stage, text))
    ui.print("resolved config:")
    ui.print(cfg.to_json())


def show_summary(ui: Ui, vm_run) -> None:
    """The end of a run: summary table, failing tests with their output, JUnit, exit code."""
    from . import results

    summary = vm_run.summary
    if summary is None:
        ui.print("exit code {}  (run record: {})".format(vm_run.exit_code, vm_run.record.dir))
        return
    junit = vm_run.record.path("junit.xml")
    results.write_junit(summary, junit)
    store = results.DurationStore.load(records_root(vm_run.cfg).parent / "durations.json")
    store.record(summary.results)
    store.save()
    suite_seconds = vm_run.record.seconds("suite")
    text = summary_text(summary, vm_run.record.total_seconds(), suite_seconds)
    vm_run.record.path("summary.txt").write_text(text + "\n")
    ui.print("")
    ui.print(summary_table(summary, vm_run.record.total_seconds(), suite_seconds))
    for r in summary.failures:
        ui.print("--- FAIL: {} ({})".format(r.name, results.format_duration(r.elapsed)), style="bold red")
        ui.print("\n".join("    " + line for line in r.output.rstrip().splitlines()))
    for package, output in summary.package_failures.items():
        ui.print("--- FAIL package {}".format(package), style="bold red")
        ui.print("\n".join("    " + line for line in output.rstrip().splitlines()))
    ui.print("exit code {}  junit: {}  record: {}".format(vm_run.exit_code, junit, vm_run.record.dir))


def _summary_rows(summary, total_seconds: float, suite_seconds: float):
    from .results import format_duration

    rows = [("tests run", str(summary.total)), ("passed", str(summary.passed)),
            ("failed", str(summary.failed)), ("skipped", str(summary.skipped)),
            ("suite time", format_duration(suite_seconds)), ("total time", format_duration(total_seconds))]
    slow = [(format_duration(r.elapsed), r.name) for r in summary.slowest(5)]
    return rows, slow


def summary_table(summary, total_seconds: float, suite_seconds: float):
    from rich.table import Table

    rows, slow = _summary_rows(summary, total_seconds, suite_seconds)
    table = Table(title="e2e results", show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    for what, value in rows:
        table.add_row(what, value, style="red" if what == "failed" and value != "0" else None)
    if slow:
        table.add_section()
        for seconds, name in slow:
            table.add_row("slow: " + name, seconds)
    return table


def summary_text(summary, total_seconds: float, suite_seconds: float) -> str:
    """The same summary as plain text, for the run record."""
    rows, slow = _summary_rows(summary, total_seconds, suite_seconds)
    lines = ["{:<12} {}".format(what, value) for what, value in rows]
    lines += ["slowest:"] + ["  {:>8}  {}".format(seconds, name) for seconds, name in slow]
    for r in summary.failures:
        lines.append("--- FAIL: {}".format(r.name))
        lines += ["    " + line for line in r.output.rstrip().splitlines()]
    for package, output in summary.package_failures.items():
        lines.append("--- FAIL package {}".format(package))
        lines += ["    " + line for line in output.rstrip().splitlines()]
    return "\n".join(lines)


def sweep_orphans(ui: Ui, cfg: Config, tart: Tart, ledger: Ledger, dry_run: bool,
                  include_kept: bool, max_age: Optional[float] = None, quiet: bool = False,
                  listed=None) -> int:
    plan = sweep.plan(tart, ledger, cfg.vm.name_prefix, include_kept=include_kept, kept_max_age=max_age,
                      listed=listed)
    if not quiet or plan.actions:
        for name in plan.live:
            ui.info("  live (not touched): {}".format(name))
        for name in plan.kept:
            ui.info("  kept (not touched; --include-kept removes it): {}".format(name))
    for action in plan.actions:
        ui.info("  {} {} {}: {}".format("would remove" if dry_run else "removing", action.kind, action.name, action.reason))
    if dry_run:
        return 0
    errors = sweep.apply(plan, tart, ledger)
    for error in errors:
        ui.error(error)
    if not quiet and not plan.actions:
        ui.info("no orphans on {}".format(socket.gethostname()))
    return 1 if errors else 0
