"""`tart run`: a guest is a mount+PID+UTS namespace with its own /Users/admin and sshd.

Process tree while a VM runs:

    R  tart run (holds the fcntl write lock on config.json, waits)
    `- C  fork of R: setsid, unshare(NEWNS|NEWUTS|NEWPID), waits for G
       `- G  fork of C: PID 1 of the guest; sets up mounts, starts sshd, reaps
          `- /usr/sbin/sshd -D -e -f <vm>/standin/run/sshd_config (+ sessions)

C and G die with their parent (PR_SET_PDEATHSIG=SIGKILL); when G (the PID
namespace's init) dies, the kernel kills every process in the namespace. R stops
the guest by SIGKILLing G and waiting for C, which returns only once the whole
namespace is gone.
"""

import errno
import fcntl
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import sys
import time
import traceback

from . import leases, linux, storage
from .errors import GenericError, TartError, UsageError, VMAlreadyRunning, VMDoesNotExist

SSHD = "/usr/sbin/sshd"
AGENT_DELAY_DEFAULT = 10.0
KEYCHAIN_LOCKED = ("SecKeyCreateRandomKey_ios failed\nFailed to generate keypair (the login keychain is "
                   "locked; Linux stand-in: TART_STANDIN_LOCKED_KEYCHAIN)")
GUEST_PATH = "/bin:/usr/bin:/usr/sbin:/usr/local/bin:/opt/homebrew/bin"
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM, signal.SIGUSR1,
           signal.SIGUSR2)
TMPFS_MOUNTS = (("/Users", "0755"), ("/tmp", "1777"), ("/var/tmp", "1777"),
                ("/run", "0755"), ("/dev/shm", "1777"))
ETC_FILES = ("passwd", "group", "shadow", "hosts")


# --- knobs ---------------------------------------------------------------------------

def knob_seconds(name, default=None):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
        if value < 0 or value != value:
            raise ValueError
    except ValueError:
        raise TartError("invalid %s=%r: expected a number of seconds >= 0" % (name, raw)) from None
    return value


def knob_int(name, default):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise TartError("invalid %s=%r: expected an integer >= 0" % (name, raw))
    return int(raw)


def knob_flag(name):
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise TartError("invalid %s=%r: expected 1 or 0" % (name, raw))


def registry_dir():
    return os.environ.get("TART_STANDIN_RUN_DIR") or "/run/tart-standin"


# --- host sshd detection and IP allocation --------------------------------------------

def _socket_owner(inode):
    target = "socket:[%s]" % inode
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fd_dir = "/proc/%s/fd" % pid
        try:
            for fd in os.listdir(fd_dir):
                try:
                    if os.readlink(os.path.join(fd_dir, fd)) == target:
                        with open("/proc/%s/comm" % pid) as fh:
                            return "pid %s (%s)" % (pid, fh.read().strip())
                except OSError:
                    continue
        except OSError:
            continue
    return None


def wildcard_ssh_listener(families=("tcp", "tcp6")):
    """Describe a host process listening on port 22 of every address, or None."""
    for family in families:
        try:
            with open("/proc/net/" + family) as fh:
                lines = fh.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "0A":  # LISTEN
                continue
            addr, _, port = fields[1].partition(":")
            if int(port, 16) == 22 and set(addr) == {"0"}:
                where = "0.0.0.0:22" if family == "tcp" else "[::]:22"
                owner = _socket_owner(fields[9])
                return "%s listens on %s" % (owner or "a process", where)
    return None


def host_sshd_error(description):
    return TartError(
        "tart run (Linux stand-in): %s on this host, which takes port 22 on every "
        "127.x.y.z address, so the guest's sshd cannot listen on its own address. "
        "Stop the host's SSH server (systemctl disable --now ssh.service ssh.socket) or "
        "make it listen on specific addresses only (e.g. \"ListenAddress 127.0.0.1\" in "
        "/etc/ssh/sshd_config, then restart it), and retry." % description)


