"""The controller's state (persisted in the data dir), its scheduler and its workers.

A worker is a Tart stand-in host: its own TART_HOME under ``DATA/workers/<name>/tart-home``,
driven only through the ``tart`` command found next to this package (scripts/tart). Each VM
placed on a worker gets one lifecycle thread that owns every ``tart`` call for it (clone,
set, run, the startup script, stop, delete), so a deletion never races a clone.
"""

import datetime
import fnmatch
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

TART = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "tart")
TART_VMS = "org.cirruslabs.tart-vms"
LOCAL_PREFIX = "orchard-"
# crypt(3) SHA-512 of "admin" (`openssl passwd -6 -salt orchardstandin admin`): the password
# of Cirrus Labs images' admin account, which the worker's startup-script login uses.
ADMIN_HASH = ("$6$orchardstandin$P3XPkfbTMTFQEgA9a0UdliNYaT2jLy60oskucT3z4UA/"
              "cKEb/khYggDxsrysYKEW7yafrHJrvkXbVsMgHAlyT1")


def rfc3339(epoch):
    """Go's time.Time JSON form; the zero time for "never"."""
    if not epoch:
        return "0001-01-01T00:00:00Z"
    stamp = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


def log(message):
    print("orchard-standin: " + message, file=sys.stderr, flush=True)


class Settings:
    """Knobs of one controller run (flags of `controller run`, see README)."""

    def __init__(self, data, workers=2, slots=2, scheduler_interval=0.5, worker_offline_timeout=5.0,
                 fail_start=(), start_delay=0.0, worker_labels=None, dev=False, image_password="admin",
                 ssh_retry_delay=0.1):
        self.data = data
        self.workers = workers
        self.slots = slots
        self.scheduler_interval = scheduler_interval
        self.worker_offline_timeout = worker_offline_timeout
        self.fail_start = list(fail_start)
        self.start_delay = start_delay
        self.worker_labels = worker_labels or {}
        self.dev = dev  # `orchard dev`: no auth, Swagger at /v1/, RPC v1 port-forwards
        self.image_password = image_password  # the images' admin password (Cirrus Labs: admin)
        self.ssh_retry_delay = ssh_retry_delay  # retry-go's first delay before a new SSH attempt


class StartFailed(Exception):
    """The VM cannot run: its message becomes the VM's status_message."""


class Gone(Exception):
    """The VM was deleted (or its worker went away) while its lifecycle thread worked."""


class Worker:
    """One Tart stand-in host: its TART_HOME, its slots, its open tunnels."""

    def __init__(self, data, name, slots):
        self.name = name
        self.slots = slots
        self.dir = os.path.join(data, "workers", name)
        self.tart_home = os.path.join(self.dir, "tart-home")
        self.logs = os.path.join(self.dir, "logs")
        os.makedirs(self.tart_home, exist_ok=True)
        os.makedirs(self.logs, exist_ok=True)
        # Guests started here and not yet torn down: the Tart VM limit counts these, including
        # ones still stopping after their VM resource was deleted.
        self.active = set()
        self.cond = threading.Condition()
        self.tunnels = set()  # open port-forward sockets, severed when the worker goes away

    @property
    def offline_flag(self):
        return os.path.join(self.dir, "offline")

    def online(self):
        return not os.path.exists(self.offline_flag)

    def env(self):
        env = dict(os.environ)
        env["TART_HOME"] = self.tart_home
        env["TART_STANDIN_MAX_VMS"] = str(self.slots)
        return env

    def tart(self, *args, timeout=120, stdin=None):
        return subprocess.run([TART, *args], env=self.env(), capture_output=True, text=True,
                              timeout=timeout, input=stdin,
                              stdin=None if stdin is not None else subprocess.DEVNULL)

    def tart_vms(self):
        done = self.tart("list", "--format", "json", timeout=60)
        if done.returncode != 0:
            return []
        return json.loads(done.stdout or "[]")

    def acquire_slot(self, uid, gone):
        with self.cond:
            while len(self.active) >= self.slots:
                if gone():
                    raise Gone()
                self.cond.wait(0.1)
            self.active.add(uid)

    def release_slot(self, uid):
        with self.cond:
            self.active.discard(uid)
            self.cond.notify_all()

    def sever_tunnels(self):
        for sock in list(self.tunnels):
            try:
                sock.close()
            except OSError:
                pass


