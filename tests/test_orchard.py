"""The Orchard backend (vmtasks/backends/orchard/): settings resolution as units, and the whole VM
lifecycle against the controller stand-in (scripts/orchard) with real Tart stand-in guests,
Paramiko over the port-forward tunnel and rsync through the ProxyCommand helper."""

from __future__ import annotations

import base64
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vmtasks.backends.orchard.backend import OrchardBackend
from vmtasks.backends.orchard.fleet import fleet_slots, online_workers, owner_alive, owner_of, parse_time
from vmtasks.backends.orchard.settings import OrchardSettings, context_file_path, load_settings
from vmtasks.guest.errors import BackendError, ConfigError, PreflightError, VmtasksError
from vmtasks.lifecycle.backend import Owner
from vmtasks.transport import ssh

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from orchard_standin.harness import Fleet  # noqa: E402


def _missing():
    if os.geteuid() != 0:
        return ["root (the Tart stand-in needs namespaces and port 22)"]
    return [tool for tool in ("rsync", "ssh", "unshare", "nsenter") if shutil.which(tool) is None] + \
        ([] if os.path.exists("/usr/sbin/sshd") else ["/usr/sbin/sshd"])


needs_guests = pytest.mark.skipif(bool(_missing()), reason="needs " + ", ".join(_missing()))
OWNER = Owner("run-1234", "host-a", "alice", 4242, "987654")


# --- settings (units) -------------------------------------------------------------------------


def _context_file(home: Path, contexts: dict, default: str) -> Path:
    import yaml

    path = home / ".orchard" / "orchard.yml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump({"default-context": default, "contexts": contexts}))
    return path


def test_settings_from_the_environment():
    env = {"ORCHARD_URL": "http://c:6120", "ORCHARD_SERVICE_ACCOUNT_NAME": "ci",
           "ORCHARD_SERVICE_ACCOUNT_TOKEN": "tok", "HOME": "/nonexistent"}
    s = load_settings(env=env)
    assert (s.url, s.service_account, s.token, s.pinned_cert) == ("http://c:6120", "ci", "tok", None)
    assert "tok" not in repr(s)


def test_settings_from_the_orchard_context_file_and_env_overrides(tmp_path):
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    _context_file(tmp_path, {
        "prod": {"url": "https://prod:6120", "serviceAccountName": "p", "serviceAccountToken": "pt",
                 "certificate": base64.b64encode(pem.encode()).decode()},
        "dev": {"url": "http://dev:6120", "serviceAccountName": "d", "serviceAccountToken": "dt"},
    }, default="prod")
    env = {"HOME": str(tmp_path)}
    assert context_file_path(env) == tmp_path / ".orchard" / "orchard.yml"
    s = load_settings(env=env)
    assert (s.url, s.service_account, s.token, s.pinned_cert) == ("https://prod:6120", "p", "pt", pem)
    assert "prod" in s.source
    s = load_settings(context="dev", env=env)
    assert (s.url, s.service_account) == ("http://dev:6120", "d")
    # vm.yaml's orchard.url beats the context; the environment beats both, field by field
    assert load_settings(url="http://cfg:1", env=env).url == "http://cfg:1"
    s = load_settings(url="http://cfg:1", env=dict(env, ORCHARD_URL="http://env:2", ORCHARD_SERVICE_ACCOUNT_TOKEN="x"))
    assert (s.url, s.service_account, s.token) == ("http://env:2", "p", "x")
    # ORCHARD_HOME moves the file, as for the orchard CLI
    assert context_file_path({"ORCHARD_HOME": "/o", "HOME": "/h"}) == Path("/o/.orchard/orchard.yml")


