"""The Invoke layer: every task and argument is documented; names match the old Make targets."""

import inspect
import subprocess
import sys
from pathlib import Path

from invoke import Collection

import tasks

REPO = Path(__file__).resolve().parent.parent


def test_every_task_and_argument_has_help():
    collection = Collection.from_module(tasks)
    assert {"test-vm", "test-vm-run", "test-vm-inner", "test-vm-inner-run", "cleanup-orphans", "build",
            "vm-doctor", "vm-list", "vm-login", "vm-prepare", "vm-report", "vm-changes"} <= set(collection.task_names)
    for name in collection.task_names:
        task = collection[name]
        assert task.__doc__ and task.__doc__.strip(), name
        params = [p for p in inspect.signature(task.body).parameters if p != "c"]
        for param in params:
            assert task.help.get(param), "{}: --{} has no help".format(name, param)


def test_list_reads_well():
    out = subprocess.run([sys.executable, "-m", "invoke", "--list"], cwd=REPO, capture_output=True,
                         text=True, timeout=60).stdout
    for name in ("test-vm ", "test-vm-run", "test-vm-inner ", "test-vm-inner-run", "cleanup-orphans", "vm-doctor"):
        assert name in out


def test_test_vm_run_requires_a_test():
    done = subprocess.run([sys.executable, "-m", "invoke", "test-vm-run"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "test" in done.stderr
