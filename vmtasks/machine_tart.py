"""The local backend: VMs made with the ``tart`` command on this host (see vmtasks/tart.py).

Codes to Tart's documented contract (shared/design/tart-cli.md), so the same code drives
real Tart on a Mac and the Linux stand-in (scripts/tart).
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

from . import ssh
from .backend import Backend, Cancelled, ListedVm, Machine, NoLongerNeeded, Owner, SshTarget
from .errors import CommandTimeout, PreflightError, StageError, TartError
from .proc import tail_file, which
from .tart import INSTALL_HINT, Tart

LIMIT_MESSAGE = "exceeds the system limit"
RESTORING = "restoring VM state from a snapshot"  # what `tart run` prints when it tries a resume
RESUMED = "resuming VM"  # ...and when the resume worked
MACOS_VM_LIMIT = 2  # Apple's limit of running macOS guests per host
STANDIN_HINT = "no Mac? the stand-in makes its base with: tart create {base}"


def backoff(poll: float, first: float = 0.02):
    """Polling intervals: 20 ms at first, doubling up to ``poll``. A guest that is up within
    moments is noticed within moments; a slow boot still sees one poll per ``poll`` seconds."""
    delay = min(first, poll)
    while True:
        yield delay
        delay = min(delay * 2, poll)


def sleep_or_cancel(seconds: float, cancel: threading.Event) -> None:
    if cancel.wait(max(0.0, seconds)):
        raise Cancelled("the run is stopping")


def is_standin(version: str) -> bool:
    return "standin" in version.replace("-", "").lower()


class TartBackend(Backend):
    name = "tart"

    def __init__(self, tart: Optional[Tart] = None, poll: float = 1.0, slot_wait: float = 1800) -> None:
        self.tart = tart or Tart()
        self.poll = poll
        self.slot_wait = slot_wait
        self._version: Optional[str] = None

    def version(self) -> str:
        if self._version is None:
            self._version = self.tart.version()
        return self._version

    def describe(self) -> str:
        return "tart on this host"

    def base_image_hint(self, base: str) -> str:
        """The one-time set-up that makes ``base`` exist, for the tart on PATH."""
        if is_standin(self.version()):
            return STANDIN_HINT.format(base=base)
        return ("one-time setup: tart pull ghcr.io/cirruslabs/tahoe-base:latest && "
                "tart clone ghcr.io/cirruslabs/tahoe-base:latest {} (or set OPENBOOT_VM_BASE)".format(base))

    def preflight(self, image: str) -> List[ListedVm]:
        missing = [tool for tool in ("tart", "rsync", "ssh") if which(tool) is None]
        if missing:
            hint = INSTALL_HINT if "tart" in missing else \
                "install them (macOS: brew install rsync; Debian: apt-get install rsync openssh-client)"
            raise PreflightError("not found on PATH: " + ", ".join(missing), hint)
        listed = self.list_vms()
        if image not in {vm.name for vm in listed}:
            raise PreflightError("base image '{}' is not in `tart list`".format(image), self.base_image_hint(image))
        return listed

    def preflight_tool(self) -> None:
        if which("tart") is None:
            raise PreflightError("`tart` is not on PATH", INSTALL_HINT)

    def list_vms(self) -> List[ListedVm]:
        return [ListedVm(vm.name, vm.running, vm.state, size_gb=vm.size_gb) for vm in self.tart.list()]

    def machine(self, name: str, owner: Owner, cfg) -> "TartMachine":
        return TartMachine(self.tart, name, cfg)

    def remove(self, name: str, timeout: float) -> None:
        self.tart.stop(name, timeout=min(30, timeout))
        self.tart.delete(name)

    def slots(self) -> Optional[int]:
        return MACOS_VM_LIMIT


class TartMachine(Machine):
    def __init__(self, tart: Tart, name: str, cfg) -> None:
        self.tart = tart
        self.name = name
        self.cfg = cfg
        self.proc: Optional[subprocess.Popen] = None
        self.ip: Optional[str] = None
        self.console_log: Optional[Path] = None
        self.exists = False  # a clone may have made it: teardown must try to delete
        self.resume = False  # cloned from a suspended slot image: keep its MAC, resume it
        self.boot_path = ""  # "resumed" / "cold boot" / "cold boot: saved state refused", for the record

    # -- create and boot ---------------------------------------------------
    def create(self, image: str, deadline: float, cancel: threading.Event, on_start=None) -> None:
        try:
            self.tart.clone(image, self.name, timeout=max(1.0, deadline - time.monotonic()), cancel=cancel,
                            on_start=on_start)
        except TartError:
            raise  # tart clone builds in a temporary place: a failed clone made nothing
        except (CommandTimeout, Cancelled):
            self.exists = True  # killed half-way: the name may exist, teardown deletes it
            raise
        self.exists = True
        if self.resume:
            return  # a saved state is tied to its MAC, CPU and memory: a `tart set` would void it
        self.tart.set(self.name, cpu=self.cfg.vm.cpu, memory=self.cfg.vm.memory,
                      random_mac=self.cfg.vm.random_mac)

    def start(self, console_log: Path, deadline: float, cancel: threading.Event,
              on_wait: Callable[[str], None], still_wanted: Optional[Callable[[], bool]] = None) -> None:
        """``tart run`` in its own session (a Ctrl-C to our group must not power the VM
        off under teardown). At the host's VM limit, retry until ``timeouts.slot_wait``."""
        self.console_log = console_log
        poll = self.cfg.timeouts.poll
        slot_deadline = time.monotonic() + self.cfg.timeouts.slot_wait
        waited = False
        while True:
            # Each attempt gets a fresh console: a slot wait must not fill it with copies of
            # the limit line.
            with open(console_log, "wb") as log:
                self.proc = self.tart.start(self.name, log)
            boot_deadline = time.monotonic() + self.cfg.timeouts.boot
            waits = backoff(poll)
            while self.proc.poll() is None:
                self.ip = self.tart.ip(self.name, timeout=max(5, poll * 5), cancel=cancel)
                if self.ip:
                    if waited:
                        on_wait("")  # got a slot: the waiting note goes
                    self.boot_deadline = boot_deadline
                    if not self.boot_path:
                        self.boot_path = "resumed" if RESUMED in "\n".join(self.console_tail(40)) else "cold boot"
                    return
                if time.monotonic() > boot_deadline:
                    raise StageError("boot", self.name, "no IP address after {:g}s".format(self.cfg.timeouts.boot),
                                     "the VM console is in the run record; raise timeouts.boot if the guest is slow",
                                     self.console_tail())
                sleep_or_cancel(next(waits), cancel)
            console = "\n".join(self.console_tail(5))
            if self.resume and RESTORING in console and self.proc.returncode != 0:
                # The saved state was refused (a MAC or configuration change): `tart stop`
                # drops it, a fresh MAC avoids the clone's old lease, and it boots cold.
                self.tart.stop(self.name, timeout=30)
                self.tart.set(self.name, random_mac=self.cfg.vm.random_mac)
                self.resume = False
                self.boot_path = "cold boot: the saved state was refused"
                continue
            if LIMIT_MESSAGE in console and still_wanted is not None and not still_wanted():
                raise NoLongerNeeded("no slot yet, and no test left for {}".format(self.name))
            if LIMIT_MESSAGE in console and time.monotonic() < slot_deadline:
                if not waited:
                    on_wait("the host is at its limit of running VMs: waiting for a slot "
                            "(up to {:g}s, timeouts.slot_wait)".format(self.cfg.timeouts.slot_wait))
                waited = True
                sleep_or_cancel(max(poll, 1.0) + secrets.randbelow(1000) / 1000, cancel)
                continue
            if LIMIT_MESSAGE in console:
                raise NoSlot("boot", self.name, "no VM slot on this host within {:g}s (timeouts.slot_wait)".format(
                    self.cfg.timeouts.slot_wait), "other VMs hold the host's slots: wait for them or stop one "
                    "(`tart list`)", self.console_tail(3))
            raise StageError("boot", self.name, "`tart run` exited with code {} before the VM got an IP".format(
                self.proc.returncode), "read the VM console in the run record", self.console_tail())

    def wait_ssh(self, deadline: float, cancel: threading.Event) -> None:
        # An IP is not SSH ready: wait for sshd's banner on port 22. The boot deadline
        # covers both.
        deadline = getattr(self, "boot_deadline", deadline)
        waits = backoff(min(self.cfg.timeouts.poll, 0.2))
        while not ssh.sshd_banner(self.ip, timeout=min(2.0, max(0.2, deadline - time.monotonic()))):
            self.require_alive("ip+ssh")
            if time.monotonic() > deadline:
                raise StageError("ip+ssh", self.name, "sshd on {}:22 did not answer within {:g}s".format(
                    self.ip, self.cfg.timeouts.boot),
                    "check Remote Login in the base image; on macOS 15 allow Local Network access for your terminal",
                    self.console_tail())
            sleep_or_cancel(next(waits), cancel)

    def install_key(self, public_line: str, deadline: float, cancel: threading.Event) -> None:
        # Keys go in through the guest agent, not SSH: the image has no authorized keys and a
        # local agent offering many keys would exhaust MaxAuthTries before any real one.
        argv = ["sh", "-c", KEY_SCRIPT, "vmtasks-key", public_line]
        waits = backoff(min(self.cfg.timeouts.poll, 0.5))
        while True:
            self.require_alive("key")
            result = self.tart.exec(self.name, argv, timeout=max(5, self.cfg.timeouts.key), cancel=cancel)
            if result.ok:
                return
            retryable = Tart.agent_not_ready(result) or result.returncode == 2
            if not retryable or time.monotonic() > deadline:
                raise StageError("key", self.name, "`tart exec` exited {}: {}".format(
                    result.returncode, (result.stderr or result.stdout).strip()[-300:]),
                    "is the Tart Guest Agent in the base image? (it is in Cirrus Labs images)",
                    (result.stderr + result.stdout).splitlines()[-15:])
            sleep_or_cancel(next(waits), cancel)

    # -- SSH ---------------------------------------------------------------
    def open_socket(self, timeout: float) -> socket.socket:
        return ssh.nodelay_socket(self.ip, timeout)

    def ssh_target(self) -> SshTarget:
        return SshTarget(self.ip or "")

    def address(self) -> str:
        return self.ip or ""

    # -- state ---------------------------------------------------------------
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def why_dead(self) -> str:
        code = self.proc.returncode if self.proc is not None else None
        return "the VM stopped (`tart run` exited {}): the guest crashed or was stopped".format(
            "?" if code is None else code)

    def require_alive(self, stage: str) -> None:
        if not self.alive():
            raise StageError(stage, self.name, self.why_dead(), "see the VM console in the run record",
                             self.console_tail())

    def console_tail(self, lines: int = 15) -> List[str]:
        return tail_file(self.console_log, lines) if self.console_log else []

    # -- teardown ----------------------------------------------------------
    def destroy(self, timeout: float) -> None:
        if not self.exists and self.proc is None:
            return  # nothing was made (a failed clone): no stop, no delete
        if self.proc is not None:
            self.tart.stop(self.name, timeout=min(30, timeout))
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.tart.delete(self.name)
                self.exists = False
                return
            except TartError:
                # `tart list` can show a VM stopped while it still runs (tart #967): stop again.
                if time.monotonic() > deadline:
                    raise
                self.tart.stop(self.name, timeout=10)
                time.sleep(0.5)

    def stop_cleanly(self, timeout: float) -> None:
        """For images: flush the guest's disks, then stop (``tart stop`` is a hard power-off)."""
        self.tart.stop(self.name, timeout=min(30, timeout))
        if self.proc is not None:
            self.proc.wait(timeout=timeout)

    def sealed(self) -> None:
        """The VM was renamed into a prepared image: teardown must leave it alone."""
        self.exists = False
        self.proc = None

    def remove_by_hand(self) -> str:
        import shlex

        return "tart stop {0}; tart delete {0}".format(shlex.quote(self.name))


class NoSlot(StageError):
    """No host VM slot within timeouts.slot_wait: the VM's tests go to the others."""


KEY_SCRIPT = (
    # Relative paths: `tart exec` runs in the guest user's home.
    'umask 077 && mkdir -p .ssh && printf "%s\\n" "$1" >> .ssh/authorized_keys '
    "&& chmod 700 .ssh && chmod 600 .ssh/authorized_keys"
)
