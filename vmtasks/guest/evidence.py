"""The guest's evidence: what a failed test left behind, and what each test changed.

Two halves, both standard library only:

- **In the guest** (Python 3.9, run as ``python3 -m vmtasks.guest.evidence ...`` from the tool
  bundle): ``pack`` writes one tar stream to stdout with the configured artifact files
  (paths and globs, ``~`` allowed) and the output of the configured ``collect`` commands,
  each bounded (total bytes, per-command deadline); ``snapshot`` records the state of the
  home (path, kind, size, mode, a content hash for small files) and the output of the
  configured probe commands; ``diff`` compares two snapshots.
- **On the host**: :func:`unpack` reads that tar stream into the run record. Nothing in it
  is trusted: only regular files are written, each under the destination folder (absolute
  names, ``..``, links, devices and names the file system refuses are skipped with a note),
  never following a link, within a byte budget. A full disk is a note too.

Neither half raises for what the guest sends or holds; problems come back as notes.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import difflib
import fnmatch
import glob
import hashlib
import io
import json
import os
import posixpath
import select
import shlex
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import IO, Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .atomic import write_all
from .errors import VmtasksError

SMALL_FILE = 64 * 1024  # files up to this size are compared by content hash, larger by size+mtime
MAX_ENTRIES = 200000  # a snapshot stops here (and says so): a home is not a file server
NOTES_MEMBER = "NOTES.txt"  # the pack's own notes, read by unpack
MAX_NOTES = 256 * 1024
DEFAULT_EXCLUDES = ("Library/Caches", "Library/Caches/*", ".cache", ".cache/*", "go/pkg/mod", "go/pkg/mod/*",
                    ".vmtasks", ".vmtasks/*", ".Trash", ".Trash/*")


# --- in the guest: changes ------------------------------------------------------------------

def _excluded(rel: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) or rel == p.rstrip("/") for p in patterns)


def _digest(path: str, limit: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(limit + 1))
    return h.hexdigest()[:16]


def snapshot(home: str, exclude: Sequence[str] = (), small: int = SMALL_FILE,
             max_entries: int = MAX_ENTRIES) -> Dict[str, Any]:
    """The state of the tree under ``home``: ``{"files": {relpath: [kind, size, mode, sig]},
    "truncated": bool}``. ``kind`` is ``f`` (file), ``d`` (dir), ``l`` (link, sig = target) or
    ``o`` (other); ``sig`` of a file is a content hash when it is at most ``small`` bytes,
    else its size and mtime. Links are recorded, never followed; an entry that vanishes or
    cannot be read while we walk is recorded as unreadable, never an error."""
    patterns = list(DEFAULT_EXCLUDES) + list(exclude)
    files: Dict[str, List[Any]] = {}
    truncated = False
    for top, dirs, names in os.walk(home, followlinks=False):
        rel_top = os.path.relpath(top, home)
        rel_top = "" if rel_top == "." else rel_top
        kept = []
        for d in sorted(dirs):
            rel = posixpath.join(rel_top, d) if rel_top else d
            if _excluded(rel, patterns):
                continue
            kept.append(d)
        dirs[:] = kept
        for name in sorted(names) + kept:
            if len(files) >= max_entries:
                truncated = True
                break
            rel = posixpath.join(rel_top, name) if rel_top else name
            if _excluded(rel, patterns):
                continue
            path = os.path.join(top, name)
            try:
                st = os.lstat(path)
                mode = stat.S_IMODE(st.st_mode)
                if stat.S_ISLNK(st.st_mode):
                    files[rel] = ["l", 0, mode, os.readlink(path)]
                elif stat.S_ISDIR(st.st_mode):
                    files[rel] = ["d", 0, mode, ""]
                elif stat.S_ISREG(st.st_mode):
                    sig = _digest(path, small) if st.st_size <= small else "mtime:%d" % st.st_mtime_ns
                    files[rel] = ["f", st.st_size, mode, sig]
                else:
                    files[rel] = ["o", 0, mode, ""]
            except OSError as exc:
                files[rel] = ["?", 0, 0, exc.strerror or str(exc)]
        if truncated:
            break
    return {"files": files, "truncated": truncated}


def run_bounded(command: str, timeout: float, max_bytes: int, cwd: Optional[str] = None) -> Tuple[bytes, str]:
    """Run ``command`` in a shell, in its own process group; ``(first max_bytes of its
    stdout+stderr, note)``. A command that runs past ``timeout`` is killed with its whole
    group; one that prints more is cut (and killed once it has printed enough)."""
    try:
        proc = subprocess.Popen(["/bin/sh", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True)
    except OSError as exc:
        return b"", "could not start: {}".format(exc.strerror or exc)
    out = bytearray()
    note = ""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno() if proc.stdout is not None else -1
    os.set_blocking(fd, False)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                note = "did not finish within {:.1f}s: stopped".format(timeout)
                break
            ready, _, _ = select.select([fd], [], [], min(left, 0.2))
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                break
            room = max_bytes - len(out)
            out += chunk[:room]
            if len(chunk) > room:
                note = "output cut at {} bytes".format(max_bytes)
                break
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    if not note and proc.returncode:
        note = "exited {}".format(proc.returncode)
    return bytes(out), note


def probe(probes: Mapping[str, str], timeout: float, max_bytes: int, cwd: Optional[str] = None) -> Dict[str, str]:
    """Each probe command's output (text, bounded), by name."""
    out = {}
    for name, command in probes.items():
        data, note = run_bounded(command, timeout, max_bytes, cwd)
        text = data.decode("utf-8", "replace")
        out[name] = text + ("\n[vmtasks: {}]\n".format(note) if note else "")
    return out


