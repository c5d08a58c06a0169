"""What a user is promised (issue 12), checked the way a user meets it: real ``invoke``
processes, piped or under a real pseudo-terminal.

Two groups: which config a task runs with (dry runs in throwaway repositories that adopt
the collection with a two-line tasks.py: no VM needed), and what a run prints and writes
(e2e, through the Linux stand-in ``tart``, real OpenSSH, rsync and go test).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from .conftest import EXAMPLE, REPO, junit_cases, junit_counts

TWO_LINES = '"""This repository\'s tasks."""\nfrom vmtasks.tasks import ns  # noqa: F401\n'
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# ---------------------------------------------------------------------------------------
# Which config: dry runs, no VM


class Repo:
    """A repository adopting vmtasks (this checkout's, through PYTHONPATH)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / "tasks.py").write_text(TWO_LINES)
        self.env = {k: v for k, v in os.environ.items()
                    if not (k.startswith("OPENBOOT_") or k.startswith("INVOKE_"))}
        self.env["PYTHONPATH"] = str(REPO)

    def config(self, rel: str, prefix: str, project_dir: str = ".") -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("project_dir: {}\nvm:\n  name_prefix: {}\n".format(project_dir, prefix))
        return path

    def invoke(self, *args: str, cwd: Optional[Path] = None, env: Optional[Dict[str, str]] = None,
               ) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=str(cwd or self.root),
                              env=dict(self.env, **(env or {})), capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)


def plan_of(done: subprocess.CompletedProcess) -> Tuple[Path, Path, dict]:
    """(config, project, resolved config) from a --dry-run's stdout."""
    assert done.returncode == 0, done.stdout + done.stderr
    fields = {}
    for line in done.stdout.splitlines():
        m = re.match(r"\s+(config|project): (.*)$", line)
        if m and m.group(1) not in fields:
            fields[m.group(1)] = Path(m.group(2)).resolve()
    resolved = json.loads(done.stdout.split("resolved config:", 1)[1])
    return fields["config"], fields["project"], resolved