def ip_candidates(name):
    for attempt in range(4096):
        digest = hashlib.sha256(("%s#%d" % (name, attempt)).encode()).digest()
        yield "127.%d.%d.%d" % (64 + digest[0] % 128, digest[1], 2 + digest[2] % 252)


def _bind_error(ip):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, 22))
    except OSError as exc:
        return exc.errno
    finally:
        sock.close()
    return None


def _lock_reservation(path):
    """flock <path> without blocking; the fd, or None if another guest holds it.

    A reservation file is unlinked by its owner when its guest is gone; after locking,
    make sure the path still names the inode we locked, else start over.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def release_ip(ip, fd):
    """Drop the reservation (call only once the guest's processes are gone)."""
    path = os.path.join(registry_dir(), "ips", ip)
    try:
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)
    except OSError:
        pass
    os.close(fd)


def allocate_ip(name, mac=None):
    """Pick 127.x.y.z for the VM and reserve it host-wide: the address of its MAC's
    unexpired DHCP lease if it has one (bootpd hands a MAC back its leased address), else
    one derived from the name that no other MAC holds a lease for.

    The reservation is an flock on <registry>/ips/<ip>, held by the returned fd,
    which the guest processes inherit: the address is free again once they are gone.
    """
    ips = os.path.join(registry_dir(), "ips")
    os.makedirs(ips, 0o755, exist_ok=True)
    leased = leases.ip_for(mac) if mac else None
    taken = leases.leased_to_others(mac) if mac else set()
    for ip in ([leased] if leased else []) + [c for c in ip_candidates(name) if c not in taken]:
        fd = _lock_reservation(os.path.join(ips, ip))
        if fd is None:
            continue
        err = _bind_error(ip)
        if err is None:
            info = json.dumps({"name": name, "tart_home": storage.tart_home(), "pid": os.getpid()})
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode() + b"\n", 0)
            return ip, fd
        os.close(fd)
        if err == errno.EADDRINUSE:
            listener = wildcard_ssh_listener()
            if listener:
                raise host_sshd_error(listener)
            continue  # something else owns ip:22; try the next address
        if err == errno.EADDRNOTAVAIL:
            raise TartError("tart run (Linux stand-in): cannot bind %s:22: the loopback "
                            "interface must carry 127.0.0.0/8 (it does by default)" % ip)
        raise TartError("tart run (Linux stand-in): cannot bind %s:22: %s" % (ip, os.strerror(err)))
    raise TartError("tart run (Linux stand-in): no free 127.x.y.z address for the guest")


# --- per-VM files ---------------------------------------------------------------------

def _filtered(path, keep):
    try:
        with open(path) as fh:
            lines = [line.rstrip("\n") for line in fh if line.strip()]
    except FileNotFoundError:
        lines = []
    return [line for line in lines if keep(line.split(":"))]


