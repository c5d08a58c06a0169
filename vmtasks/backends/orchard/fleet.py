"""The Orchard backend: VMs from an Orchard controller's REST API (``<url>/v1``).

REST calls use ``urllib.request``; the port-forward tunnel (``/v1/vms/{name}/port-forward``)
uses the ``websockets`` package's sync client, so no WebSocket framing is written here. SSH
to a VM always goes through that tunnel: Paramiko gets one end of a ``socketpair`` whose other
end a thread pumps through the WebSocket, and OpenSSH (rsync) gets a ProxyCommand running
``python3 -m vmtasks.backends.orchard.proxy`` that does the same with its stdin/stdout. The client never
needs a route to the workers' VM network.

Where things live on the VM resource, and why:
- The run's public key and the owner (run id, host, user, PID and its start time) are in the
  ``startup_script``'s ``env``. Orchard's ``labels`` are *scheduling constraints* (a VM only
  goes to a worker that has every label), so owner data there would leave the VM pending
  forever; the script env is stored on the resource, returned by ``GET /v1/vms`` and harmless.
  The owner's state dir goes there too: a sweep from another state dir on the owner's host
  (``judge_unleased``, used by vmtasks/state/orphans.py) reads that VM's lease there to tell a kept
  VM from an orphan.
- The key goes in at creation (the startup script appends it to ``authorized_keys``), because
  Orchard runs the script itself as soon as the VM boots: no second round trip. Orchard's
  worker runs it over SSH with password authentication as the VM's ``username`` and
  ``password``, and substitutes admin/admin only when both are empty: so a VM carries
  ``vm.user`` *and* ``vm.password``, or neither (``OrchardBackend.credentials``). The exec
  endpoint would need the same login.
"""

from __future__ import annotations

import base64
import inspect
import json
import os
import re
import shlex
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from vmtasks.guest.atomic import write_atomic
from vmtasks.guest.config import excerpt, orchard_url_problem
from vmtasks.guest.errors import BackendError, Cancelled, ConfigError, NoLongerNeeded, PreflightError, SshError
from vmtasks.guest.results.stream import parse_time as parse_rfc3339
from vmtasks.lifecycle.backend import Backend, Check, ListedVm, Machine, Owner, SshTarget, backoff
from vmtasks.settings.factory import state_dir
from vmtasks.settings.factory import state_dir as find_state_dir
from vmtasks.state.ledger import Ledger, process_alive

ENV_URL = "ORCHARD_URL"
ENV_NAME = "ORCHARD_SERVICE_ACCOUNT_NAME"
ENV_TOKEN = "ORCHARD_SERVICE_ACCOUNT_TOKEN"
# For the ProxyCommand helper only: how to trust the controller's certificate.
ENV_CA_CERT = "VMTASKS_ORCHARD_CA_CERT"
ENV_PINNED_CERT = "VMTASKS_ORCHARD_PINNED_CERT"

TART_VMS = "org.cirruslabs.tart-vms"
KEY_INSTALLED = "vmtasks: key installed"
OWNER_ENV = {"run_id": "VMTASKS_RUN_ID", "host": "VMTASKS_OWNER_HOST", "user": "VMTASKS_OWNER_USER",
             "pid": "VMTASKS_OWNER_PID", "pid_start": "VMTASKS_OWNER_PID_START"}
KEY_ENV = "VMTASKS_PUBLIC_KEY"
# The owner's state dir (leases): a sweep from another state dir on the same host reads the
# lease there to tell a kept VM (keep=True in its lease) from an orphan.
STATE_DIR_ENV = "VMTASKS_OWNER_STATE_DIR"
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
CREDENTIALS_HINT = ("set {} and {} to a service account of this controller (or use the `orchard` "
                    "CLI's context file: orchard context create ...)".format(ENV_NAME, ENV_TOKEN))
# Status codes of a port-forward that mean "not ready yet, retry": the description says 503,
# Orchard 0.55's source answers 408 when the VM does not run within `wait`, and real
# controllers have been seen answering 500.
NOT_READY = (408, 500, 502, 503, 504)
# What a port-forward's error status means (internal/controller/api_vms_portforward.go).
PORT_FORWARD_STATUS = {
    408: "the VM was not running within the port-forward's wait of {wait}s",
    500: "the worker could not connect to the guest's port {port} within {wait}s (nothing listens there yet?)",
    503: "the controller could not reach the VM's worker",
}
# Under Orchard's RPC v1 (`orchard dev`) a worker that cannot connect to the guest's port
# leaves the controller an upgraded WebSocket that it closes at once.
CLOSED_AT_ONCE = ("the port-forward to port {port} of VM {vm} was accepted and closed at once: the worker "
                  "could not connect to the guest's port (Orchard RPC v1, as under `orchard dev`)")
