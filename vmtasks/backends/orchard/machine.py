"""One Orchard VM: created with the run's key in its startup script, followed through its
events, reached over SSH through the port-forward tunnel (Paramiko on a socketpair, OpenSSH
through ``python3 -m vmtasks.backends.orchard.proxy``), deleted on every exit path.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional

import vmtasks
from vmtasks.guest.errors import BackendError, Cancelled, NoLongerNeeded, SshError
from vmtasks.lifecycle.backend import Machine, Owner, SshTarget, backoff

from .client import CLOSED_AT_ONCE, NOT_READY, OrchardClient, OrchardHTTPError, pump_websocket
from .fleet import OWNER_ENV, STATE_DIR_ENV, env_value, parse_time
from .settings import ENV_CA_CERT, ENV_NAME, ENV_PINNED_CERT, ENV_TOKEN, ENV_URL

if TYPE_CHECKING:  # the backend makes its machines: only the type is needed here
    from .backend import OrchardBackend


KEY_INSTALLED = "vmtasks: key installed"
KEY_ENV = "VMTASKS_PUBLIC_KEY"
# The startup script Orchard runs in the guest's login shell once it boots (after `set -e`
# and the env exported): append the run's key, then say so in the VM's events.
KEY_SCRIPT = (
    "umask 077\n"
    "mkdir -p ~/.ssh\n"
    "chmod 700 ~/.ssh\n"
    "printf '%s\\n' \"$" + KEY_ENV + "\" >> ~/.ssh/authorized_keys\n"
    "chmod 600 ~/.ssh/authorized_keys\n"
    "echo '" + KEY_INSTALLED + "'\n"
)


WAIT_REMINDER = 15.0  # seconds between "still pending" lines for the same queue position


def delete_vm(client: OrchardClient, name: str, timeout: float = 0.0, max_wait: float = 5.0) -> bool:
    """DELETE the VM; False when it did not exist. The worker tears it down in the background.
    A controller that cannot be reached or answers 408/5xx (restarting, overloaded) is asked
    again, backing off up to ``max_wait`` seconds between attempts, until ``timeout`` runs out:
    one lost request must not leave the VM running on its worker."""
    deadline = time.monotonic() + timeout
    waits = backoff(max_wait, first=0.2)
    attempts = 0
    error: BackendError
    while True:
        attempts += 1
        remaining = deadline - time.monotonic()
        try:
            client.request("DELETE", "vms/" + urllib.parse.quote(name, safe=""),
                           timeout=max(1.0, min(30.0, remaining)))
            return True
        except OrchardHTTPError as exc:
            if exc.status == 404:
                return False
            error = exc
            if exc.status not in NOT_READY:
                break  # refused (401, 403, ...): asking again changes nothing
        except BackendError as exc:  # unreachable: a restart, a network blip
            error = exc
        if time.monotonic() + 0.2 >= deadline:
            break
        time.sleep(max(0.0, min(next(waits), deadline - time.monotonic())))
    raise BackendError("could not delete VM {} on the Orchard controller at {} ({} attempt{} in {:.0f}s): {}".format(
        name, client.url, attempts, "" if attempts == 1 else "s", max(0.0, timeout), error.message),
        error.hint or "delete it by hand once the controller answers: orchard delete vm {} "
        "(or invoke cleanup-orphans)".format(name)) from None


def _without_secrets(vm: dict) -> dict:
    """A VM resource as we keep it: Orchard returns its ``password``, which we never hold."""
    return {k: v for k, v in vm.items() if k != "password"} if isinstance(vm, dict) else {}


def image_hint(image: str, status_message: str) -> str:
    text = status_message.lower()
    if "unable to authenticate" in text or "ssh connection" in text:
        return ("Orchard's worker could not log in to the guest to run the startup script: set vm.user and "
                "vm.password to an account of image {} that may log in over SSH with a password "
                "(Cirrus Labs images: admin/admin)".format(image))
    if "clone" in text or "pull" in text or "does not exist" in text:
        return ("make image {0} available on every worker (`tart pull {0}` there, or `tart clone` a local "
                "base of that name), or fix orchard.image".format(image))
    if "lost connection" in text or ("worker" in text and "exist" in text):
        return "the worker went away: check `orchard list workers`; re-run (the VM's tests are re-queued)"
    if "startup script" in text:
        return "the key-install startup script failed: see the events above"
    return "look at the VM's events (orchard logs vm NAME) and the worker's log"


class OrchardMachine(Machine):
    """One VM on the controller, from POST to DELETE."""

    def __init__(self, backend: OrchardBackend, name: str, owner: Owner, public_key: Optional[str] = None,
                 state_dir: str = "") -> None:
        self.backend = backend
        self.state_dir = state_dir
        self.client = backend.client
        self.name = name
        self.owner = owner
        self.public_key = public_key
        self.last: dict = {}
        self.gone = False
        self.created = False
        self._created_at = 0.0
        self._last_wait = ("", 0.0)

    @property
    def _path(self) -> str:
        return "vms/" + urllib.parse.quote(self.name, safe="")

    # --- creation and start ---

    def prepare_key(self, public_line: str) -> None:
        self.public_key = public_line

    def create(self, image: str, deadline: float, cancel: threading.Event, on_start=None) -> None:
        """POST /v1/vms with the run's key and owner in the startup script's env."""
        if cancel.is_set():
            raise Cancelled("cancelled before creating " + self.name)
        if not self.public_key:
            raise BackendError("OrchardMachine {} has no public key to install".format(self.name),
                               "pass public_key= to OrchardBackend.machine(): Orchard installs it at boot")
        env = {var: env_value(getattr(self.owner, key)) for key, var in OWNER_ENV.items()}
        env[KEY_ENV] = env_value(self.public_key)
        if self.state_dir and env_value(self.state_dir) == self.state_dir:
            env[STATE_DIR_ENV] = self.state_dir
        body = {"name": self.name, "image": image or self.backend.image, "headless": True,
                "restart_policy": "Never", "startup_script": {"script_content": KEY_SCRIPT, "env": env},
                **self.backend.credentials()}
        if self.backend.cpu:
            body["cpu"] = int(self.backend.cpu)
        if self.backend.memory:
            body["memory"] = int(self.backend.memory)
        if self.backend.labels:
            body["labels"] = self.backend.labels
        try:
            _, created = self.client.request("POST", "vms", body,
                                             timeout=max(1.0, min(30.0, deadline - time.monotonic())))
            self.last = _without_secrets(created or {})
        except OrchardHTTPError as exc:
            if exc.status == 409:
                raise BackendError("a VM named {} already exists on the Orchard controller at {}".format(
                    self.name, self.client.url),
                    "another run owns it, or a crashed run left it: invoke cleanup-orphans") from None
            raise BackendError("could not create VM {} on the Orchard controller at {}: {}".format(
                self.name, self.client.url, exc.message), exc.hint) from None
        self.created = True
        self._created_at = time.monotonic()

    def start(self, console_log: Path, deadline: float, cancel: threading.Event,
              on_wait: Callable[[str], None], still_wanted: Optional[Callable[[], bool]] = None) -> None:
        """Wait for ``status: running``; while ``pending``, report the queue through on_wait.
        Status changes (and a failed VM's events) go to ``console_log``. ``still_wanted``
        (optional): asked on every poll while the VM is not running yet; False (the run's
        test queue ran dry meanwhile) gives up with ``Cancelled`` instead of booting a VM
        nobody needs (teardown then deletes it)."""
        seen = None
        while True:
            if still_wanted is not None and not still_wanted():
                self._log(console_log, "no longer needed: given up before it ran")
                raise NoLongerNeeded("VM {} is no longer needed (no tests left)".format(self.name))
            vm = self._get()
            status = vm.get("status")
            if (status, vm.get("worker")) != seen:
                seen = (status, vm.get("worker"))
                self._log(console_log, "{}{}{}".format(
                    status, " on worker " + vm["worker"] if vm.get("worker") else "",
                    ": " + vm["status_message"] if vm.get("status_message") else ""))
            if status == "running":
                return
            if status == "failed":
                error = self._failure("did not start")
                for line in self._events(50):
                    self._log(console_log, "event: " + line)
                raise error
            if time.monotonic() >= deadline:
                raise BackendError(
                    "VM {} on the Orchard controller at {} is still {} after {:.0f}s{}".format(
                        self.name, self.client.url, status, time.monotonic() - self._created_at,
                        " (worker {})".format(vm["worker"]) if vm.get("worker") else " (not scheduled: fleet full)"),
                    "raise the start timeout, add workers, or run with fewer --vms")
            if status == "pending":
                self._report_wait(vm, on_wait)
            if cancel.wait(self.backend.poll):
                raise Cancelled("cancelled while VM {} was {}".format(self.name, status))

    def _report_wait(self, vm: dict, on_wait: Callable[[str], None]) -> None:
        waited = time.monotonic() - self._created_at
        if vm.get("worker"):
            text = "starting on Orchard worker {}".format(vm["worker"])
        else:
            try:
                _, vms = self.client.request("GET", "vms")
            except BackendError:
                vms = []
            queue = sorted((v for v in vms or [] if v.get("status") == "pending" and not v.get("worker")),
                           key=lambda v: parse_time(str(v.get("createdAt", ""))) or 0)
            names = [v.get("name") for v in queue]
            position = names.index(self.name) + 1 if self.name in names else 1
            text = "pending on Orchard: position {} of {} in the queue (fleet full)".format(position, len(names) or 1)
        previous, when = self._last_wait
        # A new line when the position changes, else a reminder every WAIT_REMINDER seconds.
        if text != previous or time.monotonic() - when >= WAIT_REMINDER:
            self._last_wait = (text, time.monotonic())
            on_wait("{}, waiting {:.0f}s".format(text, waited))

    def wait_ssh(self, deadline: float, cancel: threading.Event) -> None:
        """Return once the tunnel carries an SSH banner from the guest's sshd."""
        from websockets.exceptions import ConnectionClosed

        last = ""
        while True:
            if cancel.is_set():
                raise Cancelled("cancelled while waiting for SSH on " + self.name)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BackendError("no SSH banner from VM {} through the port-forward of {}: {}".format(
                    self.name, self.client.url, last or "timed out"),
                    "check the VM's events (orchard logs vm {}) and that sshd runs in the image".format(self.name))
            try:
                ws = self.client.port_forward(self.name, 22, wait=int(min(10, max(1, remaining))),
                                              open_timeout=min(10, max(1, remaining)))
                try:
                    banner = ws.recv(timeout=min(10, max(1, remaining)))
                    if isinstance(banner, bytes) and banner.startswith(b"SSH-"):
                        return
                    last = "unexpected first bytes {!r}".format(banner[:20])
                except ConnectionClosed:
                    last = CLOSED_AT_ONCE.format(port=22, vm=self.name)
                finally:
                    ws.close()
            except OrchardHTTPError as exc:
                if exc.status in (404, 417):  # deleted / failed: _get says which
                    self._get()
                    raise self._failure("stopped while waiting for SSH") from None
                if exc.status not in NOT_READY:
                    raise
                last = exc.message
            except BackendError as exc:
                last = exc.message
            except Exception as exc:  # websockets ConnectionClosed / TimeoutError: not ready yet
                last = "{}: {}".format(type(exc).__name__, exc)
            cancel.wait(min(self.backend.poll, max(0, deadline - time.monotonic())))

    def install_key(self, public_line: str, deadline: float, cancel: threading.Event) -> None:
        """The key went in with ``create`` (the startup script): wait until the script has said
        so in the VM's events, because Orchard reports ``running`` before the script has run."""
        if public_line.strip() != (self.public_key or "").strip():
            raise BackendError("VM {} was created with a different public key".format(self.name),
                               "pass the run's key to OrchardBackend.machine(public_key=...)")
        while True:
            if any(line.strip() == KEY_INSTALLED for line in self._events(100)):
                return
            vm = self._get()
            if vm.get("status") == "failed":
                raise self._failure("failed while installing the run's key")
            if time.monotonic() >= deadline:
                raise BackendError("the startup script of VM {} did not report the key installed within the "
                                   "deadline (controller {})".format(self.name, self.client.url),
                                   "see the VM's events: orchard logs vm " + self.name)
            if cancel.wait(self.backend.poll):
                raise Cancelled("cancelled while installing the key on " + self.name)

    # --- SSH through the controller ---

    def open_socket(self, timeout: float) -> socket.socket:
        """One end of a socketpair; a thread pair pumps the other end through the port-forward."""
        try:
            ws = self.client.port_forward(self.name, 22, wait=int(max(1, timeout)), open_timeout=timeout)
        except BackendError as exc:
            raise SshError("cannot open the SSH tunnel to VM {} through {}: {}".format(
                self.name, self.client.url, exc.message),
                exc.hint or "the VM may have stopped: see its events (orchard logs vm {})".format(self.name)) from None
        ours, theirs = socket.socketpair()
        pump_websocket(ws, ours)
        return theirs

    def ssh_target(self) -> SshTarget:
        s = self.client.settings
        env = {ENV_URL: s.base, ENV_NAME: s.service_account, ENV_TOKEN: s.token,
               "PYTHONPATH": _package_root() + os.pathsep + os.environ.get("PYTHONPATH", "")}
        if s.ca_cert:
            env[ENV_CA_CERT] = s.ca_cert
        if s.pinned_cert:
            env[ENV_PINNED_CERT] = s.pinned_cert
        proxy = "{} -m vmtasks.backends.orchard.proxy {} 22".format(shlex.quote(sys.executable), shlex.quote(self.name))
        return SshTarget(host=self.name, proxy_command=proxy, env=env)

    # --- state ---

    def _get(self) -> dict:
        try:
            _, vm = self.client.request("GET", self._path)
        except OrchardHTTPError as exc:
            if exc.status == 404:
                self.gone = True
                raise BackendError("VM {} no longer exists on the Orchard controller at {}".format(
                    self.name, self.client.url),
                    "someone deleted it (orchard delete vm, cleanup-orphans from another host?)") from None
            raise
        self.last = _without_secrets(vm or {})
        return self.last

    def alive(self) -> bool:
        try:
            return self._get().get("status") in ("running", "pending")
        except BackendError:
            # A lost VM is dead; a controller we cannot reach right now says nothing about it.
            return not self.gone

    def why_dead(self) -> str:
        if self.gone:
            return "VM {} was deleted from the Orchard controller at {}".format(self.name, self.client.url)
        return "VM {} on Orchard worker {} is {}: {}".format(
            self.name, self.last.get("worker") or "?", self.last.get("status", "?"),
            self.last.get("status_message") or "no status message")

    def _events(self, lines: int) -> List[str]:
        try:
            _, events = self.client.request("GET", self._path + "/events", query={"order": "desc", "limit": str(lines)})
        except BackendError:
            return []
        return [str(e.get("payload", "")) for e in reversed(events or [])]

    def console_tail(self, lines: int = 15) -> List[str]:
        return self._events(lines)

    def _failure(self, what: str) -> BackendError:
        """The error for a VM that failed: controller, VM, worker, status_message, last events."""
        vm = self.last
        message = vm.get("status_message") or "no status message"
        text = "VM {} (Orchard controller {}, worker {}) {}: status {}: {}".format(
            self.name, self.client.url, vm.get("worker") or "none", what, vm.get("status", "?"), message)
        tail = self._events(5)
        if tail:
            text += "\n  last events:\n" + "\n".join("    " + line for line in tail)
        return BackendError(text, image_hint(vm.get("image") or self.backend.image, message))

    def _log(self, console_log: Path, line: str) -> None:
        try:
            with open(console_log, "a") as fh:
                fh.write("orchard: {} {}\n".format(self.name, line))
        except OSError:
            pass

    def destroy(self, timeout: float) -> None:
        delete_vm(self.client, self.name, timeout)

    def remove_by_hand(self) -> str:
        return ('curl -fsS -X DELETE -u "${}:${}" {}'.format(
            ENV_NAME, ENV_TOKEN, shlex.quote(self.client.endpoint(self._path))))

    def plan(self, step: str, image: str = "", into: str = "") -> List[str]:
        vm = self.client.endpoint("vms/") + self.name  # as written: the plan's "<vm>" stays readable
        return {
            "create": ["POST {} (image {}, the run's key and owner in the startup script)".format(
                self.client.endpoint("vms"), image or self.backend.image)],
            "start": ["GET {} until status: running (pending: the fleet's queue)".format(vm)],
            "install_key": ["GET {}/events until the startup script says {!r}; SSH through the "
                            "controller's port-forward".format(vm, KEY_INSTALLED)],
            "destroy": ["DELETE {}".format(vm)],
        }.get(step, [])

    def address(self) -> str:
        worker = self.last.get("worker")
        return "{}/v1/vms/{}{}".format(self.client.url, self.name, " on " + worker if worker else "")


def _package_root() -> str:
    return str(Path(vmtasks.__file__).resolve().parent.parent)
