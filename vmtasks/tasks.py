"""vmtasks' Invoke collection: thin tasks over the plain-Python core.

A repository adopts it with ``pip install vmtasks`` and a two-line ``tasks.py``::

    from vmtasks.tasks import ns  # noqa: F401

The two tasks that run inside the guest (``test-vm-inner*``) live in vmtasks/guest/tasks.py,
which the guest gets on its own; this module adds the host's. Host modules (fabric, rich,
yaml) are imported inside the host tasks, so ``invoke --list`` stays fast.
"""

import os
import sys

from invoke import Collection, Exit, task

from .guest.tasks import test_vm_inner, test_vm_inner_run

COMMON_HELP = {
    "config": "vmtasks config file (default: config/vm.yaml beside tasks.py; env VMTASKS_VM_CONFIG; "
              "or `vmtasks: {config: PATH}` in invoke.yaml).",
    "keep": "Keep the VM: never, on-failure or always; a bare --keep means always "
            "(env VMTASKS_VM_KEEP=1 means always).",
    "base": "Base image to clone (env VMTASKS_VM_BASE; default from config, tahoe-base).",
    "dry_run": "Print the plan (stages, commands, resolved config) and create nothing.",
    "quiet": "Only stage failures, failing tests and the summary.",
    "verbose": "Also stream the raw test output, and show tracebacks of unexpected errors.",
    "boot_timeout": "Seconds to wait for the VM's IP and sshd (default from config, 60).",
    "vms": "How many VMs run the suite at once (config `vms`, default 1); with more than one, "
           "tests go out one at a time, longest first, to whichever VM is free.",
    "junitfile": "Also write the JUnit XML report to this path (as gotestsum --junitfile).",
    "jsonfile": "Also write the raw `go test -json` stream to this path (as gotestsum --jsonfile).",
    "allow_no_tests": "Exit 0 when no test matched (default: exit 5 and say so).",
    "rerun_failed": "Run only the tests that failed in the last recorded run of this config.",
    "retries": "Run a failed test again, up to N times (0-10), each time alone on a fresh VM "
               "(config `suite.retries`, default 0): failed then passed is `flaky`.",
    "fail_on_flaky": "Exit 1 when a test was flaky (by default only tests that failed on every attempt fail the run).",
    "isolate": "Run every test on its own fresh VM, at most --vms at once (config suite.isolation: test): "
               "does each test pass on a clean machine?",
    "prepare": "Build the prepared image for this setup first when it is missing or stale (see vm-prepare).",
    "no_prepared": "Ignore prepared images: clone the base and run the setup steps (config `prepared: false`).",
}

FLAG_NAMES = {"keep": "--keep", "vm.base": "--base", "timeouts.boot": "--boot-timeout", "vms": "--vms",
              "suite.retries": "--retries"}
FLAG_NAMES.update({"prepared": "--no-prepared"})


def _host_call(c, func, quiet=False, verbose=False):
    """Run ``func(reporter)``; show our domain errors with what to do; exit with the code."""
    from .guest.errors import VmtasksError
    from .ui.report import Reporter

    reporter = Reporter(quiet=quiet, verbose=verbose)
    try:
        code = func(reporter)
    except VmtasksError as exc:
        reporter.close()
        reporter.error(exc.render())
        code = exc.exit_code
    except BrokenPipeError:
        # `invoke test-vm --dry-run | head`: the reader left; that is not a failure of ours.
        # Point stdout at /dev/null so the interpreter's final flush does not complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 0
    finally:
        reporter.close()
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


def _load(c, config, overrides=None):
    """The validated config, found the way Invoke users expect (see vmtasks.guest.config.locate)."""
    from .guest import config as config_mod

    return config_mod.load_for_task(c, config, overrides or {}, flag_names=FLAG_NAMES)


