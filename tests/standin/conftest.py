"""Fixtures for the Linux stand-in's own tests (scripts/tart).

Every test gets its own TART_HOME in a tmp dir, `scripts/` first on PATH and no
TART_STANDIN_* knobs unless it sets them. Whatever a test starts is stopped and deleted
afterwards, and the teardown fails the test if any process of its TART_HOME survives.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
TART = SCRIPTS / "tart"

SSH_OPTS = ["-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=accept-new", "-o", "ConnectTimeout=5",
            "-o", "LogLevel=ERROR"]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "standin: tests of the Linux stand-in for tart (scripts/tart); need root")


def _missing() -> List[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("root (the stand-in uses namespaces, bind mounts and port 22)")
    for tool in ("ssh", "ssh-keygen", "rsync", "cp", "ip", "unshare", "setpriv"):
        if shutil.which(tool) is None:
            missing.append(tool)
    if not os.access("/usr/sbin/sshd", os.X_OK):
        missing.append("/usr/sbin/sshd (apt-get install openssh-server)")
    return missing


def pytest_collection_modifyitems(config, items):
    missing = _missing()
    if not missing:
        return
    skip = pytest.mark.skip(reason="stand-in tests need " + ", ".join(missing))
    for item in items:
        if "standin" in item.keywords:
            item.add_marker(skip)


# --- process inspection ----------------------------------------------------------------

def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def processes_of(tart_home: Path) -> List[Tuple[int, str]]:
    """Live processes that belong to this TART_HOME: `tart` processes (their environment),
    guest inits, sshd (its config path is under TART_HOME) and guest commands."""
    needle = str(tart_home).encode()
    env_needle = b"TART_HOME=" + needle + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        stat = _read("/proc/%s/stat" % entry)
        if not stat or stat[stat.rfind(b")") + 2:][:1] in (b"Z", b"X"):
            continue
        cmdline = _read("/proc/%s/cmdline" % entry)
        if needle in cmdline or env_needle in _read("/proc/%s/environ" % entry):
            found.append((int(entry), cmdline.replace(b"\0", b" ").decode(errors="replace")))
    return found


def sshd_processes(config_path: str) -> List[int]:
    """PIDs of live processes whose command line names this sshd config."""
    needle = config_path.encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read("/proc/%s/stat" % entry)
            if stat and stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X") \
                    and needle in _read("/proc/%s/cmdline" % entry):
                pids.append(int(entry))
    return pids


def wait_until(predicate, timeout: float, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def ssh_banner(ip: str, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((ip, 22), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(64).startswith(b"SSH-")
    except OSError:
        return False


# --- the tart driver for tests ---------------------------------------------------------

class Run:
    """A `tart run` started by a test."""

    def __init__(self, name: str, proc: subprocess.Popen, out: Path, err: Path, started: float):
        self.name, self.proc, self.out_path, self.err_path = name, proc, out, err
        self.started = started
        self.ip: Optional[str] = None

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait(self, timeout: float = 15) -> int:
        return self.proc.wait(timeout=timeout)


class Tart:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.home = tmp / "tart-home"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("TART_STANDIN_") and k != "SSH_AUTH_SOCK"}
        env["TART_HOME"] = str(self.home)
        # The real agent answers about 10 s after boot (the stand-in's default); these tests
        # of other things start it at once. Tests of the delay itself set or unset it.
        env["TART_STANDIN_AGENT_DELAY"] = "0"
        env["PATH"] = str(SCRIPTS) + os.pathsep + env.get("PATH", "/usr/bin:/bin")
        self.env = env
        self.runs: List[Run] = []

    def _env(self, extra: Optional[Dict[str, str]]) -> Dict[str, str]:
        return dict(self.env, **(extra or {}))

    def __call__(self, *args: str, env: Optional[Dict[str, str]] = None, input: Optional[str] = None,
                 timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(["tart", *args], env=self._env(env), input=input, capture_output=True,
                              text=True, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def ok(self, *args: str, **kwargs) -> str:
        done = self(*args, **kwargs)
        assert done.returncode == 0, (args, done.returncode, done.stdout, done.stderr)
        return done.stdout

    def spawn_run(self, name: str, env: Optional[Dict[str, str]] = None, flags: Tuple[str, ...] = ()) -> Run:
        n = len(self.runs)
        out, err = self.tmp / ("run-%d-%s.out" % (n, name)), self.tmp / ("run-%d-%s.err" % (n, name))
        started = time.monotonic()
        with open(out, "w") as fo, open(err, "w") as fe:
            proc = subprocess.Popen(["tart", "run", "--no-graphics", *flags, name], env=self._env(env),
                                    stdin=subprocess.DEVNULL, stdout=fo, stderr=fe,
                                    start_new_session=True)
        run = Run(name, proc, out, err, started)
        self.runs.append(run)
        return run

    def running(self, name: str) -> bool:
        rows = json.loads(self.ok("list", "--format", "json"))
        return any(r["Name"] == name and r["Running"] for r in rows)

    def wait_running(self, run: Run, timeout: float = 10) -> None:
        ok = wait_until(lambda: run.proc.poll() is not None or self.running(run.name), timeout)
        assert ok and run.proc.poll() is None, (run.proc.poll(), run.stdout, run.stderr)

    def wait_ip(self, name: str, timeout: float = 10) -> str:
        done = self("ip", name, "--wait", str(int(timeout)), timeout=timeout + 5)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def start(self, name: str, env: Optional[Dict[str, str]] = None, ssh: bool = True,
              flags: Tuple[str, ...] = ()) -> Run:
        run = self.spawn_run(name, env, flags)
        self.wait_running(run)
        run.ip = self.wait_ip(name)
        if ssh:
            assert wait_until(lambda: ssh_banner(run.ip), 10), run.stderr
        return run

    def exec_ok(self, name: str, *cmd: str, **kwargs) -> str:
        """`tart exec`, retried while the guest agent is not up yet."""
        for _ in range(250):
            done = self("exec", name, *cmd, **kwargs)
            if done.returncode == 1 and "is the Tart Guest Agent running?" in done.stderr:
                time.sleep(0.02)
                continue
            break
        assert done.returncode == 0, (cmd, done.returncode, done.stdout, done.stderr)
        return done.stdout

    def state(self, name: str) -> str:
        """The VM's State as `tart get` reports it: running, suspended or stopped."""
        return json.loads(self.ok("get", name, "--format", "json"))["State"]

    def mac(self, name: str) -> str:
        return json.loads((self.home / "vms" / name / "config.json").read_text())["macAddress"]

    def saved_state(self, name: str) -> Path:
        return self.home / "vms" / name / "state.vzvmsave"

    def sshd_config(self, name: str) -> str:
        return str(self.home / "vms" / name / "standin" / "run" / "sshd_config")

    def cleanup(self) -> List[Tuple[int, str]]:
        """Stop and delete everything; return the processes that had to be killed."""
        for run in self.runs:
            if run.proc.poll() is None:
                self("stop", "--timeout", "5", run.name, timeout=20)
                try:
                    run.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    run.proc.kill()
                    run.proc.wait(timeout=10)
        if self.home.is_dir():
            rows = json.loads(self("list", "--format", "json").stdout or "[]")
            for row in rows:
                if row["Running"]:
                    self("stop", "--timeout", "2", row["Name"])
            if rows:
                self("delete", *[row["Name"] for row in rows])
        wait_until(lambda: not processes_of(self.home), 5)
        leftovers = processes_of(self.home)
        for pid, _ in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return leftovers


