"""Layered, validated configuration, and where it was found.

Layers, lowest first: built-in defaults < Invoke's config (the ``vmtasks:`` section of
``invoke.yaml``, ``invoke -f``, or the collection's ``configure``) < the config file
(``config/vm.yaml``) < ``VMTASKS_VM_*`` environment (``OPENBOOT_VM_*`` are aliases) < task
flags. Everything is validated once, here, so a typo is an error before any VM exists, and
every error names the layer the bad value came from: ``config/vm.yaml:12``, ``environment
variable VMTASKS_VM_KEEP``, ``flag --boot-timeout``. The result is a frozen dataclass tree
with absolute host paths, each relative path resolved against the directory of the file that
wrote it. ``project_dir`` left unset is the Go module the config belongs to (see
:func:`default_project_dir`).

This module is imported inside the guest (Python 3.9, no PyYAML): the host hands the guest
the resolved config as JSON, which needs only the standard library. YAML goes through
``vmtasks.settings.yamlsafe``, imported on the host only.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import posixpath
import re
import reprlib
import unicodedata
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from . import gotest
from .errors import ConfigError

KEEP_CHOICES = ("never", "on-failure", "always")
# The `backend` choices, each with the module that builds it (``backend_from_config``):
# the one place outside the backends that names them.
BACKEND_MODULES = {"tart": "vmtasks.backends.tart.machine", "orchard": "vmtasks.backends.orchard.backend"}
BACKENDS = tuple(BACKEND_MODULES)
ENV_PREFIX = "VMTASKS_VM_"
# openboot's names, kept: every VMTASKS_<x> variable is also read as OPENBOOT_<x>.
ALIAS_PREFIX = "OPENBOOT_"
DEFAULT_CONFIG = Path("config") / "vm.yaml"
MAX_TIMEOUT = 7 * 24 * 3600.0  # a week: anything longer is a typo, and never "no deadline"
MAX_VMS = 100
MAX_RETRIES = 10
MAX_FILE_BYTES = 256 << 10  # a config is a few KB; refuse to read (and parse) a runaway file
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_GUEST_PATH_RE = re.compile(r"^/[A-Za-z0-9._@+/-]*$")
_REL_PATH_RE = re.compile(r"^[A-Za-z0-9._@+-][A-Za-z0-9._@+/-]*$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_IMAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$")
_INTERNAL = ("source", "origins")
# Values no message, record or plan may show: errors about them never quote the value, and
# Config.to_dict() leaves them out (a config loaded from that dict gets the default).
SECRET_KEYS = ("vm.password",)


# The one guest step every project needs: Invoke runs the in-VM task (skipped when the image has it).
INSTALL_INVOKE = ("python3 -c 'import invoke' 2>/dev/null || python3 -m pip install --user --quiet "
                  "--disable-pip-version-check 'invoke>=2,<3'")


@dataclass(frozen=True)
class VmSettings:
    base: str = "tahoe-base"
    name_prefix: str = "vmtasks"
    user: str = "admin"
    # The guest account's password. Only Orchard uses it: its worker runs the startup script
    # (which installs the run's key) over SSH with password authentication. Never printed,
    # never in records, plans or the config shipped to the guest (see SECRET_KEYS).
    password: str = field(default="admin", repr=False)
    cpu: Optional[int] = None
    memory: Optional[int] = None
    random_mac: bool = True


@dataclass(frozen=True)
class GuestSettings:
    dir: str = "/Users/admin/project"
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
    all: str = "go test -v -timeout 60m ./..."
    one: str = "go test -v -timeout 45m -run {test} ./..."
    durations: str = ".vmtasks/durations.json"  # per-test durations the sharding reads
    changes: bool = False  # record what each test changed on the machine (changes/<test>.txt)
    isolation: str = "shared"  # shared: a VM runs many tests; test: every test on its own fresh VM
    retries: int = 0  # run a failed test again, up to this many times, each time on a fresh VM


@dataclass(frozen=True)
class Timeouts:
    """Deadlines in seconds for each stage; ``poll`` is the polling interval."""

    build: float = 1800
    clone: float = 300
    boot: float = 60
    key: float = 60
    setup: float = 900
    prepare: float = 1800
    sync: float = 600
    suite: float = 4500
    test: float = 2700
    teardown: float = 120
    collect: float = 120  # a failed test's artifacts and collect commands, together
    slot_wait: float = 1800
    poll: float = 1.0


@dataclass(frozen=True)
class RecordSettings:
    dir: str = ".vmtasks/runs"
    keep_last: int = 20


@dataclass(frozen=True)
class OrchardSettings:
    """The Orchard controller, used when ``backend: orchard``."""

    url: str = ""
    ca_cert: str = ""
    context: str = ""
    image: str = ""  # "" means vm.base; resolved at load
    cpu: Optional[int] = None
    memory: Optional[int] = None


@dataclass(frozen=True)
class ChangesSettings:
    """What ``suite.changes`` compares before and after each test, besides the home's files."""

    exclude: List[str] = field(default_factory=list)  # globs relative to the home, e.g. "Library/Logs/*"
    probes: Dict[str, str] = field(default_factory=dict)  # name: guest command whose output is diffed


@dataclass(frozen=True)
class SweepSettings:
    unleased_after: float = 24.0  # hours: a stopped, unleased VM of ours is removed after this


