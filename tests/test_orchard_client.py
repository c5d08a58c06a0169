"""The Orchard client's side of issues 17 and 18, as units: the credentials a VM is created
with (Orchard's worker logs in with them), the image probe doing the same, `GET /v1/`
answering HTML, clear messages for each way a port-forward fails, and a teardown DELETE
that outlives a controller restart. Fakes stand in for the controller; the HTTP ones are a
tiny real server on loopback."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vmtasks.backends.orchard.backend import PROBE_RAN, OrchardBackend
from vmtasks.backends.orchard.client import CLOSED_AT_ONCE, OrchardClient, OrchardHTTPError
from vmtasks.backends.orchard.machine import delete_vm
from vmtasks.backends.orchard.settings import OrchardSettings
from vmtasks.guest.errors import BackendError, ConfigError, PreflightError
from vmtasks.lifecycle.backend import Owner

OWNER = Owner("run-1", "host-a", "alice", 4242, "987654")
URL = "http://controller.test:6120"


class Recorder:
    """Records requests; ``answers`` maps (method, path) to a list of results or exceptions."""

    url = URL

    def __init__(self, answers=None):
        self.calls = []
        self.answers = answers or {}

    def request(self, method, path, body=None, query=None, timeout=None, parse=True):
        self.calls.append((method, path, body))
        queue = self.answers.get((method, path))
        answer = queue.pop(0) if queue else (200, {})
        if isinstance(answer, Exception):
            raise answer
        return answer

    def endpoint(self, path, query=None):
        return self.url + "/v1/" + path


def backend(client, **kwargs):
    return OrchardBackend(OrchardSettings(URL, "a", "b"), "tahoe-base", client=client, poll=0.01, **kwargs)


@pytest.mark.parametrize("kwargs,sent", [
    ({}, {"username": "admin", "password": "admin"}),
    ({"user": "ci", "password": "pw"}, {"username": "ci", "password": "pw"}),
    ({"password": ""}, {}),  # neither: the worker's own admin/admin
])
def test_a_vm_is_created_with_both_username_and_password_or_neither(kwargs, sent):
    client = Recorder()
    machine = backend(client, **kwargs).machine("vm-1", OWNER, public_key="ssh-ed25519 AAAA run")
    machine.create("", deadline=1e12, cancel=threading.Event())
    body = client.calls[0][2]
    assert {k: body[k] for k in ("username", "password") if k in body} == sent
    assert "password" not in machine.last


def test_a_user_without_a_password_is_refused_before_any_request():
    with pytest.raises(ConfigError, match="need its password"):
        backend(Recorder(), user="ci", password="")


def test_the_image_probe_logs_in_the_same_way_and_fails_preflight_when_it_cannot():
    status = ("VM failed: failed to run startup script: failed to establish SSH connection: All attempts fail:\n"
              "#1: SSH handshake with 10.0.0.2:22 failed: ssh: handshake failed: ssh: unable to authenticate")

    class Probe(Recorder):
        def request(self, method, path, body=None, query=None, timeout=None, parse=True):
            self.calls.append((method, path, body))
            if path == "workers":
                return 200, [{"name": "w", "last_seen": "2999-01-01T00:00:00Z",
                              "resources": {"org.cirruslabs.tart-vms": 2}}]
            if path.endswith("/events"):
                return 200, [{"payload": PROBE_RAN}] if self.ok else []
            if method == "GET" and path.startswith("vms/"):
                return 200, {"status": "running" if self.ok else "failed", "worker": "w", "status_message": status}
            return 200, [] if path == "vms" else {}

    client = Probe()
    client.ok = True
    backend(client, password="pw").preflight("tahoe-base")
    posted = [body for method, path, body in client.calls if method == "POST"][0]
    assert (posted["username"], posted["password"]) == ("admin", "pw")
    assert posted["startup_script"]["script_content"] == "echo '{}'".format(PROBE_RAN)
    client = Probe()
    client.ok = False
    with pytest.raises(PreflightError) as err:
        backend(client).preflight("tahoe-base")
    assert "unable to authenticate" in err.value.message and "vm.password" in err.value.hint
    assert client.calls[-1][0] == "DELETE"


def test_delete_is_retried_through_a_controller_restart():
    unreachable = BackendError("cannot reach the Orchard controller at x: Connection refused")
    client = Recorder({("DELETE", "vms/vm-1"): [unreachable, OrchardHTTPError(503, "busy"), unreachable, (200, None)]})
    assert delete_vm(client, "vm-1", timeout=30, max_wait=0.05) is True
    assert len(client.calls) == 4
    client = Recorder({("DELETE", "vms/vm-1"): [unreachable, OrchardHTTPError(404, "gone")]})
    assert delete_vm(client, "vm-1", timeout=30, max_wait=0.05) is False  # the first one went through


def test_delete_gives_up_at_once_on_a_refusal_and_after_the_timeout_otherwise():
    client = Recorder({("DELETE", "vms/vm-1"): [OrchardHTTPError(401, "refused", "set the account")] * 5})
    with pytest.raises(BackendError, match=r"\(1 attempt in 30s\): refused") as err:
        delete_vm(client, "vm-1", timeout=30, max_wait=0.05)
    assert err.value.hint == "set the account"
    down = BackendError("cannot reach the Orchard controller at x: Connection refused")
    client = Recorder({("DELETE", "vms/vm-1"): [down] * 1000})
    with pytest.raises(BackendError) as err:
        delete_vm(client, "vm-1", timeout=0.5, max_wait=0.05)
    assert "could not delete VM vm-1" in err.value.message and "Connection refused" in err.value.message
    assert 2 < len(client.calls) < 100 and "orchard delete vm vm-1" in err.value.hint


def test_an_upgrade_closed_at_once_says_the_worker_could_not_connect():
    from websockets.exceptions import ConnectionClosedError

    class ClosedAtOnce:
        def recv(self, timeout=None):
            raise ConnectionClosedError(None, None)

        def close(self):
            pass

    client = Recorder({("GET", "vms/vm-1"): [(200, {"status": "running"})] * 100})
    client.port_forward = lambda *args, **kwargs: ClosedAtOnce()
    machine = backend(client).machine("vm-1", OWNER, public_key="k")
    with pytest.raises(BackendError) as err:
        machine.wait_ssh(deadline=__import__("time").monotonic() + 0.3, cancel=threading.Event())
    assert CLOSED_AT_ONCE.format(port=22, vm="vm-1") in err.value.message


class _Controller(BaseHTTPRequestHandler):
    """`GET /v1/` answers Swagger's HTML; a port-forward answers the status in its port."""

    protocol_version = "HTTP/1.1"  # websockets wants an HTTP/1.1 answer to its upgrade

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/v1/":
            body, kind, code = b"<!DOCTYPE html><html></html>", "text/html", 200
        else:
            code = int(self.path.split("port=")[1].split("&")[0]) - 60000
            body, kind = (b"", "text/plain") if code == 500 else (
                json.dumps({"message": "VM is not running on 'w' worker"}).encode(), "application/json")
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def controller():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Controller)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield OrchardClient(OrchardSettings("http://127.0.0.1:%d" % server.server_address[1]))
    server.shutdown()
    server.server_close()


