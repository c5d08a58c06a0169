"""The Go suite, taken apart for the test queue: which packages, which tests, one compiled
test binary per package, and the command that runs one test from it in a guest.

The tests are listed by the suite itself (the compiled binary's ``-test.list``), never by a
hand-written list, so a new test cannot be missed. Listing runs the binary on the host
(host and guest share GOOS/GOARCH on an Apple Silicon Mac, and on Linux with the stand-in)
with ``VMTASKS_IN_VM`` and ``OPENBOOT_IN_VM`` removed from its environment: ``-test.list`` runs
no test, and the destructive tests refuse without that variable anyway.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from .errors import ConfigError, StageError, VmtasksError

# go test's own flags that take a value, and where each goes.
BUILD_VALUE_FLAGS = {"tags", "ldflags", "gcflags", "asmflags", "mod", "modfile", "overlay", "pkgdir",
                     "toolexec", "coverpkg", "covermode", "buildvcs", "pgo"}
BUILD_BOOL_FLAGS = {"race", "msan", "asan", "trimpath", "cover", "a", "linkshared"}
TEST_VALUE_FLAGS = {"timeout", "run", "skip", "count", "parallel", "cpu", "shuffle"}
TEST_BOOL_FLAGS = {"v", "short", "failfast"}
IGNORED_BOOL_FLAGS = {"json"}  # we ask for JSON ourselves
RUNNABLE = re.compile(r"^(Test|Example|Fuzz)")


def valid_test_name(name: str) -> bool:
    """Could ``name`` be a top-level Go test? A Go identifier (letters, digits, ``_``)
    starting with Test, Example or Fuzz. A listing line with a NUL, a control character, a
    space or a ``/`` is something a TestMain printed, never a test: it must not become a
    ``-test.run`` regex in a guest command line (a NUL broke the SSH session)."""
    return bool(RUNNABLE.match(name)) and name.isidentifier() and name.isprintable()


def split_listing(names) -> Tuple[List[str], List[str]]:
    """``(tests, rejected)`` from the lines of a test listing: runnable names that are Go
    identifiers, and runnable-looking lines that are not (shown with ``repr``)."""
    tests: List[str] = []
    rejected: List[str] = []
    for line in names:
        name = line.strip()
        if not RUNNABLE.match(name):
            continue
        if valid_test_name(name):
            tests.append(name)
        else:
            rejected.append(name)
    return tests, rejected


class _TestIdFields(NamedTuple):
    package: str
    name: str


class TestId(_TestIdFields):
    """One top-level test, the one identity everywhere (the queue, --shard, the durations,
    the results): its Go package and name. A ``(package, name)`` tuple; sorts by package,
    then name."""

    __slots__ = ()
    __test__ = False  # not a pytest test class despite the name

    def __str__(self) -> str:
        return "%s.%s" % (self.package, self.name) if self.package else self.name


# go's per-package verdict after a listing: "ok  \tpkg\t0.01s", "FAIL\tpkg\t...",
# "?   \tpkg\t[no test files]".
VERDICT = re.compile(r"^(ok|FAIL|\?)\s+(\S+)(\s|$)")


@dataclass(frozen=True)
class Listing:
    tests: List[TestId]  # in listing order, each once
    rejected: Dict[str, List[str]]  # package -> runnable-looking lines that are no Go test name


def parse_listing(text: str, package: str = "") -> Listing:
    """The one parser of a suite's listing: ``go test -list REGEX [-json] PKGS`` or a test
    binary's ``-test.list REGEX`` (then pass its ``package``), for the queue, ``--shard`` and
    a one-VM run's expected tests.

    With ``-json`` each name carries go's own ``Package`` (an event of a running test is
    never a listed name; plain lines around JSON are noise). In plain text, names are given
    to the package of the ``ok``/``FAIL`` line that follows them, and names after the last
    such line to ``package``. A package's ``TestMain`` still runs for ``-list`` and its
    prints are listed too: a printed line that is no Go test name (``valid_test_name``) is
    rejected (see ``rejected_note``); a printed valid name ends up "not run" in the summary
    (an error someone sees), never a test silently skipped."""
    found: List[TestId] = []
    rejected: Dict[str, List[str]] = {}
    pending: List[str] = []
    events = 0

    def take(pkg: str, lines: Sequence[str]) -> None:
        names, bad = split_listing(lines)
        found.extend(TestId(pkg, name) for name in names)
        if bad:
            rejected.setdefault(pkg, []).extend(bad)

    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict):
                events += 1
                out, pkg = event.get("Output"), event.get("Package")
                if event.get("Action") == "output" and isinstance(out, str) and isinstance(pkg, str) \
                        and "Test" not in event:
                    take(pkg, [out])
                continue
        verdict = VERDICT.match(line)
        if verdict:
            take(verdict.group(2), pending)
            pending = []
        else:
            pending.append(line)
    if not events:
        take(package, pending)
    unique = list(dict.fromkeys(found))
    return Listing(unique, rejected)


def rejected_note(package: str, rejected: Sequence[str]) -> str:
    shown = ", ".join(repr(name) for name in list(rejected)[:5])
    more = " and {} more".format(len(rejected) - 5) if len(rejected) > 5 else ""
    return ("the listing of {} printed {}{}: not a Go test name (a control character, space or '/'); "
            "ignored, the other tests run".format(package, shown, more))


@dataclass(frozen=True)
class GoSuite:
    """A `go test` command line, split into what the compiler and the test binary need."""

    packages: Tuple[str, ...]
    build_flags: Tuple[str, ...]  # for `go test -c`
    test_flags: Tuple[str, ...]  # for the test binary, as -test.X (without -test.run)
    run_regex: Optional[str]


@dataclass(frozen=True)
class Package:
    import_path: str
    rel_dir: str  # relative to the project dir ("." for the root)
    binary: str  # file name of its compiled test binary


@dataclass(frozen=True)
class TestItem:
    """One top-level test of one package: what the queue hands out."""

    package: Package
    name: str

    @property
    def key(self) -> TestId:
        return TestId(self.package.import_path, self.name)


def parse_suite(command: str, test: Optional[str]) -> GoSuite:
    """Split ``suite.all`` (``go test [flags] [packages]``) for the queue; ``test`` is the
    user's ``-run`` regex (it replaces any -run in the command)."""
    where = "suite.all"
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise ConfigError("{}: cannot parse {!r}: {}".format(where, command, exc), "fix the quoting") from None
    if words[:2] != ["go", "test"]:
        raise ConfigError("{} is not a `go test ...` command: {!r}; with vms > 1 the suite is split into "
                          "single tests, which needs go test's own flags".format(where, command),
                          "make suite.all a plain `go test` command, or run with --vms 1")
    build: List[str] = []
    tests: List[str] = []
    packages: List[str] = []
    run_regex = test
    i = 2
    while i < len(words):
        word = words[i]
        i += 1
        if not word.startswith("-") or word == "-":
            packages.append(word)
            continue
        name, eq, value = word.lstrip("-").partition("=")
        takes_value = name in BUILD_VALUE_FLAGS or name in TEST_VALUE_FLAGS
        if takes_value and not eq:
            if i >= len(words):
                raise ConfigError("{}: flag -{} needs a value".format(where, name), "for example -{}=...".format(name))
            value = words[i]
            i += 1
        if name in BUILD_VALUE_FLAGS:
            build.append("-{}={}".format(name, value))
        elif name in BUILD_BOOL_FLAGS:
            build.append(word)
        elif name == "run":
            run_regex = test if test is not None else value
        elif name in TEST_VALUE_FLAGS:
            tests.append("-test.{}={}".format(name, value))
        elif name in TEST_BOOL_FLAGS:
            if name != "v":  # we ask for the verbose framing ourselves
                tests.append("-test." + word.lstrip("-"))
        elif name in IGNORED_BOOL_FLAGS:
            continue
        else:
            raise ConfigError("{}: go test flag {} is not known to the test queue".format(where, word),
                              "remove it, or run with --vms 1 (which runs the command as written)")
    return GoSuite(tuple(packages or ["."]), tuple(build), tuple(tests), run_regex)