def _suite(c, test, keep, base, config, dry_run, quiet, verbose, boot_timeout, rerun_failed, vms,
           junitfile, jsonfile, allow_no_tests, prepare=False, no_prepared=False, only_prepare=False,
           retries=None, fail_on_flaky=False, replay=None, isolate=False):
    from .guest import config as config_mod
    from .lifecycle.run import Run, RunRequest
    from .settings import factory
    from .ui import rerun

    def go(reporter):
        chosen_keep = "always" if keep is True else (config_mod.keep_from_env(keep) if keep is not None else None)
        cfg = _load(c, config, {"keep": chosen_keep, "vm.base": base, "timeouts.boot": boot_timeout,
                                "vms": _int_flag("--vms", vms), "suite.retries": _int_flag("--retries", retries)})
        parts = factory.Parts(cfg, reporter)
        chosen = test if test is not None else config_mod.test_from_env(os.environ)
        source = ""
        if rerun_failed:
            choice = rerun.choose(parts.records_root, factory.task_command(cfg, "test-vm"))
            for note in choice.notes:
                reporter.info(note)
            if choice.regex is None:
                return 0  # nothing to rerun is not a failure: the notes say why
            chosen, source = choice.regex, choice.source
            reporter.info("rerunning the tests that failed in {}: {}".format(source, chosen))
        if prepare and no_prepared:
            from .guest.errors import ConfigError

            raise ConfigError("--prepare and --no-prepared contradict each other", "pass one of them")
        recorded = None
        if replay is not None:
            from .guest.errors import ConfigError
            from .lifecycle import replay as replay_mod

            if rerun_failed:
                raise ConfigError("--replay and --rerun-failed contradict each other", "pass one of them")
            recorded = replay_mod.load(parts.records_root, replay)
            reporter.info("replaying {}: {} (one fresh VM, this order)".format(
                recorded.source, ", ".join(name for _, name in recorded.tests)))
        mode = "build" if prepare else ("never" if no_prepared else "auto")
        request = RunRequest(test=chosen, vms=cfg.vms, junitfile=junitfile, jsonfile=jsonfile,
                             allow_no_tests=allow_no_tests, rerun_source=source, prepared=mode,
                             only_prepare=only_prepare, retries=cfg.suite.retries, fail_on_flaky=fail_on_flaky,
                             replay=recorded, isolate=isolate or cfg.suite.isolation == "test")
        run = Run(parts, request)
        if dry_run:
            reporter.close()
            print("\n".join(run.plan() + ["resolved config:", cfg.to_json()]))
            return 0
        return run.execute()

    _host_call(c, go, quiet=quiet, verbose=verbose)


def _int_flag(flag, value):
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        from .guest.errors import ConfigError

        raise ConfigError("{} must be a whole number, got {!r}".format(flag, value),
                          "for example {}=2".format(flag)) from None


SUITE_HELP = dict(COMMON_HELP)


@task(help=dict(SUITE_HELP, replay="RUN[:VM]: run exactly the tests that VM (vm2, or its name) ran in that "
                                  "recorded run, in the same order, on one fresh VM, and say whether its failures "
                                  "come back."), optional=["keep"])
def test_vm(c, keep=None, base=None, config=None, dry_run=False, quiet=False, verbose=False,
            boot_timeout=None, rerun_failed=False, vms=None, junitfile=None, jsonfile=None,
            allow_no_tests=False, prepare=False, no_prepared=False, retries=None, fail_on_flaky=False, replay=None,
            isolate=False):
    """Run the whole e2e suite in fresh throwaway VMs (env VMTASKS_VM_TEST limits it)."""
    _suite(c, None, keep, base, config, dry_run, quiet, verbose, boot_timeout, rerun_failed, vms,
           junitfile, jsonfile, allow_no_tests, prepare, no_prepared, retries=retries, fail_on_flaky=fail_on_flaky,
           replay=replay, isolate=isolate)


@task(help=dict(SUITE_HELP, test="The go test -run regex, e.g. 'TestA|TestB' (required)."), optional=["keep"])
def test_vm_run(c, test=None, keep=None, base=None, config=None, dry_run=False, quiet=False, verbose=False,
                boot_timeout=None, rerun_failed=False, vms=None, junitfile=None, jsonfile=None,
                allow_no_tests=False, prepare=False, no_prepared=False, retries=None, fail_on_flaky=False,
                isolate=False):
    """Run the tests matching --test (a go test -run regex) in fresh throwaway VMs."""
    if not test and not rerun_failed:
        raise Exit("test-vm-run: --test is empty; pass a go test -run regex, e.g. --test='TestA|TestB' "
                   "(or --rerun-failed)", code=2)
    _suite(c, test or None, keep, base, config, dry_run, quiet, verbose, boot_timeout, rerun_failed, vms,
           junitfile, jsonfile, allow_no_tests, prepare, no_prepared, retries=retries, fail_on_flaky=fail_on_flaky,
           isolate=isolate)


