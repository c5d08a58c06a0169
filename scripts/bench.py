#!/usr/bin/env python3
"""Benchmark `invoke test-vm` against the floor: the same work done by hand with no tool.

usage: python3 scripts/bench.py [--runs N] [--trees 1k,10k,50k,10mb,200mb|none] [--out DIR] [--tmp DIR]
                               [--big-output MB,MB,...] [--big-line BYTES]

Runs against the Linux stand-in `tart` (scripts/tart, first on PATH) with no artificial
delays: every TART_STANDIN_* knob is removed from the environment but one,
TART_STANDIN_AGENT_DELAY=0 (the stand-in's guest agent otherwise answers `tart exec` 10 s after
a cold boot, as Tart's does: both the tool and the floor would wait it), and so is
PYTHONDONTWRITEBYTECODE (Python runs with its byte-code cache, as installed). Needs root.
Everything it creates (TART_HOME, VMs, trees, keys, run records) lives in one temporary
directory under /dev/shm/bench when it can (see in_memory; else /tmp/bench; --tmp to choose),
removed at the end, on failure and on Ctrl-C/SIGTERM/SIGHUP too.

Per tree (a copy of examples/gosuite plus filler files), N pairs of runs, the order
alternating, the tree read into the page cache before each:

* vmtasks: `python3 -m invoke -r <repo> test-vm --config <generated config>`, timed from
  spawn to exit; its stages come from the run record (stages.json); "start-up" is spawn to
  the first recorded stage, "exit" the end of teardown to process exit.
* floor: `tart clone`; `tart run` in the background, `tart ip` and the SSH banner polled
  every 20 ms; one `tart exec` (the key script vmtasks runs); one plain `rsync -a` of the
  tree with the same ssh options (StrictHostKeyChecking=accept-new instead of a pinned
  key); one `ssh` running vmtasks' own in-VM command line (vm.inner_command); `tart stop`;
  `tart delete`.
* then, in one VM, N alternating pairs of the sync stage alone (VmPipeline._sync) and a plain
  `rsync -a` with the same ssh options (the same pinned known_hosts), fresh directories.

Both clone the same base image, prepared once, not timed: Invoke copied into the guest
user's site-packages (so the example's setup step is a no-op), Go's build cache warmed
with the example suite, and, used by the floor only, the vmtasks tool bundle
(vm.tool_bundle, what the setup stage unpacks every run) unpacked at ~/.vmtasks/tool.
Also timed: `python3 -c pass`, `invoke --list`, `invoke test-vm --dry-run`.

Every `invoke test-vm` row also has the process's peak memory: VmHWM of the invoke process
itself (read from /proc every 50 ms while it runs) and ru_maxrss and CPU seconds from wait4.

* prepared images: when the tree has `invoke vm-prepare` (`invoke --list`), each tree also
  gets `invoke vm-prepare` (once, timed apart) and a third kind of run, "prepared"
  (`invoke test-vm`, cloning that image); the plain runs then pass `--no-prepared`.
* --big-output 0,50,200 (issue 10 #17): a generated one-test suite whose test prints that
  many MB to stdout (lines of --big-line bytes), N runs per size through `invoke test-vm`:
  wall time, suite stage, bytes streamed (the record's suite-output.txt), peak memory.
Results: .vmtasks/bench/<stamp>.{json,md} and latest.{json,md}; the table is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
EXAMPLE = REPO / "examples" / "gosuite"
BASE = "tahoe-base"
FLOOR_POLL = 0.02

sys.path.insert(0, str(REPO))

# name -> (filler files, bytes per filler file)
TREES = {
    "1k": (1000, 1024),
    "10k": (10000, 1024),
    "50k": (50000, 1024),
    "10mb": (100, 100 * 1024),
    "200mb": (200, 1024 * 1024),
}
TREE_LABELS = {"1k": "1 000 files", "10k": "10 000 files", "50k": "50 000 files",
               "10mb": "10 MB", "200mb": "200 MB"}


# The large-output suite (issue 10 #17), generated: one test printing BIG_MB MB to stdout in
# lines of BIG_LINE bytes, as a chatty e2e test or a dumped log would.
BIG_GUEST_DIR = "/Users/admin/bigout"
BIG_LINE = 1000
BIG_GO = """//go:build e2e && vm

package e2e

import (
	"bufio"
	"os"
	"strconv"
	"strings"
	"testing"
)