def write_guest_files(vm, ip, name):
    run = vm.run_path
    uid, gid, user = storage.GUEST_UID, storage.GUEST_GID, storage.GUEST_USER

    passwd = _filtered("/etc/passwd", lambda f: f[0] != user and (len(f) < 3 or f[2] != str(uid)))
    passwd.append("%s:x:%d:%d:Administrator:%s:/bin/bash" % (user, uid, gid, storage.GUEST_HOME))
    group = _filtered("/etc/group", lambda f: f[0] != user and (len(f) < 3 or f[2] != str(gid)))
    group.append("%s:x:%d:" % (user, gid))
    shadow = _filtered("/etc/shadow", lambda f: f[0] != user)
    shadow.append("%s:*:%d:0:99999:7:::" % (user, int(time.time() // 86400)))
    hosts = _filtered("/etc/hosts", lambda f: True)
    hosts.append("%s\t%s" % (ip, name))

    def put(fname, lines, mode, gid_=0):
        path = os.path.join(run, fname)
        with open(path, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        os.chmod(path, mode)
        os.chown(path, 0, gid_)

    try:
        import grp
        shadow_gid = grp.getgrnam("shadow").gr_gid
    except (KeyError, ImportError):
        shadow_gid = 0
    put("passwd", passwd, 0o644)
    put("group", group, 0o644)
    put("shadow", shadow, 0o640, shadow_gid)
    put("hosts", hosts, 0o644)

    key = os.path.join(run, storage.HOST_KEY)
    if not os.path.exists(vm.host_key_path):
        from .commands import make_host_key
        make_host_key(vm.host_key_path, "root@" + name)
    shutil.copyfile(vm.host_key_path, key)
    os.chmod(key, 0o600)

    level = os.environ.get("TART_STANDIN_SSHD_LOG_LEVEL", "").strip() or "INFO"
    config = [
        "# sshd of the Tart stand-in guest %s (generated by `tart run`)" % json.dumps(name),
        "ListenAddress %s:22" % ip,
        'HostKey "%s"' % key,
        "PidFile none",
        "LogLevel %s" % level,
        "AuthorizedKeysFile .ssh/authorized_keys",
        "StrictModes yes",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitEmptyPasswords no",
        "HostbasedAuthentication no",
        "UsePAM no",
        "MaxAuthTries 3",
        "PermitRootLogin no",
        "AllowUsers %s" % user,
        "UseDNS no",
        "PrintMotd no",
        "PrintLastLog no",
        "X11Forwarding no",
        "AcceptEnv LANG LC_*",
        "MaxStartups 100:30:200",
        "Subsystem sftp internal-sftp",
    ]
    with open(vm.sshd_config_path, "w") as fh:
        fh.write("\n".join(config) + "\n")
    os.chmod(vm.sshd_config_path, 0o644)


# --- the guest's PID 1 ----------------------------------------------------------------

def _bind_fd(fd, target):
    linux.mount("/proc/self/fd/%d" % fd, target, None, linux.MS_BIND)


def setup_guest_fs(home, run):
    """Runs in G (new mount namespace, already private): build the guest's view."""
    home_fd = os.open(home, os.O_PATH | os.O_DIRECTORY)
    run_fd = os.open(run, os.O_PATH | os.O_DIRECTORY)
    for fname in ETC_FILES:
        linux.mount(os.path.join(run, fname), "/etc/" + fname, None, linux.MS_BIND)
    for target, mode in TMPFS_MOUNTS:
        if os.path.isdir(target):
            linux.mount("tmpfs", target, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=" + mode)
    os.mkdir(storage.GUEST_HOME, 0o750)
    _bind_fd(home_fd, storage.GUEST_HOME)
    for path, mode in (("/run/sshd", 0o755), ("/run/lock", 0o1777)):
        os.mkdir(path)
        os.chmod(path, mode)
    # The sshd config and host key must be reachable at the same path as on the host,
    # even when TART_HOME lies under one of the directories we just covered (pytest's /tmp).
    try:
        st = os.stat(run)
        visible = (st.st_dev, st.st_ino) == (os.fstat(run_fd).st_dev, os.fstat(run_fd).st_ino)
    except FileNotFoundError:
        visible = False
    if not visible:
        os.makedirs(run, 0o755, exist_ok=True)
        _bind_fd(run_fd, run)
    linux.mount("proc", "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    os.close(home_fd)
    os.close(run_fd)


def guest_init(ctx, ready_w, parent_alive_r):
    """G: PID 1 of the guest. Never returns."""
    linux.set_pdeathsig(signal.SIGKILL)
    if select.select([parent_alive_r], [], [], 0)[0]:
        os._exit(1)  # C died before we armed the parent-death signal
    linux.set_comm("tart-vm-init")
    os.umask(0o022)
    setup_guest_fs(ctx["home"], ctx["run"])
    os.write(ready_w, b"ready\n")
    os.close(ready_w)

    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    argv = [SSHD, "-D", "-e", "-f", ctx["sshd_config"]]
    sshd_at = ctx["sshd_at"]
    sshd_pid = None
    while True:
        now = time.monotonic()
        if sshd_pid is None and now >= sshd_at:
            sshd_pid = os.posix_spawn(
                SSHD, argv, env,
                file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0)],
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM,
                           signal.SIGHUP, signal.SIGCHLD),
                setsigmask=())
            continue
        if sshd_pid is None:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if pid == 0:
                time.sleep(max(0.0, min(0.05, sshd_at - now)))
                continue
        else:
            pid, status = os.waitpid(-1, 0)
        if pid == sshd_pid:
            sys.stderr.write("tart run (Linux stand-in): the guest's sshd exited (%s)\n"
                             % _describe_status(status))
            sys.stderr.flush()
            os._exit(3)


def _say(text):
    """print() to stdout that survives a closed stdout (the driver may have gone away)."""
    try:
        print(text, flush=True)
    except OSError:
        pass


def _describe_status(status):
    if os.WIFSIGNALED(status):
        return "killed by signal %d" % os.WTERMSIG(status)
    return "exit status %d" % os.WEXITSTATUS(status)


def fork_child(target, *args, close_in_child):
    """Fork; the child closes the parent's end of its pipe and runs ``target(*args)``, which
    must not return: whatever it raises is printed and the child exits 1. Returns the pid."""
    pid = os.fork()
    if pid == 0:
        try:
            os.close(close_in_child)
            target(*args)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(1)
    return pid


def container_init(ctx, ready_w, run_pid):
    """C: new namespaces, then fork G and wait for it. Never returns."""
    linux.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != run_pid:
        os._exit(1)
    linux.set_comm("tart-vm-ns")
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    os.setsid()
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    linux.unshare(linux.CLONE_NEWNS | linux.CLONE_NEWUTS | linux.CLONE_NEWPID)
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    linux.sethostname(ctx["name"])
    alive_r, alive_w = os.pipe()
    gpid = fork_child(guest_init, ctx, ready_w, alive_r, close_in_child=alive_w)
    os.close(alive_r)
    os.write(ready_w, b"pid %d\n" % gpid)
    os.close(ready_w)
    while True:
        try:
            _, status = os.waitpid(gpid, 0)
            break
        except ChildProcessError:
            os._exit(1)
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)


# --- tart run -----------------------------------------------------------------------

class _Signal(Exception):
    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _raise_signal(signum, _frame):
    raise _Signal(signum)


def _read_startup(fd, deadline):
    """Collect C's "pid N" and G's "ready" messages (either order) until EOF or timeout."""
    buf, seen = b"", {}
    while "pid" not in seen or "ready" not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
        for line in buf.decode(errors="replace").splitlines():
            word, _, value = line.partition(" ")
            seen[word] = value
    return seen


def check_prerequisites():
    for binary in (SSHD,):
        if not os.access(binary, os.X_OK):
            raise TartError("tart run (Linux stand-in): %s is missing: apt-get install "
                            "openssh-server openssh-client rsync util-linux" % binary)


def cmd_run(args, log):
    if args.graphics and args.no_graphics:
        raise UsageError("--graphics and --no-graphics are mutually exclusive", "run")
    name = args.name
    vm = storage.VMDir(name)
    try:
        vm.validate()
    except VMDoesNotExist as exc:
        raise GenericError(exc.message) from None  # Tart reports this one through its validation path
    config = vm.read_config()
    # A suspended VM runs suspendable whatever the flags say (as in Tart's validate()).
    suspendable = bool(args.suspendable) or vm.state() == "suspended"
    if suspendable and config.get("os", "darwin") != "darwin":
        raise UsageError("You can only suspend macOS VMs", "run")
    boot_delay = knob_seconds("TART_STANDIN_BOOT_DELAY", 0.0)
    resume_delay = knob_seconds("TART_STANDIN_RESUME_DELAY", 0.0)
    sshd_delay = knob_seconds("TART_STANDIN_SSHD_DELAY", 0.0)
    # The Tart Guest Agent is a LaunchAgent of the auto-logged-in user: it answers about
    # 10 s after the guest has booted (tart-cli.md); tests may shorten it.
    agent_delay = knob_seconds("TART_STANDIN_AGENT_DELAY", AGENT_DELAY_DEFAULT)
    lease_time = knob_seconds("TART_STANDIN_DHCP_LEASE_TIME", 86400.0)
    network_denied = knob_flag("TART_STANDIN_LOCAL_NETWORK_DENIED")
    locked_keychain = knob_flag("TART_STANDIN_LOCKED_KEYCHAIN")
    crash_after = knob_seconds("TART_STANDIN_CRASH_AFTER", None)
    stop_delay = knob_seconds("TART_STANDIN_STOP_DELAY", 0.0)
    max_vms = knob_int("TART_STANDIN_MAX_VMS", 2)
    refuse_restore = knob_flag("TART_STANDIN_REFUSE_RESTORE")
    refuse_suspend = knob_flag("TART_STANDIN_REFUSE_SUSPEND")
    check_prerequisites()
    listener = wildcard_ssh_listener(("tcp",))
    if listener:
        raise host_sshd_error(listener)

    # config.json was read above, before locking it: any close() of a descriptor of the
    # locked file by this process would drop the fcntl lock (as Tart's comments explain).
    # Signals wait until the handlers below are in place (a `tart stop` may come as soon
    # as the lock is taken); they are then delivered inside the main try block.
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    lock_fd = storage.storage_lock()
    try:
        for other in storage.list_vms():
            if other.name == name or not other.running_pid():
                continue
            try:
                same_mac = other.read_config().get("macAddress") == config.get("macAddress")
            except (OSError, ValueError):
                same_mac = False
            if same_mac:
                _say("There is already a running VM with the same MAC address!")
                _say("Resetting VM to assign a new MAC address...")
                config["macAddress"] = storage.random_mac()
                vm.write_config(config)
                # Tart's regenerateMACAddress(): a saved state only restores with the old MAC
                vm.drop_saved_state()
                break
        cfg_fd = os.open(vm.config_path, os.O_RDWR | os.O_CLOEXEC)
        if not linux.try_write_lock(cfg_fd):
            raise VMAlreadyRunning(name)
        # From here on "running"; never open+close our own config.json again.
    finally:
        os.close(lock_fd)

    if locked_keychain:
        raise TartError(KEYCHAIN_LOCKED)
    # Tart's Run.swift restores (printing both lines and deleting state.vzvmsave) and only
    # then starts the VM, which is where Virtualization.framework refuses a VM over the
    # host's limit: at the limit, a resume's output shows both restore lines, then the error,
    # and the saved state is gone.
    resumed = restore_saved_state(vm, config, refuse_restore)
    if max_vms:
        others = [o.name for o in storage.list_vms() if o.name != name and o.running_pid()]
        if len(others) >= max_vms:
            hint = " (other running VMs: %s)" % ", ".join(others) if others else ""
            raise TartError("The number of VMs exceeds the system limit" + hint)

    for sig in SIGNALS:
        signal.signal(sig, _raise_signal)
    outcome, detail, cpid, gpid, ip, ip_fd = "exited", None, None, None, None, None
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        ip, ip_fd = allocate_ip(name, config.get("macAddress"))
        storage.remove_tree(vm.run_path)
        os.makedirs(vm.run_path, 0o755)
        write_guest_files(vm, ip, name)
        os.makedirs("/Users", 0o755, exist_ok=True)  # mount point for the guests' tmpfs

        t0 = time.monotonic()
        if resumed:
            # A resumed guest skips the boot: its sshd and agent were already up when it was
            # suspended, so only the restore itself (TART_STANDIN_RESUME_DELAY) takes time.
            boot_at = t0 + resume_delay
            sshd_at = agent_at = boot_at
        else:
            boot_at = t0 + boot_delay
            sshd_at, agent_at = boot_at + sshd_delay, boot_at + agent_delay
        if network_denied:
            sshd_at = float("inf")  # the host's connects to the guest are refused
        ctx = {
            "name": name,
            "home": vm.home_path,
            "run": vm.run_path,
            "sshd_config": vm.sshd_config_path,
            "sshd_at": sshd_at,
        }
        ready_r, ready_w = os.pipe()
        run_pid = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        cpid = fork_child(container_init, ctx, ready_w, run_pid, close_in_child=ready_r)
        os.close(ready_w)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        seen = _read_startup(ready_r, time.monotonic() + 30)
        os.close(ready_r)
        if seen.get("pid", "").isdigit():
            gpid = int(seen["pid"])
        if gpid is None or "ready" not in seen:
            outcome, detail = "failed", "the guest failed to start (see the messages above)"
        else:
            state = {
                "name": name,
                "run_pid": run_pid,
                "init_pid": gpid,
                "init_starttime": linux.proc_starttime(gpid),
                "ip": ip,
                "uid": storage.GUEST_UID,
                "gid": storage.GUEST_GID,
                "user": storage.GUEST_USER,
                "home": storage.GUEST_HOME,
                "path": GUEST_PATH,
                "started_at": time.time(),
                "boot_at": boot_at,
                "sshd_at": sshd_at,
                "agent_at": agent_at,
                "resumed": resumed,
                "suspendable": suspendable,
                "mac_address": config.get("macAddress"),
                "crash_at": None if crash_after is None else boot_at + crash_after,
                "sshd_config": vm.sshd_config_path,
            }
            storage.atomic_write(vm.state_path, json.dumps(state, indent=2) + "\n")
            if crash_after is not None:
                signal.setitimer(signal.ITIMER_REAL, max(0.001, state["crash_at"] - time.monotonic()))
            status = _wait_granting_lease(cpid, boot_at, name, config.get("macAddress"), ip, lease_time)
            cpid = None
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                outcome, detail = "failed", "the guest's init exited with status %d" % code
    except _Signal as sig:
        if sig.signum == signal.SIGINT:
            outcome = "stopped"
            _say("Stopping VM...")
            if stop_delay and gpid:
                # a slow shutdown: the guest keeps running; more SIGINTs change nothing,
                # `tart stop` SIGKILLs us after its timeout
                signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGINT, signal.SIGALRM))
                for other in (signal.SIGTERM, signal.SIGHUP):
                    signal.signal(other, signal.SIG_DFL)  # dies at once, guest with it
                time.sleep(stop_delay)
        elif sig.signum == signal.SIGALRM:
            outcome = "crashed"
        elif sig.signum == signal.SIGUSR2:  # Tart: ask the guest OS to shut down
            _say("Requesting guest OS to stop...")
        elif sig.signum == signal.SIGUSR1:  # `tart suspend`: save the state, then stop
            outcome, detail = suspend(vm, config, suspendable and not refuse_suspend, gpid)
        else:
            outcome, detail = "signal", sig.signum
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        signal.setitimer(signal.ITIMER_REAL, 0)
        _teardown(cpid, gpid)
        storage.remove_tree(vm.run_path)  # still under our lock: no new run can race us
        if ip_fd is not None:
            release_ip(ip, ip_fd)

    if outcome in ("stopped", "suspended"):
        return 0
    if outcome == "exited":
        _say("guest has stopped the virtual machine")
        return 0
    if outcome == "crashed":
        _say("guest has stopped the virtual machine due to error: the virtual machine "
             "stopped unexpectedly (simulated crash: TART_STANDIN_CRASH_AFTER=%s)"
             % os.environ.get("TART_STANDIN_CRASH_AFTER"))
        return 1
    if outcome == "suspend-failed":
        _say("Failed to suspend the VM: " + detail)  # Tart prints it on stdout
        return 1
    if outcome == "signal":
        # Tart does not handle SIGTERM/SIGHUP: die by the signal, after a clean teardown.
        if log is not None:
            log.finish(-detail)
        sys.stdout.flush()
        signal.signal(detail, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [detail])
        os.kill(os.getpid(), detail)
        time.sleep(1)
        return 128 + detail
    try:
        sys.stderr.write(detail + "\n")
    except OSError:
        pass
    return 1