@task(help={"config": COMMON_HELP["config"], "base": COMMON_HELP["base"], "dry_run": COMMON_HELP["dry_run"],
            "quiet": COMMON_HELP["quiet"], "verbose": COMMON_HELP["verbose"]})
def vm_prepare(c, config=None, base=None, dry_run=False, quiet=False, verbose=False):
    """Build the prepared image for this setup (base + setup/prepare steps), once."""
    _suite(c, None, None, base, config, dry_run, quiet, verbose, None, False, None, None, None, False,
           only_prepare=True)


@task(help={
    "dry_run": "Show what would be removed, remove nothing.",
    "include_kept": "Also remove VMs kept on purpose (--keep) whose run has ended.",
    "max_age": "Also remove kept VMs older than this many hours (with --prepared: also another config's "
               "prepared images older than this).",
    "include_unleased": "Also remove stopped VMs with our prefix and no lease at all, whatever their age.",
    "prepared": "Also remove prepared images no config here can use (another existing config's image only "
                "past --max-age, default 30 days), and abandoned image builds.",
    "config": COMMON_HELP["config"],
})
def cleanup_orphans(c, dry_run=False, include_kept=False, max_age=None, include_unleased=False, prepared=False,
                    config=None):
    """Remove VMs, keys and leases whose owning run is gone (never a live run's)."""
    from .guest.errors import ConfigError
    from .settings import factory
    from .state import orphans

    def go(reporter):
        cfg = _load(c, config)
        try:
            age = float(max_age) * 3600 if max_age is not None else None
            if age is not None and not 0 <= age < float("inf"):
                raise ValueError(max_age)
        except ValueError:
            raise ConfigError("--max-age must be a number of hours, got {!r}".format(max_age),
                              "for example --max-age=24") from None
        parts = factory.Parts(cfg, reporter)
        parts.ledger.ensure()
        parts.backend.preflight_tool()
        code = orphans.sweep(reporter, parts, dry_run=dry_run, include_kept=include_kept, max_age=age,
                             include_unleased=include_unleased)
        if prepared:
            from .lifecycle import prepare

            code = max(code, prepare.clean(reporter, parts, dry_run, max_age=age))
        return code

    _host_call(c, go)


@task(help={"config": COMMON_HELP["config"]})
def build(c, config=None):
    """Run the host build commands from the config (test-vm runs them itself before cloning)."""
    from .settings import factory

    def go(reporter):
        cfg = _load(c, config)
        runner = factory.Parts(cfg, reporter).runner_for(None)
        for command in cfg.build:
            reporter.info("$ " + command)
            done = runner.run(command, shell=True, cwd=cfg.project_dir, timeout=cfg.timeouts.build)
            sys.stdout.write(done.stdout)
            sys.stderr.write(done.stderr)
            if not done.ok:
                reporter.error("`{}` exited {}".format(command, done.returncode))
                return done.returncode
        return 0

    _host_call(c, go)


@task(help={"config": COMMON_HELP["config"]})
def vm_doctor(c, config=None):
    """Check this machine can run test-vm: tart, base image, disk, VM slots, leftovers."""
    from .ui import doctor

    _host_call(c, lambda reporter: doctor.run(reporter, lambda: _load(c, config)))


@task(help={"config": COMMON_HELP["config"]})
def vm_list(c, config=None):
    """List this tool's VMs: run, owner, live or kept or orphaned, age, address."""
    from .settings import factory
    from .ui import inventory

    def go(reporter):
        parts = factory.Parts(_load(c, config), reporter)
        return inventory.show(reporter, parts)

    _host_call(c, go)