# Images a probe VM has started on a controller, and when (in the state dir): a run skips the
# probe for an image seen within PROBE_TTL. Only successes are kept, so a missing image is
# always caught before any VM; one removed from the workers since fails at its VMs' start,
# with the same hint.
PROBE_CACHE = "orchard-images.json"
PROBE_RAN = "vmtasks: probe ran"
PROBE_TTL = 6 * 3600.0
WAIT_REMINDER = 15.0  # seconds between "still pending" lines for the same queue position


# --- settings -------------------------------------------------------------------------


@dataclass(frozen=True)
class OrchardSettings:
    """Where the controller is and how to authenticate; ``source`` says where it came from."""

    url: str
    service_account: str = ""
    token: str = field(default="", repr=False)
    ca_cert: Optional[str] = None  # a CA bundle file to trust (hostname checked)
    pinned_cert: Optional[str] = field(default=None, repr=False)  # PEM from a context file
    source: str = "environment"

    @property
    def base(self) -> str:
        return self.url.rstrip("/")


def context_file_path(env=None) -> Path:
    """Where the `orchard` CLI keeps its contexts: ``$ORCHARD_HOME/.orchard/orchard.yml``,
    ORCHARD_HOME defaulting to the home directory (as in orchard's internal/orchardhome)."""
    env = os.environ if env is None else env
    home = env.get("ORCHARD_HOME") or env.get("HOME") or str(Path.home())
    return Path(home) / ".orchard" / "orchard.yml"


def backend_from_config(cfg, runner=None, driver: Optional["OrchardClient"] = None) -> "OrchardBackend":
    """The Orchard backend for a loaded config (``backend: orchard``; ``orchard.*`` keys).
    ``runner``: unused (no local commands); ``driver``: an ``OrchardClient`` to use."""
    settings = load_settings(url=cfg.orchard.url or None, ca_cert=cfg.orchard.ca_cert or None,
                             context=cfg.orchard.context or None)
    return OrchardBackend(settings, image=cfg.orchard.image or cfg.vm.base, cpu=cfg.orchard.cpu,
                          memory=cfg.orchard.memory, prefix=cfg.vm.name_prefix, user=cfg.vm.user,
                          password=cfg.vm.password, client=driver,
                          poll=min(cfg.timeouts.poll, 0.5),
                          probe_cache=state_dir(cfg, os.environ) / PROBE_CACHE)


def load_settings(url: Optional[str] = None, ca_cert: Optional[str] = None, context: Optional[str] = None,
                  env=None, context_file: Optional[Path] = None) -> OrchardSettings:
    """Resolve the connection the way the `orchard` CLI does, lowest first: the context file's
    context (``context``, else its ``default-context``), then ``url`` (vm.yaml's
    ``orchard.url``), then ORCHARD_URL / ORCHARD_SERVICE_ACCOUNT_NAME / _TOKEN one by one."""
    env = os.environ if env is None else env
    path = context_file or context_file_path(env)
    found: Dict[str, str] = {}
    sources = []
    if path.is_file():
        import yaml

        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError("cannot read Orchard's context file {}: {}".format(path, exc),
                              "fix or remove it (orchard context list)") from None
        contexts = data.get("contexts") or {}
        wanted = context or data.get("default-context")
        if context and context not in contexts:
            raise ConfigError("Orchard context {!r} is not in {} (it has: {})".format(
                context, path, ", ".join(sorted(contexts)) or "none"),
                "create it with `orchard context create` or fix orchard.context in the config")
        if wanted in contexts:
            found = {k: str(v) for k, v in (contexts[wanted] or {}).items() if v is not None}
            sources.append("context {!r} of {}".format(wanted, path))
    elif context:
        raise ConfigError("orchard.context is {!r} but there is no context file at {}".format(context, path),
                          "create it with `orchard context create`, or set ORCHARD_URL and the service account")
    pinned = None
    if found.get("certificate"):
        try:
            pinned = base64.b64decode(found["certificate"]).decode()
        except (ValueError, UnicodeDecodeError):
            raise ConfigError("the certificate of Orchard context in {} is not base64 PEM".format(path),
                              "re-create the context (orchard context create --force ...)") from None
    final_url = found.get("url", "")
    if url:
        final_url, sources = url, sources + ["orchard.url"]
    name, token = found.get("serviceAccountName", ""), found.get("serviceAccountToken", "")
    if env.get(ENV_URL):
        final_url, sources = env[ENV_URL], sources + [ENV_URL]
    if ENV_NAME in env:
        name = env[ENV_NAME]
    if ENV_TOKEN in env:
        token = env[ENV_TOKEN]
    if not final_url:
        raise ConfigError("no Orchard controller URL: {} is not set, orchard.url is empty and there is no "
                          "context file at {}".format(ENV_URL, path),
                          "export {}=https://controller:6120 (and the service account variables)".format(ENV_URL))
    problem = orchard_url_problem(final_url)
    if problem:
        raise ConfigError("the Orchard URL from {} {}, got {}".format(
            sources[-1] if sources else "?", problem, excerpt(final_url)),
            "write the controller's base URL there, for example https://orchard.example.com:6120")
    if ca_cert and not Path(ca_cert).is_file():
        raise ConfigError("orchard.ca_cert {} does not exist".format(ca_cert),
                          "point it at the controller's CA certificate (PEM)")
    return OrchardSettings(final_url, name, token, ca_cert, pinned, ", ".join(sources) or "environment")


