import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from vmtasks.guest import config
from vmtasks.guest.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "vm.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load_error(path, environ=None, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        config.load(path, environ={} if environ is None else environ, cwd=kwargs.pop("cwd", path.parent
                                                                                  if path else Path("/")),
                    **kwargs)
    assert err.value.hint
    return err.value


# --- defaults and layering ------------------------------------------------------------


def test_builtin_defaults_are_neutral_and_openboots_settings_are_in_its_config(tmp_path):
    cfg = config.load(None, environ={}, cwd=tmp_path)
    assert cfg.vm.base == "tahoe-base"
    assert cfg.vm.user == "admin"
    assert cfg.vm.name_prefix == "vmtasks"
    assert cfg.guest.dir == "/Users/admin/project"
    assert cfg.setup == [config.INSTALL_INVOKE] and "openboot" not in cfg.to_json()
    assert "mise" not in cfg.to_json() and "/opt/homebrew" not in cfg.to_json()
    assert cfg.timeouts.boot == 60
    assert cfg.sync.excludes == ["/.git/objects", "/coverage.out", "/coverage.html"]
    assert cfg.suite.all == "go test -v -timeout 60m ./..."
    assert "-run {test}" in cfg.suite.one and "-timeout 45m" in cfg.suite.one
    assert cfg.project_dir == str(tmp_path.resolve())
    # openboot keeps its own settings, explicitly, in this repository's config/vm.yaml.
    repo = Path(__file__).resolve().parents[1]
    ob = config.load(repo / "config" / "vm.yaml", environ={}, cwd=tmp_path)
    assert ob.vm.name_prefix == "openboot-ephemeral" and ob.guest.dir == "/Users/admin/openboot"
    assert ob.suite.all == "go test -v -timeout 60m -tags=e2e,vm ./test/e2e/..."
    assert ob.setup[0] == "/opt/homebrew/bin/mise install go@latest"
    assert ob.project_dir == str(repo)


def test_new_keys_defaults(tmp_path):
    cfg = config.load(None, environ={}, cwd=tmp_path)
    assert (cfg.vms, cfg.backend, cfg.prepare, cfg.prepared) == (1, "tart", [], True)
    assert cfg.orchard == config.OrchardSettings(image="tahoe-base")  # image defaults to vm.base
    assert (cfg.timeouts.prepare, cfg.timeouts.test, cfg.sweep.unleased_after) == (1800, 2700, 24)
    assert cfg.suite.durations == str(tmp_path.resolve() / ".vmtasks" / "durations.json")
    assert not hasattr(cfg, "test")  # the regex belongs to the run request


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
    assert cfg.origin("vm.base").startswith("flag ") and cfg.origin("timeouts.boot") == "{}:5".format(path)


def test_invoke_layer_sits_between_defaults_and_file(tmp_path):
    path = write(tmp_path, "vm:\n  base: from-file\n")
    cfg = config.load(path, environ={}, cwd=tmp_path,
                      invoke_layer={"vm": {"base": "from-invoke", "user": "bob"}, "keep": None})
    assert (cfg.vm.base, cfg.vm.user, cfg.keep) == ("from-file", "bob", "never")
    assert cfg.origin("vm.user") == "Invoke config vmtasks.vm.user"
    err = load_error(path, invoke_layer={"kep": "always"})
    assert "Invoke config vmtasks.kep" in err.message and "did you mean 'keep'" in err.message


@pytest.mark.parametrize("value,expected", [("1", "always"), ("0", "never"), ("", "never"),
                                            ("on-failure", "on-failure"), ("true", "always")])
def test_old_keep_knob(tmp_path, value, expected):
    cfg = config.load(None, environ={"OPENBOOT_VM_KEEP": value}, cwd=tmp_path)
    assert cfg.keep == expected


def test_new_env_knobs(tmp_path):
    cfg = config.load(None, environ={"OPENBOOT_VM_VMS": "3", "OPENBOOT_VM_BACKEND": "orchard",
                                     "ORCHARD_URL": "https://orch.example:6120"}, cwd=tmp_path)
    assert (cfg.vms, cfg.backend, cfg.orchard.url) == (3, "orchard", "https://orch.example:6120")
    assert cfg.origin("orchard.url") == "environment variable ORCHARD_URL"


def test_orchard_url_env_is_only_a_fallback(tmp_path):
    path = write(tmp_path, "backend: orchard\norchard:\n  url: https://project.example\n")
    cfg = config.load(path, environ={"ORCHARD_URL": "https://ambient.example"}, cwd=tmp_path)
    assert cfg.orchard.url == "https://project.example"
    # With the tart backend the Orchard CLI's variable is none of our business.
    assert config.load(None, environ={"ORCHARD_URL": "https://x"}, cwd=tmp_path).orchard.url == ""
    err = load_error(write(tmp_path, "backend: orchard\n", "o.yaml"))
    assert "o.yaml:1" in err.message and "orchard.url" in err.message and "ORCHARD_URL" in err.hint