@task(help={"target": "A run id or VM name (see vm-list) of a kept VM.", "config": COMMON_HELP["config"]})
def vm_login(c, target, config=None):
    """Open an SSH session to a kept VM with its run's key."""
    from .settings import factory
    from .ui import inventory

    def go(reporter):
        parts = factory.Parts(_load(c, config), reporter)
        how = inventory.login(parts, target, on_wait=reporter.info)
        for line in inventory.login_banner(parts, how):
            reporter.info(line)
        reporter.close()
        os.execvpe(how.argv[0], how.argv, dict(os.environ, **how.env))

    _host_call(c, go)


# Invoke has no optional positional arguments, so the run is `--run ID` (or `-r ID`).
@task(help={"run": "A run id (or a unique start of one, or a record's path), e.g. --run 20261205-0612; "
                   "default: the latest run of this config.",
            "open": "Also open the report in the default browser.",
            "config": COMMON_HELP["config"]})
def vm_report(c, run=None, open=False, config=None):
    """Write a run's report.html (timeline, failures first, where the time went) and print its path."""
    from .settings import factory
    from .ui import html_report

    def go(reporter):
        run_dir = html_report.find_run(factory.Parts(_load(c, config), reporter).records_root, run)
        path = html_report.write_report(run_dir)
        reporter.close()
        print(path)
        if open:
            import webbrowser

            webbrowser.open(path.resolve().as_uri())
        return 0

    _host_call(c, go)


@task(help={"test": "The test whose changes to show, e.g. TestShellRC (required).",
            "run": "A run id (or a unique start of one, or a record's path); default: the latest run of this config.",
            "config": COMMON_HELP["config"]})
def vm_changes(c, test=None, run=None, config=None):
    """Print what one test changed on its VM in a run made with --changes (suite.changes)."""
    from .guest import evidence
    from .guest.errors import ConfigError
    from .settings import factory
    from .ui import html_report

    def go(reporter):
        if not test:
            raise ConfigError("vm-changes: --test is empty", "name a test, e.g. --test=TestShellRC")
        run_dir = html_report.find_run(factory.Parts(_load(c, config), reporter).records_root, run)
        folder = run_dir / "changes"
        stem = evidence.safe_part(test)
        files = sorted(p for p in folder.glob("*.txt") if p.name == stem + ".txt" or p.name.startswith(stem + "."))
        if not files:
            known = sorted({p.name.split(".")[0] for p in folder.glob("*.txt")}) if folder.is_dir() else []
            raise ConfigError("run {} kept no changes for {}".format(run_dir.name, test),
                              "tests with changes in that run: {}".format(", ".join(known)) if known else
                              "run with suite.changes: true in the config to record what each test changes")
        reporter.close()
        from .guest.visible import visible

        for path in files:
            if len(files) > 1:
                print("== " + visible(path.name))
            print(visible(path.read_text(errors="replace")), end="")
        return 0

    _host_call(c, go)


@task(help={"config": "Where to write the config (default: config/vm.yaml beside tasks.py); an existing "
                      "file is never overwritten."})
def vm_init(c, config=None):
    """Write a commented config for this Go module (suite, tags and prefix found with go list)."""
    from pathlib import Path

    from .guest import config as config_mod
    from .ui import adopt

    def go(reporter):
        root, _, _ = config_mod.invoke_context_info(c)
        written = adopt.init(Path.cwd(), Path(config) if config else None, project_root=root)
        reporter.close()
        suite = written.suite
        flag = "" if config is None else " --config {}".format(written.path)
        lines = ["wrote {}".format(written.path),
                 "  module:  {} (project_dir)".format(written.root),
                 "  suite:   {}{}".format(suite.pattern, " with tags " + ",".join(suite.tags) if suite.tags else ""),
                 "  prefix:  {} (VM names)".format(written.prefix)]
        lines += ["  note:    " + note for note in suite.notes]
        lines += ["next: read it, then",
                  "  invoke vm-doctor{}        # is this machine ready?".format(flag),
                  "  invoke test-vm --dry-run{} # the plan, nothing created".format(flag),
                  "  invoke test-vm{}          # the suite in a throwaway VM".format(flag)]
        print("\n".join(lines))
        return 0

    _host_call(c, go)


ns = Collection(test_vm, test_vm_run, test_vm_inner, test_vm_inner_run, cleanup_orphans, build, vm_doctor,
                vm_list, vm_login, vm_prepare, vm_report, vm_init, vm_changes)