def settings_from_proxy_env(env=None) -> OrchardSettings:
    """The ProxyCommand helper's settings: only the environment (never argv)."""
    env = os.environ if env is None else env
    if not env.get(ENV_URL):
        raise ConfigError("{} is not set".format(ENV_URL), "the ProxyCommand needs the run's environment")
    problem = orchard_url_problem(env[ENV_URL])
    if problem:
        raise ConfigError("{} {}, got {}".format(ENV_URL, problem, excerpt(env[ENV_URL])),
                          "the ProxyCommand needs the run's environment")
    return OrchardSettings(env[ENV_URL], env.get(ENV_NAME, ""), env.get(ENV_TOKEN, ""),
                           env.get(ENV_CA_CERT) or None, env.get(ENV_PINNED_CERT) or None)


# --- the REST client ------------------------------------------------------------------------


class OrchardHTTPError(BackendError):
    """The controller answered with an HTTP error status."""

    def __init__(self, status: int, message: str, hint: str = "", detail: str = "") -> None:
        self.status = status
        self.detail = detail
        super().__init__(message, hint)


def _ssl_context(settings: OrchardSettings) -> Optional[ssl.SSLContext]:
    if not settings.base.startswith("https:"):
        return None
    if settings.pinned_cert:
        # As the `orchard` CLI does with a context's certificate: trust exactly that one.
        # Orchard checks the name against the certificate's own first DNS name rather than
        # the URL's host, which amounts to "the server holds this key": so no hostname check.
        context = ssl.create_default_context(cadata=settings.pinned_cert)
        context.check_hostname = False
        return context
    return ssl.create_default_context(cafile=settings.ca_cert)