@dataclass(frozen=True)
class Config:
    project_dir: str = "."
    build: List[str] = field(default_factory=list)
    setup: List[str] = field(
        default_factory=lambda: [INSTALL_INVOKE]
    )
    prepare: List[str] = field(default_factory=list)
    prepared: bool = True
    keep: str = "never"
    keep_for: float = 24.0  # hours a kept VM lives; cleanup-orphans removes it after that
    vms: int = 1
    backend: str = "tart"
    state_dir: str = ""
    vm: VmSettings = field(default_factory=VmSettings)
    guest: GuestSettings = field(default_factory=GuestSettings)
    sync: SyncSettings = field(default_factory=SyncSettings)
    suite: SuiteSettings = field(default_factory=SuiteSettings)
    timeouts: Timeouts = field(default_factory=Timeouts)
    records: RecordSettings = field(default_factory=RecordSettings)
    orchard: OrchardSettings = field(default_factory=OrchardSettings)
    sweep: SweepSettings = field(default_factory=SweepSettings)
    # Evidence of a failure, copied out of the VM before anything else touches it.
    artifacts: List[str] = field(default_factory=list)  # guest paths and globs, ~ allowed
    collect: Dict[str, str] = field(default_factory=dict)  # name: guest command whose output is kept
    artifacts_max_mb: int = 50  # per failed test (and attempt)
    changes: ChangesSettings = field(default_factory=ChangesSettings)
    source: str = "<built-in defaults>"
    # Dotted key -> the layer its value came from ("config/vm.yaml:12"), for later messages.
    origins: Dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def origin(self, key: str) -> str:
        """Where the value of dotted ``key`` came from, for an error message."""
        return self.origins.get(key, "built-in default")

    def to_dict(self) -> Dict[str, Any]:
        """All settings, loadable again as a config file (``source`` is where they came from)."""
        data = dataclasses.asdict(self)
        for name in _INTERNAL:
            data.pop(name)
        for key in SECRET_KEYS:
            section, name = key.split(".")
            data[section].pop(name)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# Environment knobs, old and new. Values are parsed by the same validator as the file.
ENV_KEYS = {
    "VMTASKS_VM_BASE": "vm.base",
    "VMTASKS_VM_KEEP": "keep",
    "VMTASKS_VM_PREFIX": "vm.name_prefix",
    "VMTASKS_VM_BOOT_TIMEOUT": "timeouts.boot",
    "VMTASKS_VM_PROJECT": "project_dir",
    "VMTASKS_VM_STATE_DIR": "state_dir",
    "VMTASKS_VM_VMS": "vms",
    "VMTASKS_VM_BACKEND": "backend",
}
# The task flags that set config keys, for messages (a caller may pass its own mapping).
FLAG_NAMES = {"vm.base": "--base", "keep": "--keep", "timeouts.boot": "--boot-timeout"}
# Read by locate, not a config key.
ENV_CONFIG_PATH = "VMTASKS_VM_CONFIG"
# The test regex is part of the run request, not the config: read by test_from_env.
ENV_TEST = "VMTASKS_VM_TEST"
# The Orchard CLI's own variable: fills orchard.url when no layer sets it.
ENV_ORCHARD_URL = "ORCHARD_URL"
# Host paths, resolved to absolute paths against the directory of the layer that set them.


def alias_of(name: str) -> str:
    """The openboot name of a ``VMTASKS_*`` variable (``VMTASKS_VM_BASE`` -> ``OPENBOOT_VM_BASE``)."""
    return ALIAS_PREFIX + name[len("VMTASKS_"):]


def env_lookup(environ: Mapping[str, str], name: str) -> Tuple[Optional[str], str]:
    """``(value, the variable that set it)`` for ``VMTASKS_*`` variable ``name`` or its
    ``OPENBOOT_*`` alias; ``(None, name)`` when neither is set. Both set to different
    values is an error: which one wins would be a guess."""
    alias = alias_of(name)
    new, old = environ.get(name), environ.get(alias)
    if new is not None and old is not None and new != old:
        raise ConfigError("environment variables {} = {} and {} = {} disagree (they are the same setting)".format(
            name, excerpt(new), alias, excerpt(old)),
            "unset {} (the old name) or give both the same value".format(alias))
    if new is not None:
        return new, name
    if old is not None:
        return old, alias
    return None, name


PATH_KEYS = ("project_dir", "state_dir", "records.dir", "suite.durations", "orchard.ca_cert")

_repr = reprlib.Repr()
_repr.maxstring = 120
_repr.maxother = 120
_repr.maxlevel = 3


