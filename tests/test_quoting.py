"""Test names reach `go test -run` literally through every layer: the guest's login shell
(which parses our SSH command line), Invoke's argument parser, and the argv we exec."""

import io
import json
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from vmtasks.guest import config, inner
from vmtasks.lifecycle.vm import inner_command, tool_bundle

HOSTILE = [
    "TestA|TestB",
    "TestPackages/brew\\|cask_\\[x\\]",
    "it's \"quoted\"",
    "$(touch {marker}-dollar)",
    "`touch {marker}-backtick`",
    "x'; touch {marker}-semi; echo '",
    "a\nb; touch {marker}-newline",
    "  spaces  and * glob ?",
    "-leading-dash",
    "$HOME ${{PATH}} \\ end\\",
]


@pytest.fixture
def guest(tmp_path, monkeypatch):
    """A fake guest home: the tool bundle unpacked where setup puts it, a suite command that
    records its argv instead of running go."""
    home = tmp_path / "guest-home"
    workdir = tmp_path / "guest-tree"
    workdir.mkdir()
    home.mkdir()
    recorder = tmp_path / "fake-go"
    out = tmp_path / "argv.json"
    recorder.write_text("#!{}\nimport json, sys\njson.dump(sys.argv[1:], open({!r}, 'w'))\n".format(
        sys.executable, str(out)))
    recorder.chmod(0o755)
    cfg_file = tmp_path / "vm.yaml"
    cfg_file.write_text(json.dumps({
        "guest": {"dir": str(workdir), "python": sys.executable},
        "suite": {"all": "{} test -v ./...".format(recorder), "one": "{} test -v -run {{test}} ./...".format(recorder)},
        "setup": [],
    }))
    cfg = config.load(cfg_file, environ={}, cwd=tmp_path)
    tool = home / cfg.guest.tool_dir
    tool.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(tool_bundle(cfg)), mode="r:gz") as tar:
        tar.extractall(str(tool))
    return cfg, home, out


def run_in_guest_shell(command: str, home: Path, shell: str = "/bin/sh") -> subprocess.CompletedProcess:
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    return subprocess.run([shell, "-c", command], cwd=str(home), env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", HOSTILE)
@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_hostile_names_arrive_literally(guest, tmp_path, name, shell):
    cfg, home, out = guest
    marker = str(tmp_path / "pwned")
    name = name.format(marker=marker)
    result = run_in_guest_shell(inner_command(cfg, name, json_output=True), home, shell)
    assert result.returncode == 0, result.stderr
    argv = json.loads(out.read_text())
    assert argv == ["test", "-json", "-run", name, "./..."]
    assert not list(tmp_path.glob("pwned*")), "a test name was interpreted by a shell"


def test_whole_suite_command(guest):
    cfg, home, out = guest
    result = run_in_guest_shell(inner_command(cfg, None, json_output=False), home)
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text()) == ["test", "-v", "./..."]


def test_inner_refuses_without_in_vm(guest):
    """The remote command sets OPENBOOT_IN_VM=1; the task itself refuses without it."""
    cfg, home, out = guest
    tool = home / cfg.guest.tool_dir
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "OPENBOOT_VM_CONFIG": str(tool / "config.json")}
    result = subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(tool), "test-vm-inner"],
                            cwd=str(home), env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "VMTASKS_IN_VM=1 (or OPENBOOT_IN_VM=1) is not set" in result.stderr
    assert not out.exists(), "the suite ran although it must refuse"


def test_guest_env_is_only_what_config_lists(tmp_path):
    cfg = config.load(None, environ={}, overrides={"guest.env": {"GOFLAGS": "-count=1 $(x)"}}, cwd=tmp_path)
    command = inner_command(cfg, None, True)
    assert "'GOFLAGS=-count=1 $(x)'" in command
    words = shlex.split(command)
    assignments = words[words.index("env") + 1:words.index(cfg.guest.python)]
    assert [a.split("=", 1)[0] for a in assignments] == ["CI", "VMTASKS_IN_VM", "OPENBOOT_IN_VM", "GOFLAGS",
                                                           "OPENBOOT_VM_CONFIG"]


def test_suite_argv_json_replaces_v():
    cfg = config.Config(suite=config.SuiteSettings(all="go test -v -timeout 60m -tags=e2e,vm ./test/e2e/...",
                                                   one="go test -v -timeout 45m -tags=e2e,vm -run {test} "
                                                       "./test/e2e/..."))
    assert inner.suite_argv(cfg, "X", json_output=True) == [
        "go", "test", "-json", "-timeout", "45m", "-tags=e2e,vm", "-run", "X", "./test/e2e/..."]
    assert inner.suite_argv(cfg) == ["go", "test", "-v", "-timeout", "60m", "-tags=e2e,vm", "./test/e2e/..."]


def test_a_test_regex_that_looks_like_a_flag_is_kept(tmp_path):
    """`--test=-v` (or `-test.v`) is the user's regex: only the template's own -v is dropped
    when JSON output is asked for."""
    cfg = config.load(None, environ={}, cwd=tmp_path)
    for regex in ("-v", "-test.v"):
        argv = inner.suite_argv(cfg, regex, json_output=True)
        assert argv[argv.index("-run") + 1] == regex, argv
        assert argv.count("-v") == (1 if regex == "-v" else 0) and "-json" in argv