class OrchardClient:
    """A small REST client for ``<url>/v1``; every failure is a BackendError naming the URL."""

    def __init__(self, settings: OrchardSettings, timeout: float = 30.0) -> None:
        self.settings = settings
        self.timeout = timeout
        self._ssl = _ssl_context(settings)

    @property
    def url(self) -> str:
        return self.settings.base

    def _headers(self) -> Dict[str, str]:
        headers = {"User-Agent": "vmtasks-orchard"}
        if self.settings.service_account and self.settings.token:
            pair = "{}:{}".format(self.settings.service_account, self.settings.token).encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        return headers

    def endpoint(self, path: str, query: Optional[Dict[str, str]] = None) -> str:
        url = self.url + "/v1/" + path.lstrip("/")
        return url + ("?" + urllib.parse.urlencode(query) if query else "")

    def request(self, method: str, path: str, body=None, query: Optional[Dict[str, str]] = None,
                timeout: Optional[float] = None, parse: bool = True):
        """(status, decoded JSON or None). 2xx only; HTTP errors raise OrchardHTTPError.
        ``parse=False``: the body is not read as JSON (``GET /v1/`` answers Swagger's HTML page
        on a controller started with docs on, as `orchard dev` does)."""
        data = None if body is None else json.dumps(body).encode()
        headers = self._headers()
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.endpoint(path, query), data=data, method=method, headers=headers)
        where = "{} {}".format(method, self.endpoint(path, query))
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout, context=self._ssl) as resp:
                raw = resp.read()
                if not parse:
                    return resp.status, None
                return resp.status, (json.loads(raw) if raw.strip() else None)
        except urllib.error.HTTPError as exc:
            raise self._http_error(exc.code, exc.read(), where) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise self._transport_error(exc, where) from None

    def _http_error(self, status: int, raw: bytes, where: str) -> OrchardHTTPError:
        detail = ""
        try:
            detail = str((json.loads(raw) or {}).get("message", ""))
        except (ValueError, AttributeError):
            detail = raw.decode(errors="replace").strip()[:200]
        if status == 401:
            who = ("service account {!r}".format(self.settings.service_account)
                   if self.settings.service_account else "no credentials ({} is not set)".format(ENV_NAME))
            hint = CREDENTIALS_HINT
            if "roles" in detail:  # valid account, missing roles: Orchard answers 401 with the list
                hint = "give service account {!r} the roles the controller names (orchard create " \
                       "service-account --roles ...)".format(self.settings.service_account)
            return OrchardHTTPError(401, "the Orchard controller at {} refused {} for {} (HTTP 401{})".format(
                self.url, who, where, ": " + detail if detail else ""), hint, detail)
        return OrchardHTTPError(status, "{} answered HTTP {}{}".format(where, status, ": " + detail if detail else ""),
                                "", detail)

    def _transport_error(self, exc: BaseException, where: str) -> BackendError:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLCertVerificationError) or isinstance(exc, ssl.SSLCertVerificationError):
            return BackendError("cannot verify the TLS certificate of the Orchard controller at {}: {}".format(
                self.url, getattr(reason, "verify_message", reason)),
                "set orchard.ca_cert to the controller's CA certificate (PEM), or use an `orchard` "
                "context created with its certificate")
        if isinstance(exc, ValueError) and not isinstance(exc, OSError):
            return BackendError("{}: the answer is not JSON: {}".format(where, exc),
                                "check that {} is an Orchard controller".format(self.url))
        return BackendError("cannot reach the Orchard controller at {}: {}".format(self.url, reason),
                            "check {} / orchard.url and that the controller runs and is reachable "
                            "from this host".format(ENV_URL))

    # --- the port-forward WebSocket ---

    def port_forward(self, vm: str, port: int, wait: int, open_timeout: float):
        """A connected websockets ClientConnection to the VM's ``port``."""
        from websockets.exceptions import InvalidHandshake, InvalidStatus
        from websockets.sync.client import connect

        http = self.endpoint("vms/{}/port-forward".format(urllib.parse.quote(vm, safe="")),
                             {"port": str(port), "wait": str(max(0, int(wait)))})
        url = "ws" + http[len("http"):]
        options: Dict[str, Any] = dict(additional_headers=self._headers(), ssl=self._ssl,
                       open_timeout=open_timeout + max(0, int(wait)), compression=None, max_size=None,
                       ping_interval=20, ping_timeout=20, close_timeout=2)
        if "legacy" in inspect.signature(connect).parameters:
            options["legacy"] = True  # websockets >= 17: a plain connection, closed by us
        try:
            ws = connect(url, **options)
        except InvalidStatus as exc:
            status = exc.response.status_code
            error = self._http_error(status, bytes(exc.response.body or b""), "GET " + http)
            why = PORT_FORWARD_STATUS.get(status)
            if why:
                error = OrchardHTTPError(status, "port {} of VM {} through {}: {} (HTTP {}{})".format(
                    port, vm, self.url, why.format(wait=wait, port=port), status,
                    ": " + error.detail if error.detail else ""), error.hint, error.detail)
            raise error from None
        except (InvalidHandshake, OSError, TimeoutError) as exc:
            raise self._transport_error(exc, "GET " + http) from None
        sock = getattr(ws, "socket", None)
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Small SSH packets must not wait for delayed ACKs (see ssh.nodelay_socket).
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # already closed (an upgrade closed at once): the caller's first recv says so
        return ws


def send_until_eof(read: Callable[[], bytes], ws) -> None:
    """Send what ``read()`` returns as binary frames until it returns b"" (or either side
    breaks), then close the WebSocket: the other direction ends with it."""
    try:
        while True:
            data = read()
            if not data:
                break
            ws.send(data)
    except Exception:  # noqa: BLE001 - closed, reset: either way this direction is over
        pass
    finally:
        try:
            ws.close()
        except Exception:  # noqa: BLE001 - already closed
            pass


def pump_websocket(ws, sock: socket.socket) -> Tuple[threading.Thread, threading.Thread]:
    """Copy bytes both ways between a WebSocket (binary frames) and a stream socket until
    either side ends; then close both. Returns the two (daemon) threads."""

    def ws_to_sock():
        try:
            for message in ws:
                sock.sendall(message if isinstance(message, bytes) else message.encode())
        except Exception:  # closed, reset: either way this direction is over
            pass
        finally:
            # Last one out: the other direction ends on this shutdown, then the fd is released.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    threads = (threading.Thread(target=ws_to_sock, daemon=True, name="orchard-ws-in"),
               threading.Thread(target=send_until_eof, args=(lambda: sock.recv(65536), ws), daemon=True,
                                name="orchard-ws-out"))
    for thread in threads:
        thread.start()
    return threads


