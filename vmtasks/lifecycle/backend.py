"""Where VMs come from: the interface every backend implements.

The pipeline (``vmtasks/lifecycle/vm.py``) drives one ``Machine`` per VM through the same stages
whatever the backend; only these methods differ. The core never asks which backend it has:
what only some backends can do is an optional interface below (``PreparedImages``,
``SealableMachine``, ``ResumableMachine``) that the core asks for with ``isinstance``.
Which modules implement a backend is ``config.BACKEND_MODULES``.

Rules every implementation keeps:
- Every method that waits takes a ``deadline`` (``time.monotonic()`` value) and a ``cancel``
  (``threading.Event``): it returns or raises ``errors.Cancelled`` promptly when ``cancel`` is set.
- Library errors (OSError, HTTP, WebSocket, subprocess timeouts) are translated into the
  ``vmtasks.guest.errors`` family at this boundary, with a hint naming the next step.
- ``destroy`` is idempotent and safe to call after any partial ``create``.
"""

from __future__ import annotations

import abc
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from vmtasks.guest.errors import Cancelled
from vmtasks.state.ledger import current_user, owner_stamp

# Steps of a VM's life a machine describes for ``--dry-run`` (``Machine.plan``).
PLAN_STEPS = ("create", "start", "install_key", "seal", "destroy")


@dataclass(frozen=True)
class Owner:
    """Who owns a VM: written into the lease (tart) or the VM's labels (orchard)."""

    run_id: str
    host: str
    user: str
    pid: int
    pid_start: str

    @classmethod
    def this_process(cls, run_id: str) -> "Owner":
        """This process as the owner of ``run_id``'s VMs (the same stamp as its leases)."""
        stamp = owner_stamp()
        return cls(run_id, stamp["host"], current_user(), stamp["pid"], stamp["pid_start"])


@dataclass(frozen=True)
class Check:
    """One line of vm-doctor: ok / warn / fail, what was found, and how to fix it."""

    name: str
    status: str  # "ok", "warn" or "fail"
    detail: str
    hint: str = ""


@dataclass(frozen=True)
class ListedVm:
    """A VM the backend knows about, as the sweep and ``vm-list`` see it."""

    name: str
    running: bool
    state: str  # running / stopped / suspended / pending / failed
    labels: Dict[str, str] = field(default_factory=dict)  # orchard: the owner labels
    created: Optional[float] = None  # epoch seconds, when known
    size_gb: float = 0.0


class Machine(abc.ABC):
    """One VM of one run, from creation to deletion."""

    name: str

    def prepare_key(self, public_line: str) -> None:
        """The run's public key, known before ``create`` (orchard installs it through the
        VM's startup script; tart ignores it and uses ``install_key`` after boot)."""

    @abc.abstractmethod
    def create(self, image: str, deadline: float, cancel: threading.Event,
               on_start: Optional[Callable[[int, List[str]], None]] = None) -> None:
        """Make the VM from ``image`` (tart: clone + set; orchard: POST /v1/vms).
        ``on_start(pid, argv)``: told the PID and command of a local child doing the work, so
        the ledger can record it."""

    @abc.abstractmethod
    def start(self, console_log: Path, deadline: float, cancel: threading.Event,
              on_wait: Callable[[str], None], still_wanted: Optional[Callable[[], bool]] = None) -> None:
        """Boot it and return once it runs (tart: ``tart run`` in its own session, waiting
        for a host VM slot up to the slot deadline; orchard: wait for ``status: running``,
        reporting the ``pending`` queue through ``on_wait(text)``). ``still_wanted()``
        False while waiting for a slot: give up (raise ``NoLongerNeeded``), the other VMs
        took all the work."""

    @abc.abstractmethod
    def wait_ssh(self, deadline: float, cancel: threading.Event) -> None:
        """Return once sshd answers (tart: ``tart ip`` then sshd's banner; orchard: the
        port-forward tunnel carries an SSH banner)."""

    @abc.abstractmethod
    def install_key(self, public_line: str, deadline: float, cancel: threading.Event) -> None:
        """Append ``public_line`` to the guest user's ``~/.ssh/authorized_keys``
        (tart: ``tart exec``; orchard: the exec WebSocket or the startup script)."""

    @abc.abstractmethod
    def open_socket(self, timeout: float) -> socket.socket:
        """A connected stream to the guest's port 22 for Paramiko (tart: TCP to the VM's IP;
        orchard: one end of a socketpair pumped through the port-forward WebSocket)."""

    @abc.abstractmethod
    def ssh_target(self) -> "SshTarget":
        """How OpenSSH (rsync, the printed attach command) reaches the guest."""

    @abc.abstractmethod
    def alive(self) -> bool:
        """False once the VM is known to have stopped (crash, worker lost)."""

    @abc.abstractmethod
    def why_dead(self) -> str:
        """A line for the user when ``alive()`` is False (exit code, status_message)."""

    @abc.abstractmethod
    def console_tail(self, lines: int = 15) -> List[str]:
        """The last lines of the VM's console or events, for error messages."""

    @abc.abstractmethod
    def destroy(self, timeout: float) -> None:
        """Stop and delete the VM; idempotent; a VM that never existed is not an error."""

    @abc.abstractmethod
    def remove_by_hand(self) -> str:
        """The shell command a person pastes to remove this VM when teardown could not."""

    def address(self) -> str:
        """For messages and the lease: the VM's IP (tart) or its controller path (orchard)."""
        return ""

    def plan(self, step: str, image: str = "", into: str = "") -> List[str]:
        """The commands ``--dry-run`` shows for ``step`` (one of ``PLAN_STEPS``): the same
        object that does the work says what it would run. ``image``: what ``create`` clones;
        ``into``: the image ``seal`` makes."""
        return []

    def boot_note(self) -> str:
        """How the last ``start`` went, when it had a choice (resumed / cold boot), else ""."""
        return ""

    def login_target(self, recorded_address: str) -> "SshTarget":
        """How ``vm-login`` reaches this VM after its run has ended: ``recorded_address`` is
        what ``address()`` said during the run (written into the lease)."""
        return self.ssh_target()


