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
