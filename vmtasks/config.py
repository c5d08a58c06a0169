"""Layered, validated configuration.

Layers, lowest first: built-in defaults < the config file (``config/vm.yaml``) <
``OPENBOOT_VM_*`` environment < task flags. Everything is validated once, here, so a typo
is an error naming the key before any VM exists. The result is a frozen dataclass tree.

This module is imported inside the guest (Python 3.9, no PyYAML): the host hands the guest
the resolved config as JSON, which needs only the standard library.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .errors import ConfigError

KEEP_CHOICES = ("never", "on-failure", "always")
ENV_PREFIX = "OPENBOOT_VM_"
DEFAULT_CONFIG = Path("config") / "vm.yaml"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_GUEST_PATH_RE = re.compile(r"^/[A-Za-z0-9._@+/-]*$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class VmSettings:
    base: str = "tahoe-base"
    name_prefix: str = "openboot-ephemeral"
    user: str = "admin"
    cpu: Optional[int] = None
    memory: Optional[int] = None
    random_mac: bool = True


@dataclass(frozen=True)
class GuestSettings:
    dir: str = "/Users/admin/openboot"
    python: str = "python3"
    command_prefix: str = ""
    env: Dict[str, str] = field(default_factory=dict)
    tool_dir: str = ".vmtasks/tool"


@dataclass(frozen=True)
class SyncSettings:
    excludes: List[str] = field(
        default_factory=lambda: ["/.git/objects", "/coverage.out", "/coverage.html"]
    )
    compress: bool = True


@dataclass(frozen=True)
class SuiteSettings:
    all: str = "go test -v -timeout 60m -tags=e2e,vm ./test/e2e/..."
    one: str = "go test -v -timeout 45m -tags=e2e,vm -run {test} ./test/e2e/..."
    durations: str = ".vmtasks/durations.json"


@dataclass(frozen=True)
class Timeouts:
    """Deadlines in seconds for each stage; ``poll`` is the polling interval."""

    build: float = 1800
    clone: float = 300
    boot: float = 60
    key: float = 60
    setup: float = 900
    sync: float = 600
    suite: float = 4500
    teardown: float = 120
    slot_wait: float = 1800
    poll: float = 1.0
    test: float = 2700


@dataclass(frozen=True)
class SweepSettings:
    unleased_after: float = 24


@dataclass(frozen=True)
class RecordSettings:
    dir: str = ".vmtasks/runs"
    keep_last: int = 20


@dataclass(frozen=True)
class Config:
    project_dir: str = "."
    build: List[str] = field(default_factory=list)
    setup: List[str] = field(
        default_factory=lambda: [
            "/opt/homebrew/bin/mise install go@latest",
            "/opt/homebrew/bin/mise use -g go@latest",
            "python3 -m pip install --user --quiet --disable-pip-version-check 'invoke>=2,<3'",
        ]
    )
    keep: str = "never"
    test: Optional[str] = None
    vms: int = 1
    backend: str = "tart"
    state_dir: str = ""
    vm: VmSettings = field(default_factory=VmSettings)
    guest: GuestSettings = field(default_factory=GuestSettings)
    sync: SyncSettings = field(default_factory=SyncSettings)
    suite: SuiteSettings = field(default_factory=SuiteSettings)
    timeouts: Timeouts = field(default_factory=Timeouts)
    records: RecordSettings = field(default_factory=RecordSettings)
    sweep: SweepSettings = field(default_factory=SweepSettings)
    source: str = "<built-in defaults>"

    def to_dict(self) -> Dict[str, Any]:
        """All settings, loadable again as a config file (``source`` is where they came from)."""
        data = dataclasses.asdict(self)
        data.pop("source")
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# Environment knobs, old and new. Values are parsed by the same validator as the file.
ENV_KEYS = {
    "OPENBOOT_VM_BASE": "vm.base",
    "OPENBOOT_VM_KEEP": "keep",
    "OPENBOOT_VM_TEST": "test",
    "OPENBOOT_VM_PREFIX": "vm.name_prefix",
    "OPENBOOT_VM_BOOT_TIMEOUT": "timeouts.boot",
    "OPENBOOT_VM_PROJECT": "project_dir",
    "OPENBOOT_VM_STATE_DIR": "state_dir",
}
# Read by find_config_file, not a config key.
ENV_CONFIG_PATH = "OPENBOOT_VM_CONFIG"


def _resolve(f: dataclasses.Field) -> Any:
    """The default value of a field (dataclass fields use a factory)."""
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def _did_you_mean(key: str, options: List[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    return " (did you mean '{}'?)".format(close[0]) if close else ""


def _coerce(path: str, value: Any, annotation: str, where: str) -> Any:
    """Check ``value`` against the field's type; strings from the environment are parsed."""
    optional = annotation.startswith("Optional[")
    if value is None:
        if optional:
            return None
        raise ConfigError("{}: '{}' must have a value".format(where, path),
                          "set '{}' or remove the key to use the default".format(path))
    base = annotation[len("Optional["):-1] if optional else annotation

    def bad(expected: str) -> ConfigError:
        return ConfigError(
            "{}: '{}' must be {}, got {!r}".format(where, path, expected, value),
            "fix '{}' in the config".format(path),
        )

    if base == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
            return value.lower() in ("1", "true", "yes", "on")
        raise bad("true or false")
    if base in ("int", "float"):
        if isinstance(value, str):
            try:
                value = float(value) if base == "float" else int(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if base == "int" and not float(value).is_integer():
            raise bad("a whole number")
        if value < 0:
            raise bad("zero or more")
        return int(value) if base == "int" else float(value)
    if base == "str":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if base == "List[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        return list(value)
    if base == "Dict[str, str]":
        if not isinstance(value, dict):
            raise bad("a mapping of names to strings")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or not _ENV_KEY_RE.match(k):
                raise ConfigError("{}: '{}' has an invalid variable name {!r}".format(where, path, k),
                                  "use letters, digits and '_' only")
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise bad("a mapping of names to strings")
            out[k] = str(v)
        return out
    raise AssertionError("unsupported annotation " + annotation)  # pragma: no cover


def _merge(target: Dict[str, Any], layer: Mapping[str, Any], where: str, prefix: str = "") -> None:
    """Merge one layer (nested mapping) into ``target``, validating keys and types."""
    cls = _class_for(prefix)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in layer.items():
        path = prefix + key
        if key not in fields or key == "source":
            options = [prefix + name for name in fields if name != "source"]
            raise ConfigError(
                "{}: unknown key '{}'{}".format(where, path, _did_you_mean(path, options)),
                "valid keys here: " + ", ".join(sorted(options)),
            )
        f = fields[key]
        default = _resolve(f)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError("{}: '{}' must be a mapping".format(where, path),
                                  "see config/vm.yaml for the layout")
            _merge(target.setdefault(key, {}), value, where, path + ".")
        else:
            target[key] = _coerce(path, value, str(f.type), where)


def _class_for(prefix: str) -> type:
    cls: type = Config
    for part in [p for p in prefix.split(".") if p]:
        cls = type(_resolve({f.name: f for f in dataclasses.fields(cls)}[part]))
    return cls


def _nest(dotted: Mapping[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in dotted.items():
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _build(cls: type, values: Mapping[str, Any]) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            default = _resolve(f)
            if dataclasses.is_dataclass(default):
                kwargs[f.name] = _build(type(default), values[f.name])
            else:
                kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def read_file(path: Path) -> Dict[str, Any]:
    """Parse a config file: JSON (what the guest gets) or YAML (with ``yaml.safe_load``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("cannot read config file {}: {}".format(path, exc.strerror),
                          "check the path given with --config or OPENBOOT_VM_CONFIG") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml  # host only: the guest reads JSON

            data = yaml.safe_load(text)
    except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError
        raise ConfigError("{} is not valid {}: {}".format(
            path, "JSON" if path.suffix == ".json" else "YAML", exc),
            "fix the syntax error shown above") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("{}: the top level must be a mapping of keys".format(path),
                          "see config/vm.yaml for the layout")
    return data


def env_layer(environ: Mapping[str, str]) -> Dict[str, Any]:
    """The ``OPENBOOT_VM_*`` variables as dotted config keys; a misspelt one is an error."""
    dotted: Dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG_PATH:
            continue
        if name not in ENV_KEYS:
            known = sorted(list(ENV_KEYS) + [ENV_CONFIG_PATH])
            raise ConfigError(
                "unknown environment variable {}{}".format(name, _did_you_mean(name, known)),
                "unset it, or use one of: " + ", ".join(known),
            )
        key = ENV_KEYS[name]
        if key == "keep":
            value = keep_from_env(value)
        if key == "test" and value == "":
            continue
        dotted[key] = value
    return dotted


def keep_from_env(value: str) -> str:
    """``OPENBOOT_VM_KEEP=1`` meant "keep" in the old driver; the new names work too."""
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return "always"
    if v in ("", "0", "false", "no", "off"):
        return "never"
    return v


def find_config_file(explicit: Optional[str], environ: Mapping[str, str], cwd: Path) -> Optional[Path]:
    """The config file to use: --config, else OPENBOOT_VM_CONFIG, else ./config/vm.yaml if present."""
    chosen = explicit or environ.get(ENV_CONFIG_PATH)
    if chosen:
        path = Path(chosen).expanduser()
        path = path if path.is_absolute() else cwd / path
        if not path.is_file():
            raise ConfigError("config file {} does not exist".format(path),
                              "check --config / {}".format(ENV_CONFIG_PATH))
        return path
    default = cwd / DEFAULT_CONFIG
    return default if default.is_file() else None


def load(
    path: Optional[Path] = None,
    environ: Optional[Mapping[str, str]] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    cwd: Optional[Path] = None,
) -> Config:
    """Build the validated config from all layers. ``overrides`` are dotted keys from flags;
    a value of ``None`` means "flag not given" and is skipped."""
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else cwd
    values: Dict[str, Any] = {}
    layers: List[Tuple[str, Mapping[str, Any]]] = []
    if path is not None:
        layers.append((str(path), read_file(path)))
    layers.append(("environment", _nest(env_layer(environ))))
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    layers.append(("task flags", _nest(flags)))
    for where, layer in layers:
        _merge(values, layer, where)
    base_dir = path.parent if path is not None else cwd
    project = Path(values.get("project_dir", ".")).expanduser()
    values["project_dir"] = str((project if project.is_absolute() else base_dir / project).resolve())
    for section, key, default in (("records", "dir", ".vmtasks/runs"), ("suite", "durations", ".vmtasks/durations.json")):
        p = Path(values.get(section, {}).get(key, default)).expanduser()
        values.setdefault(section, {})[key] = str(p if p.is_absolute() else base_dir / p)
    cfg = _build(Config, values)
    cfg = dataclasses.replace(cfg, source=str(path) if path else "<built-in defaults>")
    _check(cfg)
    return cfg


def _check(cfg: Config) -> None:
    """Cross-field rules the type check cannot express."""
    where = cfg.source
    required = {
        "vm.base": cfg.vm.base, "vm.name_prefix": cfg.vm.name_prefix, "vm.user": cfg.vm.user,
        "guest.dir": cfg.guest.dir, "guest.python": cfg.guest.python,
        "suite.all": cfg.suite.all, "suite.one": cfg.suite.one,
    }
    for key, value in required.items():
        if not value.strip():
            raise ConfigError("{}: '{}' is required and empty".format(where, key),
                              "set '{}' in the config".format(key))
    for key in ("vm.base", "vm.name_prefix", "vm.user"):
        value = required[key]
        if not _NAME_RE.match(value):
            raise ConfigError(
                "{}: '{}' = {!r} may contain only letters, digits, '.', '_' and '-'".format(where, key, value),
                "choose a plain name (it becomes part of VM names and SSH logins)",
            )
    if not _GUEST_PATH_RE.match(cfg.guest.dir):
        raise ConfigError("{}: 'guest.dir' must be an absolute path of letters, digits and ._@+-/ "
                          "(it reaches the guest's shell and rsync), got {!r}".format(where, cfg.guest.dir),
                          "for example /Users/admin/openboot")
    if cfg.guest.tool_dir.startswith("/") or ".." in cfg.guest.tool_dir.split("/"):
        raise ConfigError("{}: 'guest.tool_dir' must be relative to the guest home".format(where),
                          "for example .vmtasks/tool")
    if "{test}" not in cfg.suite.one.split():
        raise ConfigError("{}: 'suite.one' must contain the word {{test}} where the test regex goes".format(where),
                          "for example: go test -v -run {test} ./test/e2e/...")
    if cfg.keep not in KEEP_CHOICES:
        raise ConfigError(
            "{}: 'keep' must be one of {}, got {!r}{}".format(
                where, ", ".join(KEEP_CHOICES), cfg.keep, _did_you_mean(cfg.keep, list(KEEP_CHOICES))),
            "use never, on-failure or always (OPENBOOT_VM_KEEP=1 means always)",
        )
    if cfg.timeouts.poll <= 0:
        raise ConfigError("{}: 'timeouts.poll' must be greater than 0".format(where), "for example 1")
    for exclude in cfg.sync.excludes:
        if not exclude or "\n" in exclude:
            raise ConfigError("{}: 'sync.excludes' has an empty or multi-line pattern".format(where),
                              "one rsync pattern per entry")
    if cfg.test is not None and not cfg.test.strip():
        raise ConfigError("the test regex is empty", "pass --test with a go test -run regex")


# TEMPORARY shims until the config work lands.
def invoke_context_info(c):
    return None, None, None


def locate(explicit, environ, cwd, project_root=None, invoke_section=None, runtime_path=None, required=True):
    return find_config_file(explicit, environ, cwd), None


_load = load


def load(path=None, environ=None, overrides=None, cwd=None, flag_names=None, invoke_layer=None):
    return _load(path, environ, overrides, cwd)


def test_from_env(environ):
    return environ.get("OPENBOOT_VM_TEST") or None


def check_host_paths(cfg):
    if not Path(cfg.project_dir).is_dir():
        raise ConfigError("project_dir {} does not exist".format(cfg.project_dir), "fix project_dir")
