"""vmtasks: run openboot's destructive e2e suite inside throwaway Tart VMs.

Thin Invoke tasks over the plain-Python core in ``vmtasks/``. This file is also what runs
inside the guest (``test-vm-inner*``), on its Python 3.9 with only Invoke installed: host
modules (fabric, rich, yaml) are imported inside the host tasks only.
"""

import os
import sys

from invoke import Exit, task

COMMON_HELP = {
    "config": "Config file (default: ./config/vm.yaml; env OPENBOOT_VM_CONFIG).",
    "keep": "Keep the VM: never, on-failure or always; a bare --keep means always "
            "(env OPENBOOT_VM_KEEP=1 means always).",
    "base": "Base image to clone (env OPENBOOT_VM_BASE; default from config, tahoe-base).",
    "dry_run": "Print the plan (stages, commands, resolved config) and create nothing.",
    "quiet": "Only stage failures, failing tests and the summary.",
    "verbose": "Also stream the raw test output.",
    "boot_timeout": "Seconds to wait for the VM's IP and sshd (default from config, 60).",
}


def _host_call(func, quiet=False, verbose=False):
    """Run ``func(ui)``; turn our domain errors into a message and an exit code."""
    from vmtasks.errors import VmtasksError
    from vmtasks.ui import Ui

    ui = Ui(quiet=quiet, verbose=verbose)
    try:
        code = func(ui)
    except VmtasksError as exc:
        ui.close()
        ui.error(exc.render())
        code = exc.exit_code
    _before_exit()
    if code:
        raise Exit(code=code)


def _before_exit():
    """The task's work is done, written and closed. At exit Python's collector would walk
    every object fabric, paramiko, cryptography and rich made, several times (about 40 ms,
    the longest part of our exit): collect today's garbage as usual (finalizers run), then
    freeze the survivors out of its sight; the ending process frees them all at once."""
    import gc

    gc.collect()
    gc.freeze()


def _suite(test, keep, base, config, dry_run, quiet, verbose, boot_timeout, rerun_failed=False):
    from vmtasks import host
    from vmtasks.config import keep_from_env

    def go(ui):
        chosen_keep = "always" if keep is True else (keep_from_env(keep) if keep is not None else None)
        overrides = {"keep": chosen_keep, "vm.base": base,
                     "timeouts.boot": boot_timeout, "test": test}
        cfg = host.load_config(config, overrides)
        chosen = cfg.test
        if rerun_failed:
            chosen = host.rerun_failed_regex(cfg)
            ui.info("rerunning the tests that failed last time: " + chosen)
        return host.run_suite(ui, cfg, chosen, dry_run)

    _host_call(go, quiet=quiet, verbose=verbose)


@task(help=dict(COMMON_HELP, rerun_failed="Run only the tests that failed in the last recorded run."),
      optional=["keep"])
def test_vm(c, keep=None, base=None, config=None, dry_run=False, quiet=False, verbose=False,
            boot_timeout=None, rerun_failed=False):
    """Run the whole e2e suite in a fresh throwaway VM (env OPENBOOT_VM_TEST limits it)."""
    _suite(None, keep, base, config, dry_run, quiet, verbose, boot_timeout, rerun_failed)


@task(help=dict(COMMON_HELP, test="The go test -run regex, e.g. 'TestA|TestB' (required)."),
      optional=["keep"])
def test_vm_run(c, test, keep=None, base=None, config=None, dry_run=False, quiet=False, verbose=False,
                boot_timeout=None):
    """Run the tests matching --test (a go test -run regex) in a fresh throwaway VM."""
    if not test:
        raise Exit("test-vm-run: --test is empty; pass a go test -run regex, e.g. --test='TestA|TestB'", code=2)
    _suite(test, keep, base, config, dry_run, quiet, verbose, boot_timeout)


def _inner(test, json_output):
    from vmtasks import config as config_mod
    from vmtasks import inner
    from vmtasks.errors import VmtasksError

    try:
        inner.require_vm(os.environ)
        from pathlib import Path

        path = config_mod.find_config_file(None, os.environ, Path.cwd())
        cfg = config_mod.load(path, os.environ)
        code = inner.run_suite(cfg, test, json_output)
    except VmtasksError as exc:
        print("error: " + exc.render(), file=sys.stderr)
        raise Exit(code=exc.exit_code)
    if code:
        raise Exit(code=code)


@task(help={"json_output": "Emit go test's JSON event stream (what the host parses)."})
def test_vm_inner(c, json_output=False):
    """[inside the VM] Run the whole suite here; refuses unless OPENBOOT_IN_VM=1."""
    _inner(None, json_output)


@task(help={"test": "The go test -run regex (required).",
            "json_output": "Emit go test's JSON event stream (what the host parses)."})
def test_vm_inner_run(c, test, json_output=False):
    """[inside the VM] Run the tests matching --test here; refuses unless OPENBOOT_IN_VM=1."""
    if not test:
        raise Exit("test-vm-inner-run: --test is empty", code=2)
    _inner(test, json_output)


@task(help={
    "dry_run": "Show what would be removed, remove nothing.",
    "include_kept": "Also remove VMs kept on purpose (--keep) whose run has ended.",
    "max_age": "Also remove kept VMs older than this many hours.",
    "config": COMMON_HELP["config"],
})
def cleanup_orphans(c, dry_run=False, include_kept=False, max_age=None, config=None):
    """Remove VMs, keys and leases whose owning run is gone (never a live run's)."""
    from vmtasks import host
    from vmtasks.errors import ConfigError
    from vmtasks.tart import Tart

    def go(ui):
        cfg = host.load_config(config, {})
        try:
            age = float(max_age) * 3600 if max_age is not None else None
        except ValueError:
            raise ConfigError("--max-age must be a number of hours, got {!r}".format(max_age),
                              "for example --max-age=24") from None
        ledger = host.ledger_for(cfg)
        ledger.ensure()
        return host.sweep_orphans(ui, cfg, Tart(), ledger, dry_run, include_kept, age)

    _host_call(go)


@task(help={"config": COMMON_HELP["config"]})
def build(c, config=None):
    """Run the host build commands from the config (before test-vm syncs the tree)."""
    from vmtasks import host

    def go(ui):
        cfg = host.load_config(config, {})
        for command in cfg.build:
            ui.info("$ " + command)
            c.run(command, echo=False, pty=False)
        return 0

    _host_call(go)


@task(help={"config": COMMON_HELP["config"]})
def vm_doctor(c, config=None):
    """Check this machine can run test-vm: tart, base image, disk, VM slots, leftovers."""
    from vmtasks import doctor

    _host_call(lambda ui: doctor.run(ui, config))