def no_traceback(done: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in done.stderr + done.stdout, done.stderr


@pytest.fixture
def repo(tmp_path) -> Repo:
    r = Repo(tmp_path / "project")
    r.config("config/vm.yaml", "from-project", project_dir="..")
    r.config("other/x.yaml", "from-x")
    return r


@pytest.mark.parametrize("how", [["-f"], ["--config"]], ids=["invoke -f", "invoke --config"])
def test_invoke_core_config_flag_selects_the_vmtasks_config(repo, how):
    x = repo.root / "other" / "x.yaml"
    config, project, resolved = plan_of(repo.invoke(*how, str(x), "test-vm", "--dry-run"))
    assert config == x.resolve()
    assert project == x.parent.resolve()
    assert resolved["vm"]["name_prefix"] == "from-x"


def test_task_config_flag_selects_the_config(repo):
    x = repo.root / "other" / "x.yaml"
    config, _, resolved = plan_of(repo.invoke("test-vm", "--config", "other/x.yaml", "--dry-run"))
    assert config == x.resolve() and resolved["vm"]["name_prefix"] == "from-x"


def test_invoke_yaml_names_the_config(repo):
    """The reusable-collection convention: a `vmtasks:` section in the project's invoke.yaml."""
    (repo.root / "invoke.yaml").write_text("vmtasks:\n  config: other/x.yaml\n")
    config, _, resolved = plan_of(repo.invoke("test-vm", "--dry-run"))
    assert config == (repo.root / "other" / "x.yaml").resolve() and resolved["vm"]["name_prefix"] == "from-x"


def test_invoke_yaml_vmtasks_section_is_a_layer_under_the_file(repo):
    (repo.root / "invoke.yaml").write_text("vmtasks:\n  keep: on-failure\n  vm:\n    name_prefix: from-invoke\n")
    _, _, resolved = plan_of(repo.invoke("test-vm", "--dry-run"))
    assert resolved["keep"] == "on-failure", "the invoke.yaml value was not read"
    assert resolved["vm"]["name_prefix"] == "from-project", "invoke.yaml must not override the config file"


def test_bad_invoke_yaml_value_names_invoke_config(repo):
    (repo.root / "invoke.yaml").write_text("vmtasks:\n  keep: sometimes\n")
    done = repo.invoke("test-vm", "--dry-run")
    assert done.returncode != 0
    no_traceback(done)
    assert "vmtasks.keep" in done.stderr and "'sometimes'" in done.stderr, done.stderr
    assert "vm.yaml" not in done.stderr, "blames the config file for the Invoke config's value"


def test_invoke_f_with_an_invoke_config_names_the_vmtasks_config(repo):
    """`invoke -f ci.yaml` where ci.yaml is an Invoke config whose vmtasks section points at
    the vmtasks file (relative to the project, where tasks.py is)."""
    (repo.root / "ci.yaml").write_text("vmtasks:\n  config: other/x.yaml\n")
    config, _, resolved = plan_of(repo.invoke("-f", str(repo.root / "ci.yaml"), "test-vm", "--dry-run"))
    assert config == (repo.root / "other" / "x.yaml").resolve() and resolved["vm"]["name_prefix"] == "from-x"


def test_misspelt_environment_variable_gets_a_suggestion(repo):
    done = repo.invoke("test-vm", "--dry-run", env={"OPENBOOT_VM_KEPP": "1"})
    assert done.returncode != 0
    no_traceback(done)
    assert "OPENBOOT_VM_KEPP" in done.stderr and "OPENBOOT_VM_KEEP" in done.stderr.replace("OPENBOOT_VM_KEPP", "")


@pytest.mark.parametrize("args", [[], ["-r", "../.."], ["--search-root", "<root>"]],
                         ids=["walks up", "-r ../..", "--search-root"])
def test_from_a_subdirectory_the_project_config_is_used(repo, args):
    deeper = repo.root / "internal" / "pkg"
    deeper.mkdir(parents=True)
    args = [str(repo.root) if a == "<root>" else a for a in args]
    config, project, resolved = plan_of(repo.invoke(*args, "test-vm", "--dry-run", cwd=deeper))
    assert config == (repo.root / "config" / "vm.yaml").resolve()
    assert project == repo.root.resolve(), "would sync the wrong tree"
    assert resolved["vm"]["name_prefix"] == "from-project"
    assert Path(resolved["records"]["dir"]).is_relative_to(repo.root.resolve())


def test_dry_run_names_the_vm_as_the_run_will(repo):
    done = repo.invoke("test-vm", "--dry-run")
    run_id = re.match(r"Plan for run (\S+) ", done.stdout).group(1)
    plan = done.stdout.split("resolved config:", 1)[0]
    names = set(re.findall(r"from-project-[\w<>-]+", plan))
    assert names == {"from-project-" + run_id}, names


def test_no_config_anywhere_is_a_clear_error(tmp_path):
    bare = Repo(tmp_path / "bare")
    done = bare.invoke("test-vm", "--dry-run")
    assert done.returncode != 0
    no_traceback(done)
    assert "no vmtasks config found" in done.stderr
    assert str(bare.root / "config" / "vm.yaml") in done.stderr, "should say where it looked"
    assert "--config" in done.stderr
    assert "Plan for run" not in done.stdout, "ran with built-in defaults"


def test_task_config_typo_gets_did_you_mean(repo):
    (repo.root / "vm.yaml").write_text("project_dir: .\n")
    done = repo.invoke("test-vm", "--config", "vm.yml", "--dry-run")
    assert done.returncode != 0
    no_traceback(done)
    assert "vm.yml" in done.stderr and "did you mean {}".format(repo.root / "vm.yaml") in done.stderr


@pytest.mark.parametrize("flag", ["-f", "--config"])
def test_invoke_core_config_typo_gets_did_you_mean(repo, flag):
    (repo.root / "vm.yaml").write_text("project_dir: .\n")
    done = repo.invoke(flag, "vm.yml", "test-vm", "--dry-run")
    assert done.returncode != 0
    no_traceback(done)
    assert "did you mean {}".format(repo.root / "vm.yaml") in done.stderr
    assert "invoke -f" in done.stderr or "invoke {}".format(flag) in done.stderr


def test_bad_environment_value_names_the_variable(repo):
    done = repo.invoke("test-vm", "--dry-run", env={"OPENBOOT_VM_KEEP": "maybe"})
    assert done.returncode != 0
    no_traceback(done)
    assert "environment variable OPENBOOT_VM_KEEP" in done.stderr and "'maybe'" in done.stderr
    assert "vm.yaml" not in done.stderr, "blames the config file for the variable"


def test_bad_flag_value_names_the_flag(repo):
    done = repo.invoke("test-vm", "--boot-timeout=abc", "--dry-run")
    assert done.returncode != 0
    no_traceback(done)
    assert "flag --boot-timeout" in done.stderr and "'abc'" in done.stderr
    assert "vm.yaml" not in done.stderr and "fix it in the config" not in done.stderr


def test_bad_file_value_names_file_and_line(repo):
    path = repo.root / "config" / "vm.yaml"
    path.write_text("project_dir: ..\nvm:\n  name_prefix: ok\ntimeouts:\n  boot: soon\n")
    done = repo.invoke("test-vm", "--dry-run")
    assert done.returncode != 0
    no_traceback(done)
    assert "{}:5".format(path) in done.stderr, done.stderr


def test_yaml_syntax_error_names_the_file(repo):
    path = repo.root / "config" / "vm.yaml"
    path.write_text("project_dir: ..\nvm: [unclosed\n")
    done = repo.invoke("test-vm", "--dry-run")
    assert done.returncode != 0
    no_traceback(done)
    assert str(path) in done.stderr


def test_dry_run_into_a_closed_pipe_has_no_traceback(repo):
    """`invoke test-vm --dry-run | head -1`: the reader leaving early is not a crash. Made
    deterministic: the reader is gone before the first write."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "invoke", "test-vm", "--dry-run"], cwd=str(repo.root),
                              env=repo.env, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr


# ---------------------------------------------------------------------------------------
# What a run prints: e2e through the stand-in


def top_results(jsonfile: Path) -> Dict[Tuple[str, str], str]:
    """(package, test) -> final action, subtests included, from a `go test -json` stream."""
    out = {}
    for line in jsonfile.read_text().splitlines():
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        if event.get("Test") and event.get("Action") in ("pass", "fail", "skip"):
            out[(event["Package"], event["Test"])] = event["Action"]
    return out


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.mark.e2e
def test_piped_run_puts_summary_and_verdict_on_stdout(world, tmp_path):
    cfg = world.write_config(name="fail.yaml", guest={"env": {"GOSUITE_FAIL": "1"}})
    jsonfile = tmp_path / "out" / "events.json"
    junitfile = tmp_path / "out" / "junit.xml"
    done = world.invoke("test-vm", "--jsonfile", str(jsonfile), "--junitfile", str(junitfile), config=cfg,
                        env={"CI": ""})
    assert done.code == 1, done.text
    # stdout: the summary and, last, the verdict; stderr: the progress.
    assert "e2e results" in done.out and "e2e results" not in done.err
    assert "-> clone" in done.err and "-> suite" in done.err
    assert "-> " not in done.out and "PASS TestShellRC (" not in done.out
    verdict = last_line(done.out)
    assert verdict.startswith("DONE "), done.out
    assert not ANSI.search(done.out) and not ANSI.search(done.err)
    # The verdict counts what the raw stream says (subtests too, as gotestsum does).
    ran = top_results(jsonfile)
    tests = len(ran)
    failures = sum(1 for a in ran.values() if a == "fail")
    skipped = sum(1 for a in ran.values() if a == "skip")
    m = re.match(r"DONE (\d+) tests?(?:, (\d+) skipped)?(?:, (\d+) failures?)?.* in [0-9.]+s$", verdict)
    assert m, verdict
    assert (int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)) == (tests, skipped, failures)
    assert failures == 1
    # --jsonfile / --junitfile wrote where they were told, the same as the run record.
    record = world.latest_record()
    assert jsonfile.read_bytes() == (record / "suite-output.txt").read_bytes()
    assert junit_counts(junitfile) == junit_counts(record / "junit.xml")
    assert "TestExampleFailure" in junit_cases(junitfile)
    assert (record / "summary.txt").read_text().strip().endswith(verdict)
    world.assert_nothing_left()


@pytest.mark.e2e
def test_no_test_ran_exits_5_unless_allowed(world):
    done = world.invoke("test-vm-run", "--test=TestNope")
    assert done.code == 5, done.text
    assert "no test ran" in done.text.lower()
    assert last_line(done.out).startswith("DONE 0 tests"), done.out
    allowed = world.invoke("test-vm-run", "--test=TestNope", "--allow-no-tests")
    assert allowed.code == 0, allowed.text
    world.assert_nothing_left()


@pytest.mark.e2e
def test_verbose_shows_run_line_before_pass(world):
    done = world.invoke("test-vm-run", "--test=TestShellRC|TestDefaultsWrite", "--verbose")
    assert done.code == 0, done.text
    for name in ("TestShellRC", "TestDefaultsWrite"):
        run = re.search(r"^=== RUN\s+{}$".format(name), done.err, re.M)
        passed = re.search(r"^\s*PASS {} \(".format(name), done.err, re.M)
        assert run and passed, done.err
        assert run.start() < passed.start(), "PASS {} printed before its own === RUN".format(name)
    world.assert_nothing_left()


def _spawn_pty(world, args: List[str], env: Dict[str, str], config: Path):
    pexpect = pytest.importorskip("pexpect")
    full = {k: v for k, v in world.env.items() if k != "CI"}
    full.update(env, TERM="xterm-256color")
    log = io.StringIO()
    child = pexpect.spawn(sys.executable, ["-m", "invoke", "--search-root", str(REPO), *args, "--config",
                                           str(config)],
                          cwd=str(world.cwd), env=full, encoding="utf-8", codec_errors="replace", timeout=240,
                          dimensions=(40, 120))
    child.logfile_read = log
    return pexpect, child, log


def _drain(pexpect, child, seconds: float) -> bool:
    """Read the child's output for up to ``seconds``; True if it ended."""
    try:
        child.expect(pexpect.EOF, timeout=seconds)
        return True
    except pexpect.TIMEOUT:
        return False


@pytest.mark.e2e
def test_live_view_shows_the_stage_clock_moving_with_its_deadline(world):
    pexpect, child, log = _spawn_pty(world, ["test-vm-run", "--test=TestShellRC"],
                                     {"TART_STANDIN_BOOT_DELAY": "3"}, world.default_config())
    _drain(pexpect, child, 240)
    child.close()
    screen = log.getvalue()
    assert child.exitstatus == 0, screen[-3000:]
    shown = {int(s) for s in re.findall(r"boot (\d+)s / 60s", ANSI.sub("", screen))}
    print("boot clock values seen:", sorted(shown))
    assert shown, "no `boot Ns / 60s` in the live view"
    assert max(shown) >= 2 and len(shown) >= 3, "the boot clock did not move: {}".format(sorted(shown))
    world.assert_nothing_left()


def _wait_for_guest_file(world, rel: str, seconds: float, pump) -> str:
    """The VM whose guest has ``~/rel``, polling (and pumping the child's output) meanwhile."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for vm in world.ephemeral_vms():
            if world.tart("exec", vm, "test", "-e", rel).returncode == 0:
                return vm
        if pump(0.3):
            raise AssertionError("the run ended before {} appeared".format(rel))
    raise AssertionError("{} never appeared in a guest".format(rel))


def _fail_then_interrupt(world):
    """A run with a real failure (TestExampleFailure), then a run of TestSlow stopped by ^C
    on its terminal while TestSlow runs in the guest. Returns (failed run id, interrupted
    run's record, its screen without escape codes, the pexpect child)."""
    failing = world.write_config(name="fail.yaml", guest={"env": {"GOSUITE_FAIL": "1"}})
    first = world.invoke("test-vm-run", "--test=TestExampleFailure", config=failing)
    assert first.code == 1, first.text
    first_run = world.latest_record().name

    slow = world.write_config(name="slow.yaml", guest={"env": {"GOSUITE_SLEEP": "60"}})
    pexpect, child, log = _spawn_pty(world, ["test-vm-run", "--test=TestSlow"], {}, slow)
    _wait_for_guest_file(world, ".gosuite-ran/TestSlow", 120, lambda s: _drain(pexpect, child, s))
    time.sleep(0.5)
    child.sendintr()  # the terminal's ^C: SIGINT to the foreground process group
    _drain(pexpect, child, 120)
    child.close()
    record = world.latest_record()
    assert record.name != first_run
    return first_run, record, ANSI.sub("", log.getvalue()), child


@pytest.mark.e2e
def test_ctrl_c_during_a_test_shows_it_interrupted_not_failed(world):
    first_run, record, screen, child = _fail_then_interrupt(world)
    assert child.signalstatus is None and child.exitstatus == 130, screen[-3000:]
    assert re.search(r"INTERRUPTED:? TestSlow", screen), screen[-3000:]
    assert not re.search(r"FAIL:? TestSlow", screen), "the interrupted test is shown as failed"
    assert "guest crash" not in screen
    summary = screen[screen.rindex("e2e results"):]
    assert re.search(r"^failed\s+0\s*$", summary, re.M) and re.search(r"^interrupted\s+1\s*$", summary, re.M)
    assert re.search(r"DONE 1 test, 1 interrupted in", summary), summary
    result = json.loads((record / "result.json").read_text())
    assert result["failed_tests"] == [] and result.get("interrupted") is True, result
    world.assert_nothing_left()

    # The next --rerun-failed never reruns the interrupted test as if it had failed.
    again = world.invoke("test-vm", "--rerun-failed")
    assert "Traceback" not in again.err
    for run in (world.root / ".vmtasks" / "runs").iterdir():
        if run.is_dir() and not run.is_symlink() and run.name not in (first_run, record.name):
            assert "TestSlow" not in junit_cases(run / "junit.xml"), again.text
    world.assert_nothing_left()


@pytest.mark.e2e
def test_an_interrupted_test_shows_how_long_it_ran(world):
    slow = world.write_config(name="slow.yaml", guest={"env": {"GOSUITE_SLEEP": "60"}})
    pexpect, child, log = _spawn_pty(world, ["test-vm-run", "--test=TestSlow"], {}, slow)
    _wait_for_guest_file(world, ".gosuite-ran/TestSlow", 120, lambda s: _drain(pexpect, child, s))
    time.sleep(2)
    child.sendintr()
    _drain(pexpect, child, 120)
    child.close()
    screen = ANSI.sub("", log.getvalue())
    assert child.exitstatus == 130, screen[-2000:]
    m = re.search(r"--- INTERRUPTED: TestSlow \(([0-9.]+)s\)", screen)
    assert m, screen[-2000:]
    assert float(m.group(1)) >= 1.5, m.group(0)
    world.assert_nothing_left()


@pytest.mark.e2e
def test_rerun_failed_after_ctrl_c_takes_the_last_completed_run(world):
    first_run, record, screen, child = _fail_then_interrupt(world)
    assert child.exitstatus == 130, screen[-3000:]
    again = world.invoke("test-vm", "--rerun-failed")
    assert again.code == 0, again.text
    latest = world.latest_record()
    assert latest.name not in (first_run, record.name)
    assert set(junit_cases(latest / "junit.xml")) == {"TestExampleFailure"}, again.text
    assert first_run in again.text, "does not say which run the failures came from"
    world.assert_nothing_left()


ESCAPE_TEST = r'''//go:build e2e && vm

package e2e

import (
	"os"
	"testing"
)

func TestEscapes(t *testing.T) {
	requireEphemeralHost(t)
	if os.Getenv("GOSUITE_ESCAPES") != "1" {
		t.Skip("set GOSUITE_ESCAPES=1")
	}
	os.Stdout.WriteString("raw-title \x1b]0;pwned-raw\x07 clip \x1b]52;c;cHduZWQ=\x07 clear \x1b[2J\x1b[H\n")
	os.Stdout.WriteString("c1 \xc2\x9b31m csi\n")
	t.Log("logged \x1b]0;pwned-log\x07 \x1b[31mred\x1b[0m")
	t.Fatal("failing \x1b[2J after escapes")
}
'''


@pytest.mark.e2e
def test_guest_escape_sequences_never_reach_the_host_terminal(world, tmp_path):
    project = tmp_path / "gosuite"
    shutil.copytree(str(EXAMPLE), str(project), ignore=shutil.ignore_patterns(".vmtasks"))
    (project / "test" / "e2e" / "escape_test.go").write_text(ESCAPE_TEST)
    import yaml

    base = yaml.safe_load((EXAMPLE / "vm.yaml").read_text())
    cfg = world.write_config(name="escapes.yaml", project_dir=str(project),
                             guest={"env": {"GOSUITE_ESCAPES": "1"}},
                             setup=base["setup"] + [r"printf 'setup \033]0;pwned-setup\007\033[2J done\n'"])
    for extra in ([], ["--verbose"]):
        argv = [sys.executable, "-m", "invoke", "--search-root", str(REPO), "test-vm-run", "--test=TestEscapes",
                "--config", str(cfg), *extra]
        proc = subprocess.run(argv, cwd=str(world.cwd), env=dict(world.env, CI=""), capture_output=True,
                              timeout=300, stdin=subprocess.DEVNULL)
        out, err = proc.stdout, proc.stderr
        assert proc.returncode == 1, (out + err).decode(errors="replace")
        for name, data in (("stdout", out), ("stderr", err)):
            assert b"\x1b" not in data, "raw ESC on the host's {} ({})".format(name, extra)
            assert b"\x07" not in data and b"\xc2\x9b" not in data, "raw BEL/C1 on the host's {}".format(name)
        text = (out + err).decode()
        # Shown, made visible, not dropped.
        assert "^[]0;pwned-log" in text and "failing ^[[2J after escapes" in text, text[-3000:]
        if extra:
            assert "^[]0;pwned-raw" in text and "^[]0;pwned-setup" in text, text[-3000:]
    # Under a real terminal too: the live view's own codes are there, the guest's never.
    pexpect, child, log = _spawn_pty(world, ["test-vm-run", "--test=TestEscapes", "--verbose"], {}, cfg)
    _drain(pexpect, child, 240)
    child.close()
    screen = log.getvalue()
    assert child.exitstatus == 1, screen[-2000:]
    assert "pwned-raw" in screen and "pwned-log" in screen
    for raw in ("\x1b]0;pwned", "\x1b]52;", "\x1b[2J", "\x07", "\x9b"):
        assert raw not in screen, "guest sequence {!r} reached the terminal".format(raw)
    # The run record keeps the original bytes.
    assert b"\\u001b]0;pwned-raw" in (world.latest_record() / "suite-output.txt").read_bytes() or \
        b"\x1b]0;pwned-raw" in (world.latest_record() / "suite-output.txt").read_bytes()
    world.assert_nothing_left()


BROKEN_TEST = '''//go:build e2e && vm

package e2e

import "testing"

func TestDoesNotCompile(t *testing.T) {
	var unused int = "a string"
}
'''


@pytest.mark.e2e
def test_a_build_error_is_shown_as_an_error_not_as_failed_0(world, tmp_path):
    project = tmp_path / "gosuite"
    shutil.copytree(str(EXAMPLE), str(project), ignore=shutil.ignore_patterns(".vmtasks"))
    (project / "test" / "e2e" / "broken_test.go").write_text(BROKEN_TEST)
    cfg = world.write_config(name="broken.yaml", project_dir=str(project))
    done = world.invoke("test-vm", config=cfg)
    assert done.code != 0, done.text
    summary = done.out[done.out.index("e2e results"):]
    assert re.search(r"^errors\s+1 \(package or build\)", summary, re.M), summary
    assert "--- ERROR package" in summary and "broken_test.go" in summary, summary
    assert re.search(r"^DONE .*1 error", last_line(done.out)), done.out
    world.assert_nothing_left()


@pytest.mark.e2e
def test_passing_run_lists_no_slow_tests_of_zero_seconds_and_counts_subtests(world):
    done = world.invoke("test-vm-run", "--test=TestShellRC|TestPackages")
    assert done.code == 0, done.text
    assert "slowest" not in done.out, done.out
    assert re.search(r"^subtests\s+2 \(2 passed\)", done.out, re.M), done.out
    # The verdict counts the subtests too (as gotestsum): 2 tests + 2 subtests.
    assert last_line(done.out).startswith("DONE 4 tests"), done.out
    world.assert_nothing_left()


@pytest.mark.e2e
def test_rerun_failed_on_test_vm_run_and_records_belong_to_their_config(world, tmp_path):
    # Config A (its own directory) has a failing run.
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    for d in (a_dir, b_dir):
        d.mkdir()
    a = world.write_config(name="a.yaml", guest={"env": {"GOSUITE_FAIL": "1"}})
    a = Path(shutil.move(str(a), str(a_dir / "vm.yaml")))
    b = Path(shutil.move(str(world.write_config(name="b.yaml")), str(b_dir / "vm.yaml")))
    failed = world.invoke("test-vm-run", "--test=TestExampleFailure|TestShellRC", config=a)
    assert failed.code == 1, failed.text
    a_runs = a_dir / ".vmtasks" / "runs"
    a_run = (a_runs / "latest").resolve().name
    assert not (world.cwd / ".vmtasks").exists(), "records went to the working directory"
    # B has no runs: --rerun-failed must not take A's failures.
    other = world.invoke("test-vm-run", "--rerun-failed", config=b)
    assert other.code != 0 and "Traceback" not in other.err, other.text
    assert str(b_dir / ".vmtasks" / "runs") in other.err and a_run not in other.text, other.text
    # A's --rerun-failed, on test-vm-run, reruns exactly the failed test and says from where.
    again = world.invoke("test-vm-run", "--rerun-failed", config=a, env={"CI": ""})
    assert again.code == 1, again.text  # GOSUITE_FAIL=1 still: it fails again, as it should
    assert a_run in again.text, "does not say which run the failures came from"
    latest = (a_runs / "latest").resolve()
    assert latest.name != a_run and junit_cases(latest / "junit.xml") == ["TestExampleFailure"]
    world.assert_nothing_left()


@pytest.mark.e2e
def test_missing_base_image_hint_works_with_the_stand_in(world):
    done = world.invoke("test-vm", "--base=no-such-base")
    assert done.code != 0 and "Traceback" not in done.err, done.text
    assert "no-such-base" in done.err
    assert "tart pull" not in done.err, "the stand-in cannot pull: " + done.err
    assert "tart create" in done.err or "tart clone" in done.err, done.err
    world.assert_nothing_left()


@pytest.mark.e2e
def test_cleanup_orphans_without_tart_on_path_is_a_clear_error(world):
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if p and not os.path.exists(os.path.join(p, "tart")))
    done = world.invoke("cleanup-orphans", env={"PATH": path})
    assert done.code != 0, done.text
    assert "Traceback" not in done.err, done.err
    assert "tart" in done.err and "PATH" in done.err, done.err


@pytest.mark.e2e
def test_summary_paths_do_not_wrap_on_a_120_column_terminal(world, tmp_path):
    deep = tmp_path / ("a-rather-long-directory-name-for-the-records-" * 2) / "and-one-more-level"
    deep.mkdir(parents=True)
    cfg = Path(shutil.move(str(world.write_config(name="deep.yaml")), str(deep / "vm.yaml")))
    pexpect, child, log = _spawn_pty(world, ["test-vm-run", "--test=TestShellRC"], {}, cfg)
    _drain(pexpect, child, 240)
    child.close()
    screen = ANSI.sub("", log.getvalue()).replace("\r", "")
    assert child.exitstatus == 0, screen[-3000:]
    records = (deep / ".vmtasks" / "runs" / "latest").resolve()
    assert len(str(records)) > 120
    assert "record: {}\n".format(records) in screen, screen[-2000:]
    world.assert_nothing_left()


@pytest.mark.e2e
@pytest.mark.parametrize("flag,rel", [
    ("--jsonfile", "reports/json/events.json"),
    ("--junitfile", "reports/junit/junit.xml"),
])
def test_jsonfile_and_junitfile_alone_create_their_directory(world, flag, rel):
    """Each flag on its own, relative to the working directory, into a directory that does
    not exist yet (as gotestsum does)."""
    done = world.invoke("test-vm-run", "--test=TestShellRC", "{}={}".format(flag, rel))
    assert done.code == 0, done.text
    target = world.cwd / rel
    assert target.is_file(), "{} {} was not written: {}".format(flag, rel, done.out[-800:])
    if flag == "--jsonfile":
        assert top_results(target) and all(a == "pass" for a in top_results(target).values())
    else:
        assert junit_cases(target) == ["TestShellRC"]
    assert "incomplete" not in done.out
    world.assert_nothing_left()


@pytest.mark.e2e
def test_an_unwritable_report_path_is_not_silent(world, tmp_path):
    """--junitfile into a read-only place: the user asked for that file, so its absence is
    said plainly (not only as a note about the run record) and the run does not pass."""
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where a directory should be\n")
    done = world.invoke("test-vm-run", "--test=TestShellRC", "--junitfile={}/junit.xml".format(blocked))
    assert "Traceback" not in done.err
    assert str(blocked) in done.text, done.text
    assert done.code != 0, "asked-for report missing, yet exit 0: " + done.out[-600:]
    world.assert_nothing_left()