@pytest.mark.parametrize("text,needle", [
    ("backend: tarte\n", "did you mean 'tart'"),
    ("vms: 0\n", "'vms' must be between 1"),
    ("vms: 2.5\n", "whole number"),
    ("prepared: maybe\n", "'prepared' must be true or false"),
    ("prepare: make\n", "'prepare' must be a list of strings"),
    ("orchard:\n  url: ftp://x\n", "http:// or https://"),
    ("orchard:\n  cpu: 0\n", "'orchard.cpu' must be at least 1"),
    ("orchard:\n  image: '-rf x'\n", "'orchard.image'"),
    ("sweep:\n  unleased_after: -1\n", "zero or more"),
    ("sweep:\n  unleased_after: .nan\n", "finite"),
])
def test_new_keys_are_validated(tmp_path, text, needle):
    assert needle in load_error(write(tmp_path, text)).message


def test_test_regex_is_not_config(tmp_path):
    assert config.test_from_env({"OPENBOOT_VM_TEST": "TestA|TestB"}) == "TestA|TestB"
    assert config.test_from_env({"OPENBOOT_VM_TEST": ""}) is None
    assert config.test_from_env({}) is None
    with pytest.raises(ConfigError, match="OPENBOOT_VM_TEST is blank"):
        config.test_from_env({"OPENBOOT_VM_TEST": "  "})
    # Still a known variable: no "unknown environment variable", and not a config key.
    cfg = config.load(None, environ={"OPENBOOT_VM_TEST": "TestA"}, cwd=tmp_path)
    assert "test" not in cfg.to_dict()
    err = load_error(write(tmp_path, "test: TestA\n"))
    assert "unknown key 'test'" in err.message


def test_unknown_key_did_you_mean_with_line(tmp_path):
    path = write(tmp_path, "keep: never\nvm:\n  base: x\n  bsae: x\n")
    err = load_error(path)
    assert "vm.bsae" in err.message and "did you mean 'vm.base'" in err.message
    assert err.message.startswith("{}:4:".format(path))


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
    ("vm: !!python/object:os.system x\n", "cannot be read"),
    ("vm: !!set {a, b}\n", "YAML tag"),
])
def test_validation_errors_name_the_key(tmp_path, text, needle):
    assert needle in load_error(write(tmp_path, text)).message


# --- 8: alias bombs and bounded messages -----------------------------------------------

def bomb(indent: str, item: str, merge: bool = False) -> str:
    """Nine levels of nine aliases each (9**9 leaves if expanded), written under one key."""
    if merge:
        lines = ["X0: &a0 {" + ", ".join("K%d: v" % i for i in range(9)) + "}"]
        lines += ["X{0}: &a{0} {{<<: [{1}]}}".format(i, ", ".join(["*a%d" % (i - 1)] * 9)) for i in range(1, 9)]
    else:
        lines = [item + "&a0 [" + ", ".join(["lol"] * 9) + "]"]
        lines += [item + "&a{0} [{1}]".format(i, ", ".join(["*a%d" % (i - 1)] * 9)) for i in range(1, 9)]
    return "".join(indent + line + "\n" for line in lines)