# --- helpers ------------------------------------------------------------------------------------


def parse_time(text: str) -> Optional[float]:
    """Epoch seconds from Go's RFC 3339 (nanoseconds allowed; the go test -json parser's);
    None for Go's zero time (a field the controller has not set)."""
    if not text or text.startswith("0001-01-01"):
        return None
    return parse_rfc3339(text)


def env_value(value) -> str:
    """A value Orchard's worker can put inside `export K="..."` untouched (it does not escape):
    other characters become ``_``. Owner values are stored this way, so compare through it."""
    return re.sub(r'[^A-Za-z0-9 ._:@+=/,-]', "_", str(value))


def owner_labels(vm: dict) -> Dict[str, str]:
    env = ((vm.get("startup_script") or {}).get("env") or {})
    labels = {key: env[var] for key, var in OWNER_ENV.items() if var in env}
    if env.get(STATE_DIR_ENV):
        labels["state_dir"] = env[STATE_DIR_ENV]
    return labels


def owner_of(labels: Dict[str, str]) -> Optional[Owner]:
    """The Owner recorded on a VM (``ListedVm.labels``), or None for someone else's VM."""
    try:
        return Owner(labels["run_id"], labels["host"], labels["user"], int(labels["pid"]), labels["pid_start"])
    except (KeyError, ValueError):
        return None


def owner_alive(labels: Dict[str, str], hostname: Optional[str] = None) -> Optional[bool]:
    """For the sweep and cleanup-orphans: None when the VM carries no vmtasks owner (not ours:
    never touch it); True when its owner may still run (another host, which we cannot judge,
    or that very process still lives); False when the owning process on this host is gone."""
    owner = owner_of(labels)
    if owner is None:
        return None
    return process_alive(owner.pid, owner.pid_start, owner.host or "?", this_host=hostname, stored=env_value)


def judge_unleased(name: str, labels: Dict[str, str], include_kept: bool = False) -> Tuple[str, str]:
    """The sweep's verdict on an Orchard VM that has no lease in the sweeping ledger (another
    state dir, another checkout, or a lost state dir), from the owner its resource records:
    ``("foreign", why)`` no vmtasks owner (never touched); ``("live", why)`` the owner may
    run; ``("kept", why)`` its dead owner's lease (in the state dir the VM records) says
    keep; ``("orphan", why)`` the owner is gone: remove it."""
    alive = owner_alive(labels)
    owner = owner_of(labels)
    if alive is None or owner is None:
        return "foreign", "{} carries no vmtasks owner record".format(name)
    if alive:
        where = "on this host" if owner.host == env_value(socket.gethostname()) else "on host " + owner.host
        return "live", "owner process {} of run {} {} may still run".format(owner.pid, owner.run_id, where)
    why = "owner process {} of run {} on this host is gone (the VM's owner record)".format(owner.pid, owner.run_id)
    state_dir = labels.get("state_dir")
    if state_dir and Path(state_dir).is_dir():
        ledger = Ledger(Path(state_dir))
        lease = ledger.read(name)
        if lease is None and ledger.has_lease(name):
            return "live", "its lease in {} cannot be read: left alone".format(state_dir)
        if lease is not None and lease.keep and not include_kept:
            return "kept", "kept on purpose (lease in {}); {}".format(state_dir, why)
    return "orphan", why


def online_workers(workers: List[dict], offline_after: float, now: Optional[float] = None) -> List[dict]:
    """Workers that reported within ``offline_after`` seconds and take new VMs. ``last_seen``
    is the controller's clock: the default 180 s (Orchard's own offline timeout) leaves room
    for a skewed client clock."""
    now = time.time() if now is None else now
    alive = []
    for worker in workers:
        seen = parse_time(str(worker.get("last_seen", "")))
        if seen is not None and now - seen <= offline_after and not worker.get("scheduling_paused"):
            alive.append(worker)
    return alive


def fleet_slots(workers: List[dict], vms: List[dict]) -> Tuple[int, int]:
    """(capacity, busy) in Tart VM slots over ``workers``: what the scheduler will count."""
    names = {w.get("name") for w in workers}
    capacity = sum(int((w.get("resources") or {}).get(TART_VMS, 0)) for w in workers)
    busy = sum(int((vm.get("resources") or {}).get(TART_VMS, 1)) for vm in vms
               if vm.get("worker") in names and vm.get("status") != "failed")
    return capacity, busy


# --- the backend -------------------------------------------------------------------------------------


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
    return str(Path(__file__).resolve().parent.parent)