def test_settings_errors_say_what_to_set(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_settings(env={"HOME": str(tmp_path)})
    assert "ORCHARD_URL" in err.value.message and err.value.hint
    with pytest.raises(ConfigError, match="http:// or https://"):
        load_settings(env={"HOME": str(tmp_path), "ORCHARD_URL": "ftp://x"})
    with pytest.raises(ConfigError, match="no context file"):
        load_settings(context="prod", env={"HOME": str(tmp_path)})
    _context_file(tmp_path, {"dev": {"url": "http://dev"}}, default="dev")
    with pytest.raises(ConfigError, match="it has: dev"):
        load_settings(context="prod", env={"HOME": str(tmp_path)})
    with pytest.raises(ConfigError, match="ca_cert"):
        load_settings(url="https://x", ca_cert=str(tmp_path / "missing.pem"), env={"HOME": str(tmp_path)})


def test_time_workers_and_slots():
    assert parse_time("0001-01-01T00:00:00Z") is None
    assert parse_time("2026-12-01T09:15:42.494305123Z") == pytest.approx(1796116542.494305, abs=1e-5)
    assert parse_time("2026-12-01T10:15:42+01:00") == parse_time("2026-12-01T09:15:42Z")
    now = parse_time("2026-12-01T09:00:00Z")
    workers = [{"name": "a", "last_seen": "2026-12-01T08:59:59Z", "resources": {"org.cirruslabs.tart-vms": 2}},
               {"name": "b", "last_seen": "2026-12-01T08:50:00Z", "resources": {"org.cirruslabs.tart-vms": 2}},
               {"name": "c", "last_seen": "2026-12-01T08:59:59Z", "scheduling_paused": True}]
    online = online_workers(workers, offline_after=60, now=now)
    assert [w["name"] for w in online] == ["a"]
    vms = [{"worker": "a", "status": "running", "resources": {"org.cirruslabs.tart-vms": 1}},
           {"worker": "a", "status": "failed"}, {"worker": "b", "status": "running"},
           {"worker": "", "status": "pending"}]
    assert fleet_slots(online, vms) == (2, 1)
    assert owner_of({"run_id": "r", "host": "h", "user": "u", "pid": "12", "pid_start": "5"}) == \
        Owner("r", "h", "u", 12, "5")
    assert owner_of({"run_id": "r"}) is None


def test_owner_alive_judges_only_this_hosts_processes():
    import socket

    from vmtasks.state.ledger import process_start_time

    me = {"run_id": "r", "host": socket.gethostname(), "user": "u", "pid": str(os.getpid()),
          "pid_start": process_start_time(os.getpid())}
    assert owner_alive(me) is True
    assert owner_alive(dict(me, pid_start="linux:1")) is False  # the PID was reused
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert owner_alive(dict(me, pid=dead.stdout.strip())) is False
    assert owner_alive(dict(me, host="another-mac", pid_start="linux:1")) is True
    assert owner_alive({}) is None


# --- against the controller stand-in -------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    if _missing():
        pytest.skip("needs " + ", ".join(_missing()))
    f = Fleet(tmp_path_factory.mktemp("orchard"), workers=2,
              args=["--scheduler-interval", "0.2", "--worker-offline-timeout", "1"])
    f.start()
    yield f
    f.down()


@pytest.fixture
def backend(fleet):
    settings = load_settings(env=dict(fleet.env(), HOME="/nonexistent"))
    yield OrchardBackend(settings, "tahoe-base", cpu=2, memory=4096, prefix="vmt", poll=0.1, worker_offline_after=5)
    for vm in fleet.api("GET", "vms")[1] or []:
        fleet.api("DELETE", "vms/" + vm["name"])
    assert fleet.wait_no_guests(), fleet.guests()


def _ssh(machine, key):
    """The pipeline's way: the one Connection factory over the machine's tunnel socket."""
    conn = ssh.connect(machine.name, "admin", key, connect_timeout=10, sock=machine.open_socket(10))
    conn.open()
    return conn


def _run_key(tmp_path):
    return ssh.generate_key(tmp_path / "key", "vmtasks run-1234")


@pytest.mark.e2e
@needs_guests
def test_lifecycle_ssh_and_rsync_through_the_tunnel(fleet, backend, tmp_path):
    listed = backend.preflight("tahoe-base")
    assert listed == [] and backend.slots() == 4
    assert fleet.api("GET", "vms")[1] == []  # the image probe is gone again
    key = _run_key(tmp_path)
    machine = backend.machine("vmt-run-1234-1", OWNER, None, public_key=key.public_line)
    cancel = threading.Event()
    deadline = time.monotonic() + 30
    machine.create("tahoe-base", deadline, cancel)
    machine.start(tmp_path / "console.log", deadline, cancel, lambda text: None)
    machine.wait_ssh(deadline, cancel)
    machine.install_key(key.public_line, deadline, cancel)
    vm = fleet.vm("vmt-run-1234-1")
    assert vm["headless"] is True and vm["cpu"] == 2 and vm["memory"] == 4096 and vm["status"] == "running"
    assert "running on worker " + vm["worker"] in (tmp_path / "console.log").read_text()
    assert vm["startup_script"]["env"]["VMTASKS_PUBLIC_KEY"] == key.public_line
    assert vm["labels"] == {}  # owner data in labels would be a scheduling constraint
    (listed_vm,) = backend.list_vms()
    assert owner_of(listed_vm.labels) == OWNER and listed_vm.running
    assert machine.alive() and "worker-" in machine.address()

    with _ssh(machine, key) as conn:
        result = ssh.remote_exec(conn, "echo hi; hostname", timeout=20)
    assert result.exit_code == 0 and result.output.splitlines()[0] == "hi"
    assert result.output.splitlines()[1] == vm["localName"]  # it is that VM's guest
    assert key.known_hosts.read_text().startswith(machine.name + " ")  # pinned under the VM name

    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha\n")
    (src / "sub" / "b.bin").write_bytes(os.urandom(200_000))
    target = machine.ssh_target()
    assert target.env["ORCHARD_SERVICE_ACCOUNT_TOKEN"] not in target.proxy_command
    ssh_cmd = " ".join(shlex.quote(a)
                       for a in ["ssh", *ssh.ssh_options(key), "-o", "ProxyCommand=" + target.proxy_command])
    # The ProxyCommand finds this vmtasks through PYTHONPATH, from any directory (not only the checkout's).
    assert (Path(target.env["PYTHONPATH"].split(os.pathsep)[0]) / "vmtasks" / "__init__.py").is_file()
    env = dict(os.environ, **target.env)
    done = subprocess.run(["rsync", "-a", "-e", ssh_cmd, str(src) + "/", "admin@{}:tree/".format(target.host)],
                          env=env, capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    with _ssh(machine, key) as conn:
        result = ssh.remote_exec(conn, "cat tree/a.txt; wc -c < tree/sub/b.bin", timeout=20)
    assert result.output.split() == ["alpha", "200000"]

    machine.destroy(10)
    machine.destroy(10)  # idempotent: the second DELETE is a 404
    assert fleet.api("GET", "vms")[1] == []
    assert fleet.wait_no_guests()
    assert not machine.alive() and "deleted" in machine.why_dead()


@pytest.mark.e2e
@needs_guests
def test_wrong_credentials_fail_preflight_naming_the_variables(fleet):
    settings = OrchardSettings(fleet.url, "vmtasks", "wrong")
    with pytest.raises(PreflightError) as err:
        OrchardBackend(settings, "tahoe-base").preflight("tahoe-base")
    text = err.value.render()
    assert "401" in text and fleet.url in text and "ORCHARD_SERVICE_ACCOUNT_TOKEN" in text
    with pytest.raises(PreflightError, match="no credentials"):
        OrchardBackend(OrchardSettings(fleet.url), "tahoe-base").preflight("tahoe-base")
    assert fleet.api("GET", "vms")[1] == []


def test_unreachable_controller_fails_preflight():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = "http://127.0.0.1:%d" % s.getsockname()[1]
    with pytest.raises(PreflightError) as err:
        OrchardBackend(OrchardSettings(url, "a", "b"), "tahoe-base").preflight("tahoe-base")
    assert "cannot reach the Orchard controller at " + url in err.value.message and "ORCHARD_URL" in err.value.hint


@pytest.mark.e2e
@needs_guests
def test_missing_image_fails_preflight_and_leaves_no_vm(fleet, backend):
    with pytest.raises(PreflightError) as err:
        backend.preflight("no-such-image")
    text = err.value.render()
    assert "no-such-image" in text and "worker-" in text and "tart pull no-such-image" in text
    assert fleet.api("GET", "vms")[1] == []


@pytest.mark.e2e
@needs_guests
def test_start_reports_the_pending_queue_and_failures(fleet, backend, tmp_path):
    key = _run_key(tmp_path)
    cancel = threading.Event()
    deadline = time.monotonic() + 30
    for i in range(4):  # fill both workers
        assert fleet.api("POST", "vms", {"name": "fill-%d" % i, "image": "tahoe-base"})[0] == 200
    for i in range(4):
        fleet.wait_status("fill-%d" % i, ("running",))
    waiting = backend.machine("vmt-q-1", OWNER, None, public_key=key.public_line)
    waiting.create("tahoe-base", deadline, cancel)
    waits = []

    def free_a_slot():
        while not waits:
            time.sleep(0.05)
        fleet.api("DELETE", "vms/fill-0")

    threading.Thread(target=free_a_slot, daemon=True).start()
    waiting.start(tmp_path / "console.log", deadline, cancel, waits.append)
    assert waits and "position 1 of 1" in waits[0] and "pending" in waits[0]
    assert fleet.vm("vmt-q-1")["status"] == "running"

    assert fleet.api("DELETE", "vms/fill-1")[0] == 200  # room for the next one
    deadline = time.monotonic() + 15
    broken = backend.machine("vmt-bad-1", OWNER, None, public_key=key.public_line)
    broken.create("no-such-image", deadline, cancel)
    with pytest.raises(BackendError) as err:
        broken.start(tmp_path / "console.log", deadline, cancel, waits.append)
    text = err.value.render()
    assert "vmt-bad-1" in text and fleet.url in text and "clone" in text and "tart pull" in text
    assert not broken.alive() and "failed" in broken.why_dead()
    with pytest.raises(BackendError, match="already exists"):
        broken.create("tahoe-base", deadline, cancel)
    cancel.set()
    with pytest.raises(VmtasksError):
        waiting.wait_ssh(deadline, cancel)


@pytest.mark.e2e
@needs_guests
def test_worker_going_offline_kills_the_machine_with_a_reason(fleet, backend, tmp_path):
    key = _run_key(tmp_path)
    cancel = threading.Event()
    deadline = time.monotonic() + 20
    machine = backend.machine("vmt-off-1", OWNER, None, public_key=key.public_line)
    machine.create("tahoe-base", deadline, cancel)
    machine.start(tmp_path / "console.log", deadline, cancel, lambda text: None)
    # The worker runs the startup script over SSH after `running`: let it finish, so the VM
    # dies of the worker going offline, not of a startup script cut short.
    machine.install_key(key.public_line, deadline + 40, cancel)
    assert machine.alive()
    worker = fleet.vm(machine.name)["worker"]
    offline = [sys.executable, str(REPO / "scripts" / "orchard"), "standin", "worker-offline", "--data", fleet.data,
               worker]
    subprocess.run(offline, check=True, timeout=30)
    try:
        limit = time.monotonic() + 10
        while machine.alive() and time.monotonic() < limit:
            time.sleep(0.1)
        assert not machine.alive()
        assert worker in machine.why_dead() and "lost connection" in machine.why_dead()
        with pytest.raises(VmtasksError) as err:
            machine.open_socket(2)
        assert "417" in err.value.message and machine.name in err.value.message
        strict = OrchardBackend(backend.settings, "tahoe-base", worker_offline_after=1)
        checks = {name: (status, detail) for name, status, detail, hint in strict.health()}
        assert checks["orchard workers"][0] == "ok" and "1 of 2 online" in checks["orchard workers"][1]
    finally:
        subprocess.run(offline[:3] + ["worker-online"] + offline[4:], check=True, timeout=30)
    machine.destroy(10)


@pytest.mark.e2e
@needs_guests
def test_health_and_the_proxy_helper_errors(fleet, backend):
    checks = {name: (status, detail) for name, status, detail, hint in backend.health()}
    assert [status for status, _ in checks.values()] == ["ok"] * 4, checks
    assert "4 of 4 VM slots free" == checks["orchard slots"][1]
    assert "2 of 2 online" in checks["orchard workers"][1]
    proxy = [sys.executable, "-m", "vmtasks.backends.orchard.proxy"]
    env = dict(os.environ, PYTHONPATH=str(REPO), **fleet.env())
    done = subprocess.run(proxy + ["no-such-vm", "22"], env=env, capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 1 and "404" in done.stderr and "no-such-vm" in done.stderr
    env.pop("ORCHARD_URL")
    done = subprocess.run(proxy + ["x", "22"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "ORCHARD_URL is not set" in done.stderr
    assert subprocess.run(proxy + ["x"], env=env, capture_output=True, timeout=30).returncode == 2


def _self_signed(tmp_path: Path):
    """A CA-style self-signed certificate for 127.0.0.1 and orchard-controller, as Orchard makes."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "orchard-controller")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("orchard-controller"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "controller.pem", tmp_path / "controller.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_is_verified_and_a_ca_file_or_context_certificate_is_trusted(tmp_path):
    cert, key = _self_signed(tmp_path)
    f = Fleet(tmp_path / "orchard", workers=1, base=None, tls=(cert, key))
    f.start()
    try:
        assert f.url.startswith("https://")
        creds = dict(f.env(), HOME=str(tmp_path / "nohome"))
        plain = OrchardBackend(load_settings(env=creds), "tahoe-base")
        (name, status, detail, hint), = plain.health()
        assert status == "fail" and "cannot verify the TLS certificate" in detail and "ca_cert" in hint
        with pytest.raises(PreflightError, match="TLS certificate"):
            plain.preflight("tahoe-base")
        trusted = OrchardBackend(load_settings(ca_cert=str(cert), env=creds), "tahoe-base")
        assert [c[1] for c in trusted.health()] == ["ok"] * 4
        home = tmp_path / "home"
        _context_file(home, {"c": {"url": f.url, "serviceAccountName": f.account[0],
                                   "serviceAccountToken": f.account[1],
                                   "certificate": base64.b64encode(cert.read_bytes()).decode()}}, default="c")
        pinned = OrchardBackend(load_settings(env={"HOME": str(home)}), "tahoe-base")
        assert pinned.settings.pinned_cert and [c[1] for c in pinned.health()] == ["ok"] * 4
    finally:
        f.down()


@pytest.mark.e2e
@needs_guests
def test_a_running_vm_survives_a_controller_restart(fleet, backend, tmp_path):
    key = _run_key(tmp_path)
    cancel = threading.Event()
    deadline = time.monotonic() + 30
    machine = backend.machine("vmt-restart-1", OWNER, None, public_key=key.public_line)
    machine.create("tahoe-base", deadline, cancel)
    machine.start(tmp_path / "console.log", deadline, cancel, lambda text: None)
    machine.install_key(key.public_line, deadline, cancel)
    url = fleet.url
    fleet.restart(kill=True)  # same URL: the harness reuses the port
    assert fleet.url == url and machine.alive()
    conn = _ssh(machine, key)
    try:
        assert ssh.remote_exec(conn, "echo back", timeout=20).output.strip() == "back"
    finally:
        conn.close()
    machine.destroy(10)


@pytest.mark.e2e
@needs_guests
def test_ssh_through_a_wss_tunnel(tmp_path):
    cert, tls_key = _self_signed(tmp_path)
    f = Fleet(tmp_path / "orchard", workers=1, tls=(cert, tls_key))
    f.start()
    try:
        backend = OrchardBackend(load_settings(ca_cert=str(cert), env=dict(f.env(), HOME=str(tmp_path))),
                                 "tahoe-base", poll=0.1, probe_image=False)
        backend.preflight("tahoe-base")
        key = _run_key(tmp_path)
        cancel = threading.Event()
        deadline = time.monotonic() + 30
        machine = backend.machine("vmt-tls-1", OWNER, None, public_key=key.public_line)
        machine.create("tahoe-base", deadline, cancel)
        machine.start(tmp_path / "console.log", deadline, cancel, lambda text: None)
        machine.wait_ssh(deadline, cancel)
        machine.install_key(key.public_line, deadline, cancel)
        conn = _ssh(machine, key)
        try:
            result = ssh.remote_exec(conn, "head -c 300000 /dev/zero | wc -c", timeout=20)
        finally:
            conn.close()
        assert result.output.strip() == "300000"
        target = machine.ssh_target()
        assert target.env["VMTASKS_ORCHARD_CA_CERT"] == str(cert)
        ssh_argv = ["ssh", *ssh.ssh_options(key), "-o", "ProxyCommand=" + target.proxy_command,
                    "admin@" + target.host, "echo over-wss"]
        done = subprocess.run(ssh_argv, env=dict(os.environ, **target.env), capture_output=True, text=True,
                              timeout=30, stdin=subprocess.DEVNULL)
        assert done.returncode == 0 and done.stdout.strip() == "over-wss", done.stderr
        machine.destroy(10)
    finally:
        f.down()


# --- the sweep covers Orchard VMs by their owner records (units, fake controller) ------------------


class _FakeOrchard:
    """A controller listing for vmtasks.state.orphans.sweep: ListedVm rows; remove() records."""

    name = "orchard"

    def __init__(self, vms):
        self.vms = list(vms)
        self.removed = []

    def list_vms(self):
        return [vm for vm in self.vms if vm.name not in self.removed]

    def remove(self, name, timeout):
        self.removed.append(name)

    def stop_command(self, name):
        return ""

    def judge_unleased(self, name, labels, include_kept):  # as OrchardBackend: by the VM's owner record
        from vmtasks.backends.orchard.backend import OrchardBackend

        return OrchardBackend.judge_unleased(self, name, labels, include_kept)


class _Reporter:
    def __init__(self):
        self.lines = []

    def info(self, text):
        self.lines.append(text)

    error = info


def _sweep_parts(tmp_path, backend):
    from types import SimpleNamespace

    from vmtasks.state.ledger import Ledger

    cfg = SimpleNamespace(vm=SimpleNamespace(name_prefix="vmt"), sweep=SimpleNamespace(unleased_after=24.0),
                          timeouts=SimpleNamespace(teardown=30))
    ledger = Ledger(tmp_path / "state")
    ledger.ensure()
    return SimpleNamespace(cfg=cfg, backend=backend, ledger=ledger, cleanup_command="invoke cleanup-orphans")


def _owner_labels(pid, pid_start, host=None, **extra):
    import socket

    from vmtasks.backends.orchard.fleet import env_value

    labels = {"run_id": "r-%s" % pid, "host": env_value(host or socket.gethostname()), "user": "u",
              "pid": str(pid), "pid_start": env_value(pid_start)}
    labels.update(extra)
    return labels


def test_the_sweep_judges_unleased_orchard_vms_by_their_owner_records(tmp_path):
    from vmtasks.lifecycle.backend import ListedVm
    from vmtasks.state import orphans
    from vmtasks.state.ledger import Ledger, process_start_time

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    me, my_start = os.getpid(), process_start_time(os.getpid())
    kept_state = tmp_path / "other-state"
    other = Ledger(kept_state)
    other.ensure()
    other.write(other.new_lease("vmt-kept-1", "r-kept", keep=True, base="tahoe-base"))
    vms = [
        ListedVm("vmt-dead-1", True, "running", _owner_labels(dead_pid, "linux:1")),
        ListedVm("vmt-reused-1", True, "running", _owner_labels(me, "linux:1")),  # PID reused since
        ListedVm("vmt-live-1", True, "running", _owner_labels(me, my_start)),
        ListedVm("vmt-remote-1", True, "running", _owner_labels(dead_pid, "linux:1", host="another-mac")),
        ListedVm("vmt-foreign-1", True, "running", {}),
        ListedVm("vmt-kept-1", True, "running", _owner_labels(dead_pid, "linux:1", state_dir=str(kept_state))),
        ListedVm("other-dead-1", True, "running", _owner_labels(dead_pid, "linux:1")),  # not our prefix
    ]
    backend = _FakeOrchard(vms)
    reporter = _Reporter()
    assert orphans.sweep(reporter, _sweep_parts(tmp_path, backend)) == 0
    assert sorted(backend.removed) == ["vmt-dead-1", "vmt-reused-1"], reporter.lines
    text = "\n".join(reporter.lines)
    assert "owner process {} of run r-{} on this host is gone".format(dead_pid, dead_pid) in text
    for name in ("vmt-live-1", "vmt-remote-1"):
        assert "live (not touched): " + name in text
    assert "kept (not touched): vmt-kept-1" in text
    assert "no lease (not touched): vmt-foreign-1" in text
    # --include-kept takes the kept one too; the live and foreign ones still stay.
    assert orphans.sweep(reporter, _sweep_parts(tmp_path, backend), include_kept=True) == 0
    assert sorted(backend.removed) == ["vmt-dead-1", "vmt-kept-1", "vmt-reused-1"]


def test_dry_run_of_the_orchard_owner_rules_removes_nothing(tmp_path):
    from vmtasks.lifecycle.backend import ListedVm
    from vmtasks.state import orphans

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    backend = _FakeOrchard([ListedVm("vmt-dead-1", True, "running", _owner_labels(int(dead.stdout), "linux:1"))])
    reporter = _Reporter()
    assert orphans.sweep(reporter, _sweep_parts(tmp_path, backend), dry_run=True) == 0
    assert backend.removed == [] and any("would remove vm vmt-dead-1" in line for line in reporter.lines)


class _PendingClient:
    """A controller whose VMs stay pending (fleet full), for start()'s give-up path."""

    url = "http://controller.test:6120"

    def __init__(self):
        self.calls = []

    def request(self, method, path, body=None, query=None, timeout=None):
        self.calls.append((method, path))
        if path == "vms":
            return 200, [{"name": "vmt-wait-1", "status": "pending", "worker": "", "createdAt": ""}]
        return 200, {"name": "vmt-wait-1", "status": "pending", "worker": ""}


def test_start_gives_up_waiting_once_the_vm_is_no_longer_wanted(tmp_path):
    from vmtasks.guest.errors import NoLongerNeeded

    client = _PendingClient()
    backend = OrchardBackend(OrchardSettings(client.url, "a", "b"), "tahoe-base", client=client, poll=0.01)
    machine = backend.machine("vmt-wait-1", OWNER, None, public_key="ssh-ed25519 AAAA test")
    waits, asked = [], []

    def still_wanted():
        asked.append(1)
        return len(asked) < 5  # the queue runs dry while the VM is pending

    with pytest.raises(NoLongerNeeded, match="no longer needed"):
        machine.start(tmp_path / "console.log", time.monotonic() + 30, threading.Event(), waits.append, still_wanted)
    assert len(asked) == 5 and waits and "position 1 of 1" in waits[0]
    assert "given up before it ran" in (tmp_path / "console.log").read_text()
    # Without the callable it waits until the deadline, saying the fleet is full.
    with pytest.raises(BackendError, match="still pending .* fleet full"):
        machine.start(tmp_path / "console.log", time.monotonic() + 0.2, threading.Event(), waits.append)


class _ProbeClient:
    """A one-worker controller whose VMs run as soon as they are created (or fail, for a
    missing image), for preflight's image probe and its cache."""

    url = "http://controller.test:6120"

    def __init__(self, images=("tahoe-base",)):
        import datetime

        self.images = set(images)
        self.vms = {}
        self.posted = []
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.workers = [{"name": "w1", "last_seen": now, "resources": {"org.cirruslabs.tart-vms": 2}}]

    def request(self, method, path, body=None, query=None, timeout=None, parse=True):
        if path in ("/", "controller/info"):
            return 200, {"version": "test"}
        if path == "workers":
            return 200, self.workers
        if path == "vms" and method == "GET":
            return 200, list(self.vms.values())
        if path == "vms" and method == "POST":
            self.posted.append(body["name"])
            ok = body["image"] in self.images
            self.vms[body["name"]] = dict(body, worker="w1", status="running" if ok else "failed",
                                          status_message="" if ok else "failed to clone the VM: no such image")
            return 200, self.vms[body["name"]]
        name = path.split("/", 1)[1]
        if name.endswith("/events"):  # the probe's script said it ran once the VM runs
            vm = self.vms[name[:-len("/events")]]
            return 200, [{"payload": "vmtasks: probe ran"}] if vm["status"] == "running" else []
        if method == "DELETE":
            self.vms.pop(name, None)
            return 200, None
        return 200, self.vms[name]


def test_a_probed_image_is_remembered_and_a_missing_one_is_probed_every_time(tmp_path):
    client = _ProbeClient()
    cache = tmp_path / "state" / "orchard-images.json"

    def backend():
        return OrchardBackend(OrchardSettings(client.url, "a", "b"), "tahoe-base", client=client, poll=0.01,
                              probe_cache=cache)

    backend().preflight("tahoe-base")
    assert len(client.posted) == 1 and client.vms == {}  # probed, and the probe is gone
    assert "tahoe-base" in cache.read_text()
    backend().preflight("tahoe-base")
    assert len(client.posted) == 1, "a recent probe of the same image on the same controller is reused"
    for _ in range(2):
        with pytest.raises(PreflightError, match="no-such-image"):
            backend().preflight("no-such-image")
    assert len(client.posted) == 3, "a failure is never remembered"
    cache.write_text("{not json")
    backend().preflight("tahoe-base")
    assert len(client.posted) == 4, "a damaged cache means probing again"