def test_root_answering_html_is_fine_and_each_port_forward_status_is_explained(controller):
    assert controller.request("GET", "/", parse=False) == (200, None)
    with pytest.raises(BackendError, match="not JSON"):
        controller.request("GET", "/")  # what pre-flight did before: `orchard dev` failed it
    expected = {408: "the VM was not running within the port-forward's wait of 3s",
                500: "the worker could not connect to the guest's port 60500 within 3s",
                503: "the controller could not reach the VM's worker"}
    for status, needle in expected.items():
        with pytest.raises(OrchardHTTPError) as err:
            controller.port_forward("vm-1", 60000 + status, wait=3, open_timeout=5)
        assert err.value.status == status and needle in err.value.message, err.value.message
        assert "HTTP {}".format(status) in err.value.message


def test_the_proxy_command_explains_a_tunnel_closed_at_once(tmp_path):
    """OpenSSH alone would only say "Connection closed by remote host"."""
    import subprocess
    import sys

    from websockets.sync.server import serve

    with serve(lambda ws: None, "127.0.0.1", 0) as server:  # accepts, then closes at once
        threading.Thread(target=server.serve_forever, daemon=True).start()
        env = {"ORCHARD_URL": "http://127.0.0.1:%d" % server.socket.getsockname()[1], "PATH": "/usr/bin:/bin",
               "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parent.parent)}
        done = subprocess.run([sys.executable, "-m", "vmtasks.backends.orchard.proxy", "vm-1", "22"], env=env,
                              capture_output=True, text=True, timeout=30, stdin=subprocess.PIPE)
        server.shutdown()
    assert done.returncode == 1, done.stderr
    assert CLOSED_AT_ONCE.format(port=22, vm="vm-1") in done.stderr
