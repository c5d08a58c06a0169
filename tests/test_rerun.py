"""--rerun-failed (vmtasks/ui/rerun.py): which recorded run it takes, and what it says about
the runs it skips."""

from __future__ import annotations

import json

import pytest

from vmtasks.guest.errors import ConfigError
from vmtasks.ui import rerun


def record(root, run_id, **result):
    (root / run_id).mkdir(parents=True)
    (root / run_id / "result.json").write_text(json.dumps(result))


def test_runs_that_ran_no_test_or_were_interrupted_are_skipped_and_named(tmp_path):
    record(tmp_path, "20261201-000001-aaaa", failed_tests=["TestA", "TestB/sub"], tests_run=4, exit_code=1)
    record(tmp_path, "20261201-000002-bbbb", failed_tests=[], tests_run=0, exit_code=2)  # pre-flight
    record(tmp_path, "20261201-000003-cccc", failed_tests=[], interrupted=True, tests_run=1,
           unfinished_tests=["TestSlow", "TestNext"])
    record(tmp_path, "20261201-000004-dddd", image="x-prepared-1", exit_code=0)  # a vm-prepare
    choice = rerun.choose(tmp_path)
    assert choice.regex == "^(TestA)$" and choice.source.startswith("run 20261201-000001-aaaa")
    assert choice.notes == [
        "skipped run 20261201-000003-cccc: it was interrupted; it left 2 tests unfinished: TestSlow, TestNext; "
        "run them with --test='^(TestSlow|TestNext)$'",
        "skipped run 20261201-000002-bbbb: it ran no test (exit 2)"]


def test_nothing_to_rerun_is_a_note_not_an_error(tmp_path):
    record(tmp_path, "20261201-000001-aaaa", failed_tests=[], tests_run=3, exit_code=0)
    choice = rerun.choose(tmp_path)
    assert choice.regex is None and "had no failed test" in choice.notes[-1]
    only_empty = tmp_path / "b"
    record(only_empty, "20261201-000001-aaaa", failed_tests=[], tests_run=0, exit_code=1)
    choice = rerun.choose(only_empty)
    assert choice.regex is None and choice.notes[-1].startswith("nothing to rerun: no run in")
    with pytest.raises(ConfigError, match="no finished run recorded") as err:
        rerun.choose(tmp_path / "none", "invoke test-vm --config /x/vm.yaml")
    assert err.value.hint == "run `invoke test-vm --config /x/vm.yaml` first"