@pytest.mark.parametrize("text,key", [
    ("setup:\n" + bomb("  ", "- "), "setup["),
    ("guest:\n  env:\n" + bomb("    ", "", merge=True), "guest.env.X"),
    ("guest:\n  env:\n" + "".join("    V{0}: {1}\n".format(i, line.split(" ", 1)[1])
                                  for i, line in enumerate(bomb("", "- ").splitlines())), "guest.env.V"),
], ids=["setup", "guest.env-merge-keys", "guest.env-lists"])
def test_alias_bomb_fails_fast_in_bounded_memory(tmp_path, text, key):
    """Gigabytes if expanded: refused in well under a second, in a few MB."""
    path = write(tmp_path, "keep: never\n" + text)
    started = time.monotonic()
    err = load_error(path)
    elapsed = time.monotonic() - started
    tracemalloc.start()  # measured apart: tracing slows Python down several times
    try:
        load_error(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "through YAML aliases (an alias bomb?)" in err.message and key in err.message
    assert err.message.startswith(str(path) + ":")
    assert len(err.render()) < 600
    assert elapsed < 1.0, elapsed
    assert peak < 30 * 1024 * 1024, peak


def test_recursive_alias_is_refused(tmp_path):
    err = load_error(write(tmp_path, "setup: &s [*s]\n"))
    assert "nested more than" in err.message and "vm.yaml:1" in err.message


def test_aliases_and_merge_keys_of_sane_size_work(tmp_path):
    text = ("vm: &vm {base: img, user: bob}\n"
            "guest:\n  env: &env {A: '1'}\n  dir: /Users/bob/p\n"
            "setup: &steps [one, two]\nbuild: *steps\n")
    cfg = config.load(write(tmp_path, text), environ={}, cwd=tmp_path)
    assert cfg.build == ["one", "two"] and cfg.vm.user == "bob"
    merged = write(tmp_path, "sync: &s {compress: false}\nrecords: {<<: {keep_last: 3}, dir: r}\n", "m.yaml")
    cfg = config.load(merged, environ={}, cwd=tmp_path)
    assert cfg.records.keep_last == 3 and cfg.sync.compress is False


def test_duplicate_key_is_an_error_not_the_last_one(tmp_path):
    err = load_error(write(tmp_path, "keep: never\nvm:\n  base: a\nkeep: always\n"))
    assert "vm.yaml:4" in err.message and "given twice" in err.message and "line 1" in err.message


def test_error_shows_a_bounded_excerpt(tmp_path):
    err = load_error(write(tmp_path, "keep: " + "x" * 100000 + "\n"))
    assert len(err.message) < 400 and "'keep' must be one of" in err.message
    # The environment and flags are bounded the same way.
    with pytest.raises(ConfigError) as env_err:
        config.load(None, environ={"OPENBOOT_VM_BOOT_TIMEOUT": "9" * 5000 + "x"}, cwd=tmp_path)
    assert len(env_err.value.message) < 400


def test_runaway_file_is_not_read(tmp_path):
    path = tmp_path / "vm.yaml"
    path.write_text("# " + "x" * (300 << 10) + "\n")
    assert "larger than" in load_error(path).message
    err = load_error(write(tmp_path, "setup: [" + "x, " * 20000 + "x]\n", "long.yaml"))
    assert "that is not a config" in err.message and "alias" not in err.message


# --- 9: encoding -----------------------------------------------------------------------


def test_non_utf8_config_names_file_and_offset(tmp_path):
    path = tmp_path / "vm.yaml"
    path.write_bytes(b"vm:\n  base: caf\xe9\n")
    err = load_error(path)
    assert str(path) in err.message and "byte 15" in err.message and "line 2" in err.message
    assert "UTF-8" in err.message


def test_bom_is_accepted(tmp_path):
    path = tmp_path / "vm.yaml"
    path.write_bytes(b"\xef\xbb\xbfkeep: always\n")
    assert config.load(path, environ={}, cwd=tmp_path).keep == "always"


# --- 10: numbers -----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", ".nan", "NaN", "inf", ".inf", "-.inf", "1e999", "Infinity", "-5",
                                   "604801", "1e6"])
def test_timeouts_must_be_finite_and_sane(tmp_path, value):
    err = load_error(write(tmp_path, "timeouts:\n  boot: {}\n".format(value)))
    assert "timeouts.boot" in err.message and "vm.yaml:2" in err.message
    with pytest.raises(ConfigError, match="OPENBOOT_VM_BOOT_TIMEOUT"):
        config.load(None, environ={"OPENBOOT_VM_BOOT_TIMEOUT": value}, cwd=tmp_path)


def test_json_nan_timeout_is_rejected(tmp_path):
    path = write(tmp_path, '{"timeouts": {"suite": NaN}}', "c.json")
    assert "finite" in load_error(path).message


def test_poll_must_be_positive_and_zero_waits_are_allowed(tmp_path):
    assert "greater than 0" in load_error(write(tmp_path, "timeouts:\n  poll: 0\n")).message
    cfg = config.load(write(tmp_path, "timeouts:\n  slot_wait: 0\n  boot: 604800\n", "ok.yaml"),
                      environ={}, cwd=tmp_path)
    assert (cfg.timeouts.slot_wait, cfg.timeouts.boot) == (0, 604800)


# --- 11: host paths, checked by pre-flight, not at load --------------------------------


def test_missing_project_dir_is_found_by_check_host_paths(tmp_path):
    path = write(tmp_path, "keep: never\nproject_dir: ../nope\n", "config/vm.yaml")
    cfg = config.load(path, environ={}, cwd=tmp_path)  # loading alone is fine (the guest does it)
    with pytest.raises(ConfigError) as err:
        config.check_host_paths(cfg)
    missing = str((tmp_path / "nope").resolve())
    assert "'project_dir'" in err.value.message and missing in err.value.message
    assert "{}:2".format(path) in err.value.message
    cfg = config.load(path, environ={"OPENBOOT_VM_PROJECT": "gone"}, cwd=tmp_path)
    with pytest.raises(ConfigError, match="environment variable OPENBOOT_VM_PROJECT"):
        config.check_host_paths(cfg)
    cfg = config.load(path, environ={"VMTASKS_VM_PROJECT": "gone"}, cwd=tmp_path)
    with pytest.raises(ConfigError, match="environment variable VMTASKS_VM_PROJECT"):
        config.check_host_paths(cfg)
    (tmp_path / "go.mod").write_text("module m\n")
    config.check_host_paths(config.load(None, environ={}, cwd=tmp_path))  # cwd exists, with go.mod


