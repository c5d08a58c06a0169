"""The README's exit codes, through the real command line (`python -m invoke ...`).

Every configuration and usage error exits 2, whichever task, flag, file or variable it comes
from; the message still says what is wrong and what to do. The other codes the README promises
are checked where they happen (named in the table at the end of this file)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def invoke(tmp_path: Path, *args: str, env=None, config_text=None, config_bytes=None):
    """Run a task the way a user does, in an empty directory; the finished process."""
    cfg = tmp_path / "vm.yaml"
    if config_bytes is not None:
        cfg.write_bytes(config_bytes)
    elif config_text is not None:
        cfg.write_text(config_text)
    argv = [sys.executable, "-m", "invoke", "--search-root", str(REPO)] + list(args)
    if (config_text is not None or config_bytes is not None) and "--config" not in args:
        argv += ["--config", str(cfg)]
    full_env = dict(os.environ, CI="true")
    full_env.update(env or {})
    return subprocess.run(argv, cwd=str(tmp_path), env=full_env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


BOMB = "setup:\n" + "".join("  - &a{0} [{1}]\n".format(i, ", ".join(["*a%d" % (i - 1)] * 9) if i else "lol")
                            for i in range(9))

CONFIG_CASES = [
    ("alias-bomb", BOMB, "alias bomb"),
    ("nan-timeout", "timeouts:\n  boot: .nan\n", "timeouts.boot"),
    ("inf-timeout", "timeouts:\n  suite: .inf\n", "timeouts.suite"),
    ("guest-dir-home", "guest:\n  dir: /Users/admin\n", "guest user's home"),
    ("unknown-key", "timeuots:\n  boot: 5\n", "did you mean 'timeouts'"),
    ("bad-orchard-url", "backend: orchard\norchard:\n  url: ftp://controller\n", "http"),
    ("broken-orchard-url", "backend: orchard\norchard:\n  url: 'http://[::1'\n", "not a valid URL"),
    ("orchard-url-control-char", "backend: orchard\norchard:\n  url: \"http://ctl\\x07:6120\"\n", "orchard.url"),
    ("syntax", "vm: [\n", "vm.yaml"),
    ("vms-zero-in-file", "vms: 0\n", "vms"),
]


@pytest.mark.parametrize("text,needle", [(t, n) for _, t, n in CONFIG_CASES], ids=[i for i, _, _ in CONFIG_CASES])
def test_a_bad_config_file_exits_2(tmp_path, text, needle):
    done = invoke(tmp_path, "test-vm", "--dry-run", config_text=text)
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr and "Traceback" not in done.stderr


def test_a_non_utf8_config_exits_2(tmp_path):
    done = invoke(tmp_path, "test-vm", "--dry-run", config_bytes=b"vm:\n  base: caf\xe9\n")
    assert done.returncode == 2 and "UTF-8" in done.stderr


USAGE_CASES = [
    ("vms-zero", ["test-vm", "--vms", "0"], "--vms"),
    ("vms-word", ["test-vm", "--vms", "two"], "--vms"),
    ("missing-config", ["test-vm", "--config", "/nonexistent/vm.yaml"], "does not exist"),
    ("prepare-both", ["test-vm", "--prepare", "--no-prepared"], "contradict"),
    ("empty-test", ["test-vm-run", "--test", ""], "--test is empty"),
    ("max-age", ["cleanup-orphans", "--max-age", "soon"], "--max-age"),
    ("boot-timeout", ["test-vm", "--boot-timeout", "nan"], "--boot-timeout"),
]


@pytest.mark.parametrize("args,needle", [(a, n) for _, a, n in USAGE_CASES], ids=[i for i, _, _ in USAGE_CASES])
def test_a_bad_flag_exits_2(tmp_path, args, needle):
    extra = ["--dry-run"] if args[0] == "test-vm" else []
    done = invoke(tmp_path, *args, *extra, config_text="keep: never\n")
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr and "Traceback" not in done.stderr


def test_a_bad_environment_variable_exits_2(tmp_path):
    done = invoke(tmp_path, "test-vm", "--dry-run", config_text="keep: never\n",
                  env={"OPENBOOT_VM_BOOT_TIMEOUT": "-5"})
    assert done.returncode == 2 and "OPENBOOT_VM_BOOT_TIMEOUT" in done.stderr


@pytest.mark.parametrize("shard,needle", [("", "--shard is empty"), ("junk", "not K/N"), ("0/2", "between 1 and N"),
                                          ("1/10000000000", "more than")])
def test_a_bad_shard_exits_2_in_the_guest(tmp_path, shard, needle):
    done = invoke(tmp_path, "test-vm-inner", "--shard", shard, config_text="keep: never\n",
                  env={"OPENBOOT_IN_VM": "1", "OPENBOOT_VM_CONFIG": str(tmp_path / "vm.yaml")})
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr and done.stdout == ""


def test_the_in_vm_tasks_refuse_outside_a_vm_with_2(tmp_path):
    done = invoke(tmp_path, "test-vm-inner", env={"OPENBOOT_IN_VM": ""})
    assert done.returncode == 2 and "OPENBOOT_IN_VM=1" in done.stderr


def test_invokes_own_parse_errors_exit_1_as_the_readme_says(tmp_path):
    """An unknown flag is Invoke's own parse error, before vmtasks runs: Invoke exits 1."""
    done = invoke(tmp_path, "test-vm", "--no-such-flag")
    assert done.returncode == 1 and "no-such-flag" in done.stderr


# Where the README's other exit codes are checked:
#   0 / 1 (the suite's, one VM; any failure with several): tests/e2e/test_flows.py, tests/e2e/test_queue.py
#   5 (no test matched) and --allow-no-tests:               tests/e2e/test_user_flows.py
#   128 + N (130 for Ctrl-C, 143 for SIGTERM, 129 for HUP):   tests/e2e/test_faults.py