def list_packages(runner, project_dir: str, suite: GoSuite, timeout: float, cancel=None) -> List[Package]:
    """The suite's packages that have tests (``go list``), in the project tree."""
    template = "{{.ImportPath}}\t{{.Dir}}\t{{len .TestGoFiles}}\t{{len .XTestGoFiles}}"
    argv = ["go", "list", "-f", template] + [f for f in suite.build_flags if f.startswith("-tags=")] + \
        list(suite.packages)
    done = runner.run(argv, timeout=timeout, cwd=project_dir, cancel=cancel)
    if not done.ok:
        raise StageError("compile", "host", "`go list` exited {}".format(done.returncode),
                         "fix the suite's packages (suite.all) or the Go module", done.stderr.splitlines()[-15:])
    root = Path(project_dir).resolve()
    out: List[Package] = []
    for line in done.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) != 4 or (parts[2] == "0" and parts[3] == "0"):
            continue
        rel = os.path.relpath(str(Path(parts[1]).resolve()), str(root))
        if rel.startswith(".."):
            raise StageError("compile", "host", "package {} is outside the project tree".format(parts[0]),
                             "only packages under project_dir are synced into the guest")
        out.append(Package(parts[0], rel, re.sub(r"[^A-Za-z0-9]+", "_", parts[0]).strip("_") + ".test"))
    return out


