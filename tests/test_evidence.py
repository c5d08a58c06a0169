"""vmtasks.guest.evidence: the guest's half run here on a real tree and real commands, the host's half
on what a hostile guest could send."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from test_records import fill_disk, mounted_tmpfs

from vmtasks.guest import evidence

REPO = Path(__file__).resolve().parent.parent
MB = 1024 * 1024


def packed(home: Path, artifacts=(), commands=None, max_bytes=MB, timeout=5.0) -> bytes:
    out = io.BytesIO()
    evidence.pack(list(artifacts), commands or {}, out, home=str(home), max_bytes=max_bytes, timeout=timeout)
    return out.getvalue()


def test_a_failed_tests_log_and_command_output_reach_the_record(tmp_path):
    home = tmp_path / "home"
    (home / "Library" / "Logs" / "openboot").mkdir(parents=True)
    (home / "Library" / "Logs" / "openboot" / "run.log").write_text("step 3 failed: brew exited 1\n")
    (home / ".zshrc").write_text("export PATH=/opt/homebrew/bin:$PATH\n")
    data = packed(home, ["~/Library/Logs/openboot/*.log", "~/.zshrc", "~/missing.txt"],
                  {"brew": "echo 'git 2.47.0'", "fails": "echo half; exit 3"})
    dest = tmp_path / "record" / "artifacts" / "TestX"
    files, notes = evidence.unpack(io.BytesIO(data), str(dest), MB)
    assert sorted(files) == ["collect/brew.txt", "collect/fails.txt", "home/.zshrc",
                             "home/Library/Logs/openboot/run.log"]
    assert (dest / "home/Library/Logs/openboot/run.log").read_text() == "step 3 failed: brew exited 1\n"
    assert (dest / "collect/brew.txt").read_text() == "git 2.47.0\n"
    assert any("missing.txt: no such file" in n for n in notes)
    assert any("collect fails: exited 3" in n for n in notes)


def test_links_in_the_guest_are_not_followed(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    secret = tmp_path / "host-secret"
    secret.write_text("not for the record")
    os.symlink(str(secret), str(home / "evil.log"))
    files, notes = evidence.unpack(io.BytesIO(packed(home, ["~/*.log"])), str(tmp_path / "dest"), MB)
    assert files == [] and any("not a regular file" in n for n in notes)


def _hostile_tar(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            elif kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = payload
                tar.addfile(info)
            elif kind == "hardlink":
                info.type = tarfile.LNKTYPE
                info.linkname = payload
                tar.addfile(info)
    return buf.getvalue()


def test_a_hostile_stream_cannot_write_outside_the_folder(tmp_path):
    dest = tmp_path / "rec" / "artifacts" / "T"
    data = _hostile_tar([
        ("../../../escaped.txt", "file", b"x"),
        ("/etc/evil", "file", b"x"),
        ("home/ok.txt", "file", b"fine"),
        ("home/link", "symlink", "/etc/passwd"),
        ("home/hard", "hardlink", "/etc/passwd"),
        ("home/dir/../../../../up.txt", "file", b"x"),
        ("home/new\nline\x1b[2J.txt", "file", b"x"),
        ("home/ok.txt", "file", b"second copy must not overwrite"),
    ])
    # A link planted in the record itself must not be followed either.
    dest.mkdir(parents=True)
    os.symlink(str(tmp_path), str(dest / "home"))
    files, notes = evidence.unpack(io.BytesIO(data), str(dest), MB)
    assert files == []
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "ok.txt").exists()
    assert not (tmp_path / "up.txt").exists() and not list(tmp_path.glob("rec/*.txt"))
    os.unlink(str(dest / "home"))
    files, notes = evidence.unpack(io.BytesIO(data), str(dest), MB)
    assert files == ["home/ok.txt"] and (dest / "home/ok.txt").read_bytes() == b"fine"
    assert sum("unsafe name" in n for n in notes) == 4 and sum("not a regular file" in n for n in notes) == 2
    assert any("could not keep home/ok.txt" in n for n in notes)


def test_a_command_that_prints_100_mb_is_cut_and_one_that_hangs_is_stopped(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    started = time.monotonic()
    data = packed(home, commands={"flood": "yes 0123456789abcdef | head -c 100000000",
                                  "hang": "sleep 300 & sleep 300"}, max_bytes=2 * MB, timeout=2.0)
    assert time.monotonic() - started < 30
    assert len(data) < 3 * MB
    files, notes = evidence.unpack(io.BytesIO(data), str(tmp_path / "dest"), 2 * MB)
    assert (tmp_path / "dest/collect/flood.txt").stat().st_size == MB  # its fair share: half, for two commands
    assert any("flood: output cut" in n for n in notes) and any("hang: did not finish within" in n for n in notes)
    # the hung command's whole process group is gone (its background sleep too)
    left = subprocess.run(["pgrep", "-f", "sleep 300"], capture_output=True, text=True).stdout.split()
    assert left == [], "the hung collect command left processes behind"


def test_the_size_cap_holds_over_all_files(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    for i in range(5):
        (home / "big{}.log".format(i)).write_bytes(b"x" * 300_000)
    files, notes = evidence.unpack(io.BytesIO(packed(home, ["~/*.log"], max_bytes=MB)), str(tmp_path / "d"), MB)
    assert len(files) == 3 and sum("over what is left of the size cap" in n for n in notes) == 2


def test_a_full_record_disk_is_a_note_not_an_error(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "a.log").write_bytes(b"y" * 200_000)
    data = packed(home, ["~/a.log"])
    with mounted_tmpfs(tmp_path / "disk", "64k") as disk:
        fill_disk(disk)
        files, notes = evidence.unpack(io.BytesIO(data), str(disk / "artifacts"), MB)
        assert files == [] and any("No space left" in n for n in notes), notes
        assert not (disk / "artifacts" / "home" / "a.log").exists()


def test_a_truncated_stream_keeps_what_arrived(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "a.log").write_text("first\n")
    (home / "b.log").write_bytes(b"z" * 100_000)
    data = packed(home, ["~/a.log", "~/b.log"])
    files, notes = evidence.unpack(io.BytesIO(data[:3000]), str(tmp_path / "d"), MB)
    assert files == ["home/a.log"] and any("ended early" in n for n in notes)


def test_changes_name_exactly_what_a_test_touched(tmp_path):
    home = tmp_path / "home"
    (home / "project" / "src").mkdir(parents=True)  # the synced tree: excluded
    (home / "Library" / "Caches").mkdir(parents=True)
    (home / ".zshrc").write_text("# zsh\n")
    (home / "untouched.txt").write_text("same\n")
    (home / "mode.sh").write_text("#!/bin/sh\n")
    before = evidence.snapshot(str(home), exclude=["project", "project/*"])
    before["probes"] = evidence.probe({"defaults": "cat {}/prefs 2>/dev/null || true".format(home)}, 5, MB)
    (home / ".zshrc").write_text("# zsh\neval \"$(brew shellenv)\"\n")
    (home / ".config" / "openboot").mkdir(parents=True)
    (home / ".config" / "openboot" / "state.json").write_text("{}")
    os.chmod(str(home / "mode.sh"), 0o755)
    (home / "project" / "src" / "built.o").write_text("bin")
    (home / "Library" / "Caches" / "brew.tgz").write_text("cache")
    (home / "prefs").write_text("AppleShowAllFiles = 1\n")
    after = evidence.snapshot(str(home), exclude=["project", "project/*"])
    after["probes"] = evidence.probe({"defaults": "cat {}/prefs 2>/dev/null || true".format(home)}, 5, MB)
    lines = evidence.diff_snapshots(before, after)
    assert lines == [
        "+ .config (dir)",
        "+ .config/openboot (dir)",
        "+ .config/openboot/state.json (file, 2 bytes, mode 644)",
        "M .zshrc (size 6 -> 30)",
        "M mode.sh (mode 644 -> 755)",
        "+ prefs (file, 22 bytes, mode 644)",
        "probe defaults:",
        "  +AppleShowAllFiles = 1",
    ], lines


def test_same_size_content_change_is_seen(tmp_path):
    home = tmp_path / "h"
    home.mkdir()
    (home / "f").write_text("aaaa")
    before = evidence.snapshot(str(home))
    (home / "f").write_text("bbbb")
    assert evidence.diff_snapshots(before, evidence.snapshot(str(home))) == ["M f (content)"]


def test_the_guest_command_line_round_trip(tmp_path):
    """What the host runs in the guest: snapshot, change, snapshot, diff; pack to stdout."""
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), PYTHONPATH=str(REPO))
    run = lambda *a: subprocess.run([sys.executable, "-m", "vmtasks.guest.evidence", *a], env=env,  # noqa: E731
                                    capture_output=True, timeout=60)
    assert run("snapshot", str(home / ".vmtasks/c/1-before.json"), "--probe", "p=echo one").returncode == 0
    (home / "new.txt").write_text("hi")
    assert run("snapshot", str(home / ".vmtasks/c/1-after.json"), "--probe", "p=echo two").returncode == 0
    diff = run("diff", str(home / ".vmtasks/c/1-before.json"), str(home / ".vmtasks/c/1-after.json"))
    assert diff.stdout.decode().splitlines() == ["+ new.txt (file, 2 bytes, mode 644)", "probe p:", "  -one", "  +two"]
    packed_out = run("pack", "--artifact", "~/new.txt", "--command", "who=echo me", "--max-bytes", "1000",
                     "--timeout", "5")
    files, notes = evidence.unpack(io.BytesIO(packed_out.stdout), str(tmp_path / "d"), 1000)
    assert sorted(files) == ["collect/who.txt", "home/new.txt"] and notes == []


@pytest.mark.parametrize("name,expected", [("a/b.txt", "a/b.txt"), ("./a//b", "a/b"), ("../x", None),
                                           ("/abs", None), ("a/../../b", None), ("", None), ("a\x00b", None),
                                           ("a\nb", None)])
def test_safe_relpath(name, expected):
    assert evidence.safe_relpath(name) == expected


class LocalRemote:
    """``remote(command, timeout, on_output=)`` as the VM pipeline's, run by a local shell in
    ``home``: the output arrives as text in pieces, a deadline raises RemoteTimeout."""

    def __init__(self, home: Path, fail_with=None):
        self.home = home
        self.fail_with = fail_with

    def __call__(self, command, timeout, on_output=None):
        from vmtasks.guest.errors import RemoteTimeout

        if self.fail_with is not None:
            raise self.fail_with
        env = dict(os.environ, HOME=str(self.home))
        proc = subprocess.Popen(["/bin/sh", "-c", command], env=env, stdout=subprocess.PIPE, start_new_session=True)
        started = time.monotonic()
        try:
            while True:
                chunk = proc.stdout.read1(7919)
                if not chunk:
                    break
                on_output(chunk.decode("utf-8", "replace"))
                if time.monotonic() - started > timeout:
                    raise RemoteTimeout(command, timeout)
            return proc.wait()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()


def tool_dir(tmp_path: Path) -> str:
    """The guest's tool dir as the bundle lays it out: vmtasks/ importable from there."""
    tool = tmp_path / "tool"
    tool.mkdir()
    os.symlink(str(REPO / "vmtasks"), str(tool / "vmtasks"))
    return str(tool)


