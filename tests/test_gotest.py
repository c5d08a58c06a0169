"""The Go suite taken apart for the queue: flags split between compiler and test binary,
-run regexes split at the subtest '/', and the per-test command quoted for the guest's shell."""

from __future__ import annotations

import shlex
import subprocess

import pytest

from vmtasks.guest import config, gotest
from vmtasks.guest.errors import ConfigError
from vmtasks.lifecycle.queue import TestQueue


def test_flags_go_where_they_belong():
    suite = gotest.parse_suite("go test -v -timeout 60m -tags=e2e,vm -race -count 1 -run TestX ./test/e2e/...", None)
    assert suite.packages == ("./test/e2e/...",)
    assert suite.build_flags == ("-tags=e2e,vm", "-race")
    assert suite.test_flags == ("-test.timeout=60m", "-test.count=1")
    assert suite.run_regex == "TestX"
    # The user's --test replaces the command's own -run.
    assert gotest.parse_suite("go test -run TestX ./...", "TestY").run_regex == "TestY"


@pytest.mark.parametrize("command,needle,hint", [
    ("make test-vm-inner", "not a `go test", "--vms 1"),
    ("go test -coverprofile=c.out ./...", "-coverprofile=c.out", "--vms 1"),
    ("go test -timeout", "needs a value", "-timeout="),
])
def test_what_the_queue_cannot_split_is_a_clear_error(command, needle, hint):
    with pytest.raises(ConfigError) as err:
        gotest.parse_suite(command, None)
    assert needle in err.value.message and hint in err.value.render()


@pytest.mark.parametrize("regex,top,sub", [
    ("TestA|TestB", "TestA|TestB", ""),
    ("TestPackages/brew|cask", "TestPackages", "brew|cask"),
    ("Test[/]x/y", "Test[/]x", "y"),
    ("Test\\/x", "Test\\/x", ""),
    (None, "", ""),
])
def test_run_regex_splits_at_the_first_unbracketed_slash(regex, top, sub):
    assert gotest.split_regex(regex) == (top, sub)


