"""Issue 23: adopting vmtasks in another Go project, and screens that give the reason.

User-level checks: real ``invoke`` processes, piped, through the Linux stand-in ``tart``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest

from .conftest import EXAMPLE, REPO, junit_cases


def _outer_module(tmp_path):
    """A project whose go.mod is at the top but whose suite lives in a nested module: go
    itself refuses the pattern (`directory prefix ... does not contain main module`) before
    any test event."""
    project = tmp_path / "outer"
    project.mkdir()
    (project / "go.mod").write_text("module example.com/outer\n\ngo 1.19\n")
    shutil.copytree(str(EXAMPLE), str(project / "sub"), ignore=shutil.ignore_patterns(".vmtasks"))
    return project


@pytest.mark.e2e
@pytest.mark.parametrize("vms", ["1", "2"])
def test_a_suite_that_dies_before_its_first_test_shows_go_s_reason(world, tmp_path, vms):
    project = _outer_module(tmp_path)
    cfg = world.write_config(name="outer.yaml", project_dir=str(project),
                             suite={"all": "go test -v -tags=e2e,vm ./sub/test/e2e/...",
                                    "one": "go test -v -tags=e2e,vm -run {test} ./sub/test/e2e/..."})
    done = world.invoke("test-vm", "--vms", vms, config=cfg)
    assert done.code == 1, done.text
    assert "Traceback" not in done.text
    reason = r"directory prefix sub/test/e2e does not contain main module"
    if vms == "1":
        # The guest's go said it: on the suite's own stage line (stderr) and in the summary.
        assert re.search(r"suite FAILED [0-9.]+s\s+exited 1 before any test: .*" + reason, done.err), done.err
        assert re.search(reason, done.out[done.out.index("e2e results"):]), done.out
        # The host's listing failed first, for the same reason, and said go's words.
        assert re.search(r"could not be listed on the host .*go said: .*" + reason, done.err), done.err
    else:
        # The queue compiles on the host first: the stage fails there with go's lines.
        assert re.search(r"stage 'compile' failed on the host(.|\n)*" + reason, done.err), done.err
    world.assert_nothing_left()


# ---------------------------------------------------------------------------------------
# From pip install to a green run in a new Go module (the README's "Use it in your project")

NEW_TEST = '''//go:build e2e

package e2e

import (
	"os"
	"path/filepath"
	"testing"
)

// Destructive: writes into the home. The host sets both guard variables in the guest.
func TestWritesHome(t *testing.T) {
	if os.Getenv("VMTASKS_IN_VM") != "1" || os.Getenv("OPENBOOT_IN_VM") != "1" {
		t.Fatalf("not in a throwaway VM: VMTASKS_IN_VM=%q OPENBOOT_IN_VM=%q",
			os.Getenv("VMTASKS_IN_VM"), os.Getenv("OPENBOOT_IN_VM"))
	}
	home, _ := os.UserHomeDir()
	if err := os.WriteFile(filepath.Join(home, ".newproj-was-here"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
}
'''

UNIT_TEST = '''package newproj

import "testing"

func TestUnit(t *testing.T) {}
'''


def _install_vmtasks(dest: Path) -> Path:
    """``pip install`` of this checkout (what a user does), into ``--target`` so the test
    touches no environment; the dependencies are the system's (test_packaging checks that
    they are declared). Built from a copy: a build leaves nothing in the worktree."""
    source = dest / "src"
    source.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(str(REPO / name), str(source / name))
    shutil.copytree(str(REPO / "vmtasks"), str(source / "vmtasks"), ignore=shutil.ignore_patterns("__pycache__"))
    target = dest / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           "--no-deps", "--target", str(target), str(source)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return target


@pytest.mark.e2e
def test_a_new_go_module_gets_from_pip_install_to_a_green_test_vm_through_vm_init(world, tmp_path):
    site = _install_vmtasks(tmp_path / "pip")
    project = tmp_path / "newproj"  # outside this repository, a git repository of its own
    (project / "test" / "e2e").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(project)], check=True, timeout=60)
    (project / "go.mod").write_text("module example.com/newproj\n\ngo 1.19\n")
    (project / "unit_test.go").write_text(UNIT_TEST)
    (project / "test" / "e2e" / "e2e_test.go").write_text(NEW_TEST)
    # The README's steps: a two-line tasks.py, `python -m invoke vm-init`, `python -m invoke test-vm`.
    (project / "tasks.py").write_text("from vmtasks.tasks import ns  # noqa: F401\n")
    env = {k: v for k, v in world.env.items() if not k.startswith(("INVOKE_", "VMTASKS_VM_"))}
    env["PYTHONPATH"] = str(site)

    def invoke(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=str(project), env=env,
                              capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)

    where = subprocess.run([sys.executable, "-c", "import vmtasks; print(vmtasks.__file__)"], env=env,
                           cwd=str(project), capture_output=True, text=True, timeout=60).stdout
    assert where.startswith(str(site)), where  # the installed copy, not this checkout

    init = invoke("vm-init")
    assert init.returncode == 0, init.stdout + init.stderr
    config = project / "config" / "vm.yaml"
    assert "wrote {}".format(config) in init.stdout
    text = config.read_text()
    assert "-tags=e2e ./test/e2e/..." in text and "name_prefix: newproj-vmtasks" in text, text
    assert "openboot" not in text.lower()
    again = invoke("vm-init")
    assert again.returncode == 2 and "already exists" in again.stderr and config.read_text() == text

    run = invoke("test-vm")
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"^DONE 1 test in ", run.stdout.splitlines()[-1]), run.stdout
    assert "newproj-vmtasks-" in run.stderr
    assert not [vm for vm in world.vms() if vm.startswith("newproj-vmtasks-")], "VM left behind"
    assert (project / ".vmtasks" / "runs" / "latest" / "junit.xml").is_file()


# ---------------------------------------------------------------------------------------
# Which project: no VM needed


def _adopter(root: Path, config_text: str) -> Dict[str, str]:
    (root / "config").mkdir(parents=True)
    (root / "go.mod").write_text("module example.com/adopter\n")
    (root / "tasks.py").write_text("from vmtasks.tasks import ns  # noqa: F401\n")
    (root / "config" / "vm.yaml").write_text(config_text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENBOOT_", "INVOKE_", "VMTASKS_VM_"))}
    env["PYTHONPATH"] = str(REPO)
    return env


def _invoke(root: Path, env: Dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=str(root), env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_a_config_in_config_dir_without_project_dir_syncs_the_repository_root(tmp_path):
    root = tmp_path / "adopter"
    env = _adopter(root, "vm:\n  name_prefix: adopter\n")
    done = _invoke(root / "config", env, "test-vm", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "  project: {}\n".format(root.resolve()) in done.stdout, done.stdout


def test_a_project_dir_without_go_mod_is_refused_before_any_vm(tmp_path):
    root = tmp_path / "adopter"
    env = _adopter(root, "project_dir: .\n")  # config/ itself: no go.mod there
    env["PATH"] = "/usr/bin:/bin"  # no tart: the refusal comes first
    done = _invoke(root, env, "test-vm")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert "config/vm.yaml:1: 'project_dir' = {} has no go.mod".format(root.resolve() / "config") in done.stderr
    assert "the nearest go.mod is in {}".format(root.resolve()) in done.stderr
    assert "vm-init" in done.stderr


# ---------------------------------------------------------------------------------------
# Printed commands name the config; vm-login says where you are and how to rerun


def _shell_line(text: str, label: str) -> str:
    m = re.search(r"^\s*{}\s*(invoke .*?)\)?$".format(re.escape(label)), text, re.M)
    assert m, "no {!r} line in:\n{}".format(label, text)
    return m.group(1)


@pytest.mark.e2e
def test_a_kept_vm_s_commands_work_pasted_at_the_repository_root(world):
    cfg = world.write_config(name="fail.yaml", guest={"env": {"GOSUITE_FAIL": "1"}})
    done = world.invoke("test-vm-run", "--test=TestExampleFailure", "--keep=always", config=cfg)
    assert done.code == 1, done.text
    login = _shell_line(done.err, "log in:")
    sweep = _shell_line(done.err, "(or:")
    for line in (login, sweep):
        assert "--config {}".format(cfg.resolve()) in line, line
    assert done.err.index("log in:") < done.err.index("attach:")
    # Pasted where a user stands: this repository's root, whose own config/vm.yaml is openboot's.
    env = dict(world.env, PYTHONPATH=str(REPO))
    argv = [sys.executable, "-m"] + login.split()
    session = subprocess.run(argv, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=120,
                             input="echo in-the-vm-$((6 * 7))\nexit\n")
    assert "in-the-vm-42" in session.stdout, session.stdout + session.stderr
    banner = session.stderr
    assert re.search(r"vm-login: VM vmtasks-example-\S+ of run \S+, admin@", banner), banner
    assert "synced tree: /Users/admin/gosuite" in banner
    rerun = re.search(r"^\s+(cd /Users/admin/gosuite && VMTASKS_IN_VM=1 OPENBOOT_IN_VM=1 go test .*)$", banner, re.M)
    assert rerun and "-run '^(TestExampleFailure)$'" in rerun.group(1), banner
    assert "rerun its failed test (TestExampleFailure)" in banner
    # The banner's line, run in the VM, runs that test with the guard set.
    inside = subprocess.run(argv, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=300,
                            input=rerun.group(1) + "\nexit\n")
    assert "=== RUN   TestExampleFailure" in inside.stdout and "destructive: set" not in inside.stdout, inside.stdout
    # Another config's vm-list is not silent about this VM: it names the prefix and how to see it.
    other = world.invoke("vm-list", config=world.write_config(name="other.yaml", vm={"name_prefix": "other-prefix"}))
    assert other.code == 0 and "no other-prefix-* VMs" in other.out, other.text
    assert "other vmtasks prefixes have VMs on this host: vmtasks-example (1 VM)" in other.err, other.text
    assert "VMTASKS_VM_PREFIX=PREFIX invoke vm-list --config " in other.err, other.text
    removed = subprocess.run([sys.executable, "-m"] + sweep.split(), cwd=str(REPO), env=env, capture_output=True,
                             text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert re.search(r"^removed [1-9]\d* of [1-9]\d* \(checked 1 VM with prefix vmtasks-example on ", removed.stderr,
                     re.M), removed.stderr
    world.assert_nothing_left()


@pytest.mark.e2e
def test_cleanup_orphans_with_nothing_to_do_says_what_it_checked(world):
    for args in ((), ("--dry-run",)):
        done = world.invoke("cleanup-orphans", *args)
        assert done.code == 0, done.text
        assert re.search(r"^nothing to remove \(checked 0 VMs with prefix vmtasks-example on \S+\)$",
                         done.err, re.M), done.text


@pytest.mark.e2e
def test_vm_doctor_checks_what_the_run_needs_not_only_the_host(world, tmp_path):
    ok = world.invoke("vm-doctor")
    assert ok.code == 0, ok.text
    assert re.search(r"^ok\s+project\s+{} \(project_dir, from ".format(re.escape(str(EXAMPLE))), ok.err, re.M), ok.err
    assert re.search(r"^ok\s+suite\s+`go list -tags=e2e,vm ./test/e2e/...` in project_dir: 1 package", ok.err, re.M)
    # A config that passes pre-flight but fails 0.4 s into a run: doctor says so first.
    project = _outer_module(tmp_path)
    cfg = world.write_config(name="outer.yaml", project_dir=str(project), build=["no-such-tool --make"],
                             suite={"all": "go test -v -tags=e2e,vm ./sub/test/e2e/...",
                                    "one": "go test -v -tags=e2e,vm -run {test} ./sub/test/e2e/..."})
    bad = world.invoke("vm-doctor", config=cfg)
    assert bad.code == 1, bad.text
    assert re.search(r"^fail\s+suite\s+.*directory prefix sub/test/e2e does not contain main module", bad.err, re.M)
    assert re.search(r"^fail\s+build\s+`no-such-tool` is not on PATH", bad.err, re.M), bad.err
    assert re.search(r"^\d+ checks, 2 failed$", bad.err, re.M), bad.err
    # No go on the host: a queue cannot run; one VM can (without the host's listing).
    nogo = dict(PATH=":".join(p for p in world.env["PATH"].split(":") if not (Path(p) / "go").exists()))
    queue = world.invoke("vm-doctor", config=world.write_config(name="q.yaml", vms=2), env=nogo)
    assert re.search(r"^fail\s+go\s+not on PATH on the host", queue.err, re.M) and queue.code == 1, queue.text
    one = world.invoke("vm-doctor", env=nogo)
    assert re.search(r"^warn\s+go\s+not on PATH on the host", one.err, re.M), one.text


@pytest.mark.e2e
def test_a_regex_that_matches_nothing_fails_fast_with_one_vm(world):
    done = world.invoke("test-vm-run", "--test=TestShelRC")
    assert done.code == 5, done.text
    assert "no test matches -run 'TestShelRC'" in done.text and "the nearest: TestShellRC" in done.text, done.text
    assert "-> clone" not in done.err and "-> boot" not in done.err, "a VM was booted to find out"
    assert "no test listed: no VM booted" in done.err, done.err
    assert re.match(r"DONE 0 tests, no test matched in [0-9.]+s$", done.out.splitlines()[-1]), done.out
    allowed = world.invoke("test-vm-run", "--test=TestShelRC", "--allow-no-tests")
    assert allowed.code == 0, allowed.text
    assert world.vms() == [v for v in world.vms() if not v.startswith("vmtasks-example-")]


@pytest.mark.e2e
def test_rerun_failed_skips_runs_that_ran_no_test_and_exits_0_with_nothing_to_rerun(world):
    failing = world.write_config(name="fail.yaml", guest={"env": {"GOSUITE_FAIL": "1"}})
    first = world.invoke("test-vm-run", "--test=TestExampleFailure|TestShellRC", config=failing)
    assert first.code == 1, first.text
    failed_run = world.latest_record().name
    broken = world.write_config(name="broken.yaml", build=["false"])  # same records directory
    second = world.invoke("test-vm", config=broken)
    assert second.code == 1, second.text
    broken_run = world.latest_record().name
    ok = world.write_config(name="ok.yaml")
    again = world.invoke("test-vm", "--rerun-failed", config=ok)
    assert "skipped run {}: it ran no test (exit 1)".format(broken_run) in again.err, again.text
    assert "rerunning the tests that failed in run {}".format(failed_run) in again.err, again.text
    assert again.code == 0, again.text  # TestExampleFailure passes without GOSUITE_FAIL
    assert junit_cases(world.latest_record() / "junit.xml") == ["TestExampleFailure"]
    nothing = world.invoke("test-vm", "--rerun-failed", config=ok)
    assert nothing.code == 0, nothing.text
    assert re.search(r"nothing to rerun: run \S+ \(.*\) had no failed test", nothing.err), nothing.text
    assert "-> clone" not in nothing.err
    world.assert_nothing_left()


@pytest.mark.e2e
def test_queue_live_rows_show_counts_and_the_running_test_with_its_deadline(world):
    from .test_user_flows import ANSI, _drain, _spawn_pty

    cfg = world.write_config(name="uneven.yaml", project_dir=str(REPO / "examples" / "uneven"), vms=2,
                             vm={"name_prefix": "vmtasks-example"}, guest={"dir": "/Users/admin/uneven",
                                                                            "env": {"UNEVEN_SCALE": "0.4"}},
                             suite={"all": "go test -v -timeout 10m -tags=e2e,vm ./test/e2e/...",
                                    "one": "go test -v -timeout 10m -tags=e2e,vm -run {test} ./test/e2e/..."},
                             timeouts={"boot": 60, "poll": 0.2, "test": 600})
    pexpect, child, log = _spawn_pty(world, ["test-vm"], {}, cfg)
    _drain(pexpect, child, 300)
    child.close()
    screen = ANSI.sub("", log.getvalue())
    assert child.exitstatus == 0, screen[-3000:]
    rows = re.findall(r"vm[12]  tests \d+s\s+passed \d+\s+failed \d+\s+skipped \d+\s+running: Test\w+ \d+s / 10m",
                      screen)
    assert rows, screen[-3000:]
    # Short labels on lines and rows; the full names once.
    names = re.search(r"vm1 = (vmtasks-example-\S+-1), vm2 = (vmtasks-example-\S+-2) from ", screen)
    assert names, screen[:3000]
    assert re.search(r"\[vm[12]\]\s+PASS Test\w+", screen)
    # One test count on screen: the table's row says the verdict's number too.
    row = re.search(r"^tests\s+(\d+) \(\+ (\d+) subtests = (\d+), the verdict's count\)", screen, re.M)
    verdict = re.search(r"^DONE (\d+) tests", screen, re.M)
    assert row and verdict and int(row.group(3)) == int(row.group(1)) + int(row.group(2)) == int(verdict.group(1))
    world.assert_nothing_left()


MAIN_TEST = '''//go:build e2e

package e2e

import (
	"fmt"
	"os"
	"testing"
)

func TestMain(m *testing.M) {
	if os.Getenv("VMTASKS_IN_VM") == "1" {
		fmt.Println("fixture setup failed: no such device /dev/vmtasks-fixture")
		os.Exit(3)
	}
	os.Exit(m.Run())
}

func TestOne(t *testing.T) {}

func TestTwo(t *testing.T) {}
'''


@pytest.mark.e2e
def test_a_queued_test_binary_that_exits_before_any_event_shows_its_last_lines(world, tmp_path):
    project = tmp_path / "mainfail"
    (project / "e2e").mkdir(parents=True)
    (project / "go.mod").write_text("module example.com/mainfail\n\ngo 1.19\n")
    (project / "e2e" / "main_test.go").write_text(MAIN_TEST)
    cfg = world.write_config(name="main.yaml", project_dir=str(project), vms=2,
                             suite={"all": "go test -v -tags=e2e ./e2e/...",
                                    "one": "go test -v -tags=e2e -run {test} ./e2e/..."})
    done = world.invoke("test-vm", config=cfg)
    assert done.code == 1, done.text
    assert "Traceback" not in done.text
    reason = "fixture setup failed: no such device /dev/vmtasks-fixture"
    assert reason in done.err, done.err  # on the terminal as it happens, not only in the record
    assert reason in done.out[done.out.index("e2e results"):], done.out
    world.assert_nothing_left()