def diff_snapshots(before: Mapping[str, Any], after: Mapping[str, Any]) -> List[str]:
    """What changed under the home, one line each: ``+ path``, ``- path``, ``M path (...)``,
    then each probe's differences (``probe NAME:`` and unified-diff lines)."""
    lines: List[str] = []
    old, new = before.get("files", {}), after.get("files", {})
    for path in sorted(set(old) | set(new)):
        a, b = old.get(path), new.get(path)
        if a == b:
            continue
        if a is None:
            lines.append("+ {} ({})".format(path, _describe(b)))
        elif b is None:
            lines.append("- {} (was {})".format(path, _describe(a)))
        elif a[0] == "d" and b[0] == "d":
            if a[2] != b[2]:
                lines.append("M {} (mode {:o} -> {:o})".format(path, a[2], b[2]))
        else:
            what = []
            if a[0] != b[0]:
                what.append("now " + _describe(b))
            else:
                if a[1] != b[1]:
                    what.append("size {} -> {}".format(a[1], b[1]))
                if a[2] != b[2]:
                    what.append("mode {:o} -> {:o}".format(a[2], b[2]))
                if a[3] != b[3] and a[0] == "l":
                    what.append("target {} -> {}".format(a[3], b[3]))
                elif a[3] != b[3] and a[1] == b[1]:
                    what.append("content")
            lines.append("M {} ({})".format(path, ", ".join(what) or "changed"))
    if before.get("truncated") or after.get("truncated"):
        lines.append("(the home has more than {} entries: only the first were compared)".format(MAX_ENTRIES))
    old_probes, new_probes = before.get("probes", {}), after.get("probes", {})
    for name in sorted(set(old_probes) | set(new_probes)):
        a_text, b_text = old_probes.get(name, ""), new_probes.get(name, "")
        if a_text == b_text:
            continue
        lines.append("probe {}:".format(name))
        for line in difflib.unified_diff(a_text.splitlines(), b_text.splitlines(), lineterm="", n=0):
            if line.startswith(("---", "+++", "@@")):
                continue
            lines.append("  " + line)
    return lines


def _describe(entry: Sequence[Any]) -> str:
    kind = {"f": "file", "d": "dir", "l": "link", "o": "other", "?": "unreadable"}.get(entry[0], entry[0])
    if entry[0] == "f":
        return "file, {} bytes, mode {:o}".format(entry[1], entry[2])
    if entry[0] == "l":
        return "link -> {}".format(entry[3])
    return kind