def test_one_test_command_is_inert_in_the_guest_shell(tmp_path):
    cfg = config.load(None, environ={}, cwd=tmp_path)
    hostile = "x$(touch pwned)`touch pwned2`'\"; touch pwned3 ${IFS}"
    suite = gotest.parse_suite("go test -v -timeout 5m -tags=e2e ./...", "TestA/" + hostile)
    package = gotest.Package("example.com/x/test/e2e", "test/e2e", "example_com_x_test_e2e.test")
    queue = TestQueue([gotest.TestItem(package, "TestA")], suite, tmp_path, True, ["CI=true"])
    command = queue.command_for(cfg, queue.items[0])
    # Run it through a real shell, `go` replaced by a printer of its argv, the guest dir by ours.
    (tmp_path / "test" / "e2e").mkdir(parents=True)
    (tmp_path / "go").write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    (tmp_path / "go").chmod(0o755)
    runnable = command.replace(shlex.quote(cfg.guest.dir + "/test/e2e"), shlex.quote(str(tmp_path / "test" / "e2e")))
    done = subprocess.run(["sh", "-c", runnable], cwd=str(tmp_path), capture_output=True, text=True,
                          env={"PATH": str(tmp_path) + ":/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    args = done.stdout.splitlines()
    # Anchored to the one test; the user's subtest pattern arrives literally.
    assert "-test.run=^TestA$/" + hostile in args, args
    assert "-test.timeout=5m" in args and "-test.v=test2json" in args
    assert args[:4] == ["tool", "test2json", "-t", "-p"]
    assert not list(tmp_path.rglob("pwned*"))


def test_the_queue_hands_each_test_out_once_across_threads(tmp_path):
    import threading

    package = gotest.Package("p", ".", "p.test")
    items = [gotest.TestItem(package, "Test{}".format(i)) for i in range(500)]
    queue = TestQueue(items, gotest.GoSuite((".",), (), (), None), tmp_path, True, [])
    taken = []
    lock = threading.Lock()

    def worker(vm):
        while True:
            item = queue.take(vm)
            if item is None:
                return
            with lock:
                taken.append(item.name)
            queue.done(item)

    threads = [threading.Thread(target=worker, args=("vm{}".format(i),)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == sorted(i.name for i in items) and len(taken) == len(set(taken))
    assert queue.exhausted() and queue.remaining() == []


# -- issue 18: a listing line that cannot be a test; a hung test's process group ----------

class ListingRunner:
    """Answers every command with ``stdout``; records argv and env."""

    def __init__(self, stdout: str) -> None:
        self.stdout = stdout
        self.calls = []

    def run(self, argv, **kwargs):
        from vmtasks.transport.proc import Result

        self.calls.append((list(argv), kwargs.get("env")))
        return Result(list(argv), 0, self.stdout, "")


@pytest.mark.parametrize("name,ok", [
    ("TestA", True), ("TestÜber", True), ("Example_x", True), ("FuzzParse", True),
    ("TestEvil\x00Name", False), ("TestEvil\x1b[2J", False), ("Test A", False), ("TestA/sub", False),
    ("TestA\r", False), ("Benchmark", False), ("Helper", False),
])
def test_only_go_identifiers_are_test_names(name, ok):
    assert gotest.valid_test_name(name) is ok


def test_a_nul_in_a_binary_listing_is_left_out_with_a_note(tmp_path):
    package = gotest.Package("example.com/x/e2e", ".", "x.test")
    runner = ListingRunner("TestA\nTestEvil\x00Name\nTestB\nok  \texample.com/x/e2e\t0.01s\n")
    notes = []
    items = gotest.list_tests(runner, str(tmp_path), gotest.parse_suite("go test ./...", None), package, tmp_path,
                              on_note=notes.append)
    assert [i.name for i in items] == ["TestA", "TestB"]
    assert len(notes) == 1 and "'TestEvil\\x00Name'" in notes[0] and "not a Go test name" in notes[0]


def test_one_vm_listing_is_go_test_list_json_without_openboot_vars(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("OPENBOOT_IN_VM", "1")
    lines = [{"Action": "output", "Package": "p/a", "Output": "TestA\n"},
             {"Action": "output", "Package": "p/a", "Output": "TestEvil\x00Name\n"},
             {"Action": "output", "Package": "p/a", "Output": "ok  \tp/a\t0.01s\n"},
             {"Action": "output", "Package": "p/b", "Output": "TestB\n"},
             {"Action": "output", "Package": "p/b", "Test": "TestX", "Output": "TestC\n"},
             {"Action": "pass", "Package": "p/b"}]
    runner = ListingRunner("".join(json.dumps(line) + "\n" for line in lines) + "noise\n")
    notes = []
    suite = gotest.parse_suite("go test -v -tags=e2e,vm -run 'TestA|TestB' ./...", None)
    listed = gotest.list_suite(runner, str(tmp_path), suite, 60, on_note=notes.append)
    assert listed == [("p/a", "TestA"), ("p/b", "TestB")]
    assert len(notes) == 1 and "p/a" in notes[0]
    argv, env = runner.calls[0]
    assert argv == ["go", "test", "-list", "TestA|TestB", "-json", "-tags=e2e,vm", "./..."]
    assert not any(k.startswith("OPENBOOT_") for k in env)


def test_a_timed_out_test_command_can_kill_its_whole_process_group(tmp_path):
    """sshd runs each command as a session leader: the PID the command notes is the process
    group of the test binary and of whatever it started."""
    import time

    pid_file = shlex.quote(str(tmp_path / "running.pid"))
    command = gotest.note_pid(pid_file) + "sleep 300 & exec sleep 301"
    proc = subprocess.Popen(["sh", "-c", command], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "running.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        done = subprocess.run(["sh", "-c", gotest.kill_command(pid_file)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert proc.wait(timeout=10) == -9
        for _ in range(50):  # SIGKILL is delivered at once; reaping the orphan may take a moment
            alive = subprocess.run(["ps", "-o", "stat=", "-g", str(proc.pid)], capture_output=True,
                                   text=True).stdout.split()
            if all(state.startswith("Z") for state in alive):
                break
            time.sleep(0.1)
        assert all(state.startswith("Z") for state in alive), "the test's children outlived the kill"
        assert not (tmp_path / "running.pid").exists()
    finally:
        import os
        import signal

        try:  # whatever the kill missed (a failing run) goes now
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def test_the_queued_command_notes_its_pid_only_when_asked(tmp_path):
    cfg = config.load(None, environ={}, cwd=tmp_path)
    package = gotest.Package("p", ".", "p.test")
    queue = TestQueue([gotest.TestItem(package, "TestA")], gotest.GoSuite((".",), (), (), None), tmp_path, True, [])
    assert queue.command_for(cfg, queue.items[0]).startswith("cd ")
    assert queue.command_for(cfg, queue.items[0], pid_file='"$HOME"/x.pid').startswith(
        'echo $$ 2>/dev/null >"$HOME"/x.pid; cd ')


def test_one_listing_parser_for_the_queue_the_shard_and_a_one_vm_run():
    """A binary's -test.list, `go test -list` and `go test -list -json` give the same tests
    (gotest.TestId), and a printed line that is no Go test name is rejected in each."""
    import json

    from vmtasks.guest.gotest import TestId, parse_listing

    pkg = "example.com/e2e"
    binary = "TestA\nTestB\x00evil\nBenchmarkC\nTestD\n"
    text = binary + "ok  \t{}\t0.01s\n".format(pkg)
    events = "\n".join(json.dumps({"Action": "output", "Package": pkg, "Output": line + "\n"})
                       for line in binary.splitlines()) + "\n"
    expected = [TestId(pkg, "TestA"), TestId(pkg, "TestD")]
    for listing in (parse_listing(binary, pkg), parse_listing(text), parse_listing(events)):
        assert listing.tests == expected
        assert listing.rejected == {pkg: ["TestB\x00evil"]}
    assert expected[0] == (pkg, "TestA") and str(expected[0]) == pkg + ".TestA"


def test_launch_failure_hints_name_the_loaders_refusal_only():
    from vmtasks.guest.gotest import launch_failure_hint

    assert "Exec format error" in launch_failure_hint(
        ["sh: 1: /Users/admin/.vmtasks/bin/e2e.test: cannot execute binary file: Exec format error"])
    assert "CGO_ENABLED=0" in launch_failure_hint(["dyld[1]: Library not loaded: /opt/homebrew/lib/libfoo.dylib"])
    assert launch_failure_hint(["--- FAIL: TestA (0.00s)", "FAIL"]) == ""
    assert launch_failure_hint([]) == ""
