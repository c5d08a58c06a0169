"""What runs inside the guest: the guard and the go test command line.

Imported by ``tasks.py`` inside the VM on the guest's Python (3.9 on the macOS base image):
standard library only.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from typing import List, Mapping, Optional

from .config import Config
from .errors import NotInVm, VmtasksError

IN_VM_VAR = "OPENBOOT_IN_VM"


def require_vm(environ: Mapping[str, str]) -> None:
    """Refuse unless OPENBOOT_IN_VM=1: the suite is destructive to the machine it runs on."""
    if environ.get(IN_VM_VAR) != "1":
        raise NotInVm(
            "refusing to run the destructive suite here: {}=1 is not set, so this is not a "
            "throwaway VM and nothing was run".format(IN_VM_VAR),
            "on your machine run `invoke test-vm` (or `invoke test-vm-run --test=X`); it runs "
            "this task inside a fresh VM",
        )


def suite_argv(cfg: Config, test: Optional[str] = None, json_output: bool = False) -> List[str]:
    """The suite command as an argv list (no shell: the test regex stays one literal word).

    ``json_output`` asks go test for its event stream (``-json`` implies ``-v``), which the
    host parses as it arrives.
    """
    template = cfg.suite.one if test is not None else cfg.suite.all
    argv = [test if word == "{test}" else word for word in shlex.split(template)]
    if json_output and "-json" not in argv:
        try:
            at = argv.index("test") + 1
        except ValueError:
            at = len(argv)
        argv = [w for w in argv if w not in ("-v", "-test.v")]
        argv.insert(min(at, len(argv)), "-json")
    return argv


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
