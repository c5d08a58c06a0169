"""``invoke vm-init``: a commented config for the Go module in front of the user.

What it writes is found, not guessed: the module root is the nearest ``go.mod``; the e2e
packages and their build tags come from ``go list`` (packages whose test files go leaves
out without tags, such as ``//go:build e2e``), and go is asked again with those tags to
confirm the tests are then seen; the VM name prefix comes from the repository's name. An
existing config is never overwritten. The file is loaded back through :mod:`vmtasks.guest.config`
before it is written, so what vm-init writes always validates.

Host only.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from vmtasks.guest import config as config_mod
from vmtasks.guest.errors import ConfigError

# Words of a //go:build line that are not project tags: operating systems, architectures,
# toolchains, and go's own release tags.
_PLATFORM_TAGS = frozenset("""
aix android darwin dragonfly freebsd hurd illumos ios js linux nacl netbsd openbsd plan9 solaris wasip1 windows
zos unix 386 amd64 amd64p32 arm arm64 arm64be armbe loong64 mips mips64 mips64le mips64p32 mips64p32le mipsle
ppc ppc64 ppc64le riscv riscv64 s390 s390x sparc sparc64 wasm cgo gc gccgo ignore race msan asan purego
""".split())
_TAG_RE = re.compile(r"!?[A-Za-z0-9_.]+")
_LIST_TEMPLATE = ("{{.ImportPath}}\t{{.Dir}}\t{{len .TestGoFiles}}\t{{len .XTestGoFiles}}\t"
                  "{{join .IgnoredGoFiles \" \"}}")

Run = Callable[[Sequence[str], Path], "subprocess.CompletedProcess[str]"]


def _run_go(argv: Sequence[str], cwd: Path) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(list(argv), cwd=str(cwd), capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


@dataclass
class Suite:
    """What ``go list`` said about the module's tests."""

    pattern: str = "./..."
    tags: List[str] = field(default_factory=list)
    packages: List[str] = field(default_factory=list)  # import paths of the e2e packages
    notes: List[str] = field(default_factory=list)


def module_root(start: Path) -> Path:
    """The nearest directory, from ``start`` upwards, with a ``go.mod``."""
    start = start.resolve()
    for directory in [start] + list(start.parents):
        if (directory / "go.mod").is_file():
            return directory
    raise ConfigError("no go.mod in {} or any directory above it: vm-init writes a config for a Go "
                      "module".format(start), "run it inside your Go module (where go.mod is, or below)")


def repository_name(root: Path) -> str:
    """The repository's directory name (the git top level when there is one), else the module's."""
    for directory in [root] + list(root.parents):
        if (directory / ".git").exists():
            return directory.name
    return root.name


def name_prefix(name: str) -> str:
    """A VM name prefix from a repository name: letters, digits and '-', with ``-vmtasks`` so
    the sweep's prefix can never be another tool's VMs."""
    plain = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:30].strip("-") or "project"
    return plain + "-vmtasks"


def build_tags(lines: Sequence[str]) -> List[str]:
    """The project tags a file's ``//go:build`` line asks for (not negated, not a platform)."""
    tags: List[str] = []
    for line in lines:
        line = line.strip()
        if not line.startswith("//go:build "):
            if line.startswith("package "):
                break
            continue
        for word in _TAG_RE.findall(line[len("//go:build "):]):
            if word.startswith("!") or word in _PLATFORM_TAGS or re.match(r"^go1\.\d+$", word):
                continue
            if word not in tags:
                tags.append(word)
    return tags


def _listing(run: Run, root: Path, tags: Sequence[str], patterns: Sequence[str]) -> List[List[str]]:
    argv = ["go", "list", "-e", "-f", _LIST_TEMPLATE] + (["-tags=" + ",".join(tags)] if tags else []) + \
        list(patterns)
    done = run(argv, root)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError("`{}` exited {} in {}: {}".format(" ".join(argv), done.returncode, root, last),
                          "fix the module so that `go list ./...` works, then run vm-init again")
    return [line.split("\t") for line in done.stdout.splitlines() if line.count("\t") == 4]


def test_dirs(root: Path) -> List[str]:
    """``./dir`` for every directory of the module with a ``_test.go`` file, as ``./...``
    would walk it (no hidden, ``_``, ``testdata`` or ``vendor`` directories, no nested module)."""
    out: List[str] = []
    for directory, subdirs, files in os.walk(str(root)):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith((".", "_")) and d not in ("testdata", "vendor")
                            and not os.path.isfile(os.path.join(directory, d, "go.mod")))
        if any(f.endswith("_test.go") for f in files):
            rel = os.path.relpath(directory, str(root)).replace(os.sep, "/")
            out.append("." if rel == "." else "./" + rel)
    return out


