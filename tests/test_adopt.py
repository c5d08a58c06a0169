"""vm-init (vmtasks/ui/adopt.py): the config it writes is found with go list, loads, and never
replaces an existing file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vmtasks.guest import config
from vmtasks.guest.errors import ConfigError
from vmtasks.ui import adopt

REPO = Path(__file__).resolve().parents[1]


def test_build_tags_are_the_project_s_not_the_platform_s():
    assert adopt.build_tags(["//go:build e2e && vm\n", "\n", "package e2e\n"]) == ["e2e", "vm"]
    assert adopt.build_tags(["// +build old\n", "//go:build (integration || e2e) && linux && !race && go1.20\n"]) \
        == ["integration", "e2e"]
    assert adopt.build_tags(["package x\n", "//go:build e2e\n"]) == []  # after the package clause: not a constraint


def test_prefix_from_the_repository_name_is_a_valid_vm_name_of_our_own():
    assert adopt.name_prefix("My Repo.git") == "my-repo-git-vmtasks"
    assert adopt.name_prefix("###") == "project-vmtasks"


@pytest.mark.skipif(shutil.which("go") is None, reason="needs go")
def test_vm_init_finds_the_tagged_package_and_writes_a_config_that_loads(tmp_path):
    module = tmp_path / "gosuite"
    shutil.copytree(str(REPO / "examples" / "gosuite"), str(module), ignore=shutil.ignore_patterns(".vmtasks"))
    (module / "vm.yaml").unlink()
    written = adopt.init(module / "test" / "e2e", project_root=module)
    assert written.path == module / "config" / "vm.yaml" and written.root == module.resolve()
    assert (written.suite.pattern, written.suite.tags) == ("./test/e2e/...", ["e2e", "vm"])
    cfg = config.load(written.path, environ={}, cwd=tmp_path)
    assert cfg.project_dir == str(module.resolve())
    assert cfg.suite.all == "go test -v -timeout 60m -tags=e2e,vm ./test/e2e/..."
    assert cfg.vm.name_prefix == "gosuite-vmtasks" and cfg.guest.dir == "/Users/admin/gosuite"
    assert cfg.records.dir == str(module.resolve() / ".vmtasks" / "runs")
    config.check_host_paths(cfg)  # pre-flight accepts it
    before = written.path.read_text()
    with pytest.raises(ConfigError, match="already exists") as err:
        adopt.init(module, project_root=module)
    assert err.value.exit_code == 2 and written.path.read_text() == before


def test_vm_init_outside_a_go_module_says_where_to_run_it(tmp_path):
    with pytest.raises(ConfigError, match="no go.mod in") as err:
        adopt.init(tmp_path)
    assert "inside your Go module" in err.value.hint
    assert not (tmp_path / "config").exists()