def _wait_granting_lease(cpid, boot_at, name, mac, ip, lease_time):
    """Wait for C; once the guest has booted (or resumed), its DHCP client takes (or renews)
    the lease of its MAC, which then outlives the run (see leases.py). Returns C's status."""
    while True:
        if time.monotonic() >= boot_at:
            if mac:
                try:
                    leases.grant(name, mac, ip, lease_time)
                except OSError as exc:
                    sys.stderr.write("tart run (Linux stand-in): cannot write the DHCP lease: %s\n" % exc)
            while True:
                try:
                    return os.waitpid(cpid, 0)[1]
                except InterruptedError:
                    continue
        pid, status = os.waitpid(cpid, os.WNOHANG)
        if pid:
            return status
        time.sleep(max(0.001, min(0.05, boot_at - time.monotonic())))


# --- suspend / resume ------------------------------------------------------------------

# What Virtualization.framework says when a configuration with audio, entropy or console
# devices (a `tart run` without --suspendable) is asked to save its state (tart #803).
NOT_SUSPENDABLE = "Invalid virtual machine configuration. Unsupported console device in configuration."
# What it says when a saved state does not fit the VM, e.g. after a MAC change (tart #527, #796).
RESTORE_REFUSED = ('Error Domain=VZErrorDomain Code=12 "The virtual machine failed to restore with '
                   'error \u201cinvalid argument\u201d." UserInfo={NSLocalizedFailure=An error '
                   'occurred while restoring the virtual machine., NSLocalizedFailureReason=The '
                   'virtual machine failed to restore with error \u201cinvalid argument\u201d.}')


