"""The tasks that run inside the guest, over SSH: ``test-vm-inner`` and ``test-vm-inner-run``.

The guest's tool bundle has only this folder, so this is its whole collection (Python 3.9,
Invoke only); vmtasks.tasks adds the same two tasks to the host's collection. Both refuse
unless VMTASKS_IN_VM=1 (or OPENBOOT_IN_VM=1): the suite is destructive.
"""

import os
import sys

from invoke import Collection, Exit, task

INNER_HELP = {
    "json_output": "Emit go test's JSON event stream (what the host parses).",
    "shard": "Run only the K-th of N static partitions, e.g. 2/4 (CI matrix jobs: together they run "
             "every test exactly once).",
    "durations": "Durations file for --shard's balance (default: config suite.durations).",
}


def _inner(test, json_output, shard, durations):
    from pathlib import Path

    from . import config as config_mod
    from . import inner
    from .errors import VmtasksError

    try:
        inner.require_vm(os.environ)
        path, _ = config_mod.locate(None, os.environ, Path.cwd(), required=False)
        cfg = config_mod.load(path, os.environ)
        if shard is not None:
            code = inner.run_shard(cfg, test, json_output, shard, durations)
        else:
            code = inner.run_suite(cfg, test, json_output)
    except VmtasksError as exc:
        print("error: " + exc.render(), file=sys.stderr)
        raise Exit(code=exc.exit_code) from None
    if code:
        raise Exit(code=code)


@task(help=INNER_HELP)
def test_vm_inner(c, json_output=False, shard=None, durations=None):
    """[inside the VM] Run the whole suite here; refuses unless VMTASKS_IN_VM=1 (or OPENBOOT_IN_VM=1)."""
    _inner(None, json_output, shard, durations)


@task(help=dict(INNER_HELP, test="The go test -run regex (required)."))
def test_vm_inner_run(c, test=None, json_output=False, shard=None, durations=None):
    """[inside the VM] Run the tests matching --test here; refuses unless VMTASKS_IN_VM=1 (or OPENBOOT_IN_VM)."""
    if not test:
        raise Exit("test-vm-inner-run: --test is empty; pass a go test -run regex", code=2)
    _inner(test, json_output, shard, durations)


ns = Collection(test_vm_inner, test_vm_inner_run)