def test_a_project_dir_without_go_mod_or_the_suite_s_directory_is_refused_at_pre_flight(tmp_path):
    """go would exit before any test in the VM (`directory prefix ... does not contain main
    module`): say so on the host, before any VM exists, with exit 2."""
    (tmp_path / "mod" / "test" / "e2e").mkdir(parents=True)
    (tmp_path / "mod" / "go.mod").write_text("module m\n")
    path = write(tmp_path / "mod", "project_dir: ../test\nsuite:\n  all: go test ./e2e/...\n"
                 "  one: go test -run {test} ./e2e/...\n", "config/vm.yaml")
    with pytest.raises(ConfigError) as err:
        config.check_host_paths(config.load(path, environ={}, cwd=tmp_path))
    assert err.value.exit_code == 2
    assert "{}:1: 'project_dir' = {} has no go.mod".format(path, tmp_path.resolve() / "mod" / "test") \
        in err.value.message
    assert "the nearest go.mod is in {}".format(tmp_path.resolve() / "mod") in err.value.message
    assert "vm-init" in err.value.hint
    path.write_text("suite:\n  all: go test ./tests/e2e/...\n  one: go test -run {test} ./tests/e2e/...\n")
    with pytest.raises(ConfigError, match=r"vm.yaml:2: the suite's package pattern ./tests/e2e/... names"):
        config.check_host_paths(config.load(path, environ={}, cwd=tmp_path))
    path.write_text("suite:\n  all: go test ./test/e2e/...\n  one: go test -run {test} ./test/e2e/...\n")
    config.check_host_paths(config.load(path, environ={}, cwd=tmp_path))


def test_project_dir_left_unset_is_the_module_root_of_a_config_in_config_dir(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    path = write(repo, "vm:\n  name_prefix: x\n", "config/vm.yaml")
    # No go.mod anywhere in the repository: a config in config/ belongs to the repository root.
    assert config.load(path, environ={}, cwd=tmp_path).project_dir == str(repo.resolve())
    (repo / "go.mod").write_text("module m\n")
    assert config.load(path, environ={}, cwd=tmp_path).project_dir == str(repo.resolve())
    # A nested module's own config (tools/e2e/vm.yaml, with tools/e2e/go.mod) is that module.
    nested = write(repo / "tools" / "e2e", "{}\n", "vm.yaml")
    (repo / "tools" / "e2e" / "go.mod").write_text("module n\n")
    assert config.load(nested, environ={}, cwd=tmp_path).project_dir == str((repo / "tools" / "e2e").resolve())
    # Said explicitly, it stays what it says (openboot's config/vm.yaml: `project_dir: ..`).
    path.write_text("project_dir: .\n")
    assert config.load(path, environ={}, cwd=tmp_path).project_dir == str((repo / "config").resolve())


def test_orchard_ca_cert_checked_with_orchard_backend(tmp_path):
    path = write(tmp_path, "backend: orchard\norchard:\n  url: https://o\n  ca_cert: ca.pem\n")
    (tmp_path / "go.mod").write_text("module m\n")
    cfg = config.load(path, environ={}, cwd=Path("/"))
    assert cfg.orchard.ca_cert == str(tmp_path.resolve() / "ca.pem")
    with pytest.raises(ConfigError, match=r"vm.yaml:4: 'orchard.ca_cert'"):
        config.check_host_paths(cfg)
    (tmp_path / "ca.pem").write_text("cert")
    config.check_host_paths(cfg)


# --- 12: guest paths -------------------------------------------------------------------


@pytest.mark.parametrize("guest_dir,needle", [
    ("/Users/admin/x/..", "contains '..'"),
    ("/Users/admin/openboot/../openboot2", "contains '..'"),
    ("/Users/admin", "the guest user's home"),
    ("/Users/admin/", "the guest user's home"),
    ("//Users/admin/.", "the guest user's home"),
    ("/", "ancestor of the guest user's home"),
    ("/Users", "ancestor of the guest user's home"),
    ("/Users/admin/.ssh", "SSH keys"),
    ("/Users/admin/.vmtasks", "ancestor of guest.tool_dir"),
])
def test_guest_dir_never_wipes_the_home(tmp_path, guest_dir, needle):
    err = load_error(write(tmp_path, "vm:\n  user: admin\nguest:\n  dir: '{}'\n".format(guest_dir)))
    assert needle in err.message and "vm.yaml:4" in err.message


def test_guest_dir_home_follows_vm_user_and_is_normalised(tmp_path):
    err = load_error(write(tmp_path, "vm:\n  user: bob\nguest:\n  dir: /Users/bob\n"))
    assert "home" in err.message
    cfg = config.load(None, environ={}, overrides={"guest.dir": "/Users/admin/./work//tree/"}, cwd=tmp_path)
    assert cfg.guest.dir == "/Users/admin/work/tree"
    with pytest.raises(ConfigError) as flag_err:
        config.load(None, environ={}, overrides={"guest.dir": "/Users/admin"}, cwd=tmp_path,
                    flag_names={"guest.dir": "--guest-dir"})
    assert flag_err.value.message.startswith("flag --guest-dir:")


@pytest.mark.parametrize("tool_dir", ["/abs", ".", "./", "..", "a/../..", "x/..", ".ssh", ".ssh/tool", ""])
def test_guest_tool_dir_is_a_plain_subdirectory(tmp_path, tool_dir):
    err = load_error(write(tmp_path, "guest:\n  tool_dir: '{}'\n".format(tool_dir)))
    assert "guest.tool_dir" in err.message


def test_guest_tool_dir_normalised(tmp_path):
    cfg = config.load(write(tmp_path, "guest:\n  tool_dir: ./.vmtasks//t/\n"), environ={}, cwd=tmp_path)
    assert cfg.guest.tool_dir == ".vmtasks/t"


# --- issue 12: the layer a bad value came from ----------------------------------------


def test_env_value_is_blamed_on_the_variable(tmp_path):
    path = write(tmp_path, "keep: never\n")
    err = load_error(path, {"OPENBOOT_VM_KEEP": "maybe"})
    assert err.message.startswith("environment variable OPENBOOT_VM_KEEP:")
    assert str(path) not in err.message and "OPENBOOT_VM_KEEP" in err.hint


def test_flag_value_is_blamed_on_the_flag(tmp_path):
    path = write(tmp_path, "keep: never\n")
    err = load_error(path, overrides={"timeouts.boot": "abc"}, flag_names={"timeouts.boot": "--boot-timeout"})
    assert err.message.startswith("flag --boot-timeout:") and "'timeouts.boot' must be a number" in err.message
    assert "--boot-timeout" in err.hint and str(path) not in err.message + err.hint
    err = load_error(path, overrides={"vm.base": "a b"})  # the tasks' own flag names by default
    assert err.message.startswith("flag --base:")
    err = load_error(path, overrides={"vm.user": "a b"})  # no name known: a readable guess
    assert err.message.startswith("flag --vm-user:")


def test_file_value_is_blamed_on_file_and_line(tmp_path):
    path = write(tmp_path, "# comment\nvm:\n  base: ok\n\nkeep: sometimes\ntimeouts:\n  poll: 0\n")
    err = load_error(path)
    assert err.message.startswith("{}:5:".format(path)) and "{}:5".format(path) in err.hint
    fixed = write(tmp_path, "# comment\nvm:\n  base: ok\n\nkeep: always\ntimeouts:\n  poll: 0\n")
    assert load_error(fixed).message.startswith("{}:7:".format(fixed))


def test_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "vm:\n  base: a\n  user: [b\nkeep: never\n")
    err = load_error(path)
    assert err.message.startswith("{}:4: not valid YAML".format(path)) and "from line 3" in err.message
    err = load_error(write(tmp_path, "keep: never\nvm:\n  base: a\x07b\n", "ctl.yaml"))
    assert err.message.startswith("{}:3: not valid YAML: the control character #x0007".format(tmp_path / "ctl.yaml"))
    err = load_error(write(tmp_path, '{"vm": {"base": }}', "c.json"))
    assert "c.json:1: not valid JSON" in err.message