class SealableMachine(abc.ABC):
    """Optional Machine interface: the VM can become a prepared image."""

    @abc.abstractmethod
    def seal(self, image: str, timeout: float) -> None:
        """Stop the VM cleanly (its disks flushed) and turn it into ``image``; teardown then
        leaves it alone."""


class ResumableMachine(abc.ABC):
    """Optional Machine interface: the VM is cloned from a suspended copy and resumed."""

    @abc.abstractmethod
    def resume_saved_state(self) -> None:
        """Called before ``create``: keep the image's saved state (no reconfiguration) and
        resume it in ``start`` (falling back to a cold boot when it is refused)."""


class SuspendableMachine(abc.ABC):
    """Optional Machine interface: a kept VM is suspended, so it holds none of the host's
    running-VM slots, and resumed when someone logs in to it."""

    @abc.abstractmethod
    def suspend_kept(self, timeout: float) -> str:
        """Suspend the running VM; "" when its state is saved, else why not (it then stays
        running, as before)."""

    @abc.abstractmethod
    def suspended(self) -> bool:
        """True when the VM is suspended now."""

    @abc.abstractmethod
    def wake(self, console_log: Path, deadline: float, cancel: threading.Event,
             on_wait: Callable[[str], None]) -> str:
        """Resume a suspended VM (waiting for a slot if the host is at its limit, and saying so)
        until its sshd answers; returns its address. The VM runs on after this process ends."""


@dataclass(frozen=True)
class SshTarget:
    """What OpenSSH needs: ``host`` for ``user@host``, and an optional ProxyCommand
    (orchard: ``python3 -m vmtasks.backends.orchard.proxy ...``; credentials in the environment,
    never in argv)."""

    host: str
    proxy_command: Optional[str] = None
    env: Dict[str, str] = field(default_factory=dict)


class Backend(abc.ABC):
    """A source of VMs."""

    name: str

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for plans and messages: ``tart 2.32.0 on this host`` / ``orchard at URL``."""

    @abc.abstractmethod
    def preflight(self, image: str) -> List[ListedVm]:
        """Checks that create nothing (tool on PATH, controller reachable, credentials,
        image present); returns the current VM listing for the sweep to reuse."""

    @abc.abstractmethod
    def list_vms(self) -> List[ListedVm]:
        """Every VM this backend can see (the sweep filters by prefix and ownership)."""

    @abc.abstractmethod
    def machine(self, name: str, owner: Owner, cfg) -> Machine:
        """A handle for a VM this run will create (nothing happens until ``create``)."""

    @abc.abstractmethod
    def remove(self, name: str, timeout: float) -> None:
        """Stop and delete a VM by name (the sweep; ``cleanup-orphans``)."""

    def slots(self) -> Optional[int]:
        """How many VMs can run at once (None: unknown / unlimited)."""
        return None

    def preflight_tool(self) -> None:
        """The cheapest check that the backend can be reached at all (cleanup-orphans)."""

    def stop_command(self, name: str) -> str:
        """The command a person pastes to stop a VM by name ("" when the backend has none)."""
        return ""

    def doctor(self, parts) -> List[Check]:
        """vm-doctor's checks of this backend (tools, host, images, controller). The generic
        checks (leftovers, state dir) are vm-doctor's own."""
        return []

    def judge_unleased(self, name: str, labels: Dict[str, str], include_kept: bool) -> Tuple[str, str]:
        """A VM with our prefix and no lease in this ledger: ``("orphan" | "live" | "kept" |
        "unknown", why)`` from what the VM itself records about its owner. Default: unknown
        (the sweep's own rules for unleased VMs apply)."""
        return "unknown", ""


class PreparedImages(abc.ABC):
    """Optional Backend interface (cirrus-cli's warm-up): the guest's setup baked once into a
    prepared image, and suspended copies of it to resume. Its machines are
    ``SealableMachine`` and ``ResumableMachine``."""

    @abc.abstractmethod
    def image_identity(self, base: str) -> Dict[str, Any]:
        """What identifies the base image's content (it goes into the prepared image's hash)."""

    @abc.abstractmethod
    def image_disk_gb(self, name: str) -> Optional[float]:
        """The disk an image uses on the host, for vm-doctor; None when unknown."""

    @abc.abstractmethod
    def build_suspended_slots(self, services, plan, count: int) -> List[str]:
        """One suspended copy of the prepared image per VM slot (``<image>-s1`` ..); returns
        the names made, nothing when the host cannot suspend."""


# --- helpers every backend uses -----------------------------------------------------------


def backoff(poll: float, first: float = 0.02) -> Iterator[float]:
    """Polling intervals: 20 ms at first, doubling up to ``poll``. A guest that is up within
    moments is noticed within moments; a slow boot still sees one poll per ``poll`` seconds."""
    delay = min(first, poll)
    while True:
        yield delay
        delay = min(delay * 2, poll)


def sleep_or_cancel(seconds: float, cancel: threading.Event) -> None:
    """Wait ``seconds``, or raise ``Cancelled`` as soon as the run stops."""
    if cancel.wait(max(0.0, seconds)):
        raise Cancelled("the run is stopping")
