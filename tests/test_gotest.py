"""The Go suite taken apart for the queue: flags split between compiler and test binary,
-run regexes split at the subtest '/', and the per-test command quoted for the guest's shell."""

from __future__ import annotations

import shlex
import subprocess

import pytest

from vmtasks import config, gotest
from vmtasks.errors import ConfigError
from vmtasks.queue import TestQueue


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