class Controller:
    """State, scheduler and workers. Every mutation of ``vms``/``events`` holds ``lock`` and
    ends with ``save()``, so a restarted controller finds what the last one knew."""

    def __init__(self, settings, service_accounts):
        self.settings = settings
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.state_path = os.path.join(settings.data, "state.json")
        self.vms = {}      # name -> VM resource (API fields only)
        self.events = {}   # uid -> [event]
        self.ips = {}      # uid -> guest IP on its worker
        self.service_accounts = dict(service_accounts)
        self.worker_seen = {}
        self.workers = {}
        self.created = time.time()
        os.makedirs(settings.data, exist_ok=True)
        self._load()
        for i in range(1, settings.workers + 1):
            name = "worker-%d" % i
            self.workers[name] = Worker(settings.data, name, settings.slots)
            self.worker_seen.setdefault(name, {"createdAt": time.time(), "machine_id": uuid.uuid4().hex})
        self.scheduling = threading.Event()
        self._offline_handled = set()

    # --- persistence ------------------------------------------------------------

    def _load(self):
        try:
            with open(self.state_path) as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return
        self.vms = data.get("vms", {})
        self.events = data.get("events", {})
        self.ips = data.get("ips", {})
        self.worker_seen = data.get("workers", {})
        for name, token in data.get("service_accounts", {}).items():
            self.service_accounts.setdefault(name, token)

    def save(self):
        with self.lock:
            data = {"vms": self.vms, "events": self.events, "ips": self.ips,
                    "workers": self.worker_seen, "service_accounts": self.service_accounts}
            tmp = self.state_path + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(data, fh)
            os.replace(tmp, self.state_path)

    # --- VM resources ------------------------------------------------------------

    def create_vm(self, body):
        """POST /v1/vms: returns (status, payload)."""
        name = body.get("name") or ""
        if not name:
            return 412, {"message": "VM name is empty"}
        if any(not (c.isalnum() and c.isascii()) and c not in ":-_." for c in name):
            return 412, {"message": "VM name name contains restricted characters, please only use [A-Za-z0-9:-_.]"}
        if not body.get("image"):
            return 412, {"message": "VM image is empty"}
        with self.lock:
            if name in self.vms:
                return 409, {"message": "VM with this name already exists"}
            vm = dict(body)
            uid = str(uuid.uuid4())
            resources = dict(vm.get("resources") or {})
            vm.setdefault("os", "darwin")
            if vm["os"] == "darwin":
                resources.setdefault(TART_VMS, 1)
            vm.update({
                "name": name, "uid": uid, "status": "pending", "status_message": "", "worker": "",
                "createdAt": time.time(), "scheduled_at": 0, "started_at": 0, "restarted_at": 0,
                "restart_count": 0, "generation": 0, "resources": resources,
                "labels": dict(vm.get("labels") or {}), "arch": vm.get("arch") or "arm64",
                "runtime": vm.get("runtime") or "tart", "powerState": "running",
                "imagePullPolicy": vm.get("imagePullPolicy") or "IfNotPresent",
                "restart_policy": vm.get("restart_policy") or "Never",
            })
            vm["localName"] = vm["tartName"] = "%s%s-%s" % (LOCAL_PREFIX, name, uid[:8])
            self.vms[name] = vm
            self.events[uid] = []
            self.save()
        self.scheduling.set()  # Orchard requests an immediate scheduling pass on create
        return 200, self.render(vm)

    def delete_vm(self, name):
        with self.lock:
            vm = self.vms.pop(name, None)
            if vm is None:
                return 404, None
            self.events.pop(vm["uid"], None)
            self.save()
        log("VM %s deleted (worker %s tears it down in the background)" % (name, vm["worker"] or "-"))
        return 200, None

    def get(self, name):
        with self.lock:
            vm = self.vms.get(name)
            return dict(vm) if vm else None

    def alive(self, uid):
        with self.lock:
            return any(vm["uid"] == uid for vm in self.vms.values())

    def update(self, uid, **fields):
        with self.lock:
            for vm in self.vms.values():
                if vm["uid"] == uid:
                    if vm["status"] == "failed" and fields.get("status") not in (None, "failed"):
                        return False  # terminal
                    vm.update(fields)
                    self.save()
                    return True
        return False

    def add_event(self, uid, payload):
        with self.lock:
            if uid in self.events:
                self.events[uid].append({"kind": "log_line", "payload": payload, "timestamp": int(time.time())})
                self.save()

    @staticmethod
    def render(vm):
        out = dict(vm)
        for key in ("createdAt", "scheduled_at", "started_at", "restarted_at"):
            out[key] = rfc3339(out.get(key))
        return out

    def render_worker(self, name):
        seen = self.worker_seen.get(name, {})
        return {"name": name, "createdAt": rfc3339(seen.get("createdAt")),
                "last_seen": rfc3339(seen.get("last_seen")), "machine_id": seen.get("machine_id", ""),
                "scheduling_paused": False, "resources": {TART_VMS: self.settings.slots},
                "labels": dict(self.settings.worker_labels), "defaultCPU": 4, "defaultMemory": 8192,
                "arch": "arm64", "runtime": "tart"}

    def worker_offline(self, name):
        seen = self.worker_seen.get(name, {}).get("last_seen", 0)
        return time.time() - seen > self.settings.worker_offline_timeout

    # --- threads --------------------------------------------------------------------

    def start(self):
        with self.lock:  # a restarted controller has heard from its workers just now
            for name, worker in self.workers.items():
                if worker.online():
                    self.worker_seen[name]["last_seen"] = time.time()
        self._recover()
        for target in (self._heartbeat, self._scheduler):
            threading.Thread(target=target, daemon=True, name=target.__name__).start()

    def _heartbeat(self):
        """Online workers report every 0.2 s; an offline flag freezes last_seen, and the
        worker's Mac is gone: its tunnels are cut and its guests torn down."""
        while not self.stopping.is_set():
            now = time.time()
            with self.lock:
                for name, worker in self.workers.items():
                    if worker.online():
                        self.worker_seen[name]["last_seen"] = now
                        self._offline_handled.discard(name)
                    elif name not in self._offline_handled:
                        self._offline_handled.add(name)
                        log("worker %s went offline" % name)
                        worker.sever_tunnels()
            self.stopping.wait(0.2)

    def _scheduler(self):
        while not self.stopping.is_set():
            self.scheduling.wait(self.settings.scheduler_interval)
            self.scheduling.clear()
            try:
                self._schedule_once()
            except Exception as exc:  # keep scheduling; the stand-in logs its own bugs
                log("scheduler error: %r" % (exc,))

    def _schedule_once(self):
        with self.lock:
            changed = False
            for vm in self.vms.values():
                if vm["worker"] and vm["status"] != "failed" and self.worker_offline(vm["worker"]):
                    vm["status"] = "failed"
                    vm["status_message"] = "VM is assigned to a worker that lost connection with the controller"
                    changed = True
            used = {name: 0 for name in self.workers}
            for vm in self.vms.values():
                if vm["worker"] in used and vm["status"] != "failed":
                    used[vm["worker"]] += int(vm["resources"].get(TART_VMS, 0))
            pending = sorted((vm for vm in self.vms.values() if vm["status"] == "pending" and not vm["worker"]),
                             key=lambda vm: vm["createdAt"])
            placed = []
            for vm in pending:
                # optimize-utilization: the busiest worker that still fits goes first
                for name in sorted(self.workers, key=lambda n: (-used[n], n)):
                    need = int(vm["resources"].get(TART_VMS, 0))
                    labels_ok = all(self.settings.worker_labels.get(k) == v for k, v in vm["labels"].items())
                    if self.worker_offline(name) or not labels_ok or used[name] + need > self.settings.slots:
                        continue
                    used[name] += need
                    vm["worker"] = name
                    vm["scheduled_at"] = time.time()
                    placed.append((self.workers[name], dict(vm)))
                    break
            if changed or placed:
                self.save()
        for worker, vm in placed:
            log("scheduled VM %s on %s" % (vm["name"], worker.name))
            threading.Thread(target=self._lifecycle, args=(worker, vm), daemon=True).start()

    def _recover(self):
        """After a restart: adopt guests that still run, fail VMs whose guest is gone,
        and tear down guests no VM resource owns any more (as an Orchard worker does)."""
        for worker in self.workers.values():
            rows = {row["Name"]: row for row in worker.tart_vms()}
            owned = set()
            with self.lock:
                mine = [dict(vm) for vm in self.vms.values() if vm["worker"] == worker.name]
            for vm in mine:
                owned.add(vm["localName"])
                row = rows.get(vm["localName"])
                if vm["status"] == "failed":
                    threading.Thread(target=self._teardown, args=(worker, vm["localName"], None), daemon=True).start()
                elif row and row["Running"]:
                    worker.active.add(vm["uid"])
                    log("adopted running guest %s of VM %s" % (vm["localName"], vm["name"]))
                    threading.Thread(target=self._lifecycle, args=(worker, vm, True), daemon=True).start()
                else:
                    self.update(vm["uid"], status="failed",
                                status_message="VM was not running when the worker restarted")
                    threading.Thread(target=self._teardown, args=(worker, vm["localName"], None), daemon=True).start()
            for name in rows:
                if name.startswith(LOCAL_PREFIX) and name not in owned:
                    threading.Thread(target=self._teardown, args=(worker, name, None), daemon=True).start()

    # --- one VM on one worker ---------------------------------------------------------

    def _lifecycle(self, worker, vm, adopted=False):
        uid, local = vm["uid"], vm["localName"]

        def gone():
            return (self.stopping.is_set() or not self.alive(uid) or not worker.online()
                    or (self.get(vm["name"]) or {}).get("status") == "failed")

        proc = None
        try:
            if not adopted:
                for pattern in self.settings.fail_start:
                    if fnmatch.fnmatchcase(vm["name"], pattern):
                        raise StartFailed("failed to start VM: simulated failure (--fail-start %s)" % pattern)
                deadline = time.monotonic() + self.settings.start_delay
                while time.monotonic() < deadline:
                    if gone():
                        raise Gone()
                    time.sleep(0.05)
                worker.acquire_slot(uid, gone)
                done = worker.tart("clone", vm["image"], local)
                if done.returncode != 0:
                    raise StartFailed("failed to clone the VM: tart clone %s %s exited %d: %s" % (
                        vm["image"], local, done.returncode, _last_line(done.stderr)))
                args = []
                if vm.get("cpu"):
                    args += ["--cpu", str(int(vm["cpu"]))]
                if vm.get("memory"):
                    args += ["--memory", str(int(vm["memory"]))]
                if args:
                    worker.tart("set", local, *args)
                if gone():
                    raise Gone()
                log_path = os.path.join(worker.logs, local + ".log")
                with open(log_path, "ab") as fh:
                    # Its own session: the guest outlives a controller restart, as on Orchard.
                    proc = subprocess.Popen([TART, "run", "--no-graphics", local], env=worker.env(),
                                            stdin=subprocess.DEVNULL, stdout=fh, stderr=fh,
                                            start_new_session=True)
                ip = self._wait_ip(worker, local, proc, gone)
                with self.lock:
                    self.ips[uid] = ip
                # Orchard reports running once `tart run` is up; the startup script runs meanwhile.
                self.update(uid, status="running", status_message="", started_at=time.time())
                log("VM %s running on %s (%s)" % (vm["name"], worker.name, ip))
                if (vm.get("startup_script") or {}).get("script_content"):
                    threading.Thread(target=self._startup_script, args=(worker, vm), daemon=True).start()
            while not gone():
                if proc is not None:
                    if proc.poll() is not None:
                        raise StartFailed("VM stopped unexpectedly: tart run exited %d" % proc.returncode)
                    time.sleep(0.1)
                else:  # adopted after a restart: not our child, ask tart
                    rows = {row["Name"]: row for row in worker.tart_vms()}
                    if not rows.get(local, {}).get("Running"):
                        raise StartFailed("VM stopped unexpectedly")
                    time.sleep(1)
        except StartFailed as exc:
            log("VM %s failed: %s" % (vm["name"], exc))
            self.update(uid, status="failed", status_message=str(exc))
        except Gone:
            pass
        except Exception as exc:  # a stand-in bug still fails the VM rather than hanging it
            self.update(uid, status="failed", status_message="stand-in error: %r" % (exc,))
        if self.stopping.is_set():
            return  # a controller shutdown leaves guests running (they survive a restart)
        self._teardown(worker, local, proc)
        worker.release_slot(uid)

    def _wait_ip(self, worker, local, proc, gone):
        while True:
            if proc.poll() is not None:
                raise StartFailed("failed to start VM: tart run exited %d: %s" % (
                    proc.returncode, _last_line(_read_tail(os.path.join(worker.logs, local + ".log")))))
            if gone():
                raise Gone()
            done = worker.tart("ip", local, timeout=30)
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout.strip()
            time.sleep(0.05)

    def _teardown(self, worker, local, proc):
        worker.tart("stop", "--timeout", "5", local, timeout=60)
        if proc is not None:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        worker.tart("delete", local, timeout=60)

    def _startup_script(self, worker, vm):
        """As Orchard's worker does (internal/worker/vmmanager/base/base.go, Shell/RunScript):
        log in to the guest's port 22 over SSH with *password* authentication as the VM's
        username/password (admin/admin only when both are empty), retrying the login as
        retry-go does; a shell gets `set -e`, the env as exports, the script and `exit` on its
        stdin; every output line becomes a log_line event; any failure fails the VM."""
        import paramiko

        script = vm["startup_script"]
        user, password = vm.get("username") or "", vm.get("password") or ""
        if not user and not password:
            user = password = "admin"
        text = "set -e\n"
        for key, value in (script.get("env") or {}).items():
            text += 'export %s="%s"\n' % (key, value)
        text += script.get("script_content", "") + "\nexit\n"
        uid = vm["uid"]
        try:
            client = self._ssh_login(worker, vm, user, password)
        except _LoginFailed as exc:
            self._fail_script(uid, "failed to establish SSH connection: %s" % exc)
            return
        if client is None:
            return  # deleted meanwhile
        try:
            channel = client.get_transport().open_session()
            channel.invoke_shell()  # a shell, no PTY: sshd makes it a login shell
            channel.sendall(text.encode())
            channel.shutdown_write()
            lines = channel.makefile("rb")
            for raw in lines:  # events as the script prints, as Orchard streams them
                self.add_event(uid, raw.decode(errors="replace").rstrip("\n"))
            code = channel.recv_exit_status()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self._fail_script(uid, "%r" % (exc,))
            return
        finally:
            client.close()
        if code != 0:
            self._fail_script(uid, "Process exited with status %d" % code)

    def _fail_script(self, uid, why):
        # base.go: fmt.Errorf("%w: failed to run startup script: %v", ErrVMFailed, err)
        self.update(uid, status="failed", status_message="VM failed: failed to run startup script: " + why)

    def _ssh_login(self, worker, vm, user, password):
        """A logged-in paramiko client, or None once the VM is gone. retry-go's defaults:
        10 attempts, exponential backoff from --ssh-retry-delay (0.1 s) plus jitter; each
        failed attempt is an event, and the error lists them all."""
        import random

        import paramiko

        uid, errors = vm["uid"], []
        for attempt in range(10):
            if not self.alive(uid):
                return None
            give_image_account(worker, vm["localName"], self.image_password_hash())
            addr = "%s:22" % self.ip_of(uid)
            client = paramiko.SSHClient()
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # Orchard accepts any host key
            try:
                client.connect(self.ip_of(uid), 22, username=user, password=password, timeout=5,
                               allow_agent=False, look_for_keys=False, auth_timeout=10, banner_timeout=10)
                return client
            except paramiko.AuthenticationException:
                client.close()
                error = ("SSH handshake with %s failed: ssh: handshake failed: ssh: unable to authenticate, "
                         "attempted methods [none password], no supported methods remain" % addr)
            except (OSError, EOFError, paramiko.SSHException) as exc:
                client.close()
                error = "failed to dial %s: dial tcp %s: %s" % (addr, addr, getattr(exc, "strerror", None) or exc)
            errors.append(error)
            self.add_event(uid, "attempt %d to establish SSH connection failed: %s" % (attempt, error))
            if attempt < 9:
                time.sleep(self.settings.ssh_retry_delay * (2 ** attempt)
                           + random.uniform(0, self.settings.ssh_retry_delay))
        raise _LoginFailed("All attempts fail:\n" + "\n".join("#%d: %s" % (i + 1, e) for i, e in enumerate(errors)))

    def image_password_hash(self):
        if not hasattr(self, "_password_hash"):
            if self.settings.image_password == "admin":
                self._password_hash = ADMIN_HASH
            else:  # --image-password: `openssl passwd` (Python's crypt module is gone in 3.13)
                done = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=self.settings.image_password,
                                      capture_output=True, text=True, check=True)
                self._password_hash = done.stdout.strip()
        return self._password_hash

    def ip_of(self, uid):
        with self.lock:
            return self.ips.get(uid)