# The configuration a saved state must match to restore. Apple documents only "file contents
# incompatible with the current configuration"; the MAC address is confirmed (tart #527), the
# CPU count and memory size are the stand-in's assumption (the guest's memory image needs them).
SAVED_CONFIG = ("macAddress", "cpuCount", "memorySize")


def restore_saved_state(vm, config, refuse=False):
    """Tart's resume path, under the VM's lock: True when the saved state was restored (and
    consumed); False when there is none (cold boot). A saved state that does not match the
    VM's configuration (a new MAC address, CPU count or memory size) is refused as
    Virtualization.framework does: exit 1, the state is kept, and the VM stays suspended
    until `tart stop` drops it. ``refuse`` (TART_STANDIN_REFUSE_RESTORE) refuses any."""
    saved = vm.read_saved_state()
    if saved is None:
        return False
    _say("restoring VM state from a snapshot...")
    if refuse or not saved or any(saved.get(key) != config.get(key) for key in SAVED_CONFIG):
        raise TartError(RESTORE_REFUSED)
    vm.drop_saved_state()
    _say("resuming VM...")
    return True


def suspend(vm, config, suspendable, gpid):
    """SIGUSR1 in `tart run`: write the saved state if the VM can be suspended.

    Returns the run's (outcome, detail): ("suspended", None) or ("suspend-failed", message)."""
    if not suspendable:
        return "suspend-failed", NOT_SUSPENDABLE
    if not gpid:
        return "suspend-failed", "the virtual machine has not started yet"
    _say("pausing VM to take a snapshot...")
    _say("creating a snapshot...")
    saved = {
        "standin": "saved state of a Linux stand-in VM (a real one holds the guest's memory)",
        "name": vm.name,
        "savedAt": time.time(),
    }
    saved.update((key, config.get(key)) for key in SAVED_CONFIG)
    try:
        storage.atomic_write(vm.saved_state_path, json.dumps(saved, indent=2) + "\n")
    except OSError as exc:
        return "suspend-failed", str(exc)
    _say("snapshot created successfully! shutting down the VM...")
    return "suspended", None


def _children(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def _teardown(cpid, gpid):
    """Kill the guest and wait until every process of its PID namespace is gone.

    Killing G (the namespace's init) makes the kernel kill everything inside; C reaps
    G only after that, so waiting for C means waiting for the whole guest.
    """
    targets = [gpid] if gpid else (_children(cpid) if cpid else [])
    if not targets and cpid:
        targets = [cpid]  # G does not exist yet: C takes it down with PDEATHSIG
    for pid in targets:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if cpid:
        while True:
            try:
                os.waitpid(cpid, 0)
                break
            except ChildProcessError:
                break
            except InterruptedError:
                continue
