"""The local backend: VMs made with the ``tart`` command on this host (see vmtasks/backends/tart/cli.py).

Codes to Tart's documented contract (shared/design/tart-cli.md), so the same code drives
real Tart on a Mac and the Linux stand-in (scripts/tart).
"""

from __future__ import annotations

import platform
import secrets
import shlex
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

from vmtasks.guest.errors import Cancelled, CommandTimeout, NoLongerNeeded, NoSlot, PreflightError, StageError
from vmtasks.lifecycle.backend import (
    Backend,
    Check,
    ListedVm,
    Machine,
    Owner,
    PreparedImages,
    ResumableMachine,
    SealableMachine,
    SshTarget,
    SuspendableMachine,
    backoff,
    sleep_or_cancel,
)
from vmtasks.transport import ssh
from vmtasks.transport.proc import tail_file, which

from . import images as tart_images
from .cli import INSTALL_HINT, Tart, TartError

LIMIT_MESSAGE = "exceeds the system limit"
RESTORING = "restoring VM state from a snapshot"  # what `tart run` prints when it tries a resume
RESUMED = "resuming VM"  # ...and when the restore worked (the start may still hit the VM limit)
MAC_RESET = "Resetting VM to assign a new MAC address"  # a running VM has our MAC: state dropped, cold boot
KEYCHAIN_LOCKED = ("Failed to generate keypair", "SecKeyCreateRandomKey",  # headless macOS 15 (tart docs/faq.md)
                   "Interaction is not allowed with the Security Server")
KEYCHAIN_HINT = ("unlock the login keychain first: security unlock-keychain login.keychain "
                 "(a headless macOS 15 host or an SSH session starts with it locked)")
PRIVACY_HINT = ("on a macOS 15 host, Local Network privacy may be blocking this terminal app from reaching VMs "
                "(Terminal.app and SSH sessions are exempt): allow it in System Settings > Privacy & Security > "
                "Local Network, or run from Terminal.app; otherwise check Remote Login in the base image")
RESUME_SETTLE = 2.0  # after "resuming VM", how long the run must stay up before a lease is trusted
AGENT_CONNECT_WAIT = 10.0  # `tart exec` tries the agent's control socket about this long before failing
PRIVACY_PROBE_AFTER = 5.0  # port 22 failing this long: ask the agent whether the guest is up
PRIVACY_GRACE = 5.0  # the agent answers but port 22 still fails this much later: blocked
MACOS_VM_LIMIT = 2  # Apple's limit of running macOS guests per host
STANDIN_HINT = "no Mac? the stand-in makes its base with: tart create {base}"


def is_standin(version: str) -> bool:
    return "standin" in version.replace("-", "").lower()


def backend_from_config(cfg, runner=None, driver: Optional[Tart] = None) -> "TartBackend":
    """``driver``: a ``Tart`` to use (tests: one with a fake runner); else one on ``runner``."""
    return TartBackend(driver or Tart(runner), poll=cfg.timeouts.poll, slot_wait=cfg.timeouts.slot_wait)


class TartBackend(Backend, PreparedImages):
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

    def stop_command(self, name: str) -> str:
        return self.tart.stop_command(name)

    def doctor(self, parts) -> List[Check]:
        from . import hostchecks

        return hostchecks.tart_checks(parts)

    # -- prepared images (vmtasks/lifecycle/prepare.py, vmtasks/lifecycle/images.py) ------------------------------
    def image_identity(self, base: str):
        return tart_images.base_identity(self.tart, base)

    def image_disk_gb(self, name: str) -> Optional[float]:
        use = tart_images.disk_use(self.tart, name)
        return use.total_gb if use is not None else None

    def build_suspended_slots(self, services, plan, count: int) -> List[str]:
        return tart_images.build_suspended_slots(services, self.tart, plan, count)


def remove_command(name: str) -> str:
    """The paste-able removal of one Tart VM (stop, then delete)."""
    return Tart().remove_command(name)