func TestBigOutput(t *testing.T) {
	if os.Getenv("OPENBOOT_IN_VM") != "1" {
		t.Skip("destructive: set OPENBOOT_IN_VM=1 only inside a throwaway VM")
	}
	mb, _ := strconv.Atoi(os.Getenv("BIG_MB"))
	size, _ := strconv.Atoi(os.Getenv("BIG_LINE"))
	if size < 2 {
		size = 1000
	}
	line := strings.Repeat("x", size-1) + "\\n"
	w := bufio.NewWriterSize(os.Stdout, 1<<16)
	for n := 0; n < mb*1000000/size; n++ {
		w.WriteString(line)
	}
	w.Flush()
}
"""


def has_prepared_images() -> bool:
    """Whether this tree has prepared images (`invoke vm-prepare` in `invoke --list`)."""
    done = subprocess.run([sys.executable, "-m", "invoke", "-r", str(REPO), "--list"], capture_output=True,
                          text=True, timeout=60)
    return "vm-prepare" in done.stdout


def prepared_images() -> str:
    if has_prepared_images():
        return "present: `invoke vm-prepare` once per tree, then the \"prepared\" column"
    return "absent (no vm-prepare task in `invoke --list`): no \"prepared\" column"


class Abort(Exception):
    pass


class Interrupted(BaseException):
    pass


def in_memory(path: str, need: int) -> bool:
    """True when ``path`` is a tmpfs with ``need`` bytes free. The benchmark measures the
    tool, not the disk: on a small VM's disk (ext4, discard) writing 50 000 files into a
    guest took 2 to 20 s from one run to the next, in memory 1.4 s every time."""
    try:
        with open("/proc/mounts") as fh:
            mounts = [line.split() for line in fh]
        fs = max((m for m in mounts if path == m[1] or path.startswith(m[1].rstrip("/") + "/")),
                 key=lambda m: len(m[1]))
        st = os.statvfs(path)
        return fs[2] == "tmpfs" and st.f_bavail * st.f_frsize >= need
    except (OSError, ValueError, IndexError):
        return False


def vm_hwm_kb(pid: int) -> int:
    """The peak resident set (VmHWM, kB) of a live process; 0 once it is gone."""
    try:
        with open("/proc/{}/status".format(pid)) as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def machine():
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(argv):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (done.stdout or done.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"

    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
            "os": platform.platform(), "python": sys.version.split()[0],
            "rsync": version(["rsync", "--version"]), "ssh": version(["ssh", "-V"])}


class Bench:
    def __init__(self, opts) -> None:
        self.opts = opts
        self.root = Path(tempfile.mkdtemp(prefix="vmtasks-bench-", dir=opts.tmp))
        self.cwd = self.root / "cwd"
        self.cwd.mkdir()
        (self.root / "home").mkdir()
        self.env = {k: v for k, v in os.environ.items()
                    if not (k.startswith("TART_STANDIN_") or k.startswith("OPENBOOT_") or k == "SSH_AUTH_SOCK"
                            or k == "PYTHONDONTWRITEBYTECODE")}  # as installed: byte-code cached
        self.env["TART_STANDIN_AGENT_DELAY"] = "0"  # no artificial delay (see the module docstring)
        # `python3` for the stand-in (#!/usr/bin/env python3) is this interpreter itself, not a
        # version manager's shim (pyenv's bash shim costs ~70 ms per `tart` call; real tart is
        # a native binary): both sides call tart, vmtasks a few times more.
        bin_dir = self.root / "bin"
        bin_dir.mkdir()
        (bin_dir / "python3").symlink_to(sys.executable)
        self.env.update(TART_HOME=str(self.root / "tart"), HOME=str(self.root / "home"),
                        VMTASKS_STATE_DIR=str(self.root / "state"), CI="true",
                        PATH=os.pathsep.join([str(SCRIPTS), str(bin_dir), os.environ.get("PATH", "")]))
        self.children = []  # Popen objects to stop on the way out
        self.up = {}  # VM name -> its `tart run`, for VMs the floor brought up
        self.invokes = []  # the `invoke test-vm` processes among the children
        self.floor_key = None

    # -- helpers ------------------------------------------------------------
    def tart(self, *args, check=True, timeout=120, input=None):
        done = subprocess.run(["tart", *args], env=self.env, capture_output=True, timeout=timeout,
                              input=input, stdin=None if input is not None else subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise Abort("tart {} exited {}: {}".format(" ".join(args), done.returncode,
                                                       done.stderr.decode(errors="replace").strip()[-500:]))
        return done

    def spawn(self, argv, env=None, **kwargs):
        proc = subprocess.Popen(argv, env=self.env if env is None else env, **kwargs)
        self.children.append(proc)
        return proc

    def reap(self, proc):
        if proc in self.children:
            self.children.remove(proc)
        if proc in self.invokes:
            self.invokes.remove(proc)

    def log(self, text):
        print(text, file=sys.stderr, flush=True)

    # -- one-time preparation (not timed) -----------------------------------
    def prepare_base(self, cfg, suites=None, guest_script: str = "", files=()) -> None:
        """The base image, once, untimed. ``suites``: (host tree, guest dir) pairs whose Go
        build cache is warmed (default: the example suite at ``cfg.guest.dir``);
        ``guest_script``: a shell script run in it last (in the guest user's home);
        ``files``: (guest dir, tar bytes) pairs unpacked in it, for a floor's own use."""
        from vmtasks.lifecycle.vm import tool_bundle

        self.tart("create", BASE, timeout=300)
        run = self.spawn(["tart", "run", "--no-graphics", BASE], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while self.tart("exec", BASE, "true", check=False).returncode != 0:
                if time.monotonic() > deadline or run.poll() is not None:
                    raise Abort("the base image's guest did not come up")
                time.sleep(FLOOR_POLL)
            # Invoke, copied from this host (no network), byte-compiled as pip would.
            import invoke

            site = self.tart("exec", BASE, "python3", "-c", "import site; print(site.getusersitepackages())"
                             ).stdout.decode().strip()
            self.guest_untar(site, self.tar_of(Path(invoke.__file__).parent, "invoke"))
            self.tart("exec", BASE, "python3", "-m", "compileall", "-q", site + "/invoke")
            self.tart("exec", BASE, "python3", "-c", "import invoke")
            # Go's build cache, warmed at the suite's own path, which is then removed.
            for local, guest_dir in suites or [(EXAMPLE, cfg.guest.dir)]:
                self.guest_untar(guest_dir, self.tar_of(Path(local), "."))
                warm = "cd {0} && go test -count=1 -run '^$' -tags=e2e,vm ./test/e2e/... && cd / && rm -rf {0}".format(
                    shlex.quote(guest_dir))
                self.tart("exec", BASE, "sh", "-c", warm, timeout=300)
            # For the floor: the tool bundle the setup stage would unpack.
            self.guest_untar("/Users/admin/" + cfg.guest.tool_dir, tool_bundle(cfg), gz=True)
            for dest, data in files:
                self.guest_untar(dest, data)
            if guest_script:
                self.tart("exec", BASE, "sh", "-c", guest_script)
        finally:
            self.tart("stop", BASE, check=False)
            run.wait(timeout=60)
            self.reap(run)

    @staticmethod
    def tar_of(path: Path, arcname: str) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(str(path), arcname=arcname,
                    filter=lambda info: None if "__pycache__" in info.name else info)
        return buf.getvalue()

    def guest_untar(self, dest: str, data: bytes, gz: bool = False) -> None:
        script = 'mkdir -p "$1" && tar -x{}f - -C "$1"'.format("z" if gz else "")
        self.tart("exec", "-i", BASE, "sh", "-c", script, "untar", dest, input=data)

    def make_tree(self, name: str) -> Path:
        count, size = TREES[name]
        tree = self.root / "trees" / name
        shutil.copytree(str(EXAMPLE), str(tree))
        rng = random.Random(name)
        existing = sum(len(files) for _, _, files in os.walk(tree))
        if size <= 4096:  # a file-count tree: N files in total, the example's included
            count -= existing
        filler = tree / "filler"
        for i in range(count):
            sub = filler / "d{:04d}".format(i // 100)
            if i % 100 == 0:
                sub.mkdir(parents=True)
            (sub / "f{:05d}.dat".format(i)).write_bytes(rng.randbytes(size))
        return tree

    def big_tree(self) -> Path:
        """The generated large-output suite (made once)."""
        tree = self.root / "trees" / "bigout"
        if not tree.is_dir():
            (tree / "test" / "e2e").mkdir(parents=True)
            (tree / "go.mod").write_text("module example.com/bigout\n\ngo 1.19\n")
            (tree / "test" / "e2e" / "big_test.go").write_text(BIG_GO)
        return tree

    def write_config(self, name: str, tree: Path) -> Path:
        import yaml

        data = yaml.safe_load((EXAMPLE / "vm.yaml").read_text())
        data["project_dir"] = str(tree)
        path = self.root / "config-{}.yaml".format(name)
        path.write_text(yaml.safe_dump(data))
        return path

    @staticmethod
    def warm(tree: Path) -> None:
        """Read the tree so it is in the page cache, as a tree one just edited is (this host
        reclaims idle page cache within seconds: 50 000 cold small files read at ~3k/s)."""
        for top, _, names in os.walk(tree):
            for n in names:
                with open(os.path.join(top, n), "rb") as fh:
                    while fh.read(1 << 20):
                        pass
        os.sync()  # and no earlier run's dirty pages are written back inside this one

    @staticmethod
    def tree_stats(tree: Path):
        files = size = 0
        for top, _, names in os.walk(tree):
            for n in names:
                files += 1
                size += os.lstat(os.path.join(top, n)).st_size
        return files, size

    # -- measurements -------------------------------------------------------
    def run_vmtasks(self, cfg_path: Path, extra=(), env=None):
        """One `invoke test-vm` from spawn to exit. Returns its row: total, start-up, each
        stage (summed over VMs), exit, and the process's peak RSS (``peak_rss_mb``: VmHWM of
        the invoke process itself, sampled every 50 ms until it exits; ``maxrss_mb``: the
        kernel's ru_maxrss from wait4, the largest of it and the children it waited for).
        The run record's directory is ``row["record"]`` (removed by the caller or cleanup)."""
        argv = [sys.executable, "-m", "invoke", "-r", str(REPO), "test-vm", "--config", str(cfg_path), *extra]
        log_path = self.root / "invoke-output.txt"
        started_wall, started = time.time(), time.monotonic()
        with open(str(log_path), "wb") as log:
            proc = self.spawn(argv, cwd=str(self.cwd), stdin=subprocess.DEVNULL, stdout=log,
                              stderr=subprocess.STDOUT, env=env)
        self.invokes.append(proc)
        hwm = 0
        deadline = started + 900
        status = rusage = None
        while True:
            hwm = max(hwm, vm_hwm_kb(proc.pid))
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if time.monotonic() > deadline:
                raise Abort("invoke test-vm still running after 900 s")
            time.sleep(0.05)
        total = time.monotonic() - started
        ended_wall = time.time()
        proc.returncode = os.waitstatus_to_exitcode(status)
        self.reap(proc)
        if proc.returncode != 0:
            raise Abort("invoke test-vm exited {}:\n{}".format(
                proc.returncode, log_path.read_bytes().decode(errors="replace")[-3000:]))
        record = self.latest_record(cfg_path)
        stages = json.loads((record / "stages.json").read_text())
        first = min(s["started"] for s in stages)
        last = max(s["started"] + s["seconds"] for s in stages)
        row = {"total": total, "start-up": first - started_wall, "exit": ended_wall - last,
               "peak_rss_mb": hwm / 1024, "maxrss_mb": rusage.ru_maxrss / 1024,
               "cpu_s": rusage.ru_utime + rusage.ru_stime,
               "spawned": started_wall, "ended": ended_wall, "record": str(record)}
        for s in stages:
            row[s["stage"]] = row.get(s["stage"], 0.0) + s["seconds"]
        # One VM: the stages follow each other, so what they do not cover is the tool's own.
        row["between stages"] = (last - first) - sum(s["seconds"] for s in stages)
        return row

    def vm_prepare(self, cfg_path: Path) -> None:
        """`invoke vm-prepare` for this config: the prepared image the "prepared" runs clone."""
        argv = [sys.executable, "-m", "invoke", "-r", str(REPO), "vm-prepare", "--config", str(cfg_path)]
        done = subprocess.run(argv, env=self.env, cwd=str(self.cwd), capture_output=True, stdin=subprocess.DEVNULL,
                              timeout=900)
        if done.returncode != 0:
            raise Abort("invoke vm-prepare exited {}:\n{}".format(
                done.returncode, (done.stdout + done.stderr).decode(errors="replace")[-3000:]))

    def latest_record(self, cfg_path: Path) -> Path:
        """The run record the last run of ``cfg_path`` wrote (records.dir, beside the config)."""
        from vmtasks.guest import config as config_mod

        cfg = config_mod.load(cfg_path, self.env, {}, self.cwd)
        return (Path(cfg.records.dir) / "latest").resolve()

    def bring_up(self, vm: str, key, lap, image: str = BASE):
        """The floor's way up: clone ``image``, `tart run` in the background (a clone of a
        suspended image resumes), `tart ip` and the SSH banner polled every 20 ms, one `tart
        exec` with the key script. Returns (Popen, ip)."""
        from vmtasks.backends.tart.machine import KEY_SCRIPT
        from vmtasks.transport.ssh import sshd_banner

        self.tart("clone", image, vm)
        lap("clone")
        run = self.spawn(["tart", "run", "--no-graphics", vm], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.up[vm] = run
        deadline = time.monotonic() + 60
        while True:
            done = self.tart("ip", vm, check=False)
            if done.returncode == 0 and done.stdout.strip():
                ip = done.stdout.decode().split()[0]
                break
            if run.poll() is not None or time.monotonic() > deadline:
                raise Abort("floor: {} got no IP".format(vm))
            time.sleep(FLOOR_POLL)
        lap("boot")
        while not sshd_banner(ip, timeout=0.5):
            if time.monotonic() > deadline:
                raise Abort("floor: sshd of {} never answered".format(vm))
            time.sleep(FLOOR_POLL)
        lap("ip+ssh")
        while self.tart("exec", vm, "sh", "-c", KEY_SCRIPT, "vmtasks-key", key.public_line,
                        check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise Abort("floor: tart exec into {} never worked".format(vm))
            time.sleep(FLOOR_POLL)
        lap("key")
        return run, ip

    def take_down(self, vm: str, check: bool = True) -> None:
        """`tart stop`, wait for `tart run` to end, `tart delete` (also on the way out)."""
        run = self.up.pop(vm, None)
        if run is None:
            return
        try:
            self.tart("stop", vm, check=check)
            try:
                run.wait(timeout=60)
            except subprocess.TimeoutExpired:
                run.kill()
                run.wait()
            self.tart("delete", vm, check=check)
        finally:
            self.reap(run)

    @contextlib.contextmanager
    def floor_vm(self, vm: str, row: dict, image: str = BASE):
        """One fresh VM the floor's way, each phase timed into ``row`` (clone, boot, ip+ssh, key:
        bring_up's laps): yields (ip, ssh options, lap) for the caller's own phases; then the
        timed teardown and ``row["total"]``. The VM is removed however the body ends."""
        from vmtasks.transport.ssh import ssh_options

        known_hosts = self.root / "floor-known_hosts"
        known_hosts.write_text("")
        key = dataclasses.replace(self.floor_key, known_hosts=known_hosts)
        opts = ["StrictHostKeyChecking=accept-new" if o == "StrictHostKeyChecking=yes" else o for o in ssh_options(key)]
        started = t = time.monotonic()

        def lap(name):
            nonlocal t
            now = time.monotonic()
            row[name] = now - t
            t = now

        try:
            _, ip = self.bring_up(vm, key, lap, image=image)
            yield ip, opts, lap
            self.take_down(vm)
            lap("teardown")
        finally:
            self.take_down(vm, check=False)
        row["total"] = time.monotonic() - started

    def run_floor(self, tree: Path, cfg, n: int):
        from vmtasks.lifecycle.vm import inner_command

        login = "{}@".format(cfg.vm.user)
        row = {}
        with self.floor_vm("bench-floor-{}".format(n), row) as (ip, opts, lap):
            remote_shell = " ".join(shlex.quote(a) for a in ["ssh", *opts])
            done = subprocess.run(["rsync", "-a", "-e", remote_shell, str(tree) + "/",
                                   "{}{}:{}/".format(login, ip, cfg.guest.dir)],
                                  capture_output=True, stdin=subprocess.DEVNULL, timeout=600)
            if done.returncode != 0:
                raise Abort("floor: rsync exited {}: {}".format(done.returncode, done.stderr.decode()[-500:]))
            lap("sync")
            done = subprocess.run(["ssh", *opts, login + ip, inner_command(cfg, None, True)],
                                  capture_output=True, stdin=subprocess.DEVNULL, timeout=600)
            if done.returncode != 0 or b'"Action":"pass"' not in done.stdout:
                raise Abort("floor: the in-VM suite exited {}: {}".format(
                    done.returncode, (done.stdout + done.stderr).decode(errors="replace")[-1500:]))
            lap("suite")
        return row

    def sync_alone(self, tree: Path, cfg, runs: int):
        """The sync stage alone (VmPipeline._sync: its `mkdir -p` over the run's SSH
        connection, then rsync) against one plain `rsync -a` with the same ssh options (the
        same pinned known_hosts), alternating, into fresh directories of one VM. The stage
        runs in a real pipeline with a real Run's services (factory.Parts, a quiet Reporter), on a VM the
        floor's way brought up; its record is never created, so nothing is logged."""
        from vmtasks.lifecycle.run import Run, RunRequest
        from vmtasks.lifecycle.vm import VmPipeline
        from vmtasks.settings import factory
        from vmtasks.transport import ssh
        from vmtasks.ui.report import Reporter

        vm = "bench-sync"
        key = ssh.generate_key(self.root / "sync-key-{}".format(time.monotonic_ns()), "bench-sync")
        rows = {"sync stage": [], "plain rsync": []}
        conn = None
        devnull = open(os.devnull, "w")
        try:
            _, ip = self.bring_up(vm, key, lambda name: None)
            parts = factory.Parts(cfg, Reporter(quiet=True, stderr=devnull, stdout=devnull, env={"CI": "true"}),
                                  environ=self.env)
            run = Run(parts, RunRequest(), run_id="bench-sync")
            machine = parts.backend.machine(vm, parts.owner(run.run_id), cfg)
            machine.ip = ip  # what its boot stage would have found
            pipeline = VmPipeline(run.services(), vm, machine, image=cfg.vm.base)
            conn = ssh.open_when_ready(machine.open_socket, ip, cfg.vm.user, key, time.monotonic() + 30, 0.05)
            ssh.remote_exec(conn, "true", timeout=30)  # in a run, setup has used the connection already
            pipeline.ctx.key, pipeline.ctx.conn = key, conn
            remote_shell = " ".join(shlex.quote(a) for a in ["ssh", *ssh.ssh_options(key)])
            for i in range(runs):
                order = ("sync stage", "plain rsync") if i % 2 == 0 else ("plain rsync", "sync stage")
                for kind in order:
                    dest = "{}-{}-{}".format(cfg.guest.dir, "stage" if kind == "sync stage" else "plain", i)
                    self.warm(tree)
                    t = time.monotonic()
                    if kind == "sync stage":
                        pipeline.cfg = dataclasses.replace(cfg, guest=dataclasses.replace(cfg.guest, dir=dest))
                        pipeline.ctx.deadline = time.monotonic() + 600
                        pipeline._sync(pipeline.ctx)
                    else:
                        done = subprocess.run(["rsync", "-a", "-e", remote_shell, str(tree) + "/",
                                               "{}@{}:{}/".format(cfg.vm.user, ip, dest)],
                                              capture_output=True, stdin=subprocess.DEVNULL, timeout=600)
                        if done.returncode != 0:
                            raise Abort("plain rsync exited {}: {}".format(
                                done.returncode, done.stderr.decode()[-500:]))
                    rows[kind].append(time.monotonic() - t)
                    ssh.remote_exec(conn, "rm -rf " + shlex.quote(dest), timeout=600)  # keep the VM small
        finally:
            if conn is not None:
                conn.close()
            devnull.close()
            self.take_down(vm, check=False)
        return rows

    def startup(self, cfg_path: Path, n: int):
        cases = {
            "python3 -c pass": [sys.executable, "-c", "pass"],
            "invoke --list": [sys.executable, "-m", "invoke", "-r", str(REPO), "--list"],
            "invoke test-vm --dry-run": [sys.executable, "-m", "invoke", "-r", str(REPO), "test-vm",
                                         "--dry-run", "--config", str(cfg_path)],
        }
        rows = {}
        for label, argv in cases.items():
            times = []
            for _ in range(n):
                t = time.monotonic()
                done = subprocess.run(argv, env=self.env, cwd=str(self.cwd), capture_output=True,
                                      stdin=subprocess.DEVNULL, timeout=60)
                times.append(time.monotonic() - t)
                if done.returncode != 0:
                    raise Abort("{} exited {}: {}".format(label, done.returncode, done.stderr.decode()[-500:]))
            rows[label] = times
        return rows

    # -- the whole benchmark --------------------------------------------------
    def main(self):
        from vmtasks.guest import config as config_mod
        from vmtasks.transport.ssh import generate_key

        opts = self.opts
        bench_started = time.monotonic()
        result = {"machine": machine(), "runs": opts.runs, "trees": {}, "startup": {}, "big_output": {},
                  "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "prepared": prepared_images(),
                  "load_before": os.getloadavg(),
                  "tmp": "{} ({})".format(self.root.parent, "tmpfs" if in_memory(str(self.root.parent), 0) else "disk")}
        self.floor_key = generate_key(self.root / "floor-key", "bench-floor")
        prepared = False
        with_prepared = has_prepared_images()
        for name in opts.trees:
            t = time.monotonic()
            tree = self.make_tree(name)
            cfg_path = self.write_config(name, tree)
            cfg = config_mod.load(cfg_path, {}, {}, self.cwd)
            files, size = self.tree_stats(tree)
            self.log("tree {}: {} files, {:.1f} MB ({:.1f}s to generate)".format(
                name, files, size / 1e6, time.monotonic() - t))
            if not prepared:
                t = time.monotonic()
                self.prepare_base(cfg, [(EXAMPLE, cfg.guest.dir), (self.big_tree(), BIG_GUEST_DIR)]
                                  if opts.big_output else None)
                prepared = True
                self.log("base image prepared in {:.1f}s".format(time.monotonic() - t))
                result["startup"] = self.startup(cfg_path, max(opts.runs, 10))
            entry = {"label": TREE_LABELS[name], "files": files, "bytes": size, "vmtasks": [], "floor": []}
            kinds = ["vmtasks", "floor"]
            plain = []
            if with_prepared:
                # The plain column skips the image stage (--no-prepared); the prepared one
                # clones the image vm-prepare built for this tree's config, untimed here.
                plain = ["--no-prepared"]
                t = time.monotonic()
                self.vm_prepare(cfg_path)
                entry["vm_prepare_seconds"] = time.monotonic() - t
                self.log("  {} vm-prepare: {:.2f}s".format(name, entry["vm_prepare_seconds"]))
                kinds.append("prepared")
                entry["prepared"] = []
            for i in range(opts.runs):
                order = kinds[i % len(kinds):] + kinds[:i % len(kinds)]
                for kind in order:
                    self.warm(tree)
                    if kind == "floor":
                        row = self.run_floor(tree, cfg, i)
                    else:
                        row = self.run_vmtasks(cfg_path, extra=plain if kind == "vmtasks" else ())
                    entry[kind].append(row)
                v, f = entry["vmtasks"][-1], entry["floor"][-1]
                self.log("  {} run {}: vmtasks {:.2f}s (sync {:.2f}s, peak RSS {:.0f} MB)  floor {:.2f}s "
                         "(rsync {:.2f}s){}  load {:.2f}".format(
                             name, i + 1, v["total"], v["sync"], v["peak_rss_mb"], f["total"], f["sync"],
                             "  prepared {:.2f}s".format(entry["prepared"][-1]["total"]) if with_prepared else "",
                             os.getloadavg()[0]))
            entry["sync_alone"] = self.sync_alone(tree, cfg, opts.runs)
            self.log("  {} sync alone: stage {}  plain rsync {}".format(name, *(
                " ".join("{:.2f}".format(x) for x in entry["sync_alone"][k]) for k in ("sync stage", "plain rsync"))))
            summarize(entry)
            result["trees"][name] = entry
            shutil.rmtree(str(tree))
        if opts.big_output:
            if not prepared:
                cfg = config_mod.load(self.write_config("base", EXAMPLE), {}, {}, self.cwd)
                t = time.monotonic()
                self.prepare_base(cfg, [(self.big_tree(), BIG_GUEST_DIR)])
                self.log("base image prepared in {:.1f}s".format(time.monotonic() - t))
            result["big_output"] = self.big_output(opts.big_output, opts.runs)
        result["load_after"] = os.getloadavg()
        result["seconds"] = time.monotonic() - bench_started
        return result

    # -- host memory for a large guest output (issue 10 #17) ---------------------
    def big_output(self, sizes, runs: int):
        """`invoke test-vm` on a one-test suite whose test prints ``mb`` MB (lines of
        BIG_LINE bytes) to stdout, ``runs`` times per size: wall time, the invoke process's
        peak RSS and how many bytes came over SSH (the run record's suite-output.txt: the
        `go test -json` events, larger than what the test printed)."""
        import yaml

        tree = self.big_tree()
        data = yaml.safe_load((EXAMPLE / "vm.yaml").read_text())
        data["project_dir"] = str(tree)
        data["guest"]["dir"] = BIG_GUEST_DIR
        data["vm"]["name_prefix"] = "vmtasks-bigout"
        out = {}
        for mb in sizes:
            data["guest"]["env"] = {"BIG_MB": str(mb), "BIG_LINE": str(self.opts.big_line)}
            cfg_path = self.root / "config-bigout-{}.yaml".format(mb)
            cfg_path.write_text(yaml.safe_dump(data))
            rows = []
            for i in range(runs):
                row = self.run_vmtasks(cfg_path)
                record = Path(row["record"])
                row["streamed_bytes"] = (record / "suite-output.txt").stat().st_size
                rows.append(row)
                self.log("  big output {} MB run {}: {:.2f}s, peak RSS {:.0f} MB (ru_maxrss {:.0f} MB), "
                         "{:.0f} MB streamed, load {:.2f}".format(mb, i + 1, row["total"], row["peak_rss_mb"],
                                                                  row["maxrss_mb"], row["streamed_bytes"] / 1e6,
                                                                  os.getloadavg()[0]))
                shutil.rmtree(str(record), ignore_errors=True)  # 200 MB of tmpfs each
            out[str(mb)] = {"printed_mb": mb, "line_bytes": self.opts.big_line, "rows": rows,
                            "median": {k: median(r[k] for r in rows)
                                       for k in ("total", "peak_rss_mb", "maxrss_mb", "streamed_bytes", "suite",
                                                 "cpu_s")}}
        shutil.rmtree(str(tree))
        return out

    def cleanup(self, signum=None):
        """Stop what is still running, remove every VM in our TART_HOME, remove the temp dir.
        ``signum``: the signal that interrupted us (a terminal's Ctrl-C reached our children
        too; SIGTERM/SIGHUP sent to us alone are passed on)."""
        for vm in list(self.up):
            self.take_down(vm, check=False)
        for proc in list(self.children):
            if proc.poll() is None:
                try:
                    if signum == signal.SIGINT and proc in self.invokes:
                        try:
                            proc.wait(timeout=60)  # vmtasks is tearing its VM down
                        except subprocess.TimeoutExpired:
                            pass
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM if signum is None or proc not in self.invokes else signum)
                        proc.wait(timeout=120)
                except (subprocess.TimeoutExpired, OSError):
                    proc.kill()
                    proc.wait()
        self.children.clear()
        try:
            names = self.tart("list", "-q", check=False, timeout=60).stdout.decode().split()
        except (OSError, subprocess.SubprocessError):
            names = []
        for name in names:
            self.tart("stop", name, check=False, timeout=90)
            self.tart("delete", name, check=False, timeout=90)
        left = self.tart("list", "-q", check=False, timeout=60).stdout.decode().split()
        shutil.rmtree(str(self.root), ignore_errors=True)
        if left:
            self.log("bench: could not delete VMs: {} (TART_HOME was {})".format(", ".join(left), self.root / "tart"))


def summarize(entry) -> None:
    pairs = list(zip(entry["vmtasks"], entry["floor"]))
    entry["median"] = {
        "total": median(v["total"] for v, _ in pairs),
        "floor": median(f["total"] for _, f in pairs),
        "overhead": median(v["total"] - f["total"] for v, f in pairs),
        "ratio": median(v["total"] / f["total"] for v, f in pairs),
        "sync in run": median(v["sync"] for v, _ in pairs),
        "sync/rsync in runs": median(v["sync"] / f["sync"] for v, f in pairs),
        "rsync in floor": median(f["sync"] for _, f in pairs),
        "sync": median(entry["sync_alone"]["sync stage"]),
        "rsync": median(entry["sync_alone"]["plain rsync"]),
        "sync/rsync": median(a / b for a, b in zip(entry["sync_alone"]["sync stage"],
                                                   entry["sync_alone"]["plain rsync"])),
        "peak_rss_mb": median(v["peak_rss_mb"] for v, _ in pairs),
        "prepared": median(r["total"] for r in entry.get("prepared", [])),
        "prepared_overhead": median(p["total"] - f["total"] for p, f in zip(entry.get("prepared", []),
                                                                             entry["floor"])),
        "prepared_stages": {k: median(r.get(k) for r in entry.get("prepared", []))
                            for k in (entry.get("prepared") or [{}])[0] if k not in ROW_META},
        "stages": {k: median(v.get(k) for v, _ in pairs) for k in entry["vmtasks"][0] if k not in ROW_META},
        "floor_phases": {k: median(f.get(k) for _, f in pairs) for k in entry["floor"][0]},
    }


ROW_META = ("spawned", "ended", "record", "peak_rss_mb", "maxrss_mb", "cpu_s")  # not stages

FLOOR_OF = {"clone": "clone", "boot": "boot", "ip+ssh": "ip+ssh", "key": "key", "sync": "sync",
            "suite": "suite", "teardown": "teardown", "total": "total"}


def markdown(result) -> str:
    m = result["machine"]
    lines = ["vmtasks benchmark, {}: {} ({} cores), Linux {}, Python {}, {}; stand-in tart, no delays; "
             "trees and VMs in {}; median of {} runs. Load average (1/5/15 min) {} before, {} after; "
             "prepared images: {}.".format(
                 result["date"], m["cpu"], m["cores"], m["kernel"], m["python"], " ".join(m["rsync"].split()),
                 result["tmp"], result["runs"], "/".join("{:.2f}".format(x) for x in result["load_before"]),
                 "/".join("{:.2f}".format(x) for x in result["load_after"]), result["prepared"]), ""]
    if result["trees"]:
        with_prepared = any(e["median"].get("prepared") is not None for e in result["trees"].values())
        extra = " prepared | its overhead |" if with_prepared else ""
        lines += ["| tree | files | MB | `invoke test-vm` | floor | overhead | ratio |" + extra +
                  " sync stage | plain rsync | sync / rsync | (in the runs) | peak RSS |",
                  "|---|--:|--:|--:|--:|--:|--:|" + ("--:|--:|" if with_prepared else "") + "--:|--:|--:|--:|--:|"]
        for entry in result["trees"].values():
            md = entry["median"]
            cells = ""
            if with_prepared:
                cells = " {:.2f} s | {:.2f} s |".format(md["prepared"], md["prepared_overhead"])
            lines.append("| {} | {} | {:.1f} | {:.2f} s | {:.2f} s | {:.2f} s | {:.2f}x |{} {:.3f} s | {:.3f} s "
                         "| {:.2f}x | {:.2f}x | {:.0f} MB |".format(
                             entry["label"], entry["files"], entry["bytes"] / 1e6, md["total"], md["floor"],
                             md["overhead"], md["ratio"], cells, md["sync"], md["rsync"], md["sync/rsync"],
                             md["sync/rsync in runs"], md["peak_rss_mb"]))
        if with_prepared:
            lines += ["", "`invoke test-vm` here is `--no-prepared` (base image, setup steps); prepared: "
                      "`invoke test-vm` cloning the image `invoke vm-prepare` built for the tree's config "
                      "(medians {}).".format(", ".join("{}: vm-prepare {:.1f} s".format(
                          e["label"], e["vm_prepare_seconds"]) for e in result["trees"].values()))]
        lines += ["", "Overhead and ratio: medians over the run pairs of `invoke test-vm` minus (and over) the floor. "
                  "Sync stage / plain rsync: the sync stage alone (`VmPipeline._sync`: `mkdir -p` over the run's SSH "
                  "connection, then `rsync -a --delete`) against `rsync -a` with the same ssh options, alternating "
                  "in one VM; (in the runs): the sync stage of the full runs over the floor's rsync. Peak RSS: the "
                  "invoke process's VmHWM."]
        first = next(iter(result["trees"].values()))
        stages, floor = first["median"]["stages"], first["median"]["floor_phases"]
        pstages = first["median"].get("prepared_stages") or {}
        lines += ["", "Per stage, {} tree (seconds, medians):".format(first["label"]), "",
                  "| stage | `invoke test-vm` | floor | difference |" + (" prepared |" if pstages else ""),
                  "|---|--:|--:|--:|" + ("--:|" if pstages else "")]
        order = ["start-up", "preflight", "sweep", "image", "clone", "boot", "ip+ssh", "key", "setup", "sync",
                 "suite", "teardown", "between stages", "exit", "total"]
        names = set(stages) | set(pstages)
        for name in order + sorted(k for k in names if k not in order):
            if name not in names:
                continue
            f = floor.get(FLOOR_OF.get(name, ""), None)
            v = stages.get(name)
            lines.append("| {} | {} | {} | {} |{}".format(
                name, "{:.3f}".format(v) if v is not None else "-", "{:.3f}".format(f) if f is not None else "-",
                "{:+.3f}".format((v or 0.0) - (f or 0.0)),
                " {} |".format("{:.3f}".format(pstages[name]) if pstages.get(name) is not None else "-")
                if pstages else ""))
    if result["startup"]:
        lines += ["", "Python start-up (seconds, medians of {}):".format(len(next(iter(result["startup"].values())))),
                  "", "| command | seconds |", "|---|--:|"]
        for label, times in result["startup"].items():
            lines.append("| `{}` | {:.3f} |".format(label, median(times)))
    if result["big_output"]:
        lines += ["", "Host memory for a large guest output (issue 10 #17): one test printing N MB to stdout "
                  "in {}-byte lines, through `invoke test-vm` (medians of {} runs):".format(
                      next(iter(result["big_output"].values()))["line_bytes"], result["runs"]),
                  "", "| printed | streamed over SSH (go test -json) | suite stage | `invoke test-vm` | CPU "
                  "(user+sys) | peak RSS (VmHWM) | ru_maxrss (wait4) |", "|--:|--:|--:|--:|--:|--:|--:|"]
        for entry in result["big_output"].values():
            md = entry["median"]
            lines.append("| {} MB | {:.0f} MB | {:.2f} s | {:.2f} s | {:.2f} s | {:.0f} MB | {:.0f} MB |".format(
                entry["printed_mb"], md["streamed_bytes"] / 1e6, md["suite"], md["total"], md["cpu_s"],
                md["peak_rss_mb"], md["maxrss_mb"]))
        lines += ["", "Peak RSS: VmHWM of the invoke process, read every 50 ms while it runs; ru_maxrss: "
                  "the kernel's figure from wait4 (the largest of it and the children it waited for); CPU: "
                  "user+sys from wait4, the invoke process and its waited children (tart, rsync, ssh)."]
    lines += ["", "Whole benchmark: {:.0f} s.".format(result["seconds"])]
    return "\n".join(lines) + "\n"


def run_guarded(bench) -> tuple:
    """``bench.main()`` with clean-up on every way out (Ctrl-C, SIGTERM, SIGHUP, a failure):
    returns (result, 0) or (None, exit code)."""
    signalled = []

    def interrupted(signum, _frame):
        signalled.append(signum)
        raise Interrupted(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    code, signum, result = 0, None, None
    try:
        result = bench.main()
    except (KeyboardInterrupt, Interrupted, Abort) as exc:
        # A terminal's Ctrl-C also reaches rsync, ssh and invoke: their failure can come first.
        if isinstance(exc, Abort) and not signalled:
            print("bench: " + str(exc), file=sys.stderr)
            code = 1
        else:
            signum = signalled[0] if signalled else signal.SIGINT
            print("bench: interrupted ({}), cleaning up".format(signal.Signals(signum).name), file=sys.stderr)
            code = 128 + signum
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # finish cleaning up
        bench.cleanup(signum)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
    return result, code


def host_problem(prog: str) -> str:
    """Why this host cannot run a benchmark on the stand-ins ("" when it can): root, and the
    tools the stand-in and the floor use."""
    if os.geteuid() != 0:
        return "{}: run as root (the tart stand-in needs namespaces and port 22)".format(prog)
    missing = [t for t in ("rsync", "ssh", "go", "unshare") if shutil.which(t) is None]
    if missing or not os.path.exists("/usr/sbin/sshd"):
        return "{}: missing {} (bash scripts/setup.sh)".format(prog, ", ".join(missing) or "sshd")
    return ""


def write_results(out: Path, prefix: str, result, table: str) -> None:
    """``<out>/<prefix><stamp>.{json,md}`` and ``<prefix>latest.{json,md}``; the table printed,
    the stamped file named on stderr."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = prefix + time.strftime("%Y%m%d-%H%M%S")
    for name in (stamp, prefix + "latest"):
        (out / (name + ".json")).write_text(json.dumps(result, indent=2, default=str) + "\n")
        (out / (name + ".md")).write_text(table)
    print(table)
    print("written: {}".format(out / (stamp + ".json")), file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="pairs of runs per tree (default 5)")
    parser.add_argument("--trees", default=",".join(TREES),
                        help="comma list of {} (default: all; none: only --big-output)".format(", ".join(TREES)))
    parser.add_argument("--out", default=str(REPO / ".vmtasks" / "bench"), help="where the results go")
    parser.add_argument("--tmp", default=None,
                        help="where trees, TART_HOME and VMs go (default: /dev/shm when it is a tmpfs with "
                             "2 GB free, else /tmp/bench)")
    parser.add_argument("--big-output", default="",
                        help="comma list of MB: also run a one-test suite printing that much, for the host's "
                             "peak memory (issue 10 #17), e.g. 0,50,200")
    parser.add_argument("--big-line", type=int, default=BIG_LINE,
                        help="bytes per line of the --big-output test (default {})".format(BIG_LINE))
    opts = parser.parse_args(argv)
    opts.trees = [t.strip() for t in opts.trees.split(",") if t.strip() and t.strip() != "none"]
    try:
        opts.big_output = [int(x) for x in opts.big_output.split(",") if x.strip()]
    except ValueError:
        parser.error("--big-output takes whole MB, e.g. 0,50,200")
    if opts.tmp is None:
        opts.tmp = "/dev/shm/bench" if in_memory("/dev/shm", 2 << 30) else "/tmp/bench"
    os.makedirs(opts.tmp, exist_ok=True)
    unknown = [t for t in opts.trees if t not in TREES]
    if unknown or not (opts.trees or opts.big_output) or opts.runs < 1 or opts.big_line < 2:
        parser.error("unknown tree(s): {}".format(", ".join(unknown)) if unknown else "nothing to run")
    problem = host_problem("bench")
    if problem:
        print(problem, file=sys.stderr)
        return 2

    result, code = run_guarded(Bench(opts))
    if code:
        return code
    # A memory-only run (--trees none) does not replace the tree table's latest.
    write_results(Path(opts.out), "" if opts.trees else "big-", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