# --- in the guest: artifacts ------------------------------------------------------------------

def _expand(pattern: str, home: str) -> List[str]:
    if pattern.startswith("~/") or pattern == "~":
        pattern = home + pattern[1:]
    elif not pattern.startswith("/"):
        pattern = os.path.join(home, pattern)
    return sorted(glob.glob(pattern, recursive=True))


def _arcname(path: str, home: str) -> str:
    """Where a guest file goes in the record: relative to the home, else under ``root/``."""
    real = os.path.normpath(path)
    if real == home or real.startswith(home.rstrip("/") + "/"):
        return "home/" + os.path.relpath(real, home)
    return "root/" + real.lstrip("/")


def pack(artifacts: Sequence[str], commands: Mapping[str, str], out: IO[bytes], *, home: str,
         max_bytes: int, timeout: float) -> None:
    """Write a tar stream of the artifact files, then the command outputs, to ``out``: at
    most ``max_bytes`` of content in all (what did not fit is named in ``NOTES.txt``), the
    files first (they are what a failure left), the commands within ``timeout`` seconds
    together, each given a fair share of what is left. Links are not followed (a link is
    noted, not packed)."""
    notes: List[str] = []
    budget = max_bytes
    deadline = time.monotonic() + timeout
    tar = tarfile.open(fileobj=out, mode="w|")
    try:
        seen = set()
        for pattern in artifacts:
            matches = _expand(pattern, home)
            if not matches:
                notes.append("artifact {}: no such file".format(pattern))
            for path in matches:
                if path in seen:
                    continue
                seen.add(path)
                try:
                    st = os.lstat(path)
                except OSError as exc:
                    notes.append("artifact {}: {}".format(path, exc.strerror or exc))
                    continue
                if stat.S_ISDIR(st.st_mode):
                    notes.append("artifact {}: a directory (name files or use a glob such as {}/**/*)".format(
                        path, path))
                    continue
                if not stat.S_ISREG(st.st_mode):
                    notes.append("artifact {}: not a regular file (a link or device): not copied".format(path))
                    continue
                if st.st_size > budget:
                    notes.append("artifact {}: {} bytes, over what is left of the size cap ({} bytes): "
                                 "not copied".format(path, st.st_size, max(0, budget)))
                    continue
                try:
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
                    with os.fdopen(fd, "rb") as fh:
                        data = fh.read(budget + 1)
                except OSError as exc:
                    notes.append("artifact {}: {}".format(path, exc.strerror or exc))
                    continue
                data = data[:budget]
                budget -= len(data)
                _add(tar, _arcname(path, home), data)
        names = list(commands)
        for i, name in enumerate(names):
            left = deadline - time.monotonic()
            if left <= 0:
                notes.append("collect {}: not run, the collection's {:g}s were used up".format(name, timeout))
                continue
            # A fair share of the time and bytes left: one hung or flooding command cannot
            # starve the others.
            share = len(names) - i
            data, note = run_bounded(commands[name], left / share, max(0, budget) // share, cwd=home)
            budget -= len(data)
            _add(tar, "collect/" + safe_part(name) + ".txt", data)
            if note:
                notes.append("collect {}: {}".format(name, note))
        _add(tar, NOTES_MEMBER, "".join(n + "\n" for n in notes).encode("utf-8", "replace"))
    finally:
        tar.close()


def safe_part(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80].lstrip(".")
    return cleaned or "unnamed"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


# --- on the host ---------------------------------------------------------------------------

def safe_relpath(name: str) -> Optional[str]:
    """``name`` from a tar as a relative path with no ``..``, no empty or absolute part and
    no control characters, or None when it cannot be one."""
    if not name or "\x00" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        return None
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts) or name.startswith("/"):
        return None
    return "/".join(parts)


