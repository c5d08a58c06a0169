import json
from pathlib import Path

import pytest

from vmtasks import config
from vmtasks.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "vm.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_builtin_defaults_are_openboots(tmp_path):
    cfg = config.load(None, environ={}, cwd=tmp_path)
    assert cfg.vm.base == "tahoe-base"
    assert cfg.vm.user == "admin"
    assert cfg.vm.name_prefix == "openboot-ephemeral"
    assert cfg.guest.dir == "/Users/admin/openboot"
    assert cfg.timeouts.boot == 60
    assert cfg.sync.excludes == ["/.git/objects", "/coverage.out", "/coverage.html"]
    assert cfg.suite.all == "go test -v -timeout 60m -tags=e2e,vm ./test/e2e/..."
    assert "-run {test}" in cfg.suite.one and "-timeout 45m" in cfg.suite.one
    assert cfg.project_dir == str(tmp_path.resolve())


def test_layering_file_then_env_then_flags(tmp_path):
    path = write(tmp_path, "vm:\n  base: from-file\n  name_prefix: pfx\ntimeouts:\n  boot: 10\n")
    cfg = config.load(path, environ={}, cwd=tmp_path)
    assert (cfg.vm.base, cfg.vm.name_prefix, cfg.timeouts.boot) == ("from-file", "pfx", 10)
    cfg = config.load(path, environ={"OPENBOOT_VM_BASE": "from-env"}, cwd=tmp_path)
    assert cfg.vm.base == "from-env" and cfg.vm.name_prefix == "pfx"
    cfg = config.load(path, environ={"OPENBOOT_VM_BASE": "from-env"},
                      overrides={"vm.base": "from-flag", "timeouts.boot": None}, cwd=tmp_path)
    assert cfg.vm.base == "from-flag"
    assert cfg.timeouts.boot == 10  # None means "flag not given"


@pytest.mark.parametrize("value,expected", [("1", "always"), ("0", "never"), ("", "never"),
                                            ("on-failure", "on-failure"), ("true", "always")])
def test_old_keep_knob(tmp_path, value, expected):
    cfg = config.load(None, environ={"OPENBOOT_VM_KEEP": value}, cwd=tmp_path)
    assert cfg.keep == expected


def test_test_knob_and_empty(tmp_path):
    assert config.load(None, environ={"OPENBOOT_VM_TEST": "TestA|TestB"}, cwd=tmp_path).test == "TestA|TestB"
    assert config.load(None, environ={"OPENBOOT_VM_TEST": ""}, cwd=tmp_path).test is None


def test_unknown_key_did_you_mean(tmp_path):
    path = write(tmp_path, "vm:\n  bsae: x\n")
    with pytest.raises(ConfigError) as err:
        config.load(path, environ={}, cwd=tmp_path)
    assert "vm.bsae" in err.value.message and "did you mean 'vm.base'" in err.value.message
    assert str(path) in err.value.message


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'timeouts'"):
        config.load(write(tmp_path, "timeout:\n  boot: 3\n"), environ={}, cwd=tmp_path)


def test_unknown_env_knob(tmp_path):
    with pytest.raises(ConfigError, match="OPENBOOT_VM_BASE"):
        config.load(None, environ={"OPENBOOT_VM_BSE": "x"}, cwd=tmp_path)


@pytest.mark.parametrize("text,needle", [
    ("timeouts:\n  boot: soon\n", "'timeouts.boot' must be a number"),
    ("timeouts:\n  boot: -1\n", "zero or more"),
    ("vm:\n  random_mac: maybe\n", "'vm.random_mac' must be true or false"),
    ("setup: echo hi\n", "'setup' must be a list of strings"),
    ("vm:\n  base: ''\n", "'vm.base' is required"),
    ("vm:\n  base: null\n", "'vm.base' must have a value"),
    ("vm: 3\n", "'vm' must be a mapping"),
    ("guest:\n  dir: relative/path\n", "'guest.dir' must be an absolute path"),
    ("guest:\n  dir: /Users/admin/a b\n", "'guest.dir' must be an absolute path"),
    ("guest:\n  env:\n    'BAD NAME': x\n", "invalid variable name"),
    ("suite:\n  one: go test ./...\n", "{test}"),
    ("keep: sometimes\n", "'keep' must be one of"),
    ("vm:\n  name_prefix: a/b\n", "may contain only"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("vm: [unclosed\n", "not valid YAML"),
])
def test_validation_errors_name_the_key(tmp_path, text, needle):
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, text), environ={}, cwd=tmp_path)
    assert needle in err.value.message
    assert err.value.hint


def test_project_dir_relative_to_config_file(tmp_path):
    (tmp_path / "proj" / "config").mkdir(parents=True)
    path = write(tmp_path / "proj" / "config", "project_dir: ..\n")
    cfg = config.load(path, environ={}, cwd=tmp_path)
    assert cfg.project_dir == str((tmp_path / "proj").resolve())


def test_find_config_file(tmp_path):
    assert config.find_config_file(None, {}, tmp_path) is None
    (tmp_path / "config").mkdir()
    write(tmp_path / "config", "{}\n")
    assert config.find_config_file(None, {}, tmp_path) == tmp_path / "config" / "vm.yaml"
    other = write(tmp_path, "{}\n", "other.yaml")
    assert config.find_config_file(None, {"OPENBOOT_VM_CONFIG": str(other)}, tmp_path) == other
    with pytest.raises(ConfigError, match="does not exist"):
        config.find_config_file("missing.yaml", {}, tmp_path)


def test_json_round_trip_for_the_guest(tmp_path):
    """The guest gets the resolved config as JSON and must read it without PyYAML."""
    cfg = config.load(write(tmp_path, "guest:\n  env:\n    FOO: bar\nsetup: []\n"), environ={}, cwd=tmp_path)
    data = json.loads(cfg.to_json())
    assert "source" not in data
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    again = config.load(path, environ={}, cwd=tmp_path)
    assert again.guest.env == {"FOO": "bar"} and again.setup == [] and again.vm == cfg.vm


def test_repo_configs_are_valid():
    repo = Path(__file__).resolve().parent.parent
    for path in [repo / "config" / "vm.yaml", repo / "examples" / "gosuite" / "vm.yaml"]:
        cfg = config.load(path, environ={}, cwd=repo)
        assert cfg.vm.base == "tahoe-base"