# --- paths relative to the config file --------------------------------------------------


def test_paths_are_absolute_and_relative_to_the_config_file(tmp_path):
    path = write(tmp_path / "proj" / "config", "project_dir: ..\nstate_dir: state\nrecords:\n  dir: runs\n"
                 "suite:\n  durations: d.json\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cfg = config.load(path, environ={}, cwd=elsewhere)
    conf_dir = (tmp_path / "proj" / "config").resolve()
    assert cfg.project_dir == str((tmp_path / "proj").resolve())
    assert (cfg.state_dir, cfg.records.dir, cfg.suite.durations) == (
        str(conf_dir / "state"), str(conf_dir / "runs"), str(conf_dir / "d.json"))


def test_default_records_belong_to_their_config(tmp_path):
    a = write(tmp_path / "a", "{}\n")
    b = write(tmp_path / "b", "{}\n")
    ra = config.load(a, environ={}, cwd=tmp_path).records.dir
    rb = config.load(b, environ={}, cwd=tmp_path).records.dir
    assert ra == str((tmp_path / "a").resolve() / ".vmtasks" / "runs") and ra != rb
    assert config.load(a, environ={}, cwd=tmp_path).state_dir == ""  # unset: the default state dir


def test_env_paths_are_relative_to_cwd(tmp_path):
    path = write(tmp_path / "conf", "{}\n")
    cfg = config.load(path, environ={"OPENBOOT_VM_STATE_DIR": "st"}, cwd=tmp_path)
    assert cfg.state_dir == str(tmp_path.resolve() / "st")


def test_project_dir_relative_to_config_file(tmp_path):
    (tmp_path / "proj" / "config").mkdir(parents=True)
    path = write(tmp_path / "proj" / "config", "project_dir: ..\n")
    cfg = config.load(path, environ={}, cwd=tmp_path)
    assert cfg.project_dir == str((tmp_path / "proj").resolve())


# --- locating the config ----------------------------------------------------------------


def test_find_config_file(tmp_path):
    assert config.find_config_file(None, {}, tmp_path) is None
    write(tmp_path / "config", "{}\n")
    assert config.find_config_file(None, {}, tmp_path) == tmp_path / "config" / "vm.yaml"
    other = write(tmp_path, "{}\n", "other.yaml")
    assert config.find_config_file(None, {"OPENBOOT_VM_CONFIG": str(other)}, tmp_path) == other
    with pytest.raises(ConfigError, match="does not exist"):
        config.find_config_file("missing.yaml", {}, tmp_path)


def test_missing_config_gets_did_you_mean(tmp_path):
    write(tmp_path, "{}\n", "vm.yaml")
    with pytest.raises(ConfigError) as err:
        config.locate("vm.yml", {}, tmp_path)
    assert "did you mean {}".format(tmp_path / "vm.yaml") in err.value.message
    assert "--config" in err.value.message
    with pytest.raises(ConfigError, match="it is a directory; did you mean"):
        config.locate(".", {}, tmp_path)
    with pytest.raises(ConfigError, match="OPENBOOT_VM_CONFIG"):
        config.locate(None, {"OPENBOOT_VM_CONFIG": "vm.ymal"}, tmp_path)


def test_locate_order(tmp_path):
    root, cwd = tmp_path / "repo", tmp_path / "repo" / "sub"
    for name in ["flag.yaml", "env.yaml", "inv.yaml", "config/vm.yaml", "vm.yaml", "sub/config/vm.yaml"]:
        write(root, "{}\n", name)
    env = {"OPENBOOT_VM_CONFIG": str(root / "env.yaml")}
    section = {"config": "inv.yaml", "keep": "always"}

    def where(explicit, environ, section):
        path, layer = config.locate(explicit, environ, cwd, project_root=root, invoke_section=section)
        assert "config" not in layer
        return path.relative_to(root).as_posix()

    assert where(str(root / "flag.yaml"), env, section) == "flag.yaml"
    assert where(None, env, section) == "env.yaml"
    assert where(None, {}, section) == "inv.yaml"  # relative to the project root, not cwd
    assert where(None, {}, {}) == "config/vm.yaml"
    (root / "config" / "vm.yaml").unlink()
    assert where(None, {}, {}) == "vm.yaml"
    (root / "vm.yaml").unlink()
    assert where(None, {}, {}) == "sub/config/vm.yaml"
    assert config.locate(None, {}, cwd, root, section)[1] == {"keep": "always"}


def test_nothing_found_is_an_error_that_says_where_it_looked(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    with pytest.raises(ConfigError) as err:
        config.locate(None, {}, tmp_path, project_root=root)
    message = err.value.message
    assert str(root / "config" / "vm.yaml") in message and str(root / "vm.yaml") in message
    assert str(tmp_path / "config" / "vm.yaml") in message and "VMTASKS_VM_CONFIG" in message
    assert "--config" in err.value.hint and "invoke vm-init" in err.value.hint
    assert config.locate(None, {}, tmp_path, project_root=root, required=False) == (None, {})


def test_runtime_config_that_is_ours_is_the_config_file(tmp_path):
    ours = write(tmp_path, "vm:\n  base: b\ntimeouts:\n  boot: 5\n", "mine.yaml")
    write(tmp_path / "config", "{}\n")
    assert config.locate(None, {}, tmp_path, runtime_config=ours)[0] == ours
    invoke_only = write(tmp_path, "run:\n  echo: true\ntimeouts:\n  command: 5\n", "inv.yaml")
    assert config.locate(None, {}, tmp_path, runtime_config=invoke_only)[0] == tmp_path / "config" / "vm.yaml"
    with pytest.raises(ConfigError, match="two config files"):
        config.locate(str(tmp_path / "config" / "vm.yaml"), {}, tmp_path, runtime_config=ours)
    python_config = write(tmp_path, "run = {'echo': True}\n", "invoke.py")
    assert config.locate(None, {}, tmp_path, runtime_config=python_config)[0] == tmp_path / "config" / "vm.yaml"
    both = write(tmp_path, "vm: {}\nvmtasks: {}\n", "both.yaml")
    with pytest.raises(ConfigError) as err:
        config.locate(None, {}, tmp_path, runtime_config=both)
    assert "vmtasks keys at the top and a 'vmtasks:' section" in err.value.message and "use one" in err.value.hint


TASKS_PY = '''
import json, sys
sys.path.insert(0, {repo!r})
from invoke import task
from vmtasks.guest import config

@task
def info(c):
    root, runtime, section = config.invoke_context_info(c)
    path, layer = config.locate(None, {{}}, __import__("pathlib").Path.cwd(), project_root=root,
                                invoke_section=section, runtime_config=runtime)
    print(json.dumps({{"root": str(root), "runtime": runtime and str(runtime), "section": section,
                      "path": str(path), "layer": layer}}))
'''


def run_invoke(project: Path, cwd: Path, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INVOKE_", "OPENBOOT_VM_"))}
    done = subprocess.run([sys.executable, "-m", "invoke", "-r", str(project), *args, "info"], cwd=str(cwd),
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_invoke_context_info_from_a_real_invoke(tmp_path):
    """Run by Invoke itself (-r elsewhere, -f, invoke.yaml) to pin the Config attributes we read."""
    project, cwd = tmp_path / "repo", tmp_path / "elsewhere"
    cwd.mkdir()
    write(project, TASKS_PY.format(repo=str(REPO)), "tasks.py")
    write(project, "vmtasks:\n  config: conf/vm.yaml\n  keep: on-failure\n", "invoke.yaml")
    write(project, "{}\n", "conf/vm.yaml")
    out = run_invoke(project, cwd)
    assert Path(out["root"]) == project and out["runtime"] is None
    assert out["section"] == {"config": "conf/vm.yaml", "keep": "on-failure"}
    assert Path(out["path"]) == project / "conf" / "vm.yaml" and out["layer"] == {"keep": "on-failure"}
    # invoke -f with an Invoke config: its vmtasks section wins over invoke.yaml's.
    write(cwd, "vmtasks:\n  keep: always\n", "inv.yaml")
    out = run_invoke(project, cwd, "-f", "inv.yaml")
    assert Path(out["runtime"]) == Path("inv.yaml") and out["layer"] == {"keep": "always"}
    # invoke -f with a vmtasks config: that file is the config.
    write(cwd, "vm:\n  base: other\n", "vm.yaml")
    out = run_invoke(project, cwd, "-f", "vm.yaml")
    assert Path(out["path"]) == cwd / "vm.yaml"


def test_load_for_task_with_an_invoke_context(tmp_path):
    from invoke import Config as InvokeConfig
    from invoke import Context

    root, cwd = tmp_path / "repo", tmp_path / "elsewhere"
    cwd.mkdir()
    path = write(root, "vm:\n  base: from-file\nrecords:\n  dir: runs\n", "vm.yaml")
    ic = InvokeConfig(project_location=str(root), overrides={"vmtasks": {"keep": "always", "state_dir": "st"}})
    cfg = config.load_for_task(Context(ic), environ={}, cwd=cwd)
    assert (cfg.source, cfg.vm.base, cfg.keep) == (str(path), "from-file", "always")
    assert cfg.state_dir == str(root.resolve() / "st")  # Invoke's paths: relative to the project
    assert cfg.records.dir == str(root.resolve() / "runs")
    with pytest.raises(ConfigError, match="^flag --boot-timeout:"):
        config.load_for_task(Context(ic), overrides={"timeouts.boot": "x"}, environ={}, cwd=cwd,
                             flag_names={"timeouts.boot": "--boot-timeout"})
    with pytest.raises(ConfigError, match="no vmtasks config found"):
        config.load_for_task(Context(InvokeConfig(project_location=str(cwd))), environ={}, cwd=cwd)
    assert config.load_for_task(None, environ={}, cwd=cwd, required=False).source == "<built-in defaults>"


def test_invoke_context_info_without_invoke_settings():
    class Bare:
        config = object()

    assert config.invoke_context_info(Bare()) == (None, None, {})


# --- the guest's copy -------------------------------------------------------------------


def test_json_round_trip_for_the_guest(tmp_path):
    """The guest gets the resolved config as JSON and must read it without PyYAML, where the
    host's paths do not exist."""
    path = write(tmp_path / "host", "project_dir: proj\nguest:\n  env:\n    FOO: bar\nsetup: []\nvms: 2\n"
                 "backend: orchard\norchard:\n  url: https://o\n  ca_cert: ca.pem\n  cpu: 4\nprepare: [x]\n")
    cfg = config.load(path, environ={}, cwd=tmp_path)
    data = json.loads(cfg.to_json())
    assert "source" not in data and "origins" not in data
    guest = tmp_path / "guest" / "config.json"
    guest.parent.mkdir()
    guest.write_text(json.dumps(data))
    shutil.rmtree(tmp_path / "host")
    again = config.load(guest, environ={}, cwd=tmp_path)
    assert again == dataclasses.replace(cfg, source=str(guest))
    assert again.project_dir == str(tmp_path.resolve() / "host" / "proj")


def test_repo_configs_are_valid():
    for path in [REPO / "config" / "vm.yaml", REPO / "examples" / "gosuite" / "vm.yaml"]:
        cfg = config.load(path, environ={}, cwd=REPO)
        assert cfg.vm.base == "tahoe-base"
    openboot = config.load(REPO / "config" / "vm.yaml", environ={}, cwd=REPO)
    assert openboot.vms == 2 and openboot.project_dir == str(REPO)
    assert openboot.records.dir == str(REPO / ".vmtasks" / "runs")
    assert openboot.suite.durations == str(REPO / ".vmtasks" / "durations.json")


# --- issue 23: VMTASKS_* names, OPENBOOT_* aliases -------------------------------------


def test_vmtasks_variables_and_their_openboot_aliases(tmp_path):
    path = write(tmp_path, "vm:\n  base: from-file\n")
    assert config.load(path, environ={"VMTASKS_VM_BASE": "new"}, cwd=tmp_path).vm.base == "new"
    assert config.load(path, environ={"OPENBOOT_VM_BASE": "old"}, cwd=tmp_path).vm.base == "old"
    same = config.load(path, environ={"VMTASKS_VM_KEEP": "1", "OPENBOOT_VM_KEEP": "1"}, cwd=tmp_path)
    assert same.keep == "always" and same.origin("keep") == "environment variable VMTASKS_VM_KEEP"
    err = load_error(path, environ={"VMTASKS_VM_BASE": "a", "OPENBOOT_VM_BASE": "b"})
    assert "VMTASKS_VM_BASE = 'a' and OPENBOOT_VM_BASE = 'b' disagree" in err.message
    assert "unset OPENBOOT_VM_BASE" in err.hint
    assert "did you mean 'VMTASKS_VM_BASE'" in load_error(path, environ={"VMTASKS_VM_BSE": "x"}).message
    assert "did you mean 'OPENBOOT_VM_BASE'" in load_error(path, environ={"OPENBOOT_VM_BSE": "x"}).message
    assert config.test_from_env({"VMTASKS_VM_TEST": "TestA"}) == "TestA"
    assert config.test_from_env({"OPENBOOT_VM_TEST": "TestB"}) == "TestB"
    with pytest.raises(ConfigError, match="disagree"):
        config.test_from_env({"VMTASKS_VM_TEST": "TestA", "OPENBOOT_VM_TEST": "TestB"})
    other = write(tmp_path, "{}\n", "other.yaml")
    for name in ("VMTASKS_VM_CONFIG", "OPENBOOT_VM_CONFIG"):
        assert config.locate(None, {name: str(other)}, tmp_path)[0] == other


def test_the_in_vm_guard_takes_either_name_and_refuses_when_they_disagree():
    from vmtasks.guest import inner
    from vmtasks.guest.errors import NotInVm

    inner.require_vm({"VMTASKS_IN_VM": "1"})
    inner.require_vm({"OPENBOOT_IN_VM": "1"})
    inner.require_vm({"VMTASKS_IN_VM": "1", "OPENBOOT_IN_VM": "1"})
    for environ in ({}, {"VMTASKS_IN_VM": "0"}, {"VMTASKS_IN_VM": "1", "OPENBOOT_IN_VM": "0"}):
        with pytest.raises(NotInVm) as err:
            inner.require_vm(environ)
        assert err.value.exit_code == 2
    with pytest.raises(NotInVm, match="VMTASKS_IN_VM = '1' and OPENBOOT_IN_VM = '0' disagree"):
        inner.require_vm({"VMTASKS_IN_VM": "1", "OPENBOOT_IN_VM": "0"})


def test_evidence_settings_load_and_are_checked(tmp_path):
    cfg = config.load(write(tmp_path, "artifacts: ['~/Library/Logs/openboot/*.log', '~/.zshrc']\n"
                                      "collect:\n  brew: brew list --versions\nartifacts_max_mb: 5\n"
                                      "timeouts:\n  collect: 30\nsuite:\n  changes: true\n"
                                      "changes:\n  exclude: ['Library/Logs/*']\n  probes:\n    crontab: crontab -l\n"),
                      environ={}, cwd=tmp_path)
    assert cfg.artifacts == ["~/Library/Logs/openboot/*.log", "~/.zshrc"]
    assert cfg.collect == {"brew": "brew list --versions"}
    assert cfg.artifacts_max_mb == 5 and cfg.timeouts.collect == 30 and cfg.suite.changes
    assert cfg.changes.exclude == ["Library/Logs/*"] and cfg.changes.probes == {"crontab": "crontab -l"}
    defaults = config.load(write(tmp_path, "keep: never\n"), environ={}, cwd=tmp_path)
    assert defaults.artifacts == [] and defaults.collect == {} and defaults.artifacts_max_mb == 50
    assert not defaults.suite.changes


@pytest.mark.parametrize("text,needle", [
    ("artifacts: ['']\n", "'artifacts' has an empty pattern"),
    ("artifacts: [\"~/a\\x1b[2J\"]\n", "control character"),
    ("collect:\n  brew: ''\n", "'collect.brew' is an empty command"),
    ("collect:\n  'two words': x\n", "invalid variable name"),
    ("artifacts_max_mb: 0\n", "between 1 and 10240"),
    ("changes:\n  probes:\n    d: '   '\n", "'changes.probes.d' is an empty command"),
])
def test_evidence_settings_refuse_nonsense(tmp_path, text, needle):
    err = load_error(write(tmp_path, text))
    assert needle in err.message and err.exit_code == 2


@pytest.mark.parametrize("value", ["0", "-1", "9000"])
def test_keep_for_is_bounded(tmp_path, value):
    err = load_error(write(tmp_path, "keep_for: {}\n".format(value)))
    assert "keep_for" in err.message and err.exit_code == 2


def test_keep_for_default_is_a_day(tmp_path):
    assert config.load(write(tmp_path, "keep: never\n"), environ={}, cwd=tmp_path).keep_for == 24.0
