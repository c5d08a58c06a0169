"""The REST API (``/v1/...``) and the port-forward WebSocket, on http.server.

The WebSocket side uses the ``websockets`` package's sans-I/O protocol (``ServerProtocol``):
http.server parses the upgrade request, the library checks it, writes the 101 response and
does all framing (masking, ping/pong, close); this module only moves bytes between the
client's socket, the protocol object and the guest's TCP connection.
"""

import base64
import hmac
import json
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import VERSION
from .controller import log

# What `GET /v1/` answers with Swagger on (the real one loads swagger-ui from a CDN).
SWAGGER_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>API documentation</title></head>
<body><div id="swagger-ui"></div>
<script>window.onload = function () { SwaggerUIBundle({url: "/v1/openapi.yaml", dom_id: "#swagger-ui"}); };</script>
</body></html>
"""


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, controller, auth=True):
        self.controller = controller
        self.auth = auth
        super().__init__(address, Handler)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "orchard-standin/" + VERSION

    def log_message(self, fmt, *args):  # quiet: the controller logs what matters
        pass

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def do_DELETE(self):
        self._route("DELETE")

    def do_PUT(self):
        self._send(405, {"message": "PUT is not supported by the stand-in"})

    # --- plumbing -------------------------------------------------------------------

    def _send(self, code, payload=None, headers=None):
        body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(code)
        if payload is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_html(self, page):
        body = page.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _account(self):
        """None: no credentials; False: wrong ones; else the account name."""
        header = self.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return None
        try:
            name, _, token = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        known = self.server.controller.service_accounts.get(name)
        if known is None or not hmac.compare_digest(known.encode(), token.encode()):
            return False
        return name

    def _route(self, method):
        url = urllib.parse.urlsplit(self.path)
        self.query = dict(urllib.parse.parse_qsl(url.query))
        parts = [urllib.parse.unquote(p) for p in url.path.split("/") if p]
        if not parts or parts[0] != "v1":
            return self._send(404, {"message": "not found"})
        parts = parts[1:]
        account = self._account()
        if account is False:
            return self._send(401)  # wrong credentials: the middleware answers before any route
        c = self.server.controller
        if parts == [] and method == "GET":
            if c.settings.dev:  # Swagger UI, as `orchard dev` serves it (api.go: enableSwaggerDocs)
                return self._send_html(SWAGGER_PAGE)
            return self._send(200)
        if self.server.auth and account is None:
            return self._send(401)
        if parts == ["controller", "info"] and method == "GET":
            # api_controller.go: rpc-v2 unless disabled (`orchard dev` leaves it off)
            capabilities = ["rpc-v1", "vm-state-endpoint"] + ([] if c.settings.dev else ["rpc-v2"])
            return self._send(200, {"version": VERSION, "commit": "standin", "capabilities": capabilities})
        if parts == ["workers"] and method == "GET":
            with c.lock:
                return self._send(200, [c.render_worker(n) for n in c.workers])
        if len(parts) == 2 and parts[0] == "workers" and method == "GET":
            if parts[1] not in c.workers:
                return self._send(404, {"message": "worker not found"})
            with c.lock:
                return self._send(200, c.render_worker(parts[1]))
        if parts == ["vms"] and method == "POST":
            try:
                body = json.loads(self._body() or b"null")
                assert isinstance(body, dict)
            except (ValueError, AssertionError):
                return self._send(400, {"message": "invalid JSON was provided"})
            return self._send(*c.create_vm(body))
        if parts == ["vms"] and method == "GET":
            wanted = self.query.get("filter", "")
            with c.lock:
                vms = [c.render(vm) for vm in c.vms.values()]
            if wanted.startswith("worker="):
                vms = [vm for vm in vms if vm["worker"] == wanted[len("worker="):]]
            return self._send(200, vms)
        if len(parts) >= 2 and parts[0] == "vms":
            return self._vm(method, parts[1], parts[2:])
        return self._send(404, {"message": "not found"})

    def _body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    # --- /v1/vms/{name}[/...] ----------------------------------------------------------

    def _vm(self, method, name, rest):
        c = self.server.controller
        if not rest and method == "GET":
            vm = c.get(name)
            return self._send(200, c.render(vm)) if vm else self._send(404, {"message": "VM not found"})
        if not rest and method == "DELETE":
            code, _ = c.delete_vm(name)
            return self._send(code, None if code == 200 else {"message": "VM not found"})
        if rest == ["events"] and method == "GET":
            vm = c.get(name)
            if not vm:
                return self._send(404, {"message": "VM not found"})
            with c.lock:
                events = list(c.events.get(vm["uid"], []))
            if self.query.get("order") == "desc":
                events.reverse()
            limit = self.query.get("limit")
            if limit:
                if not limit.isdigit() or int(limit) < 1:
                    return self._send(400, {"message": "invalid limit %r: expected positive integer" % limit})
                events = events[:int(limit)]
            return self._send(200, events)
        if rest == ["ip"] and method == "GET":
            vm, error = self._wait_running(name, "0")
            if error:
                return self._send(*error)
            ip = c.ip_of(vm["uid"])
            return self._send(200, {"ip": ip}) if ip else self._send(503, {"message": "no IP yet"})
        if rest == ["port-forward"] and method == "GET":
            return self._port_forward(name)
        return self._send(404, {"message": "not found"})

    def _wait_running(self, name, default_wait):
        """Orchard's waitForVM (api_vms_portforward.go): 404 missing, 417 failed, 408 when not
        running within ``wait``."""
        c = self.server.controller
        wait = self.query.get("wait", default_wait)
        if not wait.isdigit():
            return None, (400, None)
        deadline = self.deadline = time.monotonic() + int(wait)
        while True:
            vm = c.get(name)
            if vm is None:
                return None, (404, {"message": "VM not found"})
            if vm["status"] == "failed":
                return None, (417, {"message": "VM is in a terminal state 'failed'"})
            if vm["status"] == "running" and c.ip_of(vm["uid"]):
                return vm, None
            if time.monotonic() >= deadline:
                return None, (408, {"message": "VM is not running on '%s' worker" % vm["worker"]})
            time.sleep(0.05)

    def _port_forward(self, name):
        c = self.server.controller
        port = self.query.get("port", "")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            return self._send(400)
        vm, error = self._wait_running(name, "10")
        if error:
            return self._send(*error)
        worker = c.workers[vm["worker"]]
        # One `wait` covers both the VM reaching running and the worker's connection
        # (api_vms_portforward.go). RPC v2: the worker dials the guest and reports a failure;
        # the controller asks again every second until the wait runs out, then answers 500
        # with no body. RPC v1 (`orchard dev`): the worker's stream is accepted whatever
        # happens, so a failed dial is an upgraded WebSocket closed at once.
        guest = None
        while True:
            if not worker.online():
                return self._send(503)  # errPortForwardRequest: the worker cannot be notified
            try:
                guest = socket.create_connection((c.ip_of(vm["uid"]), int(port)), timeout=2)
                break
            except OSError as exc:
                log("port-forwarding failed: failed to connect to the VM: %s" % exc)
                if c.settings.dev:
                    break
                if time.monotonic() + 1 >= self.deadline:
                    return self._send(500)
                time.sleep(1)
        if guest is not None:
            guest.settimeout(None)
            guest.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        from websockets.server import ServerProtocol

        proto = ServerProtocol(max_size=None)
        # http.server has already read the request; hand the protocol the same bytes so its
        # parser moves on to frames after the handshake.
        raw = "GET %s HTTP/1.1\r\n" % self.path + "".join(
            "%s: %s\r\n" % (k, v) for k, v in self.headers.items()) + "\r\n"
        proto.receive_data(raw.encode("latin-1"))
        request = proto.events_received()[0]
        response = proto.accept(request)
        proto.send_response(response)
        client = self.connection
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for data in proto.data_to_send():
            client.sendall(data)
        self.close_connection = True
        if response.status_code != 101 or guest is None:
            if guest is not None:
                guest.close()
            try:
                client.shutdown(socket.SHUT_RDWR)  # RPC v1's failed dial: CloseNow, no close frame
            except OSError:
                pass
            return
        worker.tunnels.add(client)
        worker.tunnels.add(guest)
        try:
            _pump(proto, self.rfile, client, guest)
        finally:
            worker.tunnels.discard(client)
            worker.tunnels.discard(guest)
            guest.close()


def _pump(proto, rfile, client, guest):
    """Move bytes both ways until either side closes. One thread reads the guest, this one
    reads the client; ``lock`` serialises the protocol object and writes to the client."""
    lock = threading.Lock()

    def flush():
        for data in proto.data_to_send():
            if data:
                client.sendall(data)

    def guest_to_client():
        code = 1000
        try:
            while True:
                data = guest.recv(65536)
                if not data:
                    break
                with lock:
                    if proto.state.name != "OPEN":
                        return
                    proto.send_binary(data)
                    flush()
        except OSError:
            code = 1011  # the guest connection broke (or the worker went away)
        finally:
            with lock:
                try:
                    if proto.state.name == "OPEN":
                        proto.send_close(code)
                        flush()
                except OSError:
                    pass
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    reader = threading.Thread(target=guest_to_client, daemon=True)
    reader.start()
    try:
        while True:
            # rfile may hold bytes read ahead with the request headers: read1 drains it first.
            try:
                data = rfile.read1(65536)
            except (OSError, ValueError):
                data = b""
            with lock:
                if not data:
                    proto.receive_eof()
                else:
                    proto.receive_data(data)
                frames = proto.events_received()
                try:
                    flush()  # pongs, the close reply
                except OSError:
                    break
            for frame in frames:
                if frame.opcode.name in ("BINARY", "TEXT", "CONT") and frame.data:
                    guest.sendall(frame.data)
                elif frame.opcode.name == "CLOSE":
                    data = b""
            if not data or proto.state.name == "CLOSED":
                break
    except OSError:
        pass
    finally:
        try:
            guest.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        reader.join(timeout=5)


def serve(controller, host, port, auth=True, tls=None):
    server = Server((host, port), controller, auth=auth)
    if tls:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        # The handshake happens in the connection's own thread, not in the accept loop.
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    log("listening on %s://%s:%d" % ("https" if tls else "http", host, server.server_address[1]))
    return server
