"""What runs inside the guest: the guard and the go test command line.

Imported by ``tasks.py`` inside the VM on the guest's Python (3.9 on the macOS base image):
standard library only.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from typing import Dict, List, Mapping, Optional

from . import gotest, schedule
from .config import Config, alias_of, env_lookup
from .errors import NotInVm, VmtasksError
from .results import History

IN_VM_VAR = "VMTASKS_IN_VM"  # the host sets it, and its alias OPENBOOT_IN_VM, in the guest


def require_vm(environ: Mapping[str, str]) -> None:
    """Refuse unless VMTASKS_IN_VM=1 (or OPENBOOT_IN_VM=1): the suite is destructive to the
    machine it runs on. Both set and disagreeing is an error too: one of them is wrong."""
    try:
        value, name = env_lookup(environ, IN_VM_VAR)
    except VmtasksError as exc:
        raise NotInVm("refusing to run the destructive suite: " + exc.message, exc.hint) from None
    if value != "1":
        raise NotInVm(
            "refusing to run the destructive suite here: {}=1 (or {}=1) is not set, so this is not a "
            "throwaway VM and nothing was run".format(IN_VM_VAR, alias_of(IN_VM_VAR)),
            "on your machine run `invoke test-vm` (or `invoke test-vm-run --test=X`); it runs "
            "this task inside a fresh VM",
        )


def suite_argv(cfg: Config, test: Optional[str] = None, json_output: bool = False) -> List[str]:
    """The suite command as an argv list (no shell: the test regex stays one literal word).

    ``json_output`` asks go test for its event stream (``-json`` implies ``-v``), which the
    host parses as it arrives.
    """
    template = shlex.split(cfg.suite.one if test is not None else cfg.suite.all)
    if json_output and "-json" not in template:
        # Drop -v from the template's own words, before the regex goes in: a regex that
        # is literally "-v" must stay.
        template = [w for w in template if w not in ("-v", "-test.v")]
        try:
            at = template.index("test") + 1
        except ValueError:
            at = len(template)
        template.insert(min(at, len(template)), "-json")
    return [test if test is not None and word == "{test}" else word for word in template]


def run_suite(cfg: Config, test: Optional[str], json_output: bool,
              environ: Optional[Mapping[str, str]] = None) -> int:
    """Run the suite in the synced tree, output straight to our stdout; return its exit code."""
    env = dict(os.environ if environ is None else environ)
    require_vm(env)
    workdir = cfg.guest.dir
    if not os.path.isdir(workdir):
        raise VmtasksError("the synced tree {} does not exist in this VM".format(workdir),
                      "run the suite from the host with `invoke test-vm`, which syncs it first")
    argv = suite_argv(cfg, test, json_output)
    try:
        return subprocess.call(argv, cwd=workdir, env=env)
    except FileNotFoundError:
        raise VmtasksError("{!r} is not installed in the VM".format(argv[0]),
                      "add a setup step that installs it (config: setup)") from None


def run_shard(cfg: Config, test: Optional[str], json_output: bool, shard: str,
              durations: Optional[str] = None, environ: Optional[Mapping[str, str]] = None) -> int:
    """Run the K-th of N static partitions of the suite's tests (CI matrix jobs).

    Every job lists the tests the same way (``go test -list``), reads the same durations
    file and partitions them with the same deterministic longest-processing-time rule, so
    N jobs together run every selected test exactly once."""

    env = dict(os.environ if environ is None else environ)
    require_vm(env)
    k, n = schedule.parse_shard(shard)
    suite = gotest.parse_suite(cfg.suite.all, test)
    workdir = cfg.guest.dir
    if not os.path.isdir(workdir):
        raise VmtasksError("the project tree {} does not exist here".format(workdir),
                           "check guest.dir in the config (the CI job's checkout)")
    tests = list_shard_candidates(suite, workdir, env)
    history = History.load(durations or cfg.suite.durations)
    if history.problem:
        print("vmtasks: durations file {} not used ({}): shards are cut as if no test had run before".format(
            history.path, history.problem), file=sys.stderr)
    estimate = lambda t: history.estimate(t.package, t.name)  # noqa: E731
    mine = schedule.shard(tests, k, n, estimate)
    print("vmtasks: shard {}/{}: {} of {} tests (estimated {:.0f}s)".format(
        k, n, len(mine), len(tests), sum(estimate(t) for t in mine)), file=sys.stderr)
    if n > len(tests):
        print("vmtasks: {} shards for {} tests: shards {}..{} are empty and pass; fewer CI jobs would do".format(
            n, len(tests), len(tests) + 1, n), file=sys.stderr)
    code = 0
    by_package: Dict[str, List[str]] = {}
    for t in mine:
        by_package.setdefault(t.package, []).append(t.name)
    for package, names in sorted(by_package.items()):
        regex = "^(" + "|".join(re.escape(name) for name in sorted(names)) + ")$"
        _, sub = gotest.split_regex(suite.run_regex)
        if sub:
            regex += "/" + sub
        argv = ["go", "test", "-json" if json_output else "-v"] + list(suite.build_flags) + \
            list(suite.test_flags) + ["-run", regex, package]
        code = max(code, subprocess.call(argv, cwd=workdir, env=env))
    return code


def list_shard_candidates(suite, workdir: str, env: Mapping[str, str]):
    """Every selected top-level test as a ``gotest.TestId``, listed by ``go test -list``
    (the same parser as the host's queue)."""
    top = gotest.top_level_pattern(suite.run_regex)
    argv = ["go", "test", "-list", top] + list(suite.build_flags) + list(suite.packages)
    done = subprocess.run(argv, cwd=workdir, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True)
    if done.returncode != 0:
        raise VmtasksError("`{}` exited {}: {}".format(" ".join(argv), done.returncode, done.stderr.strip()[-500:]),
                           "fix the suite so that it builds")
    return gotest.parse_listing(done.stdout).tests
