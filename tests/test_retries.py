"""--retries around the model: the exit code (flaky passes unless --fail-on-flaky) and the
config (suite.retries, 0..10, and the --retries flag)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from test_results_retries import PKG, first_pass, retried, retry

from vmtasks.guest import results
from vmtasks.guest.config import load
from vmtasks.guest.errors import ConfigError
from vmtasks.guest.results import PASS
from vmtasks.lifecycle.finish import RunEnd


def run_end(summary, fail_on_flaky=False, retried=True):
    pipeline = SimpleNamespace(ctx=SimpleNamespace(exit_code=1, error=None), name="vm1")
    request = SimpleNamespace(fail_on_flaky=fail_on_flaky, allow_no_tests=False)
    return RunEnd(cfg=None, request=request, record=None, reporter=None, pipelines=[pipeline], vm_count=1,
                  retries={("p", "TestB"): []} if retried else {})


@pytest.mark.parametrize("fail_on_flaky, code", [(False, 0), (True, 1)])
def test_a_flaky_test_fails_the_run_only_with_fail_on_flaky(fail_on_flaky, code):
    summary = results.with_retries(first_pass(), {(PKG, "TestB"): [retry("TestB", PASS, "r1")],
                                                  (PKG, "TestC"): [retry("TestC", PASS, "r2")]})
    assert run_end(summary, fail_on_flaky)._exit_code(summary, False) == code


def test_a_test_failed_on_every_attempt_fails_the_run():
    assert run_end(retried())._exit_code(retried(), False) == 1


def test_the_summary_lists_the_evidence_of_the_retry_vms_too():
    def vm(name, evidence, changed=()):
        return SimpleNamespace(name=name, ctx=SimpleNamespace(evidence=list(evidence), changed=list(changed),
                                                              changes_seconds=0.5 * len(changed)))

    end = RunEnd(cfg=None, request=None, record=SimpleNamespace(dir="/runs/r1"), reporter=None,
                 pipelines=[vm("vm1", ["evidence of TestB on vm1: /runs/r1/vm1/artifacts/TestB"], ["TestA"])],
                 retry_pipelines=[vm("r1", ["evidence of TestB on r1: /runs/r1/r1/artifacts/TestB"], ["TestB"])],
                 vm_count=1)
    assert end._evidence_lines() == [
        "evidence of TestB on vm1: /runs/r1/vm1/artifacts/TestB",
        "evidence of TestB on r1: /runs/r1/r1/artifacts/TestB",
        "changes: what each of 2 tests changed is in /runs/r1/changes/ (0.50s per test for the snapshots and the "
        "comparison)"]


@pytest.mark.parametrize("value", [-1, 11])
def test_suite_retries_is_validated(tmp_path, value):
    path = tmp_path / "vm.yaml"
    path.write_text("suite:\n  retries: {}\n".format(value))
    with pytest.raises(ConfigError, match="suite.retries"):
        load(path, environ={}, cwd=tmp_path)


def test_suite_retries_defaults_to_0_and_takes_the_flag(tmp_path):
    path = tmp_path / "vm.yaml"
    path.write_text("suite:\n  retries: 2\n")
    assert load(path, environ={}, cwd=tmp_path).suite.retries == 2
    assert load(path, environ={}, overrides={"suite.retries": 1}, cwd=tmp_path).suite.retries == 1
    path.write_text("vms: 1\n")
    assert load(path, environ={}, cwd=tmp_path).suite.retries == 0


def test_the_dry_run_plan_says_how_failed_tests_are_retried(tmp_path):
    import dataclasses

    from conftest import FakeRunner
    from test_run import make_run

    run = make_run(tmp_path, FakeRunner())
    assert not any("fresh VM" in line for line in run.plan())
    run.request = dataclasses.replace(run.request, retries=2)
    assert any("up to 2 times: run it again alone on a fresh VM" in line for line in run.plan())


def test_the_dry_run_plan_says_isolated_vms_are_cloned_ahead(tmp_path):
    import dataclasses

    from conftest import FakeRunner
    from test_run import make_run

    run = make_run(tmp_path, FakeRunner())
    assert not any("--isolate" in line for line in run.plan())
    run.request = dataclasses.replace(run.request, isolate=True, vms=2)
    assert any("next VM is cloned while its current one runs" in line for line in run.plan())