class TartMachine(Machine, SealableMachine, ResumableMachine, SuspendableMachine):
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
        self.image = ""  # what it was cloned from: a resume that hit the VM limit clones it again

    # -- create and boot ---------------------------------------------------
    def create(self, image: str, deadline: float, cancel: threading.Event, on_start=None) -> None:
        self.image = image
        try:
            self.tart.clone(image, self.name, timeout=max(1.0, deadline - time.monotonic()), cancel=cancel,
                            on_start=None if on_start is None else
                            lambda pid: on_start(pid, ["tart", "clone", image, self.name]))
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
        off under teardown). At the host's VM limit, retry until ``timeouts.slot_wait``.

        ``tart ip`` reads the host's DHCP leases, not the VM (tart's Leases.swift): a clone of
        a suspended slot image keeps the slot's MAC, so it answers with the slot's old lease
        before the restore has finished, after a refused restore, at the VM limit, and while
        another run's VM resumed from the same slot holds that address. So while resuming, an
        address is trusted only once the console says how the restore went."""
        self.console_log = console_log
        poll = self.cfg.timeouts.poll
        slot_deadline = time.monotonic() + self.cfg.timeouts.slot_wait
        waited = False
        while True:
            # The slot's old lease, answered before anything runs: after a MAC reset it is
            # the address of the other VM that has our old MAC, never ours.
            stale_ip = self.tart.ip(self.name, timeout=max(5, poll * 5), cancel=cancel) if self.resume else None
            # Each attempt gets a fresh console: a slot wait must not fill it with copies of
            # the limit line.
            with open(console_log, "wb") as log:
                self.proc = self.tart.start(self.name, log, suspendable=self.suspendable())
            boot_deadline = time.monotonic() + self.cfg.timeouts.boot
            waits = backoff(poll)
            resumed_at: Optional[float] = None
            while self.proc.poll() is None:
                console = "\n".join(self.console_tail(40))
                self.check_keychain(console)
                outcome = self.resume_outcome(console) if self.resume else "cold boot"
                if outcome == "resumed" and resumed_at is None:
                    resumed_at = time.monotonic()
                self.ip = None
                if outcome is not None:
                    self.ip = self.tart.ip(self.name, timeout=max(5, poll * 5), cancel=cancel)
                if self.ip and outcome == "mac reset" and self.ip == stale_ip:
                    self.ip = None  # our old MAC's lease: the address of the VM that has it now
                if self.ip and resumed_at is not None and time.monotonic() - resumed_at < RESUME_SETTLE \
                        and not ssh.sshd_banner(self.ip, timeout=0.5):
                    self.ip = None  # the start after a restore can still fail at the VM limit
                if self.ip and self.proc.poll() is None:
                    if waited:
                        on_wait("")  # got a slot: the waiting note goes
                    self.boot_deadline = boot_deadline
                    if not self.boot_path or outcome == "resumed":
                        self.boot_path = {"resumed": "resumed",
                                          "mac reset": "cold boot: another VM runs with the slot's MAC"}.get(
                            outcome or "", self.boot_path or "cold boot")
                    return
                if time.monotonic() > boot_deadline:
                    why = ("no IP address after {:g}s".format(self.cfg.timeouts.boot) if outcome is not None else
                           "`tart run` did not say within {:g}s whether the saved state restored".format(
                               self.cfg.timeouts.boot))
                    raise StageError("boot", self.name, why, self.boot_hint(), self.console_tail())
                sleep_or_cancel(next(waits), cancel)
            self.ip = None
            console = "\n".join(self.console_tail(8))
            self.check_keychain(console)
            # The VM limit first: Tart prints both restore lines before the start that fails
            # at the limit, so a resume at the limit also shows "restoring".
            if LIMIT_MESSAGE in console:
                if self.resume and (self.tart.get(self.name) or {}).get("State") != "suspended":
                    # The restore consumed the clone's saved state before the start failed: a
                    # fresh clone of the slot image resumes on the next try.
                    self.tart.clone(self.image, self.name, timeout=max(30.0, self.cfg.timeouts.clone),
                                    cancel=cancel)
                if still_wanted is not None and not still_wanted():
                    raise NoLongerNeeded("no slot yet, and no test left for {}".format(self.name))
                if time.monotonic() < slot_deadline:
                    if not waited:
                        on_wait("the host is at its limit of running VMs: waiting for a slot "
                                "(up to {:g}s, timeouts.slot_wait)".format(self.cfg.timeouts.slot_wait))
                    waited = True
                    sleep_or_cancel(max(poll, 1.0) + secrets.randbelow(1000) / 1000, cancel)
                    continue
                raise NoSlot("boot", self.name, "no VM slot on this host within {:g}s (timeouts.slot_wait)".format(
                    self.cfg.timeouts.slot_wait), "other VMs hold the host's slots: wait for them or stop one "
                    "(`tart list`)", self.console_tail(3))
            if self.resume and RESTORING in console and self.proc.returncode != 0:
                # The saved state was refused (a MAC or configuration change): `tart stop`
                # drops it, a fresh MAC avoids the slot's old lease, and it boots cold.
                self.tart.stop(self.name, timeout=30)
                self.tart.set(self.name, random_mac=True)
                self.resume = False
                self.boot_path = "cold boot: the saved state was refused"
                continue
            raise StageError("boot", self.name, "`tart run` exited with code {} before the VM got an IP".format(
                self.proc.returncode), "read the VM console in the run record", self.console_tail())

    @staticmethod
    def resume_outcome(console: str) -> Optional[str]:
        """How a resume went, from ``tart run``'s output: "resumed", "mac reset" (another
        running VM had the MAC: Tart gave this one a new MAC and dropped the state, so it boots
        cold), or None while undecided (the restore is still running, or refused and exiting)."""
        if MAC_RESET in console:
            return "mac reset"
        if RESUMED in console:
            return "resumed"
        return None

    def check_keychain(self, console: str) -> None:
        if any(text in console for text in KEYCHAIN_LOCKED):
            raise StageError("boot", self.name, "`tart run` could not generate a key pair: the login keychain "
                             "is locked", KEYCHAIN_HINT, self.console_tail())

    def boot_hint(self) -> str:
        from . import hostchecks

        hint = "the VM console is in the run record; raise timeouts.boot if the guest is slow"
        many = hostchecks.many_leases()
        if many:
            hint += "; " + many
        return hint

    def wait_ssh(self, deadline: float, cancel: threading.Event) -> None:
        # An IP is not SSH ready: wait for sshd's banner on port 22. The boot deadline
        # covers both. Port 22 still failing once the guest agent answers (the guest is up)
        # means something between this host and the VM blocks it: on macOS 15, Local
        # Network privacy. Say so then, not when the boot deadline runs out.
        deadline = getattr(self, "boot_deadline", deadline)
        waits = backoff(min(self.cfg.timeouts.poll, 0.2))
        started = time.monotonic()
        agent_up_at: Optional[float] = None
        last_probe = 0.0
        while True:
            error = connect_error(self.ip or "", timeout=min(2.0, max(0.2, deadline - time.monotonic())))
            if error is None:
                return
            self.require_alive("ip+ssh")
            now = time.monotonic()
            if agent_up_at is None and now - started >= PRIVACY_PROBE_AFTER and now - last_probe >= PRIVACY_GRACE:
                last_probe = now
                try:
                    probe = self.tart.exec(self.name, ["true"], timeout=AGENT_CONNECT_WAIT + 10, cancel=cancel)
                    if probe.ok:
                        agent_up_at = time.monotonic()
                except CommandTimeout:
                    pass
            if agent_up_at is not None and time.monotonic() - agent_up_at >= PRIVACY_GRACE:
                raise StageError("ip+ssh", self.name, "the VM is up (its guest agent answers) and `tart ip` gave {}, "
                                 "but this host cannot connect to {}:22 ({})".format(self.ip, self.ip, error),
                                 PRIVACY_HINT, self.console_tail())
            if time.monotonic() > deadline:
                raise StageError("ip+ssh", self.name, "sshd on {}:22 did not answer within {:g}s ({})".format(
                    self.ip, self.cfg.timeouts.boot, error), PRIVACY_HINT, self.console_tail())
            sleep_or_cancel(next(waits), cancel)

    def install_key(self, public_line: str, deadline: float, cancel: threading.Event) -> None:
        # Keys go in through the guest agent, not SSH: the image has no authorized keys and a
        # local agent offering many keys would exhaust MaxAuthTries before any real one.
        # The agent answers some seconds after boot, and each `tart exec` before that tries
        # for about 10 s before it fails: its timeout must outlast that.
        argv = ["sh", "-c", KEY_SCRIPT, "vmtasks-key", public_line]
        waits = backoff(min(self.cfg.timeouts.poll, 0.5))
        while True:
            self.require_alive("key")
            try:
                result = self.tart.exec(self.name, argv, timeout=max(AGENT_CONNECT_WAIT + 10, self.cfg.timeouts.key),
                                        cancel=cancel)
            except CommandTimeout as exc:
                if time.monotonic() > deadline:
                    raise StageError("key", self.name, "`tart exec` did not finish: {}".format(exc.message),
                                     AGENT_HINT, self.console_tail()) from None
                continue
            if result.ok:
                self.check_agent_user(result.stdout)
                return
            retryable = Tart.agent_not_ready(result) or result.returncode == 2
            if not retryable or time.monotonic() > deadline:
                raise StageError("key", self.name, "`tart exec` exited {}: {}".format(
                    result.returncode, (result.stderr or result.stdout).strip()[-300:]),
                    exec_hint(result), (result.stderr + result.stdout).splitlines()[-15:])
            sleep_or_cancel(next(waits), cancel)

    def check_agent_user(self, output: str) -> None:
        """The key went into the home of the user the agent runs as; SSH logs in as vm.user."""
        lines = output.strip().splitlines()
        agent_user = lines[-1].strip() if lines else ""
        if agent_user and agent_user != self.cfg.vm.user:
            raise StageError("key", self.name, "the guest agent runs as '{}' but vm.user is '{}': the run's key "
                             "went into {}'s home, so SSH as {} would fail".format(
                                 agent_user, self.cfg.vm.user, agent_user, self.cfg.vm.user),
                             "set vm.user: {} (the user the image logs in automatically)".format(agent_user))

    # -- SSH ---------------------------------------------------------------
    def open_socket(self, timeout: float) -> socket.socket:
        return ssh.nodelay_socket(self.ip or "", timeout)

    def ssh_target(self) -> SshTarget:
        return SshTarget(self.ip or "")

    def address(self) -> str:
        return self.ip or ""

    def login_target(self, recorded_address: str) -> SshTarget:
        return SshTarget(self.ip or recorded_address)

    def boot_note(self) -> str:
        return self.boot_path

    def resume_saved_state(self) -> None:
        self.resume = True

    def plan(self, step: str, image: str = "", into: str = "") -> List[str]:
        q, name = shlex.quote, shlex.quote(self.name)
        return {
            "create": ["tart clone {} {}".format(q(image), name)],
            "start": ["tart run --no-graphics {}  &".format(name), "tart ip {}".format(name)],
            "install_key": ["tart exec {} sh -c '<append run key to ~/.ssh/authorized_keys>'".format(name)],
            "seal": ["tart stop {}; tart rename {} {}".format(name, name, q(into or "<image>"))],
            "destroy": [self.tart.remove_command(self.name)],
        }.get(step, [])

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

    def seal(self, image: str, timeout: float) -> None:
        """Stop (the caller flushed the guest's disks: ``tart stop`` is a hard power-off),
        rename into ``image``; teardown then leaves it alone."""
        self.stop_cleanly(timeout)
        self.tart.rename(self.name, image)
        self.sealed()

    def stop_cleanly(self, timeout: float) -> None:
        """For images: stop, and wait for ``tart run`` to exit."""
        self.tart.stop(self.name, timeout=min(30, timeout))
        if self.proc is not None:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise StageError("seal", self.name, "`tart run` did not exit within {:g}s of `tart stop` "
                                 "(timeouts.teardown)".format(timeout), "raise timeouts.teardown; teardown "
                                 "removes the VM", self.console_tail()) from None

    # -- kept VMs that hold no slot -----------------------------------------
    def suspendable(self) -> bool:
        """Run with ``--suspendable`` when the VM may be kept (it is then suspended, so it
        holds no running-VM slot) and the host can suspend (macOS 14+; `--suspendable` drops
        the audio and entropy devices, so not otherwise)."""
        if self.cfg.keep == "never":
            return False
        if platform.system() != "Darwin":
            return True  # the stand-in
        release = platform.mac_ver()[0]
        return release.split(".")[0].isdigit() and int(release.split(".")[0]) >= 14

    def suspend_kept(self, timeout: float) -> str:
        if self.proc is None or self.proc.poll() is not None:
            return "it is not running"
        if not self.suspendable():
            return "this host cannot suspend VMs (macOS 14+ can)"
        try:
            if not self.tart.suspend(self.name):
                return "this Tart cannot suspend (2.27.1+ can)"
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return "`tart suspend` did not finish within {:g}s (timeouts.teardown)".format(timeout)
        except TartError as exc:
            return exc.message
        if code != 0 or not self.suspended():
            return "`tart run` exited {}: {}".format(code, " / ".join(self.console_tail(2)) or "no output")
        self.proc = None
        return ""

    def suspended(self) -> bool:
        return (self.tart.get(self.name) or {}).get("State") == "suspended"

    def wake(self, console_log: Path, deadline: float, cancel: threading.Event,
             on_wait: Callable[[str], None]) -> str:
        self.resume = True  # its own saved state, with its own MAC
        self.exists = True
        self.start(console_log, deadline, cancel, on_wait)
        self.wait_ssh(deadline, cancel)
        return self.ip or ""

    def sealed(self) -> None:
        """The VM was renamed into a prepared image: teardown must leave it alone."""
        self.exists = False
        self.proc = None

    def remove_by_hand(self) -> str:
        return self.tart.remove_command(self.name)


KEY_SCRIPT = (
    # Relative paths: `tart exec` runs in the guest user's home. Prints that user last.
    'umask 077 && mkdir -p .ssh && printf "%s\\n" "$1" >> .ssh/authorized_keys '
    "&& chmod 700 .ssh && chmod 600 .ssh/authorized_keys && id -un"
)
AGENT_HINT = ("the Tart Guest Agent did not answer: it is in Cirrus Labs images (a suspendable VM needs "
              "Tart 2.27.1+); `tart exec` needs Tart 2.27+ on a macOS 14+ host (`invoke vm-doctor` checks both)")


def exec_hint(result) -> str:
    """What to do about a failed ``tart exec``, from what it said."""
    text = (result.stderr + result.stdout).lower()
    if result.returncode == 64 or "unknown" in text and "exec" in text:
        return "this Tart has no `tart exec` (2.27+ has): brew upgrade cirruslabs/cli/tart"
    if "macos 14" in text:
        return "`tart exec` needs a macOS 14 (Sonoma) or newer host"
    return AGENT_HINT


def connect_error(host: str, timeout: float) -> Optional[str]:
    """None when sshd answers on port 22 with its banner, else what went wrong (refused,
    unreachable, timed out, no banner): the difference is what points at Local Network privacy."""
    try:
        with socket.create_connection((host, ssh.SSH_PORT), timeout=timeout) as sock:
            sock.settimeout(timeout)
            if sock.recv(4).startswith(b"SSH-"):
                return None
            return "no SSH banner"
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
