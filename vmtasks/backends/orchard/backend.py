"""The Orchard backend behind ``vmtasks.lifecycle.backend.Backend``: pre-flight (controller,
account, image probe), listing and removing VMs, the fleet's slots, and its machines.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from vmtasks.guest.atomic import write_atomic
from vmtasks.guest.errors import BackendError, ConfigError, PreflightError
from vmtasks.lifecycle.backend import Backend, Check, ListedVm, Owner
from vmtasks.settings.factory import state_dir as find_state_dir

from .client import OrchardClient, OrchardHTTPError
from .fleet import OWNER_ENV, env_value, fleet_slots, judge_unleased, online_workers, owner_labels, parse_time
from .machine import OrchardMachine, delete_vm, image_hint
from .settings import PROBE_CACHE, OrchardSettings, load_settings

PROBE_RAN = "vmtasks: probe ran"
PROBE_TTL = 6 * 3600.0


def backend_from_config(cfg, runner=None, driver: Optional["OrchardClient"] = None) -> "OrchardBackend":
    """The Orchard backend for a loaded config (``backend: orchard``; ``orchard.*`` keys).
    ``runner``: unused (no local commands); ``driver``: an ``OrchardClient`` to use."""
    settings = load_settings(url=cfg.orchard.url or None, ca_cert=cfg.orchard.ca_cert or None,
                             context=cfg.orchard.context or None)
    return OrchardBackend(settings, image=cfg.orchard.image or cfg.vm.base, cpu=cfg.orchard.cpu,
                          memory=cfg.orchard.memory, prefix=cfg.vm.name_prefix, user=cfg.vm.user,
                          password=cfg.vm.password, client=driver,
                          poll=min(cfg.timeouts.poll, 0.5),
                          probe_cache=find_state_dir(cfg, os.environ) / PROBE_CACHE)


class OrchardBackend(Backend):
    """VMs from an Orchard controller (see the module docstring).

    ``settings`` from ``load_settings``; ``image`` (an OCI reference or a name local to every
    worker), ``cpu`` and ``memory`` (MB) go into every VM; ``prefix`` names the image probe;
    ``labels`` are Orchard scheduling labels (only workers offering all of them take the VMs);
    ``user`` is the guest's SSH user (Orchard's ``username``) and ``password`` its password
    (Orchard's worker logs in with both to run the startup script; never printed). ``poll`` paces every wait;
    ``worker_offline_after`` is when a silent worker stops counting; ``probe_image`` makes
    ``preflight`` check the image with a probe VM, waiting at most ``probe_timeout``;
    ``probe_cache``: a JSON file remembering images already seen to start (see PROBE_CACHE).
    """

    name = "orchard"

    def __init__(self, settings: OrchardSettings, image: str, cpu: Optional[int] = None,
                 memory: Optional[int] = None, prefix: str = "vmtasks", labels: Optional[Dict[str, str]] = None,
                 *, user: str = "admin", password: str = "admin", client: Optional[OrchardClient] = None,
                 poll: float = 0.5, worker_offline_after: float = 180.0,
                 probe_image: bool = True, probe_timeout: float = 60.0,
                 probe_cache: Optional[Path] = None) -> None:
        self.settings = settings
        self.client = client or OrchardClient(settings)
        self.image = image
        self.cpu = cpu
        self.memory = memory
        self.prefix = prefix
        self.labels = dict(labels or {})
        if not password and user != "admin":
            raise ConfigError("Orchard VMs for user {!r} need its password: with none, Orchard's worker logs in "
                              "with an empty password and fails the VM".format(user),
                              "set vm.password to that account's password in the image")
        self.user = user
        self._password = password
        self.poll = poll
        self.worker_offline_after = worker_offline_after
        self.probe_image = probe_image
        self.probe_timeout = probe_timeout
        self.probe_cache = probe_cache
        self._capacity: Optional[int] = None

    def credentials(self) -> Dict[str, str]:
        """The VM's ``username`` and ``password`` fields. Orchard's worker runs the startup script
        over SSH with password authentication and substitutes admin/admin only when *both* are
        empty (internal/worker/vmmanager/base/base.go): a username alone fails the VM. So both,
        or (no password, user admin) neither."""
        if not self._password:
            return {}
        return {"username": self.user, "password": self._password}

    def describe(self) -> str:
        who = " as {}".format(self.settings.service_account) if self.settings.service_account else ""
        return "orchard at {}{}".format(self.client.url, who)

    def preflight(self, image: str) -> List[ListedVm]:
        """Reachable (``GET /v1/``), credentials valid (``/v1/controller/info``), workers online
        and their free slots (``/v1/workers`` + ``/v1/vms``), and the image: Orchard's API has no
        way to ask a worker for an image, so (``probe_image``) one short-lived probe VM is
        created and deleted; it fails within seconds if the image is missing. A full fleet
        leaves the probe pending: then the image is not checked (the run queues anyway)."""
        c = self.client
        try:
            c.request("GET", "/", parse=False)  # any 2xx; no credentials needed, wrong ones get a 401
            c.request("GET", "controller/info")
        except OrchardHTTPError as exc:
            raise PreflightError(exc.message, exc.hint or "check {} is an Orchard controller".format(c.url)) from None
        except BackendError as exc:
            raise PreflightError(exc.message, exc.hint) from None
        try:
            _, workers = c.request("GET", "workers")
            _, vms = c.request("GET", "vms")
        except BackendError as exc:
            hint = exc.hint or ("the service account needs the compute:read role"
                                if getattr(exc, "status", 0) in (401, 403) else "")
            raise PreflightError(exc.message, hint) from None
        workers, vms = workers or [], vms or []
        online = online_workers(workers, self.worker_offline_after)
        if not online:
            raise PreflightError(
                "the Orchard controller at {} has no online worker ({} known: {})".format(
                    c.url, len(workers), ", ".join(w.get("name", "?") for w in workers) or "none"),
                "start `orchard worker run` on the Macs, or check why they stopped reporting")
        if self.labels:
            matching = [w for w in online if all((w.get("labels") or {}).get(k) == v for k, v in self.labels.items())]
            if not matching:
                raise PreflightError("no online worker of {} has the labels {}".format(c.url, self.labels),
                                     "fix orchard labels in the config or the workers' --labels")
            online = matching
        self._capacity, busy = fleet_slots(online, vms)
        if not image:
            raise PreflightError("no Orchard image configured", "set orchard.image in the config")
        if self.probe_image and not self._probed_recently(image):
            if self._probe(image, fleet_full=busy >= self._capacity):
                self._remember_probe(image)
        return [self._listed(vm) for vm in vms]

    def _probe_key(self, image: str) -> str:
        return "{} {} {}".format(self.client.url, image, self.user)

    def _read_probe_cache(self) -> Dict[str, float]:
        try:
            data = json.loads(self.probe_cache.read_text()) if self.probe_cache else {}
        except (OSError, ValueError):
            return {}  # missing or damaged: probe again
        return {k: v for k, v in data.items() if isinstance(v, (int, float))} if isinstance(data, dict) else {}

    def _probed_recently(self, image: str) -> bool:
        seen = self._read_probe_cache().get(self._probe_key(image))
        return seen is not None and 0 <= time.time() - seen < PROBE_TTL

    def _remember_probe(self, image: str) -> None:
        if self.probe_cache is None:
            return
        data = {k: v for k, v in self._read_probe_cache().items() if time.time() - v < PROBE_TTL}
        data[self._probe_key(image)] = time.time()
        try:
            self.probe_cache.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.probe_cache, json.dumps(data, indent=1, sort_keys=True), mode=0o600)
        except OSError:
            pass  # only a cache: the next run probes again

    def doctor(self, parts=None) -> List[Check]:
        """vm-doctor's checks for this backend."""
        return [Check(*row) for row in self.health()]

    def judge_unleased(self, name: str, labels: Dict[str, str], include_kept: bool) -> Tuple[str, str]:
        return judge_unleased(name, labels, include_kept)

    def health(self) -> List[Tuple[str, str, str, str]]:
        """vm-doctor's checks of the controller, each ``(name, "ok"|"warn"|"fail", detail, hint)``:
        reachable, credentials valid, workers online, free slots. Creates nothing."""
        c = self.client
        refused = None
        try:
            c.request("GET", "/", parse=False)
        except OrchardHTTPError as exc:
            if exc.status != 401:
                return [("orchard controller", "fail", exc.message, exc.hint)]
            refused = exc  # it answered: reachable, but the credentials are wrong
        except BackendError as exc:
            return [("orchard controller", "fail", exc.message, exc.hint)]
        out = [("orchard controller", "ok", "{} reachable (settings from {})".format(c.url, self.settings.source), "")]
        if refused is not None:
            return out + [("orchard credentials", "fail", refused.message, refused.hint)]
        try:
            _, info = c.request("GET", "controller/info")
            _, workers = c.request("GET", "workers")
            _, vms = c.request("GET", "vms")
        except BackendError as exc:
            return out + [("orchard credentials", "fail", exc.message, exc.hint)]
        out.append(("orchard credentials", "ok", "service account {!r} accepted (controller {})".format(
            self.settings.service_account, (info or {}).get("version", "?")), ""))
        online = online_workers(workers or [], self.worker_offline_after)
        out.append(("orchard workers", "ok" if online else "fail", "{} of {} online{}".format(
            len(online), len(workers or []), ": " + ", ".join(w.get("name", "?") for w in online) if online else ""),
            "" if online else "start `orchard worker run` on the Macs, or check why they stopped reporting"))
        capacity, busy = fleet_slots(online, vms or [])
        free = max(0, capacity - busy)
        out.append(("orchard slots", "ok" if free else "warn", "{} of {} VM slots free".format(free, capacity),
                    "" if free else "the fleet is full: new VMs wait as pending until slots free up"))
        return out

    def _probe(self, image: str, fleet_full: bool = False) -> bool:
        """Create and delete one probe VM; True once its startup script ran (the image exists on
        its worker, and the worker logged in with the run's vm.user / vm.password),
        False when it could not be judged (``fleet_full`` and the probe is not scheduled, or
        not running within probe_timeout); PreflightError when it failed. With free slots an
        unscheduled probe is waited for: Orchard's scheduler runs every few seconds."""
        name = "{}-probe-{}-{}".format(self.prefix, os.getpid(), int(time.time() * 1000) % 10 ** 8)
        # Owned like a run's VM, so cleanup-orphans can judge a probe left by a killed process.
        owner = Owner.this_process("preflight")
        env = {var: env_value(getattr(owner, key)) for key, var in OWNER_ENV.items()}
        # The run's VMs' credentials and a script that says it ran: the probe fails the way they
        # would (a missing image, or a login the worker cannot make), before any of them exists.
        body = {"name": name, "image": image, "headless": True, "restart_policy": "Never",
                "startup_script": {"script_content": "echo '{}'".format(PROBE_RAN), "env": env},
                **self.credentials()}
        if self.labels:
            body["labels"] = self.labels
        try:
            self.client.request("POST", "vms", body)
        except BackendError as exc:
            raise PreflightError("cannot create the image probe VM on {}: {}".format(self.client.url, exc.message),
                                 exc.hint or "check the service account has the compute:write role") from None
        try:
            deadline = time.monotonic() + self.probe_timeout
            while time.monotonic() < deadline:
                _, vm = self.client.request("GET", "vms/" + urllib.parse.quote(name, safe=""))
                if vm.get("status") == "running" and self._probe_ran(name):
                    return True
                if vm.get("status") == "failed":
                    message = vm.get("status_message", "")
                    raise PreflightError(
                        "image {!r} cannot be started on Orchard worker {} ({}): {}".format(
                            image, vm.get("worker") or "?", self.client.url, message),
                        image_hint(image, message))
                if fleet_full and vm.get("status") == "pending" and not vm.get("worker"):
                    return False  # the image cannot be checked now; the run will queue
                time.sleep(min(self.poll, 0.2))
            return False
        finally:
            try:
                self.client.request("DELETE", "vms/" + urllib.parse.quote(name, safe=""))
            except OrchardHTTPError as exc:
                if exc.status != 404:
                    raise
            except BackendError:
                pass

    def _probe_ran(self, name: str) -> bool:
        """The probe's startup script has run: the worker logged in to the guest."""
        _, events = self.client.request("GET", "vms/{}/events".format(urllib.parse.quote(name, safe="")))
        return any(str(e.get("payload", "")).strip() == PROBE_RAN for e in events or [])

    def slots(self) -> Optional[int]:
        return self._capacity

    def list_vms(self) -> List[ListedVm]:
        _, vms = self.client.request("GET", "vms")
        return [self._listed(vm) for vm in vms or []]

    @staticmethod
    def _listed(vm: dict) -> ListedVm:
        status = str(vm.get("status", ""))
        return ListedVm(name=str(vm.get("name", "")), running=status == "running", state=status,
                        labels=owner_labels(vm), created=parse_time(str(vm.get("createdAt", ""))))

    def machine(self, name: str, owner: Owner, cfg=None, public_key: Optional[str] = None) -> "OrchardMachine":
        state_dir = ""
        if cfg is not None:
            state_dir = str(find_state_dir(cfg, os.environ).resolve())
        return OrchardMachine(self, name, owner, public_key=public_key, state_dir=state_dir)

    def remove(self, name: str, timeout: float) -> None:
        delete_vm(self.client, name, timeout)