def unpack(stream: IO[bytes], dest: str, max_bytes: int) -> Tuple[List[str], List[str]]:
    """Read a ``pack`` tar stream into ``dest``: ``(files written, relative to dest; notes)``.

    Never raises for the stream's content or the disk: a hostile name, a link, a member past
    the byte budget, a truncated stream or a full disk each become a note, and what was
    written stays. Files are created new (``O_EXCL | O_NOFOLLOW``) under ``dest`` only."""
    written: List[str] = []
    notes: List[str] = []
    budget = max_bytes
    try:
        os.makedirs(dest, exist_ok=True)
        tar = tarfile.open(fileobj=stream, mode="r|")
    except (OSError, tarfile.TarError) as exc:
        return written, ["cannot read the evidence: {}".format(exc)]
    try:
        for member in tar:
            rel = safe_relpath(member.name)
            if rel is None:
                notes.append("skipped a member with an unsafe name: {!r}".format(member.name[:200]))
                continue
            if not member.isreg():
                notes.append("skipped {}: not a regular file".format(rel))
                continue
            if rel == NOTES_MEMBER and member.size <= MAX_NOTES:  # the pack's own notes: not evidence
                source = tar.extractfile(member)
                text = source.read(member.size).decode("utf-8", "replace") if source is not None else ""
                notes += [line for line in text.splitlines() if line]
                continue
            if member.size > budget:
                notes.append("skipped {}: {} bytes, over the size cap".format(rel, member.size))
                continue
            source = tar.extractfile(member)
            data = source.read(member.size) if source is not None else b""
            budget -= len(data)
            problem = _write_new(dest, rel, data)
            if problem:
                notes.append("could not keep {}: {}".format(rel, problem))
            else:
                written.append(rel)
    except (tarfile.TarError, OSError, EOFError) as exc:
        notes.append("the evidence stream ended early: {}".format(exc))
    finally:
        try:
            tar.close()
        except (tarfile.TarError, OSError):
            pass
    return written, notes


def _write_new(dest: str, rel: str, data: bytes) -> str:
    """Write ``data`` to ``dest/rel`` without following any link on the way; "" or why not."""
    parts = rel.split("/")
    try:
        dir_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        for part in parts[:-1]:
            try:
                os.mkdir(part, 0o755, dir_fd=dir_fd)
            except FileExistsError:
                pass
            next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = next_fd
        fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd)
        try:
            write_all(fd, data)
        except OSError:
            os.close(fd)
            try:
                os.unlink(parts[-1], dir_fd=dir_fd)
            except OSError:
                pass
            raise
        os.close(fd)
        return ""
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        os.close(dir_fd)


class _Base64Writer(io.RawIOBase):
    """A write-only stream that passes base64 text on (76-character lines), 57 bytes a line."""

    def __init__(self, sink: IO[bytes]) -> None:
        super().__init__()
        self.sink = sink
        self.pending = b""

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.pending += bytes(data)
        whole = len(self.pending) - len(self.pending) % 57
        if whole:
            self.sink.write(base64.encodebytes(self.pending[:whole]))
            self.pending = self.pending[whole:]
        return len(data)

    def flush(self) -> None:
        if self.pending and not self.closed:
            self.sink.write(base64.encodebytes(self.pending))
            self.pending = b""
        self.sink.flush()


# --- on the host: over SSH ---------------------------------------------------------------------

def guest_command(python: str, tool_dir: str, env_words: Sequence[str], words: Sequence[str]) -> str:
    """The guest command line ``python3 -m vmtasks.guest.evidence WORDS...`` from the tool bundle.
    ``tool_dir``: a shell expression (``"$HOME"/.vmtasks/tool``) and ``env_words`` already
    quoted; every one of ``words`` is quoted here."""
    return " ".join(["env"] + list(env_words) + ["PYTHONPATH=" + tool_dir, shlex.quote(python), "-m",
                                                 "vmtasks.guest.evidence"] + [shlex.quote(w) for w in words])


def pack_command(python: str, tool_dir: str, env_words: Sequence[str], artifacts: Sequence[str],
                 commands: Mapping[str, str], max_bytes: int, timeout: float) -> str:
    """The guest command line that prints the evidence as base64 text (see :func:`guest_command`)."""
    words = ["pack", "--base64", "--max-bytes", str(int(max_bytes)), "--timeout", "{:g}".format(timeout)]
    words += ["--artifact=" + pattern for pattern in artifacts]
    words += ["--command={}={}".format(name, command) for name, command in commands.items()]
    return guest_command(python, tool_dir, env_words, words)


