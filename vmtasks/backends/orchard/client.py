"""Orchard's REST API (``<url>/v1``) over ``urllib.request``, and the port-forward tunnel
(``/v1/vms/{name}/port-forward``) over the ``websockets`` package's sync client: no WebSocket
framing is written here.
"""

from __future__ import annotations

import base64
import inspect
import json
import socket
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, Optional, Tuple

from vmtasks.guest.errors import BackendError

from .settings import CREDENTIALS_HINT, ENV_NAME, ENV_URL, OrchardSettings

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
