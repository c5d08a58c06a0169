"""Issue 23: adopting vmtasks in another Go project, and screens that give the reason.

User-level checks: real ``invoke`` processes, piped, through the Linux stand-in ``tart``.
"""

from __future__ import annotations

import re
import shutil

import pytest

from .conftest import EXAMPLE


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
