"""Evidence of a failure (issue 21) through the stand-in: right after a test fails, on its VM,
before the next test and before teardown, the config's artifacts and collect commands are
copied into the run record, bounded, and named in the summary and JUnit."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET

import pytest

pytestmark = pytest.mark.e2e

EVIDENCE = {
    "artifacts": ["~/Library/Logs/gosuite/*.log", "~/.zshrc", "~/no-such-file"],
    "collect": {"home": "ls -a ~", "flood": "yes | head -c 50000000", "hang": "sleep 300"},
    "artifacts_max_mb": 2,
}


@pytest.mark.parametrize("vms", ["1", "2"])
def test_a_failed_tests_log_reaches_the_record_summary_and_junit(world, vms):
    cfg = world.write_config(guest={"env": {"GOSUITE_FAIL": "1"}}, timeouts={"collect": 4, "poll": 0.2}, **EVIDENCE)
    started = time.monotonic()
    done = world.invoke("test-vm", "--vms", vms, config=cfg)
    assert done.code == 1, done.text
    assert time.monotonic() - started < 240  # the hung collect command did not hold the run
    record = world.latest_record()
    folders = list((record / "artifacts" / "TestExampleFailure").iterdir())
    assert len(folders) == 1, folders  # one VM ran it: artifacts/<test>/<vm>/
    got = folders[0]
    assert (got / "home/Library/Logs/gosuite/failure.log").read_text() == "step 3: brew bundle exited 1\n"
    assert ".zshrc" not in [p.name for p in got.rglob("*")] or (got / "home/.zshrc").is_file()
    assert "Library" in (got / "collect/home.txt").read_text()
    total = sum(p.stat().st_size for p in got.rglob("*") if p.is_file())
    assert total <= 2 * 1024 * 1024  # the cap held against a 50 MB flood
    assert "evidence of TestExampleFailure" in done.out and "no-such-file: no such file" in done.out, done.out
    notes = (got / "collection-notes.txt").read_text()
    assert "collect hang: did not finish" in notes and "collect flood: output cut" in notes, notes
    cases = {c.get("name"): c for c in ET.parse(str(record / "junit.xml")).getroot().iter("testcase")}
    out = cases["TestExampleFailure"].findtext("system-out") or ""
    assert "[[ATTACHMENT|{}]]".format(got / "home/Library/Logs/gosuite/failure.log") in out, out
    world.assert_nothing_left()


def test_no_evidence_configured_collects_nothing(world):
    done = world.invoke("test-vm-run", "--test=TestExampleFailure",
                        config=world.write_config(guest={"env": {"GOSUITE_FAIL": "1"}}))
    assert done.code == 1 and "evidence of" not in done.text
    assert not (world.latest_record() / "artifacts").exists()
    world.assert_nothing_left()


def changes_of(record, test):
    return (record / "changes" / (test + ".txt")).read_text().splitlines()


def test_changes_name_exactly_what_each_test_did_to_the_machine(world):
    """One VM with --changes runs each test as its own invocation and keeps, per test, the
    files it added or changed under the home and the probes' differences; nothing from the
    synced tree, the tool's own files or caches."""
    cfg = world.write_config(suite={"changes": True}, guest={"env": {"GOSUITE_FAIL": "1"}},
                             changes={"probes": {"prefs": "cat ~/Library/Preferences/*.plist 2>/dev/null || true"}})
    done = world.invoke("test-vm-run", "--test=TestShellRC|TestDotfilesDirs|TestDefaultsWrite|TestExampleFailure",
                        config=cfg)
    assert done.code == 1, done.text
    record = world.latest_record()
    # Every test leaves its mark in ~/.gosuite-ran (the first one makes the folder): the rest is its own.
    shell_rc = changes_of(record, "TestShellRC")
    assert "+ .gosuite-ran/TestShellRC (file, 17 bytes, mode 644)" in shell_rc
    assert [line for line in shell_rc if ".gosuite-ran" not in line] == ["+ .zshrc (file, 42 bytes, mode 644)"]
    dirs = changes_of(record, "TestDotfilesDirs")
    assert "+ .config/openboot (dir)" in dirs and "+ .dotfiles (dir)" in dirs
    assert not any(".zshrc" in line for line in dirs)  # TestShellRC's change is not TestDotfilesDirs'
    prefs = changes_of(record, "TestDefaultsWrite")
    assert "probe prefs:" in prefs and "  +AppleShowAllFiles=true" in prefs, prefs
    everything = "\n".join(line for p in (record / "changes").iterdir() for line in p.read_text().splitlines())
    assert not any(line[2:].startswith("gosuite") for line in everything.splitlines())  # the synced tree
    assert ".vmtasks" not in everything and ".cache" not in everything
    # The failed test's summary names its own changes and what ran before it on that VM.
    assert "changes of TestExampleFailure on" in done.out and "before it on this VM:" in done.out, done.out
    assert "per test for the snapshots" in done.out
    shown = world.invoke("vm-changes", "--test=TestShellRC", config=cfg)
    assert shown.code == 0 and shown.out.splitlines() == shell_rc, shown.text
    missing = world.invoke("vm-changes", "--test=TestNope", config=cfg)
    assert missing.code == 2 and "TestShellRC" in missing.err, missing.text
    world.assert_nothing_left()
