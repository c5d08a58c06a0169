"""Run records under a read-only or full disk (real mounts), owners, per-VM folders."""

import contextlib
import errno
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmtasks.guest.errors import StateError
from vmtasks.state.records import RunRecord, record_owner_alive

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str, read_only: bool = False, prepare=None):
    """A real small filesystem at ``path`` (tmpfs; needs root), optionally made read-only
    after ``prepare(path)`` populated it. Unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + size, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): " + done.stderr.strip())
    try:
        if prepare is not None:
            prepare(path)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_disk(disk: Path) -> None:
    """Fill the filesystem of ``disk`` until it reports ENOSPC."""
    with open(disk / "filler", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_read_only_records_dir_fails_create_with_the_directory_and_the_fix(tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "64k", read_only=True, prepare=lambda p: (p / "runs").mkdir()) as disk:
        record = RunRecord(disk / "runs", "20260101-000000-abcd")
        with pytest.raises(StateError) as err:
            record.create("{}")
    assert str(disk / "runs") in err.value.message and "Read-only file system" in err.value.message
    assert "records.dir" in err.value.hint
    # Nothing later raises either: the run can still tear down and say what is missing.
    record.stage_done("clone", 0.0, 0.1, "ok")
    record.finish(exit_code=1)
    with record.open_stream("suite-output.txt") as out:
        out.write("x")
    assert "run record was not created" in record.incomplete()


def test_records_dir_under_a_file_is_a_state_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StateError, match="Not a directory"):
        RunRecord(tmp_path / "file" / "runs", "r1").create("{}")


def test_a_disk_that_fills_mid_run_never_raises_and_says_what_is_missing(tmp_path):
    with mounted_tmpfs(tmp_path / "disk", "64k") as disk:
        record = RunRecord(disk / "runs", "20260101-000000-abcd")
        record.create('{"a": 1}')
        record.stage_done("clone", time.time(), 0.5, "ok")
        assert json.loads(record.path("stages.json").read_text())[0]["stage"] == "clone"
        stream = record.open_stream("suite-output.txt")
        chunk = "ok  \tpkg/x\t0.01s\n" * 256
        for _ in range(100):  # 460 KB into 64 KB
            stream.write(chunk)
        stream.close()
        assert stream.failed and stream.dropped > 0 and 0 < stream.written < 64 * 1024
        assert record.path("suite-output.txt").stat().st_size <= stream.written
        record.stage_done("suite", time.time(), 3.0, "ok")
        record.write_text("summary.txt", "passed 1\n" * 20000)
        record.finish(exit_code=0)
    problems = record.problems
    assert problems[0].startswith(str(disk / "runs" / record.run_id / "suite-output.txt") + " stopped after ")
    assert "No space left on device" in problems[0]
    assert len(problems) == len({p.split(":")[0] for p in problems})  # one line per file
    assert any("summary.txt" in p for p in problems)
    assert record.incomplete().startswith("run record incomplete: ") and "suite-output.txt" in record.incomplete()


def test_a_full_disk_at_create_is_a_state_error_naming_disk_full(tmp_path):
    with mounted_tmpfs(tmp_path / "disk", "64k", prepare=lambda p: (p / "runs").mkdir()) as disk:
        fill_disk(disk)
        with pytest.raises(StateError) as err:
            RunRecord(disk / "runs", "r1").create("x" * 10000)
        assert "No space left" in err.value.message and "disk is full" in err.value.hint
        assert os.listdir(disk / "runs") == []  # the half-made record is gone


OTHER_RUN = """
import sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from vmtasks.state.records import RunRecord
record = RunRecord(Path({root!r}), "20260101-000000-aaaa")
record.create("{{}}")
print("ready", flush=True)
time.sleep(60)
"""


def test_prune_never_removes_a_concurrent_live_runs_record(tmp_path):
    """Two runs with keep_last 1: the one that finishes first leaves the other's record."""
    root = tmp_path / "runs"
    other = subprocess.Popen([sys.executable, "-c", OTHER_RUN.format(repo=str(REPO), root=str(root))],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "ready"
        mine = RunRecord(root, "20260102-000000-bbbb")
        mine.create("{}")
        mine.finish(exit_code=0)
        mine.prune(1)
        assert (root / "20260101-000000-aaaa" / "config.json").is_file()
        assert record_owner_alive(root / "20260101-000000-aaaa", mine.owner)
    finally:
        other.kill()
        other.wait()
    mine.prune(1)  # its owner is gone now: an ordinary old record
    assert sorted(p.name for p in root.iterdir() if not p.is_symlink()) == ["20260102-000000-bbbb"]


def test_records_of_earlier_runs_in_this_process_are_pruned(tmp_path):
    root = tmp_path / "runs"
    for i in range(4):
        record = RunRecord(root, "2026010{}-000000-abcd".format(i))
        record.create("{}")
        record.prune(2)
    assert sorted(p.name for p in root.iterdir() if not p.is_symlink()) == [
        "20260102-000000-abcd", "20260103-000000-abcd"]
    assert json.loads((root / "20260103-000000-abcd" / "owner.json").read_text())["pid"] == os.getpid()


def test_per_vm_folders_and_latest_points_at_the_run(tmp_path):
    root = tmp_path / "runs"
    record = RunRecord(root, "20260101-000000-abcd")
    record.stage_done("preflight", 0.0, 0.2, "ok")  # timed before the record exists
    record.create("{}")
    assert json.loads(record.path("stages.json").read_text())[0]["stage"] == "preflight"
    for vm in ("p-a", "p-b"):
        (record.vm_dir(vm) / "console.log").write_text("boot " + vm)
        with record.open_stream("suite-output.txt", vm=vm) as out:
            out.write("output of " + vm)
        record.stage_done("boot", 0.0, 1.0, "ok", vm=vm)
    assert (root / "20260101-000000-abcd" / "p-b" / "suite-output.txt").read_text() == "output of p-b"
    assert [s.get("vm") for s in json.loads(record.path("stages.json").read_text())] == [None, "p-a", "p-b"]
    assert (root / "latest").resolve() == record.dir.resolve()
    assert record.problems == [] and record.incomplete() == ""


LIMITED_RUN = """
import json, resource, signal, sys
sys.path.insert(0, {repo!r})
from pathlib import Path
from vmtasks.state.records import RunRecord
record = RunRecord(Path({root!r}), "20260101-000000-abcd")
record.create("{{}}")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (32768, resource.RLIM_INFINITY))
with record.open_stream("suite-output.txt") as out:
    for _ in range(50):
        out.write("x" * 4096)
record.write_text("summary.txt", "y" * 40000)
record.finish(exit_code=0)
print(json.dumps(record.problems))
"""


def test_a_file_size_limit_mid_run_is_noted_not_raised(tmp_path):
    """The same promise without root: RLIMIT_FSIZE in a child process."""
    done = subprocess.run([sys.executable, "-c", LIMITED_RUN.format(repo=str(REPO), root=str(tmp_path / "runs"))],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    problems = json.loads(done.stdout)
    assert len(problems) == 2 and "suite-output.txt stopped after " in problems[0]
    assert "File too large" in problems[0] and "summary.txt" in problems[1]
    assert (tmp_path / "runs" / "20260101-000000-abcd" / "suite-output.txt").stat().st_size <= 32768


def test_commands_log_from_many_threads_keeps_whole_lines(tmp_path):
    """Several VMs' pipelines log commands at once: every line arrives whole."""
    import threading

    record = RunRecord(tmp_path / "runs", "r1")
    record.create("{}")
    barrier = threading.Barrier(8)

    def worker(index: int) -> None:
        barrier.wait()
        for test in range(25):
            record.command_ran("vm-{}".format(index), "ssh: go test -run 'X {}'".format(test), 0, 0.5)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = record.path("commands.log").read_text().splitlines()
    assert len(lines) == 200
    assert all(re.match(r"^\d\d:\d\d:\d\d \[vm-\d\] exit 0 in 0\.500s: ssh: go test -run 'X \d+'$", line)
               for line in lines), lines[:3]