@pytest.fixture
def tart(tmp_path):
    t = Tart(tmp_path)
    yield t
    leftovers = t.cleanup()
    assert not leftovers, "processes left behind: %r" % leftovers


@pytest.fixture
def base(tart):
    """A fresh base image, like `tahoe-base`: empty /Users/admin, no .ssh."""
    tart.ok("create", "base")
    return "base"


@pytest.fixture
def keypair(tmp_path):
    def make(name: str = "id") -> Tuple[Path, str]:
        path = tmp_path / ("key-" + name)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(path)],
                       check=True, stdin=subprocess.DEVNULL)
        return path, Path(str(path) + ".pub").read_text().strip()
    return make


def inject_key(tart: Tart, name: str, public: str) -> None:
    """The driver's way: `tart exec NAME sh -c 'mkdir -p ~/.ssh && ...'`."""
    tart.exec_ok(name, "sh", "-c",
                 "mkdir -p ~/.ssh && chmod 700 ~/.ssh && echo '%s' >> ~/.ssh/authorized_keys && "
                 "chmod 600 ~/.ssh/authorized_keys" % public)


def ssh(ip: str, key: Optional[Path], known_hosts: Path, *cmd: str, opts: Optional[List[str]] = None,
        timeout: float = 20) -> subprocess.CompletedProcess:
    argv = ["ssh", *(opts if opts is not None else SSH_OPTS), "-o", "UserKnownHostsFile=%s" % known_hosts]
    if key is not None:
        argv += ["-i", str(key)]
    argv += ["admin@" + ip, *cmd]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