def _clip(text: str, limit: int = 200) -> str:
    """A path or name for a message, cut short."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def excerpt(value: Any, limit: int = 200) -> str:
    """A bounded ``repr`` for error messages: a hostile value never costs more than this."""
    text = _repr.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------
# Layers and where a value came from


@dataclass(frozen=True)
class _Layer:
    """One source of settings: nested values, where a key is written, and the directory
    its relative paths are relative to."""

    name: str
    values: Mapping[str, Any]
    base_dir: Path
    where: Callable[[str], str]
    fix: Callable[[str], str]


def _file_layer(path: Path, data: Mapping[str, Any], lines: Mapping[str, int]) -> _Layer:
    def where(key: str) -> str:
        probe = key
        while probe:
            if probe in lines:
                return "{}:{}".format(path, lines[probe])
            probe = probe.rpartition(".")[0]
        return str(path)

    return _Layer(str(path), data, path.parent, where, lambda key: "fix '{}' at {}".format(key, where(key)))


def _env_layer_for(environ: Mapping[str, str], cwd: Path) -> _Layer:
    names = {key: env_lookup(environ, name)[1] for name, key in ENV_KEYS.items()}
    return _Layer("environment", _nest(env_layer(environ)), cwd,
                  lambda key: "environment variable " + names.get(key, key),
                  lambda key: "change or unset " + names.get(key, key))


def _flag_layer(overrides: Mapping[str, Any], flag_names: Mapping[str, str], cwd: Path) -> _Layer:
    def flag(key: str) -> str:
        return flag_names.get(key) or "--" + key.replace(".", "-").replace("_", "-")

    given = {k: v for k, v in overrides.items() if v is not None}
    return _Layer("task flags", _nest(given), cwd, lambda key: "flag " + flag(key),
                  lambda key: "pass a valid value to " + flag(key))


def _invoke_layer(section: Mapping[str, Any], base_dir: Path) -> _Layer:
    # `config` says where the file is (read by locate); None is Invoke's "not set".
    values = {k: v for k, v in section.items() if k != "config" and v is not None}
    return _Layer("Invoke config", values, base_dir, lambda key: "Invoke config vmtasks." + key,
                  lambda key: "fix vmtasks.{} in invoke.yaml, the -f file or the collection's "
                              "configure()".format(key))


_DEFAULTS = _Layer("built-in defaults", {}, Path("."), lambda key: "built-in default",
                   lambda key: "set '{}' in the config file".format(key))


def _resolve(f: dataclasses.Field) -> Any:
    """The default value of a field (dataclass fields use a factory)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _did_you_mean(key: str, options: List[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    return " (did you mean '{}'?)".format(close[0]) if close else ""


def _coerce(path: str, value: Any, annotation: str, layer: _Layer) -> Any:
    """Check ``value`` against the field's type; strings (environment, flags) are parsed."""
    where = layer.where(path)
    optional = annotation.startswith("Optional[")
    if value is None:
        if optional:
            return None
        raise ConfigError("{}: '{}' must have a value".format(where, path),
                          "set '{}' or remove the key to use the default".format(path))
    base = annotation[len("Optional["):-1] if optional else annotation

    def bad(expected: str) -> ConfigError:
        got = "a {} (not shown)".format(type(value).__name__) if path in SECRET_KEYS else excerpt(value)
        return ConfigError("{}: '{}' must be {}, got {}".format(where, path, expected, got),
                           layer.fix(path) + (" (quote it in YAML)" if path in SECRET_KEYS else ""))

    if base == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
            return value.lower() in ("1", "true", "yes", "on")
        raise bad("true or false")
    if base in ("int", "float"):
        if isinstance(value, str):
            try:
                value = float(value) if base == "float" else int(value.strip())
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if isinstance(value, float) and not math.isfinite(value):
            # nan compares false with every bound, inf passes them all: both would
            # silently disable a deadline.
            raise bad("a finite number")
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
                raise ConfigError("{}: '{}' has an invalid variable name {}".format(where, path, excerpt(k)),
                                  "use letters, digits and '_' only")
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise bad("a mapping of names to strings")
            out[k] = str(v)
        return out
    raise AssertionError("unsupported annotation " + annotation)  # pragma: no cover


def _merge(values: Dict[str, Any], origins: Dict[str, _Layer], layer: _Layer,
           data: Mapping[str, Any], prefix: str = "") -> None:
    """Merge one layer (nested mapping) into ``values``, validating keys and types and
    noting, for each dotted key, the layer it came from."""
    cls = _class_for(prefix)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        path = prefix + str(key)
        if key not in fields or key in _INTERNAL:
            options = [prefix + name for name in fields if name not in _INTERNAL]
            raise ConfigError(
                "{}: unknown key '{}'{}".format(layer.where(path), _clip(path),
                                                _did_you_mean(path, options)),
                "valid keys here: " + ", ".join(sorted(options)),
            )
        f = fields[key]
        default = _resolve(f)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError("{}: '{}' must be a mapping, got {}".format(layer.where(path), path, excerpt(value)),
                                  "see config/vm.yaml for the layout")
            _merge(values.setdefault(key, {}), origins, layer, value, path + ".")
        else:
            values[key] = _coerce(path, value, str(f.type), layer)
            origins[path] = layer


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


def _get(values: Mapping[str, Any], key: str) -> Any:
    node: Any = values
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _put(values: Dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = values
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


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


# ---------------------------------------------------------------------------------------
# Reading files


def _read(path: Path) -> Tuple[Dict[str, Any], Dict[str, int]]:
    """``(values, lines)``: the file's top-level mapping and the line of each dotted key."""
    try:
        with open(str(path), "rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError("cannot read config file {}: {}".format(path, exc.strerror or exc),
                          "check the path given with --config or VMTASKS_VM_CONFIG") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError("config file {} is larger than {} KiB; that is not a config".format(
            path, MAX_FILE_BYTES // 1024), "point --config at the vmtasks YAML file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError("{}: not UTF-8 text: byte {} (line {}) is {}".format(
            path, exc.start, line, excerpt(raw[exc.start:exc.start + 4])),
            "save the file as UTF-8 (for example: iconv -f latin1 -t utf-8)") from None
    text = text[1:] if text.startswith("\ufeff") else text
    lines: Dict[str, int] = {}
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError("{}:{}: not valid JSON: {} (column {})".format(path, exc.lineno, exc.msg, exc.colno),
                              "fix the syntax at that line") from None
        except RecursionError:
            raise ConfigError("{}: nested too deeply to be a config file".format(path),
                              "a config is a few levels of mappings and lists") from None
    else:
        from vmtasks.settings import yamlsafe  # host only: the guest reads JSON

        data, lines = yamlsafe.parse(text, str(path))
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError("{}: the top level must be a mapping of keys, got {}".format(path, excerpt(data)),
                          "see config/vm.yaml for the layout")
    return data, lines


# ---------------------------------------------------------------------------------------
# The environment


def env_layer(environ: Mapping[str, str]) -> Dict[str, Any]:
    """The ``VMTASKS_VM_*`` variables (or their ``OPENBOOT_VM_*`` aliases) as dotted config
    keys; a misspelt one is an error, and so are a name and its alias that disagree."""
    dotted: Dict[str, Any] = {}
    canonical = list(ENV_KEYS) + [ENV_CONFIG_PATH, ENV_TEST]
    for name in environ:
        for prefix in (ENV_PREFIX, alias_of(ENV_PREFIX)):
            if not name.startswith(prefix):
                continue
            known = sorted(canonical if prefix == ENV_PREFIX else [alias_of(n) for n in canonical])
            if name not in known:
                raise ConfigError(
                    "unknown environment variable {}{}".format(_clip(name), _did_you_mean(name, known)),
                    "unset it, or use one of: " + ", ".join(known),
                )
    for name, key in ENV_KEYS.items():
        value, _ = env_lookup(environ, name)
        if value is None:
            continue
        if key == "keep":
            value = keep_from_env(value)
        dotted[key] = value
    return dotted


def keep_from_env(value: str) -> str:
    """``VMTASKS_VM_KEEP=1`` (``OPENBOOT_VM_KEEP=1``) meant "keep" in the old driver; the new names work too."""
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return "always"
    if v in ("", "0", "false", "no", "off"):
        return "never"
    return v


def test_from_env(environ: Mapping[str, str]) -> Optional[str]:
    """The go test -run regex from ``VMTASKS_VM_TEST`` (or ``OPENBOOT_VM_TEST``), or None
    (unset or empty: all tests).

    Part of the run request, not the config. A value of only blanks is an error rather than
    "run everything", which is not what whoever set it meant."""
    value, name = env_lookup(environ, ENV_TEST)
    if value is None or value == "":
        return None
    if not value.strip():
        raise ConfigError("environment variable {} is blank: {}".format(name, excerpt(value)),
                          "unset it to run the whole suite, or set a go test -run regex")
    return value


test_from_env.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


# ---------------------------------------------------------------------------------------
# Finding the config file


def _suggest(path: Path) -> str:
    """A did-you-mean for a config path that does not exist: a close name beside it."""
    parent = path.parent
    if path.is_dir():
        for inner in (path / DEFAULT_CONFIG, path / "vm.yaml"):
            if inner.is_file():
                return " (it is a directory; did you mean {}?)".format(inner)
        return " (it is a directory)"
    if not parent.is_dir():
        return " (the directory {} does not exist either)".format(parent)
    try:
        names = sorted(p.name for p in parent.iterdir() if p.is_file())
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    return " (did you mean {}?)".format(parent / close[0]) if close else ""


def _explicit(chosen: str, base: Path, how: str) -> Path:
    path = Path(chosen).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise ConfigError("config file {} (from {}) does not exist{}".format(_clip(str(path)), how, _suggest(path)),
                          "fix the path given with {}".format(how))
    return path


_OUR_TOP_KEYS = frozenset(f.name for f in dataclasses.fields(Config) if f.name not in _INTERNAL)
_OUR_TIMEOUTS = frozenset(f.name for f in dataclasses.fields(Timeouts))


def is_vmtasks_config(data: Mapping[str, Any]) -> bool:
    """Whether a mapping read from ``invoke -f FILE`` is a vmtasks config (our keys at the
    top) rather than an Invoke config. ``timeouts`` is Invoke's key too: it counts as ours
    only when it holds one of our stage names."""
    for key in data:
        if key == "timeouts":
            if isinstance(data[key], Mapping) and any(k in _OUR_TIMEOUTS for k in data[key]):
                return True
        elif key in _OUR_TOP_KEYS:
            return True
    return False


def locate(
    explicit: Optional[str],
    environ: Mapping[str, str],
    cwd: Path,
    project_root: Optional[Path] = None,
    invoke_section: Optional[Mapping[str, Any]] = None,
    runtime_config: Optional[Path] = None,
    required: bool = True,
) -> Tuple[Optional[Path], Dict[str, Any]]:
    """``(config file or None, Invoke layer)``: where the settings are.

    Looks, in order, at: the task's ``--config``; Invoke's own ``-f FILE`` when FILE is a
    vmtasks config; ``VMTASKS_VM_CONFIG`` (or ``OPENBOOT_VM_CONFIG``); Invoke's ``vmtasks.config`` (relative to
    ``project_root``, the directory of the tasks.py Invoke loaded); ``config/vm.yaml`` and
    ``vm.yaml`` in ``project_root``; ``config/vm.yaml`` in ``cwd``. The Invoke layer is the
    ``vmtasks`` section without ``config``. Nothing found is an error unless
    ``required=False`` (then None: built-in defaults)."""
    section: Dict[str, Any] = dict(invoke_section or {})
    runtime_is_ours = False
    if runtime_config is not None:
        runtime_config = runtime_config if runtime_config.is_absolute() else cwd / runtime_config
    # Only a data file can be ours; an `invoke -f tasks_config.py` is Invoke's business.
    if runtime_config is not None and runtime_config.suffix in (".yaml", ".yml", ".json"):
        _explicit(str(runtime_config), cwd, "invoke -f/--config")  # missing: say so, with a did-you-mean
        data, _ = _read(runtime_config)
        if is_vmtasks_config(data):
            if "vmtasks" in data:
                raise ConfigError("{} (invoke -f) has both vmtasks keys at the top and a 'vmtasks:' "
                                  "section".format(runtime_config),
                                  "use one: a vmtasks config file, or an Invoke config with a vmtasks: section")
            runtime_is_ours = True
        # Otherwise it is Invoke's own config: Invoke merged its vmtasks: section already.
    if explicit:
        path = _explicit(explicit, cwd, "--config")
        if runtime_is_ours and runtime_config is not None and path.resolve() != runtime_config.resolve():
            raise ConfigError("two config files given: --config {} and invoke -f {}".format(path, runtime_config),
                              "pass only one of them")
        return path, _section_layer(section)
    if runtime_is_ours:
        return runtime_config, _section_layer(section)
    from_env, env_name = env_lookup(environ, ENV_CONFIG_PATH)
    if from_env:
        return _explicit(from_env, cwd, env_name), _section_layer(section)
    root = project_root if project_root is not None else cwd
    from_invoke = section.get("config")
    if from_invoke:
        if not isinstance(from_invoke, str):
            raise ConfigError("Invoke config vmtasks.config must be a path, got {}".format(excerpt(from_invoke)),
                              "set vmtasks.config to the vmtasks YAML file, relative to tasks.py's directory")
        return _explicit(from_invoke, root, "Invoke config vmtasks.config"), _section_layer(section)
    candidates = []
    if project_root is not None:
        candidates += [project_root / DEFAULT_CONFIG, project_root / "vm.yaml"]
    candidates.append(cwd / DEFAULT_CONFIG)
    for candidate in candidates:
        if candidate.is_file():
            return candidate, _section_layer(section)
    if not required:
        return None, _section_layer(section)
    looked = ["--config (not given)", "{} (not set)".format(ENV_CONFIG_PATH),
              "Invoke config vmtasks.config (not set)"] + [str(c) for c in dict.fromkeys(candidates)]
    raise ConfigError("no vmtasks config found; looked at: " + "; ".join(looked),
                      "run `invoke vm-init` to write one for this repository, pass --config PATH, set {}, "
                      "or put config/vm.yaml beside tasks.py (refusing to guess: built-in defaults would "
                      "sync {})".format(ENV_CONFIG_PATH, cwd))


def _section_layer(section: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in section.items() if k != "config"}


def find_config_file(explicit: Optional[str], environ: Mapping[str, str], cwd: Path) -> Optional[Path]:
    """The config file from --config, VMTASKS_VM_CONFIG or ./config/vm.yaml, or None."""
    return locate(explicit, environ, cwd, required=False)[0]


def invoke_context_info(c: Any) -> Tuple[Optional[Path], Optional[Path], Dict[str, Any]]:
    """``(project_root, runtime_config_path, vmtasks_section)`` from an Invoke Context.

    Invoke's ``Program`` sets the project location to the directory of the tasks.py it
    loaded (``Config.set_project_location``, kept as ``_project_prefix``) and the ``-f`` /
    ``INVOKE_RUNTIME_CONFIG`` file as ``_runtime_path``; the ``vmtasks`` section is the merge
    of every Invoke config level (collection, invoke.yaml, ``-f``, ``INVOKE_VMTASKS_*``)."""
    config = getattr(c, "config", c)
    prefix = getattr(config, "_project_prefix", None)
    runtime = getattr(config, "_runtime_path", None)
    try:
        section = config.get("vmtasks")
    except Exception:  # a bare object in a test, or no such key
        section = None
    plain = _plain(section) if section is not None else {}
    if not isinstance(plain, dict):
        raise ConfigError("Invoke config 'vmtasks' must be a mapping, got {}".format(excerpt(plain)),
                          "fix vmtasks: in invoke.yaml, the -f file or the collection's configure()")
    return (Path(prefix) if prefix else None, Path(os.path.expanduser(str(runtime))) if runtime else None, plain)


def _plain(value: Any) -> Any:
    """Invoke's DataProxy (and nested ones) as plain dicts."""
    items = getattr(value, "items", None)
    if callable(items) and not isinstance(value, (str, bytes)):
        return {k: _plain(v) for k, v in items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_for_task(
    c: Any,
    explicit: Optional[str] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    flag_names: Optional[Mapping[str, str]] = None,
    environ: Optional[Mapping[str, str]] = None,
    cwd: Optional[Path] = None,
    required: bool = True,
) -> Config:
    """The config a host task runs with: found through ``--config`` (``explicit``), Invoke's
    config and the project of the tasks.py Invoke loaded (:func:`locate`), then loaded with
    every layer (:func:`load`). ``c`` is the task's Invoke Context, or None outside Invoke."""
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else cwd
    root, runtime, section = invoke_context_info(c) if c is not None else (None, None, {})
    path, layer = locate(explicit, environ, cwd, root, section, runtime, required)
    return load(path, environ, overrides, cwd, flag_names, layer, root)


# ---------------------------------------------------------------------------------------
# Loading


def load(
    path: Optional[Path] = None,
    environ: Optional[Mapping[str, str]] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    cwd: Optional[Path] = None,
    flag_names: Optional[Mapping[str, str]] = None,
    invoke_layer: Optional[Mapping[str, Any]] = None,
    project_root: Optional[Path] = None,
) -> Config:
    """Build the validated config from all layers.

    ``overrides`` are dotted keys from task flags (``None`` means "flag not given");
    ``flag_names`` maps a dotted key to its flag for messages (default :data:`FLAG_NAMES`,
    e.g. ``{"timeouts.boot": "--boot-timeout"}``). ``invoke_layer`` is Invoke's ``vmtasks`` section (from
    :func:`locate`); its relative paths are relative to ``project_root``. Relative paths in
    the file are relative to the file's directory; from the environment or flags, to ``cwd``.
    Host paths are not checked here (the guest loads the same config): see
    :func:`check_host_paths`."""
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else cwd
    if path is not None and not path.is_absolute():
        path = cwd / path
    layers: List[_Layer] = []
    if invoke_layer:
        layers.append(_invoke_layer(invoke_layer, project_root if project_root is not None else cwd))
    if path is not None:
        layers.append(_file_layer(path, *_read(path)))
    layers.append(_env_layer_for(environ, cwd))
    layers.append(_flag_layer(overrides or {}, FLAG_NAMES if flag_names is None else flag_names, cwd))

    values: Dict[str, Any] = {}
    origins: Dict[str, _Layer] = {}  # dotted key -> the layer its value came from
    for layer in layers:
        _merge(values, origins, layer, layer.values)
    _orchard_url_fallback(values, origins, environ, cwd)

    # The defaults' relative paths belong to the config file too (records beside their config).
    default_base = path.parent if path is not None else (project_root if project_root is not None else cwd)
    for key in PATH_KEYS:
        value = _get(values, key)
        if value is None and key == "project_dir" and path is not None:
            value = str(default_project_dir(path.parent))
        elif value is None:
            value = _get(dataclasses.asdict(Config()), key)
        if value == "" and key != "project_dir":
            continue  # "" means unset (state_dir: the default state dir; no CA cert)
        base = origins[key].base_dir if key in origins else default_base
        _put(values, key, _absolute(value, base))

    cfg = _build(Config, values)
    if not cfg.orchard.image:
        cfg = dataclasses.replace(cfg, orchard=dataclasses.replace(cfg.orchard, image=cfg.vm.base))
    labels = {key: layer.where(key) for key, layer in origins.items()}
    cfg = dataclasses.replace(cfg, source=str(path) if path else "<built-in defaults>", origins=labels)
    return _check(cfg, origins)


GO_ROOT_FILES = ("go.mod", "go.work")


def default_project_dir(config_dir: Path) -> Path:
    """The project a config file belongs to when it does not say: the nearest directory, from
    the file's own upwards, with a ``go.mod`` (or ``go.work``), not leaving the repository
    (a directory with ``.git`` is the last one looked at); else, for a file in ``config/``,
    that directory's parent (the repository root); else the file's directory."""
    start = config_dir.resolve()
    for directory in [start] + list(start.parents):
        if any((directory / name).is_file() for name in GO_ROOT_FILES):
            return directory
        if (directory / ".git").exists():
            break
    return start.parent if start.name == "config" else start


def _absolute(value: str, base: Path) -> str:
    """An absolute path: a relative one against ``base`` (symlinks resolved, as the host sees
    them); an absolute one only normalised, so the guest's copy reads back unchanged."""
    p = Path(value).expanduser()
    return os.path.normpath(str(p)) if p.is_absolute() else str((base / p).resolve())


def _orchard_url_fallback(values: Dict[str, Any], origins: Dict[str, _Layer],
                          environ: Mapping[str, str], cwd: Path) -> None:
    """``ORCHARD_URL`` (the Orchard CLI's variable) fills orchard.url when nothing set it:
    an ambient variable must not override the project's own choice."""
    if values.get("backend") != "orchard" or "orchard.url" in origins or not environ.get(ENV_ORCHARD_URL):
        return
    layer = _Layer("environment", {}, cwd, lambda key: "environment variable " + ENV_ORCHARD_URL,
                   lambda key: "change or unset " + ENV_ORCHARD_URL)
    values.setdefault("orchard", {})["url"] = _coerce("orchard.url", environ[ENV_ORCHARD_URL], "str", layer)
    origins["orchard.url"] = layer


def _check(cfg: Config, layers: Mapping[str, _Layer]) -> Config:
    """Cross-field rules the type check cannot express; each names where its value came from.
    Returns ``cfg`` with its guest paths normalised."""

    def layer(key: str) -> _Layer:
        return layers.get(key, _DEFAULTS)

    def fail(key: str, problem: str, hint: str = "") -> ConfigError:
        fix = layer(key).fix(key)
        return ConfigError("{}: {}".format(layer(key).where(key), problem),
                           "{}: {}".format(fix, hint) if hint else fix)

    required = {
        "vm.base": cfg.vm.base, "vm.name_prefix": cfg.vm.name_prefix, "vm.user": cfg.vm.user,
        "guest.dir": cfg.guest.dir, "guest.python": cfg.guest.python,
        "suite.all": cfg.suite.all, "suite.one": cfg.suite.one,
    }
    for key, value in required.items():
        if not value.strip():
            raise fail(key, "'{}' is required and empty".format(key))
    for key in ("vm.base", "vm.name_prefix", "vm.user"):
        if not _NAME_RE.match(required[key]):
            raise fail(key, "'{}' = {} may contain only letters, digits, '.', '_' and '-'".format(
                key, excerpt(required[key])),
                "choose a plain name (it becomes part of VM names and SSH logins)")
    _check_password(cfg, fail)
    tool_dir = _check_tool_dir(cfg, fail)
    guest = dataclasses.replace(cfg.guest, tool_dir=tool_dir)
    guest = dataclasses.replace(guest, dir=_check_guest_dir(cfg.guest.dir, tool_dir, cfg.vm.user, fail))
    cfg = dataclasses.replace(cfg, guest=guest)
    if "{test}" not in cfg.suite.one.split():
        raise fail("suite.one", "'suite.one' must contain the word {test} where the test regex goes",
                   "for example: go test -v -run {test} ./test/e2e/...")
    if cfg.keep not in KEEP_CHOICES:
        raise fail("keep", "'keep' must be one of {}, got {}{}".format(
            ", ".join(KEEP_CHOICES), excerpt(cfg.keep), _did_you_mean(cfg.keep, list(KEEP_CHOICES))),
            "use never, on-failure or always (VMTASKS_VM_KEEP=1 means always)")
    if cfg.backend not in BACKENDS:
        raise fail("backend", "'backend' must be one of {}, got {}{}".format(
            ", ".join(BACKENDS), excerpt(cfg.backend), _did_you_mean(cfg.backend, list(BACKENDS))),
            "use tart (VMs on this Mac) or orchard (VMs from an Orchard controller)")
    if not 1 <= cfg.vms <= MAX_VMS:
        raise fail("vms", "'vms' must be between 1 and {}, got {}".format(MAX_VMS, cfg.vms))
    if not 0 <= cfg.suite.retries <= MAX_RETRIES:
        raise fail("suite.retries", "'suite.retries' must be between 0 and {}, got {}".format(
            MAX_RETRIES, cfg.suite.retries), "each retry boots a fresh VM; 1 or 2 tell flaky from broken")
    for f in dataclasses.fields(Timeouts):
        key = "timeouts." + f.name
        seconds = getattr(cfg.timeouts, f.name)
        if seconds > MAX_TIMEOUT:
            raise fail(key, "'{}' is {:g}s, more than the {:g}s (7 days) a deadline may be".format(
                key, seconds, MAX_TIMEOUT))
    if cfg.timeouts.poll <= 0:
        raise fail("timeouts.poll", "'timeouts.poll' must be greater than 0", "for example 1")
    for key in ("vm.cpu", "vm.memory", "orchard.cpu", "orchard.memory"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) == 0:
            raise fail(key, "'{}' must be at least 1 (or null for the image's own)".format(key))
    for exclude in cfg.sync.excludes:
        if not exclude or "\n" in exclude:
            raise fail("sync.excludes", "'sync.excludes' has an empty or multi-line pattern",
                       "one rsync pattern per entry")
    for key, patterns in (("artifacts", cfg.artifacts), ("changes.exclude", cfg.changes.exclude)):
        for pattern in patterns:
            if not pattern.strip() or any(unicodedata.category(c) == "Cc" for c in pattern):
                raise fail(key, "'{}' has an empty pattern or one with a control character: {}".format(
                    key, excerpt(pattern)), "one guest path or glob per entry, e.g. ~/Library/Logs/*.log")
    for key, commands in (("collect", cfg.collect), ("changes.probes", cfg.changes.probes)):
        for name, command in commands.items():
            if not command.strip():
                raise fail(key, "'{}.{}' is an empty command".format(key, name),
                           "give a guest command, e.g. brew: brew list --versions")
    if cfg.suite.isolation not in ("shared", "test"):
        raise fail("suite.isolation", "'suite.isolation' must be shared or test, got {}".format(
            excerpt(cfg.suite.isolation)), "shared: VMs run many tests; test: every test on its own fresh VM")
    if not 0 < cfg.keep_for <= 24 * 365:
        raise fail("keep_for", "'keep_for' must be more than 0 and at most a year (in hours), got {:g}".format(
            cfg.keep_for), "for example 24 (a kept VM is removed by cleanup-orphans a day after its run)")
    if not 1 <= cfg.artifacts_max_mb <= 10240:
        raise fail("artifacts_max_mb", "'artifacts_max_mb' must be between 1 and 10240 (MB per failed test), "
                   "got {}".format(cfg.artifacts_max_mb))
    _check_orchard(cfg, fail)
    return cfg


def _check_password(cfg: Config, fail: Callable[..., ConfigError]) -> None:
    """vm.password is never quoted back. Empty means "send no credentials", which Orchard's
    worker turns into admin/admin only when the user is empty too: so only for user admin."""
    if any(unicodedata.category(c) == "Cc" for c in cfg.vm.password):
        raise fail("vm.password", "'vm.password' contains a control character (value not shown)",
                   "use the guest account's password as plain text")
    if cfg.backend == "orchard" and not cfg.vm.password and cfg.vm.user != "admin":
        raise fail("vm.password", "'vm.password' is empty but 'vm.user' is {}: Orchard's worker would log in "
                   "as {} with an empty password to run the startup script, and fail the VM".format(
                       excerpt(cfg.vm.user), excerpt(cfg.vm.user)),
                   "set vm.password to that account's password in the image")


def _check_guest_dir(raw: str, tool_dir: str, user: str, fail: Callable[..., ConfigError]) -> str:
    """guest.dir is the target of ``rsync --delete``: it must be a dedicated directory in the
    guest, never the home, ``/``, an ancestor of the home, or where our own files live.
    Returns it normalised."""
    if not _GUEST_PATH_RE.match(raw):
        raise fail("guest.dir", "'guest.dir' must be an absolute path of letters, digits and ._@+-/ "
                   "(it reaches the guest's shell and rsync), got {}".format(excerpt(raw)),
                   "for example /Users/{}/openboot".format(user))
    if ".." in raw.split("/"):
        raise fail("guest.dir", "'guest.dir' = {} contains '..': the sync's rsync --delete "
                   "would land somewhere other than it says".format(excerpt(raw)),
                   "write the directory out, for example /Users/{}/openboot".format(user))
    normal = "/" + posixpath.normpath(raw).lstrip("/")
    home = "/Users/" + user
    protected = {home: "the guest user's home", home + "/.ssh": "the guest's SSH keys",
                 posixpath.join(home, tool_dir): "guest.tool_dir"}
    for path, what in protected.items():
        if normal == path or path.startswith(normal.rstrip("/") + "/"):
            raise fail("guest.dir", "'guest.dir' = {} is {} or contains it: the sync's rsync --delete "
                       "would wipe it".format(excerpt(raw), what if normal == path else "an ancestor of " + what),
                       "use a directory of its own, for example {}/openboot".format(home))
    return normal


def _check_tool_dir(cfg: Config, fail: Callable[..., ConfigError]) -> str:
    """guest.tool_dir is ``rm -rf``-ed before each unpack: a plain subdirectory of the home.
    Returns it normalised."""
    raw = cfg.guest.tool_dir
    parts = raw.split("/")
    normal = posixpath.normpath(raw) if raw else ""
    if (not _REL_PATH_RE.match(raw) or ".." in parts or normal in ("", ".")
            or normal.split("/")[0] == ".ssh"):
        raise fail("guest.tool_dir", "'guest.tool_dir' must be a subdirectory of the guest home, relative, "
                   "without '..' and not .ssh (it is removed and recreated each run), got {}".format(excerpt(raw)),
                   "for example .vmtasks/tool")
    return normal


def orchard_url_problem(url: str) -> str:
    """Why ``url`` cannot be an Orchard controller's base URL, or "" when it can. Checked
    whole at load, so nothing later (urllib, http.client, websockets) meets a URL it rejects."""
    if any(c.isspace() or unicodedata.category(c) == "Cc" for c in url):
        return "contains whitespace or a control character"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not 0-65535
    except ValueError as exc:
        return "is not a valid URL ({})".format(exc)
    if parts.scheme not in ("http", "https"):
        return "must start with http:// or https://"
    if not parts.hostname:
        return "has no host name"
    if "@" in parts.netloc:
        return "must not carry credentials (user:token@host); the service account goes in {} and {}".format(
            "ORCHARD_SERVICE_ACCOUNT_NAME", "ORCHARD_SERVICE_ACCOUNT_TOKEN")
    if "?" in url or "#" in url:
        return "must not have a query or fragment (only scheme, host, port and an optional API prefix)"
    return ""


def _check_orchard(cfg: Config, fail: Callable[..., ConfigError]) -> None:
    o = cfg.orchard
    problem = orchard_url_problem(o.url) if o.url else ""
    if problem:
        raise fail("orchard.url", "'orchard.url' {}, got {}".format(problem, excerpt(o.url)),
                   "write the controller's base URL, for example https://orchard.example.com:6120")
    if not _IMAGE_RE.match(o.image):
        raise fail("orchard.image", "'orchard.image' must be an image name or OCI reference, got {}".format(
            excerpt(o.image)), "for example ghcr.io/cirruslabs/macos-tahoe-base:latest")
    if cfg.backend == "orchard" and not (o.url or o.context):
        raise fail("backend", "'backend' is orchard but neither orchard.url (nor {}) nor orchard.context "
                   "says which controller".format(ENV_ORCHARD_URL),
                   "set orchard.url, export {}, or set orchard.context to an `orchard context` name".format(
                       ENV_ORCHARD_URL))


def check_host_paths(cfg: Config) -> None:
    """Pre-flight (host only): the host paths the run reads exist. Not part of ``load``: the
    guest loads the same config, where the host's paths do not exist."""
    project = Path(cfg.project_dir)
    if not project.is_dir():
        what = "is not a directory" if project.exists() else "does not exist"
        raise ConfigError("{}: 'project_dir' = {} {}".format(cfg.origin("project_dir"), _clip(str(project)), what),
                          "fix project_dir there (a relative path in a file is relative to that file's "
                          "directory; from the environment or a flag, to the current directory)")
    _check_go_module(cfg, project)
    if cfg.backend == "orchard" and cfg.orchard.ca_cert and not Path(cfg.orchard.ca_cert).is_file():
        raise ConfigError("{}: 'orchard.ca_cert' = {} does not exist".format(
            cfg.origin("orchard.ca_cert"), _clip(cfg.orchard.ca_cert)),
            "fix orchard.ca_cert there (a relative path in a file is relative to that file's directory)")


def _check_go_module(cfg: Config, project: Path) -> None:
    """A ``go test`` suite runs in the synced copy of project_dir: go needs the module's
    ``go.mod`` (or a ``go.work``) right there, and the directories the suite's ``./dir/...``
    patterns name. Without them go exits before any test (``directory prefix ... does not
    contain main module``), after a VM was booted for nothing."""
    try:
        suite = gotest.parse_suite(cfg.suite.all, None)
    except ConfigError:
        return  # not a plain `go test` command: nothing to check here
    fix = ("set project_dir to the Go module's root (the directory with go.mod; a relative path in a file "
           "is relative to that file's directory), or run `invoke vm-init` there to write a config")
    if not any((project / name).is_file() for name in GO_ROOT_FILES):
        above = next((d for d in project.parents if (d / "go.mod").is_file()), None)
        where = "; the nearest go.mod is in {}".format(_clip(str(above))) if above else ""
        raise ConfigError("{}: 'project_dir' = {} has no go.mod (nor go.work): `{}` would fail in the VM before "
                          "any test{}".format(cfg.origin("project_dir"), _clip(str(project)), cfg.suite.all, where),
                          fix)
    for pattern in suite.packages:
        if not pattern.startswith("./") and pattern != ".":
            continue
        rel = pattern[:-len("/...")] if pattern.endswith("/...") else pattern
        if not (project / rel).is_dir():
            raise ConfigError("{}: the suite's package pattern {} names {}, which is not a directory of "
                              "project_dir {}".format(cfg.origin("suite.all"), pattern, _clip(str(project / rel)),
                                                      _clip(str(project))),
                              "fix suite.all (and suite.one), or project_dir; `go list {}` in project_dir "
                              "lists what it matches".format(pattern))