def compile_package(runner, project_dir: str, suite: GoSuite, package: Package, bin_dir: Path,
                    timeout: float, cancel=None) -> None:
    argv = ["go", "test", "-c", "-o", str(bin_dir / package.binary)] + list(suite.build_flags) + [package.import_path]
    done = runner.run(argv, timeout=timeout, cwd=project_dir, cancel=cancel)
    if not done.ok:
        raise StageError("compile", "host", "`go test -c` for {} exited {}".format(
                             package.import_path, done.returncode),
                         "the suite does not build: fix it, then run again",
                         (done.stderr + done.stdout).splitlines()[-15:])


def host_env() -> Dict[str, str]:
    """The environment for running a test binary on the host: never destructive."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBOOT_") and k != "VMTASKS_IN_VM"}
    return env


def list_tests(runner, project_dir: str, suite: GoSuite, package: Package, bin_dir: Path,
               timeout: float = 120, cancel=None, on_note=None) -> List[TestItem]:
    """The package's top-level tests matching the regex, as its binary lists them.
    Lines that cannot be a Go test name are left out, and ``on_note(text)`` says so."""
    top = top_level_pattern(suite.run_regex)
    argv = [str(bin_dir / package.binary), "-test.list", top]
    done = runner.run(argv, timeout=timeout, cwd=str(Path(project_dir) / package.rel_dir), env=host_env(),
                      cancel=cancel)
    if not done.ok:
        raise StageError("compile", "host", "listing the tests of {} exited {}".format(
            package.import_path, done.returncode),
            "a TestMain that fails without VMTASKS_IN_VM=1 cannot be listed on the host; run with --vms 1",
            (done.stderr + done.stdout).splitlines()[-15:])
    listing = parse_listing(done.stdout, package.import_path)
    for bad in listing.rejected.values():
        if on_note is not None:
            on_note(rejected_note(package.import_path, bad))
    return [TestItem(package, test.name) for test in listing.tests]


def list_suite(runner, project_dir: str, suite: GoSuite, timeout: float, cancel=None,
               on_note=None) -> List[TestId]:
    """Every selected top-level test, from one ``go test -list -json``
    on the host (each binary's own ``-test.list``; run without ``OPENBOOT_*`` or ``VMTASKS_IN_VM``, so nothing
    destructive runs). For a one-VM run: only these tests count in its results. Raises
    :class:`StageError` when go cannot list them."""
    argv = ["go", "test", "-list", top_level_pattern(suite.run_regex), "-json"] + list(suite.build_flags) + \
        list(suite.packages)
    done = runner.run(argv, timeout=timeout, cwd=project_dir, env=host_env(), cancel=cancel)
    if not done.ok:
        raise StageError("list", "host", "`go test -list` exited {}".format(done.returncode),
                         "a TestMain that fails without VMTASKS_IN_VM=1 cannot be listed on the host",
                         (done.stderr + done.stdout).splitlines()[-15:])
    listing = parse_listing(done.stdout)
    for package, bad in listing.rejected.items():
        if on_note is not None:
            on_note(rejected_note(package, bad))
    return listing.tests


def supports_test2json_framing(runner, binary: Path, cwd: str) -> bool:
    """Go >= 1.20 test binaries accept ``-test.v=test2json`` (framing a test's output cannot
    forge); older ones only ``-test.v``."""
    done = runner.run([str(binary), "-test.v=test2json", "-test.run", "^$"], timeout=60, cwd=cwd, env=host_env())
    return done.ok


def split_regex(regex: Optional[str]) -> Tuple[str, str]:
    """go test's -run: the part before the first unbracketed '/' matches top-level tests,
    the rest their subtests."""
    if not regex:
        return "", ""
    depth = 0
    for i, ch in enumerate(regex):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(0, depth - 1)
        elif ch == "/" and depth == 0 and (i == 0 or regex[i - 1] != "\\"):
            return regex[:i], regex[i + 1:]
    return regex, ""


def top_level_pattern(regex: Optional[str]) -> str:
    top, _ = split_regex(regex)
    return top or ".*"


def note_pid(pid_file: str) -> str:
    """A guest shell prefix that writes the command's PID to ``pid_file`` (a shell word).

    sshd starts each command in a new session, so that PID is also the process group of
    everything the command starts (test2json, the test binary, their children):
    :func:`kill_command` stops them all when a deadline runs out."""
    return "echo $$ 2>/dev/null >{}; ".format(pid_file)  # never stops the command itself


def kill_command(pid_file: str) -> str:
    """Guest shell: kill the process group whose leader wrote ``pid_file``, then forget it."""
    return 'pid=$(cat {0} 2>/dev/null); rm -f {0}; [ -n "$pid" ] && kill -KILL -"$pid"'.format(pid_file)


def test_command(cfg, item: TestItem, suite: GoSuite, guest_bin: str, framing: bool, env_words: Sequence[str],
                 pid_file: Optional[str] = None) -> str:
    """The shell command that runs one test in the guest, speaking `go test -json`
    (``pid_file``: see :func:`note_pid`)."""
    _, sub = split_regex(suite.run_regex)
    run = "^" + re.escape(item.name) + "$" + ("/" + sub if sub else "")
    workdir = cfg.guest.dir.rstrip("/") + ("" if item.package.rel_dir == "." else "/" + item.package.rel_dir)
    words = ([note_pid(pid_file).rstrip()] if pid_file else []) + ["cd", shlex.quote(workdir), "&&", "exec", "env"] + \
        list(env_words)
    words += [shlex.quote(w) for w in shlex.split(cfg.guest.command_prefix)]
    words += ["go", "tool", "test2json", "-t", "-p", shlex.quote(item.package.import_path),
              guest_bin + "/" + shlex.quote(item.package.binary),
              "-test.v=test2json" if framing else "-test.v", "-test.paniconexit0",
              shlex.quote("-test.run=" + run)]
    words += [shlex.quote(f) for f in suite.test_flags]
    return " ".join(words)


def no_match_note(runner, project_dir: str, suite_all: str, regex: str, timeout: float, cancel=None) -> str:
    """What to say when ``regex`` matches none of the suite's tests: the nearest names, from
    the whole listing (best effort: the listing of every test may fail where the regex's
    did not)."""
    try:
        every = list_suite(runner, project_dir, parse_suite(suite_all, None), timeout, cancel)
    except VmtasksError:
        every = []
    names = sorted({name for _, name in every})
    if not names:
        return "no test matches -run {!r}".format(regex)
    near = difflib.get_close_matches(regex, names, n=3, cutoff=0.5) or names[:3]
    return "no test matches -run {!r}; the suite has {} test{}, the nearest: {}".format(
        regex, len(names), "" if len(names) == 1 else "s", ", ".join(near))


# What a loader prints when a binary built on the host cannot start in the guest: dyld on
# macOS (a cgo binary linked against a newer macOS than the guest's, or a missing dylib), the
# kernel or shell for a binary of another architecture, glibc for a newer C library.
_LAUNCH_FAILURES = ("built for newer macos version", "built for macos", "dyld[", "dyld:", "symbol not found",
                    "library not loaded", "exec format error", "cannot execute binary file",
                    "bad cpu type in executable", "glibc_", "no such file or directory: '/lib")


def launch_failure_hint(lines: Sequence[str]) -> str:
    """Why a test binary compiled on the host did not even start in the guest, and what to
    do, from its last output ``lines``; "" when they do not look like a loader's refusal."""
    for line in reversed([line for line in lines if line.strip()][-20:]):
        low = line.lower()
        if any(marker in low for marker in _LAUNCH_FAILURES):
            shown = line.strip()[:200]
            return ("the test binary compiled on the host did not start in the guest ({}): build it for the "
                    "guest: with cgo, set MACOSX_DEPLOYMENT_TARGET to the guest's macOS version (e.g. 14.0) "
                    "where vmtasks runs, or CGO_ENABLED=0 if the tests need no cgo; the same GOOS/GOARCH as "
                    "the guest".format(shown))
    return ""