class _LoginFailed(Exception):
    """Every SSH login attempt of the startup script failed."""


def give_image_account(worker, local, password_hash):
    """Make the guest what a Cirrus Labs image is: user admin with a password (admin unless
    --image-password) and sshd taking passwords. The Tart stand-in's guests take keys only, so
    the worker writes the hash into the guest's /etc/shadow (bind-mounted from the VM's run
    dir: rewritten in place, same inode), turns PasswordAuthentication on in its sshd_config
    and sends the guest's sshd SIGHUP (sshd re-executes itself and re-reads it). Idempotent:
    called before every login attempt, as `tart run` writes these files when it starts."""
    run = os.path.join(worker.tart_home, "vms", local, "standin", "run")
    shadow, config = os.path.join(run, "shadow"), os.path.join(run, "sshd_config")
    changed = False
    try:
        with open(shadow, "r+") as fh:
            lines = fh.read().splitlines()
            fixed = [("admin:" + password_hash + ":" + line.split(":", 2)[2]) if line.startswith("admin:") else line
                     for line in lines]
            if fixed != lines:
                fh.seek(0)
                fh.truncate()
                fh.write("\n".join(fixed) + "\n")
        with open(config, "r+") as fh:
            text = fh.read()
            if "PasswordAuthentication no" in text:
                fh.seek(0)
                fh.truncate()
                fh.write(text.replace("PasswordAuthentication no", "PasswordAuthentication yes"))
                changed = True
    except OSError:
        return  # not started yet, or gone: the next attempt tries again
    if changed:
        listeners = _sshd_listeners(config)
        for pid in listeners:
            try:
                os.kill(pid, signal.SIGHUP)
            except OSError:
                pass
        # Before the login attempt, let it re-execute and listen again: it retitles itself
        # ("sshd: ... [listener]") once it listens.
        time.sleep(0.05)
        deadline = time.monotonic() + 3
        while listeners and time.monotonic() < deadline:
            listeners = [pid for pid in listeners if not _cmdline(pid).startswith((b"sshd: ", b"?"))]
            time.sleep(0.02)


def _cmdline(pid):
    """The process's argv joined by NULs; b"?" when it is gone."""
    try:
        with open("/proc/%s/cmdline" % pid, "rb") as fh:
            return fh.read()
    except OSError:
        return b"?"


def _sshd_listeners(config):
    """PIDs (as this host sees them) of sshd processes started with ``-f config``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = _cmdline(entry).split(b"\0")
        # The listener retitles itself "sshd: /usr/sbin/sshd -D -e -f CONFIG [listener] ...";
        # a connection's child re-executes with -R (then becomes "sshd: admin [priv]").
        text = b" ".join(argv)
        if text.startswith((b"sshd: ", b"/usr/sbin/sshd")) and config.encode() in text and b"-R" not in argv:
            found.append(int(entry))
    return found


def _last_line(text):
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _read_tail(path):
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - 4096))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""