def discover(root: Path, run: Run = _run_go) -> Suite:
    """The module's e2e suite: packages whose test files need build tags, and those tags."""
    suite = Suite()
    try:
        # `./...` leaves out a directory whose every file needs a tag: name each directory
        # with test files instead (go itself says which files it ignores, and why).
        rows = _listing(run, root, [], test_dirs(root) or ["./..."])
    except FileNotFoundError:
        suite.notes.append("go is not on PATH here, so the suite could not be looked up: suite.all runs "
                           "every test (./...); narrow it")
        return suite
    tags: List[str] = []
    dirs: Dict[str, str] = {}
    for import_path, directory, _, _, ignored in rows:
        for name in ignored.split():
            if not name.endswith("_test.go"):
                continue
            try:
                with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as fh:
                    head = [next(fh, "") for _ in range(40)]
            except OSError:
                continue
            found = build_tags(head)
            if found:
                dirs[import_path] = directory
                tags += [t for t in found if t not in tags]
    if not dirs:
        suite.notes.append("no package has test files behind build tags (such as //go:build e2e): suite.all "
                           "runs every test (./...); narrow it to your e2e package")
        return suite
    # Ask go again with the tags: the packages must now have tests.
    confirmed = [row for row in _listing(run, root, tags, sorted(dirs))
                 if row[2] != "0" or row[3] != "0"]
    if not confirmed:
        suite.notes.append("go list -tags={} saw no tests in {}: check suite.all".format(",".join(tags),
                                                                                       ", ".join(sorted(dirs))))
    rels = [os.path.relpath(row[1], str(root)) for row in confirmed] or \
        [os.path.relpath(d, str(root)) for d in dirs.values()]
    common = os.path.commonpath(rels) if rels else "."
    suite.pattern = "./..." if common in ("", ".") else "./" + common.replace(os.sep, "/") + "/..."
    suite.tags = tags
    suite.packages = sorted(row[0] for row in confirmed) or sorted(dirs)
    return suite


def render(root: Path, config_path: Path, suite: Suite, prefix: str, name: str) -> str:
    """The commented config text."""
    config_dir = config_path.parent
    rel_root = os.path.relpath(str(root), str(config_dir))
    to_root = "" if rel_root == "." else rel_root.replace(os.sep, "/") + "/"
    tags = " -tags=" + ",".join(suite.tags) if suite.tags else ""
    guest_dir = "/Users/admin/" + (re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "project")
    found = ("packages {} (build tags: {})".format(", ".join(suite.packages), ", ".join(suite.tags))
             if suite.packages else "no tagged e2e package found")
    notes = "".join("# NOTE: {}\n".format(note) for note in suite.notes)
    return """\
# vmtasks config for {name}, written by `invoke vm-init`; every key is optional (built-in
# defaults otherwise). Layers, lowest first: built-in defaults < Invoke's config (a `vmtasks:`
# section in invoke.yaml) < this file < VMTASKS_VM_* environment < task flags.
# Relative host paths here are relative to this file's directory.
# go list found: {found}.
{notes}
project_dir: {project_dir}   # the Go module synced into the VM (its go.mod: checked at pre-flight)
vms: 1                     # VMs per run; with more, tests go one at a time to whichever VM is free

# Host commands run before the VM is cloned (their output is in the synced tree), e.g.
# - go build -o bin/app ./cmd/app
build: []

vm:
  base: tahoe-base         # the base image to clone (env VMTASKS_VM_BASE)
  name_prefix: {prefix}   # VM names are <prefix>-<run id>; `cleanup-orphans` only touches these
  user: admin

guest:
  dir: {guest_dir}   # rsync --delete target in the guest: a directory of its own, never the home
  env: {{}}                  # extra variables for the suite (CI=true and VMTASKS_IN_VM=1 always)

# Guest commands run over SSH after boot, on every run (or baked once: `invoke vm-prepare`).
setup:
  # - /opt/homebrew/bin/mise install go@latest && /opt/homebrew/bin/mise use -g go@latest   # no Go in the image?
  - {install_invoke}

suite:                     # your destructive tests should skip unless VMTASKS_IN_VM=1
  all: go test -v -timeout 60m{tags} {pattern}
  one: go test -v -timeout 45m{tags} -run {{test}} {pattern}
  durations: {to_root}.vmtasks/durations.json   # per-test durations, to balance several VMs

keep: never                # never | on-failure | always: keep the VM to look around (invoke vm-login)

records:
  dir: {to_root}.vmtasks/runs   # run records (add .vmtasks/ to .gitignore)

timeouts:                  # seconds
  boot: 60
  suite: 4500
""".format(name=name, found=found, notes=notes, project_dir=rel_root.replace(os.sep, "/"), prefix=prefix,
           guest_dir=guest_dir, install_invoke=_yaml_quote(config_mod.INSTALL_INVOKE), tags=tags,
           pattern=suite.pattern, to_root=to_root)


def _yaml_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class Written:
    path: Path
    root: Path
    suite: Suite
    prefix: str


def init(cwd: Path, target: Optional[Path] = None, project_root: Optional[Path] = None,
         run: Run = _run_go) -> Written:
    """Write the config for the module around ``cwd`` to ``target`` (default ``config/vm.yaml``
    beside the tasks.py Invoke loaded, ``project_root``, or at the module root). Refuses an
    existing file."""
    root = module_root(cwd)
    path = target if target is not None else (project_root or root) / config_mod.DEFAULT_CONFIG
    path = path if path.is_absolute() else cwd / path
    if path.exists():
        raise ConfigError("{} already exists; vm-init never overwrites a config".format(path),
                          "edit it, or move it away and run vm-init again (or pass --config OTHER.yaml)")
    suite = discover(root, run)
    name = repository_name(root)
    prefix = name_prefix(name)
    text = render(root, path, suite, prefix, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".vm-init.tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        config_mod.load(tmp, environ={}, cwd=cwd)  # what vm-init writes always loads
        # O_EXCL-like: a config that appeared meanwhile is not replaced.
        os.link(str(tmp), str(path))
    except FileExistsError:
        raise ConfigError("{} already exists; vm-init never overwrites a config".format(path),
                          "edit it, or move it away and run vm-init again") from None
    finally:
        tmp.unlink()
    return Written(path, root, suite, prefix)
