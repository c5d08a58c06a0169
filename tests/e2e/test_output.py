"""What a person sees: live stage list on a terminal (a real pseudo-terminal), plain lines
when piped; failing test output and the summary; a complete run record."""

from __future__ import annotations

import json
import re
import sys

import pytest

from .conftest import REPO, junit_counts

pytestmark = pytest.mark.e2e

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_terminal_gets_live_stages_and_colour(world):
    pexpect = pytest.importorskip("pexpect")
    env = {k: v for k, v in world.env.items() if k != "CI"}
    env["TERM"] = "xterm-256color"
    child = pexpect.spawn(sys.executable, ["-m", "invoke", "--search-root", str(REPO), "test-vm-run",
                                           "--test=TestShellRC", "--config", str(REPO / "examples/gosuite/vm.yaml")],
                          cwd=str(world.cwd), env=env, encoding="utf-8", timeout=180, dimensions=(40, 120))
    child.expect(pexpect.EOF)
    child.close()
    screen = child.before
    assert child.exitstatus == 0, screen
    assert ANSI.search(screen), "no terminal control sequences on a terminal"
    for stage in ("clone", "boot", "IP + SSH", "key", "setup", "sync", "suite", "teardown"):
        assert re.search(r"✓ {} \d+\.\d\ds".format(re.escape(stage)), screen), stage
    assert "e2e results" in screen and "PASS TestShellRC" in screen
    world.assert_nothing_left()


def test_piped_output_is_plain_and_failing_test_shown(world):
    cfg = world.write_config(guest={"env": {"GOSUITE_FAIL": "1"}})
    done = world.invoke("test-vm", config=cfg, env={"CI": ""})
    assert done.code == 1
    assert not ANSI.search(done.err), "escape codes in piped output"
    assert "-> suite" in done.err and "suite FAILED" in done.err
    # The failing test's output appears as soon as it fails (progress, stderr) and again in
    # the summary (stdout, so `| tee log` keeps it).
    first = done.err.index("FAIL TestExampleFailure")
    assert "intentional failure" in done.err[first:]
    assert "e2e results" not in done.err and "e2e results" in done.out
    assert "--- FAIL: TestExampleFailure" in done.out[done.out.index("e2e results"):]
    assert "intentional failure" in done.out

    record = world.latest_record()
    for name in ("stages.json", "console.log", "suite-output.txt", "junit.xml", "summary.txt",
                 "config.json", "result.json"):
        assert (record / name).is_file(), name
    # JUnit counts equal what the raw event stream says.
    events = [json.loads(line) for line in (record / "suite-output.txt").read_text().splitlines()
              if line.startswith("{")]
    top = {(e["Package"], e["Test"]): e["Action"] for e in events
           if e.get("Test") and "/" not in e["Test"] and e["Action"] in ("pass", "fail", "skip")}
    counts = junit_counts(record / "junit.xml")
    assert counts["tests"] == len(top)
    assert counts["failures"] == sum(1 for a in top.values() if a == "fail") == 1
    assert counts["skipped"] == sum(1 for a in top.values() if a == "skip")
    assert "failed       1" in (record / "summary.txt").read_text()
    # Durations and records belong to the config (beside its file), not to the cwd.
    durations = json.loads((world.root / ".vmtasks" / "durations.json").read_text())
    assert "TestShellRC" in json.dumps(durations)
    assert (world.root / ".vmtasks" / ".gitignore").is_file()
    assert not (world.cwd / ".vmtasks").exists()
    world.assert_nothing_left()


def test_quiet_hides_passing_tests(world):
    done = world.invoke("test-vm-run", "--test=TestShellRC|TestDefaultsWrite", "--quiet")
    assert done.code == 0, done.text
    assert "PASS TestShellRC" not in done.err and "-> clone" not in done.err
    assert "e2e results" in done.out
    world.assert_nothing_left()


def test_keep_on_failure_keeps_only_failed_runs(world):
    ok = world.invoke("test-vm-run", "--test=TestShellRC", "--keep=on-failure")
    assert ok.code == 0 and world.ephemeral_vms() == []
    cfg = world.write_config(guest={"env": {"GOSUITE_FAIL": "1"}})
    bad = world.invoke("test-vm-run", "--test=TestExampleFailure", "--keep=on-failure", config=cfg)
    assert bad.code == 1
    vms = world.ephemeral_vms()
    assert len(vms) == 1 and "attach:" in bad.err and "ssh " in bad.err
    attach = re.search(r"attach:\s+(ssh .*?)   \(once vm-login has resumed it\)", bad.err).group(1)
    world.resume(vms[0])  # kept VMs are suspended: they hold no slot
    import shlex
    import subprocess

    probe = subprocess.run(shlex.split(attach) + ["echo", "attached-ok"], capture_output=True, text=True,
                           timeout=30, env=world.env)
    assert "attached-ok" in probe.stdout, probe.stderr
    world.invoke("cleanup-orphans", "--include-kept")
    world.assert_nothing_left()