def test_fetch_over_a_text_channel_keeps_binary_files_intact(tmp_path):
    home = tmp_path / "home"
    (home / "Library" / "Logs").mkdir(parents=True)
    blob = bytes(range(256)) * 4000
    (home / "Library" / "Logs" / "core.bin").write_bytes(blob)
    command = evidence.pack_command(sys.executable, tool_dir(tmp_path), ["CI=true"], ["~/Library/Logs/*"],
                                    {"who": "echo \"$HOME\"", "quote's": "printf '%s' \"a'b\""}, 10 * MB, 20)
    files, notes = evidence.fetch(LocalRemote(home), command, str(tmp_path / "rec"), 10 * MB, 30)
    assert notes == [], notes
    assert (tmp_path / "rec/home/Library/Logs/core.bin").read_bytes() == blob
    assert (tmp_path / "rec/collect/who.txt").read_text() == str(home) + "\n"
    assert (tmp_path / "rec/collect/quote_s.txt").read_text() == "a'b"


def test_fetch_notes_a_lost_connection_and_a_guest_that_floods(tmp_path):
    from vmtasks.guest.errors import SshError

    home = tmp_path / "home"
    home.mkdir()
    lost = evidence.fetch(LocalRemote(home, SshError("the SSH session broke")), "true", str(tmp_path / "a"), MB, 5)
    assert lost == ([], ["collection stopped: the SSH session broke", "cannot read the evidence: empty file"]) or \
        (lost[0] == [] and lost[1][0] == "collection stopped: the SSH session broke")
    # A guest that ignores the cap and prints 50 MB of "base64": the host keeps at most the cap's worth.
    flood = "yes QUFBQUFBQUFBQUFB | head -c 50000000"
    files, notes = evidence.fetch(LocalRemote(home), flood, str(tmp_path / "b"), MB, 60)
    assert files == [] and any("more than the size cap" in n for n in notes)
