"""A controller stand-in for tests: start it on a free loopback port with its own data dir
and worker TART_HOMEs, talk to its API, restart it, take everything down.

    fleet = Fleet(tmp_path / "orchard", workers=2)
    fleet.start()            # creates the base image in every worker, waits for GET /v1/
    status, vm = fleet.api("POST", "vms", {"name": "a", "image": "tahoe-base"})
    fleet.down()             # controller stopped, every orchard-* guest stopped and deleted
"""

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

SCRIPTS = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
ORCHARD = os.path.join(SCRIPTS, "orchard")
TART = os.path.join(SCRIPTS, "tart")


def _decoded(raw):
    """JSON, or the text itself (Swagger's HTML page at /v1/ under --dev), or None when empty."""
    try:
        return json.loads(raw) if raw.strip() else None
    except ValueError:
        return raw.decode(errors="replace")


class Fleet:
    def __init__(self, root, workers=2, base="tahoe-base", account=("vmtasks", "s3cret"), args=(), tls=None):
        """``tls``: (cert, key) PEM paths to serve https; the harness trusts ``cert``."""
        self.root = str(root)
        self.data = os.path.join(self.root, "data")
        self.workers = workers
        self.base = base
        self.account = account
        self.args = list(args)
        self.tls = tls
        self.proc = None
        self.url = ""
        self.log_path = os.path.join(self.root, "controller.log")

    # --- lifecycle ---

    def worker_home(self, index_or_name):
        name = index_or_name if isinstance(index_or_name, str) else "worker-%d" % index_or_name
        return os.path.join(self.data, "workers", name, "tart-home")

    def tart(self, worker, *args, timeout=60):
        env = {k: v for k, v in os.environ.items() if not k.startswith("TART_STANDIN_")}
        env["TART_HOME"] = self.worker_home(worker)
        return subprocess.run([TART, *args], env=env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def start(self, timeout=20):
        os.makedirs(self.root, exist_ok=True)
        for i in range(1, self.workers + 1):
            os.makedirs(self.worker_home(i), exist_ok=True)
            if self.base and not os.path.isdir(os.path.join(self.worker_home(i), "vms", self.base)):
                done = self.tart(i, "create", self.base)
                assert done.returncode == 0, done.stderr
        info = os.path.join(self.data, "controller.json")
        if os.path.exists(info):
            os.unlink(info)
        # A restart keeps the URL, as a real controller's does.
        port = self.url.rsplit(":", 1)[1] if self.url else "0"
        argv = [sys.executable, ORCHARD, "controller", "run", "--listen", "127.0.0.1:" + port, "--data", self.data,
                "--workers", str(self.workers), *self.args]
        if self.account:
            argv += ["--service-account", "%s:%s" % self.account]
        if self.tls:
            argv += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TART_STANDIN_", "ORCHARD_"))}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("controller exited %s: %s" % (self.proc.returncode, self.log()))
            if os.path.exists(info):
                with open(info) as fh:
                    self.url = json.load(fh)["url"]
                if self.api("GET", "")[0] == 200:
                    return self
            time.sleep(0.05)
        raise AssertionError("controller did not come up: " + self.log())

    def stop(self, kill=False):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.proc.wait(timeout=20)
        self.proc = None

    def restart(self, kill=False):
        self.stop(kill=kill)
        return self.start()

    def down(self):
        """Stop the controller and remove every guest it started (they outlive it by design)."""
        self.stop()
        subprocess.run([sys.executable, ORCHARD, "standin", "down", "--data", self.data], timeout=120,
                       capture_output=True, stdin=subprocess.DEVNULL)

    def worker_offline(self, worker, offline=True):
        """The worker stops reporting (its tunnels are cut, its guests die) or reports again."""
        command = "worker-offline" if offline else "worker-online"
        subprocess.run([sys.executable, ORCHARD, "standin", command, "--data", self.data, worker], check=True,
                       timeout=30, capture_output=True, stdin=subprocess.DEVNULL)

    def vms(self):
        """The VM resources on the controller (names only)."""
        status, vms = self.api("GET", "vms")
        assert status == 200, (status, vms)
        return sorted(vm["name"] for vm in vms or [])

    def log(self):
        try:
            with open(self.log_path) as fh:
                return fh.read()[-4000:]
        except OSError:
            return ""

    # --- the API ---

    def env(self):
        """The environment a client needs (ORCHARD_URL and the service account)."""
        if not self.account:  # --dev: no accounts
            return {"ORCHARD_URL": self.url}
        return {"ORCHARD_URL": self.url, "ORCHARD_SERVICE_ACCOUNT_NAME": self.account[0],
                "ORCHARD_SERVICE_ACCOUNT_TOKEN": self.account[1]}

    def api(self, method, path, body=None, auth=True, timeout=30):
        """(status, decoded JSON, text or None); ``auth``: True (the fleet's account), None, or (name, token)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + "/v1/" + path, data=data, method=method)
        pair = self.account if auth is True else auth
        if pair:
            req.add_header("Authorization", "Basic " + base64.b64encode(("%s:%s" % tuple(pair)).encode()).decode())
        if data is not None:
            req.add_header("Content-Type", "application/json")
        context = None
        if self.tls:
            import ssl

            context = ssl.create_default_context(cafile=str(self.tls[0]))
            context.check_hostname = False  # the harness trusts exactly that certificate
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
                return resp.status, _decoded(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, _decoded(exc.read())

    def vm(self, name):
        status, vm = self.api("GET", "vms/" + name)
        return vm if status == 200 else None

    def wait_status(self, name, wanted, timeout=20):
        deadline = time.monotonic() + timeout
        vm = None
        while time.monotonic() < deadline:
            vm = self.vm(name)
            if vm is not None and vm["status"] in wanted:
                return vm
            time.sleep(0.05)
        raise AssertionError("VM %s did not become %s: %r\n%s" % (name, wanted, vm, self.log()))

    def guests(self):
        """Every orchard-* guest of every worker: [(worker, name, running)]."""
        found = []
        for i in range(1, self.workers + 1):
            done = self.tart(i, "list", "--format", "json")
            for row in json.loads(done.stdout or "[]"):
                if row["Name"].startswith("orchard-"):
                    found.append(("worker-%d" % i, row["Name"], row["Running"]))
        return found

    def wait_no_guests(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.guests():
                return True
            time.sleep(0.1)
        return not self.guests()