def fetch(remote: Callable[..., Any], command: str, dest: str, max_bytes: int,
          timeout: float) -> Tuple[List[str], List[str]]:
    """Run ``command`` (from :func:`pack_command`) through ``remote(command, timeout,
    on_output=...)`` and unpack what it prints into ``dest``; ``(files, notes)``. Never
    raises for the guest, the connection or the disk: each is a note. Memory stays bounded:
    the text goes to a temporary file, then is decoded and unpacked from disk."""

    notes: List[str] = []
    limit = max_bytes * 4 // 3 + 64 * 1024 + MAX_NOTES * 2  # base64 of the cap, the tar headers, the notes
    with tempfile.TemporaryFile("w+b") as text, tempfile.TemporaryFile("w+b") as raw:
        received = [0]

        def on_output(chunk: str) -> None:
            received[0] += len(chunk)
            if received[0] <= limit:
                text.write(chunk.encode("ascii", "replace"))

        try:
            result = remote(command, timeout, on_output=on_output)
            code = getattr(result, "exit_code", result)
            if code not in (0, None):
                notes.append("the guest's collection exited {}".format(code))
        except VmtasksError as exc:
            notes.append("collection stopped: {}".format(exc.message))
        if received[0] > limit:
            notes.append("the guest sent more than the size cap allows: the rest was dropped")
        text.seek(0)
        try:
            base64.decode(text, raw)
        except (ValueError, binascii.Error) as exc:
            notes.append("the evidence did not decode: {}".format(exc))
        raw.seek(0)
        files, more = unpack(raw, dest, max_bytes)
    return files, notes + more


# --- the guest's command line ------------------------------------------------------------------

def _pairs(items: Iterable[str]) -> Dict[str, str]:
    out = {}
    for item in items:
        name, _, command = item.partition("=")
        out[name] = command
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m vmtasks.guest.evidence")
    sub = parser.add_subparsers(dest="what", required=True)
    p_pack = sub.add_parser("pack", help="tar of artifacts and command outputs to stdout")
    p_pack.add_argument("--artifact", action="append", default=[])
    p_pack.add_argument("--command", action="append", default=[], help="NAME=COMMAND")
    p_pack.add_argument("--max-bytes", type=int, required=True)
    p_pack.add_argument("--timeout", type=float, required=True)
    p_pack.add_argument("--base64", action="store_true", help="the tar as base64 text (an SSH channel read as text)")
    p_snap = sub.add_parser("snapshot", help="record the home's state (and probes) as JSON in a file")
    p_snap.add_argument("out")
    p_snap.add_argument("--exclude", action="append", default=[])
    p_snap.add_argument("--probe", action="append", default=[], help="NAME=COMMAND")
    p_snap.add_argument("--timeout", type=float, default=30.0)
    p_diff = sub.add_parser("diff", help="print what changed between two snapshots")
    p_diff.add_argument("before")
    p_diff.add_argument("after")
    args = parser.parse_args(argv)
    home = os.path.expanduser("~")
    if args.what == "pack":
        sink: Any = _Base64Writer(sys.stdout.buffer) if args.base64 else sys.stdout.buffer
        pack(args.artifact, _pairs(args.command), sink, home=home, max_bytes=args.max_bytes, timeout=args.timeout)
        sink.flush()
        return 0
    if args.what == "snapshot":
        state = snapshot(home, args.exclude)
        state["probes"] = probe(_pairs(args.probe), args.timeout, 1024 * 1024, cwd=home)
        tmp = args.out + ".tmp"
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(state, fh)
        os.replace(tmp, args.out)
        return 0
    with open(args.before, encoding="utf-8") as fh:
        before = json.load(fh)
    with open(args.after, encoding="utf-8") as fh:
        after = json.load(fh)
    for line in diff_snapshots(before, after):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
