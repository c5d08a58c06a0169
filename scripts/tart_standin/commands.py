"""Subcommands that do not enter a guest: create, clone, list, get, set, rename, delete, ip,
stop, suspend."""

import datetime
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import uuid

from . import leases, linux, storage
from .errors import GenericError, TartError, UsageError, VMDoesNotExist, VMIsRunning, VMNotRunning

POLL = 0.02


def out(text):
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def to_json(value):
    # Swift's JSONEncoder with .prettyPrinted: two-space indent, " : " separator
    return json.dumps(value, indent=2, separators=(",", " : "))


def render_table(rows, columns):
    """Tart's text format: a plain left-aligned table, trimmed."""
    if not rows:
        return ""
    cells = [[str(c) for c in columns]] + [[_text(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = [" ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in cells]
    return "\n".join(lines).strip()


def _text(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def relative_time(then):
    seconds = int(time.time() - then)
    if seconds < 1:
        return "now" if seconds == 0 else "in %d seconds" % -seconds
    for unit, size in (("year", 365 * 86400), ("month", 30 * 86400), ("week", 7 * 86400),
                       ("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds >= size:
            n = seconds // size
            return "%d %s%s ago" % (n, unit, "" if n == 1 else "s")
    return "now"


def iso8601(ts):
    return datetime.datetime.fromtimestamp(int(ts), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_local_name(name, command, title):
    if "/" in name:
        raise UsageError("%s should be a local name" % title, command)
    if name in ("", ".", ".."):
        raise UsageError("%s should be a valid VM name" % title, command)


# --- create ----------------------------------------------------------------------


def make_host_key(path, comment):
    for suffix in ("", ".pub"):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass
    try:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path],
                       check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise TartError("cannot generate the guest's SSH host key with ssh-keygen (%s): "
                        "apt-get install openssh-client" % exc) from None


def cmd_create(args):
    check_local_name(args.name, "create", "<name>")
    disk_gb = args.disk_size if args.disk_size is not None else 50
    tmp = os.path.join(storage.tmp_dir(), str(uuid.uuid4()))
    os.mkdir(tmp)
    fd = os.open(tmp, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # keep gc away while we build it
    try:
        config = storage.default_config()
        config["diskFormat"] = args.disk_format or "raw"
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            fh.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
        with open(os.path.join(tmp, "disk.img"), "wb") as fh:
            fh.truncate(disk_gb * 1000 * 1000 * 1000)  # sparse, like a fresh raw disk
        with open(os.path.join(tmp, "nvram.bin"), "wb") as fh:
            fh.truncate(64 * 1024)
        standin = os.path.join(tmp, storage.STANDIN_DIR)
        os.mkdir(standin, 0o755)
        home = os.path.join(standin, storage.HOME_DIR)
        os.mkdir(home)
        os.chown(home, storage.GUEST_UID, storage.GUEST_GID)
        os.chmod(home, 0o750)
        make_host_key(os.path.join(standin, storage.HOST_KEY), "root@" + args.name)
        move_into_place(tmp, args.name)
    finally:
        os.close(fd)
        storage.remove_tree(tmp)
    return 0


def move_into_place(tmp, name):
    """Put a prepared VM directory at vms/<name>, silently replacing an existing one."""
    vms = storage.vms_dir()
    os.makedirs(vms, exist_ok=True)
    target = os.path.join(vms, name)
    old = None
    if os.path.lexists(target):
        old = os.path.join(storage.tmp_dir(), "replaced-" + str(uuid.uuid4()))
        os.rename(target, old)
    os.rename(tmp, target)
    if old:
        storage.remove_tree(old)


# --- clone -----------------------------------------------------------------------


def cmd_clone(args):
    check_local_name(args.new, "clone", "<new-name>")
    if args.concurrency is not None and args.concurrency < 1:
        raise UsageError("network concurrency cannot be less than 1", "clone")
    if "/" in args.source and not os.path.isdir(storage.VMDir(args.source).path):
        raise TartError('the Linux stand-in cannot pull OCI images ("%s"): create a local VM '
                        'with "tart create NAME" instead (see scripts/README.md)' % args.source)
    source = storage.open_vm(args.source)
    tmp = os.path.join(storage.tmp_dir(), str(uuid.uuid4()))
    os.mkdir(tmp)
    tmp_fd = os.open(tmp, os.O_RDONLY)
    fcntl.flock(tmp_fd, fcntl.LOCK_EX)  # keep gc away while we copy
    lock_fd = storage.storage_lock()
    try:
        proc = subprocess.run(["cp", "-a", "--reflink=auto", "--sparse=auto",
                               source.path + "/.", tmp + "/"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise TartError("failed to clone %s: %s" % (args.source, proc.stderr.strip()))
        # runtime files of a running source are not part of the clone
        storage.remove_tree(os.path.join(tmp, storage.STANDIN_DIR, storage.RUN_DIR))
        # The source keeps its MAC address, so the clone gets a new one, except from a
        # suspended source: its saved state (copied along) only restores with that MAC.
        # Tart's Clone does the same.
        if source.state() != "suspended":
            clone = storage.VMDir(args.new, path=tmp)
            config = clone.read_config()
            config["macAddress"] = storage.random_mac()
            clone.write_config(config)
        move_into_place(tmp, args.new)
    finally:
        os.close(lock_fd)
        os.close(tmp_fd)
        storage.remove_tree(tmp)
    return 0


# --- list / get --------------------------------------------------------------------


def cmd_list(args):
    if args.source is not None and args.source not in ("local", "oci"):
        raise UsageError("'%s' is not a valid <source>" % args.source, "list")
    fmt = args.format or "text"
    infos = []
    if args.source in (None, "local"):
        for vm in storage.list_vms():
            try:
                state = vm.state()
                infos.append({
                    "Source": "local",
                    "Name": vm.name,
                    "Disk": vm.size_bytes() // 1000 ** 3,
                    "Size": vm.allocated_bytes() // 1000 ** 3,
                    "Accessed": vm.access_time(),
                    "Running": state == "running",
                    "State": state,
                })
            except OSError:
                continue  # deleted while we were looking
    if args.quiet:
        for info in infos:
            out(info["Name"])
        return 0
    for info in infos:
        ts = info["Accessed"]
        info["Accessed"] = iso8601(ts) if fmt == "json" else relative_time(ts)
    if fmt == "json":
        out(to_json(infos))
    else:
        out(render_table(infos, ["Source", "Name", "Disk", "Size", "Accessed", "State"]))
    return 0


def cmd_get(args):
    vm = storage.open_vm(args.name)
    config = vm.read_config()
    state = vm.state()
    display = config.get("display", {})
    display_text = "%sx%s%s" % (display.get("width", 1024), display.get("height", 768),
                                display.get("unit", ""))
    info = {
        "OS": config.get("os", "darwin"),
        "CPU": config["cpuCount"],
        "Memory": config["memorySize"] // 1024 // 1024,
        "Disk": vm.size_bytes() // 1000 ** 3,
        "DiskFormat": config.get("diskFormat", "raw"),
        "Size": "%.3f" % (vm.allocated_bytes() / 1000 / 1000 / 1000),
        "Display": display_text,
        "Running": state == "running",
        "State": state,
    }
    if (args.format or "text") == "json":
        out(to_json(info))
    else:
        out(render_table([info], ["OS", "CPU", "Memory", "Disk", "DiskFormat", "Size",
                                  "Display", "State"]))
    return 0


# --- set ---------------------------------------------------------------------------


def _human_bytes(n):
    # Foundation's ByteCountFormatter (file style, decimal units), roughly
    for unit, size in (("TB", 1000 ** 4), ("GB", 1000 ** 3), ("MB", 1000 ** 2), ("KB", 1000)):
        if n >= size:
            value = n / size
            return ("%d %s" % (value, unit)) if value == int(value) else ("%.2f %s" % (value, unit))
    return "%d bytes" % n


def cmd_set(args):
    vm = storage.open_vm(args.name)
    config = vm.read_config()
    darwin = config.get("os", "darwin") == "darwin"
    if args.cpu is not None:
        if darwin and args.cpu < config.get("cpuCountMin", 1):
            raise GenericError("LessThanMinimalResourcesError: VM should have %d CPU cores at minimum "
                               "(requested %d)" % (config["cpuCountMin"], args.cpu))
        if args.cpu < 1:
            raise GenericError("LessThanMinimalResourcesError: VM should have 1 CPU cores at minimum "
                               "(requested %d)" % args.cpu)
        config["cpuCount"] = args.cpu
    if args.memory is not None:
        size = args.memory * 1024 * 1024
        if darwin and size < config.get("memorySizeMin", 0):
            raise GenericError("LessThanMinimalResourcesError: VM should have %d bytes of memory at "
                               "minimum (requested %d)" % (config["memorySizeMin"], size))
        config["memorySize"] = size
    if args.display is not None:
        text, unit = args.display, None
        for suffix in ("px", "pt"):
            if text.endswith(suffix):
                text, unit = text[:-2], suffix
        parts = text.split("x")
        display = dict(config.get("display", {}))

        def num(s):
            return int(s) if s.isdigit() else 0
        width = num(parts[0]) if parts else 0
        height = num(parts[1]) if len(parts) > 1 else 0
        if width > 0:
            display["width"] = width
        if height > 0:
            display["height"] = height
        if unit:
            display["unit"] = unit
        else:
            display.pop("unit", None)
        config["display"] = display
    if args.random_mac:
        config["macAddress"] = storage.random_mac()
    if args.random_serial:
        config["ecid"] = "standin-" + uuid.uuid4().hex
    vm.write_config(config)
    if args.disk_size is not None:
        desired = args.disk_size * 1000 * 1000 * 1000
        current = os.stat(vm.disk_path).st_size
        if desired < current:
            raise TartError("new disk size of %s should be larger than the current disk size of %s"
                            % (_human_bytes(desired), _human_bytes(current)))
        if desired > current:
            os.truncate(vm.disk_path, desired)
    return 0


# --- rename ------------------------------------------------------------------------


def cmd_rename(args):
    # Tart validates only the new name before running; the other checks are ValidationErrors
    # thrown from run(), which swift-argument-parser prints with the root usage (exit 64).
    check_local_name(args.new, "rename", "<new-name>")
    source = storage.VMDir(args.name)
    if "/" in args.name or not source.initialized():
        raise UsageError("failed to rename a non-existent local VM: %s" % args.name)
    lock_fd = storage.storage_lock()  # against a clone or create landing on the new name
    try:
        target = storage.VMDir(args.new)
        if target.initialized():
            raise UsageError("failed to rename VM %s, target VM %s already exists, delete it first!"
                             % (args.name, args.new))
        if source.running_pid():
            # Tart renames a running VM's directory under it; the stand-in's guest keeps
            # paths into it (sshd config, runtime state), so it refuses instead.
            raise VMIsRunning(args.name)
        if os.path.lexists(target.path):
            storage.remove_tree(target.path)  # an incomplete directory, as Tart replaces it
        os.rename(source.path, target.path)
    finally:
        os.close(lock_fd)
    return 0


# --- delete ------------------------------------------------------------------------


def cmd_delete(args):
    for name in args.names:
        vm = storage.VMDir(name)
        if "/" in name or not os.path.isdir(vm.path):
            raise VMDoesNotExist(name)
        try:
            fd = os.open(vm.config_path, os.O_RDWR)
        except FileNotFoundError:
            raise VMDoesNotExist(name) from None
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # see below
        try:
            if not linux.try_write_lock(fd):
                raise VMIsRunning(name)
            # While we hold the lock, `tart stop` would take us for the VM's `tart run`
            # and send us SIGINT (Tart has the same race); finish the removal regardless.
            storage.remove_tree(vm.path)
        finally:
            os.close(fd)
            signal.signal(signal.SIGINT, previous)
    return 0


# --- ip ----------------------------------------------------------------------------


def resolve_ip(vm, resolver):
    """Tart's resolvers (Commands/IP.swift). dhcp, the default: the host's lease table for
    the MAC in config.json, whether or not the VM runs (MACAddressResolver/Leases.swift), so
    a stopped VM or a clone of a suspended one answers with an old, unexpired lease. agent:
    the running guest's agent (through the VM's control socket), once it is up. arp: the
    host's ARP cache, which knows a running guest once it has booted."""
    if resolver == "dhcp":
        try:
            mac = vm.read_config().get("macAddress")
        except (OSError, ValueError):
            return None
        return leases.ip_for(mac) if mac else None
    state, _ = vm.read_runtime()
    if not state:
        return None
    ready_at = state["agent_at"] if resolver == "agent" else state["boot_at"]
    if time.monotonic() < ready_at:
        return None
    return state["ip"]


def cmd_ip(args):
    vm = storage.open_vm(args.name)
    resolver = args.resolver or "dhcp"
    deadline = time.monotonic() + (args.wait or 0)
    while True:
        ip = resolve_ip(vm, resolver)
        if ip:
            out(ip)
            return 0
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL * 2)
    message = "no IP address found"
    if not vm.running_pid():
        message += ", is your VM running?"
    if resolver == "agent":
        message += " (also make sure that Guest agent for Tart is running inside of a VM)"
    raise TartError(message)


# --- stop --------------------------------------------------------------------------


def _alive(pid, starttime):
    return pid and linux.proc_starttime(pid) == starttime


def cmd_stop(args):
    vm = storage.open_vm(args.name)
    pid = vm.running_pid()
    if not pid and vm.state() == "suspended":
        vm.drop_saved_state()  # Tart: stopping a suspended VM discards its saved state
        return 0
    if not pid:
        raise VMNotRunning(args.name)
    state, _ = vm.read_runtime()
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        pass
    timeout = 30 if args.timeout is None else args.timeout
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = vm.running_pid()
        if not pid:
            return 0
        time.sleep(POLL)
    pid = vm.running_pid()
    if not pid:
        return 0
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except OSError as exc:
        raise TartError('failed to forcefully terminate the VM "%s": %s' % (args.name, exc)) from None
    # Tart returns right after SIGKILL; the stand-in also takes the guest down and waits
    # for it, so that no guest process outlives `tart stop`.
    init_pid = state and state.get("init_pid")
    init_start = state and state.get("init_starttime")
    if _alive(init_pid, init_start):
        try:
            os.kill(init_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not vm.running_pid() and not _alive(init_pid, init_start):
            break
        time.sleep(POLL)
    return 0


# --- suspend -----------------------------------------------------------------------


def cmd_suspend(args):
    """Like Tart: SIGUSR1 to the `tart run` process, which saves the state and exits.

    Returns at once; whether the suspend worked shows in `tart run`'s output and exit code
    and in the VM's State afterwards."""
    vm = storage.open_vm(args.name)
    pid = vm.running_pid()
    if not pid:
        raise VMNotRunning(args.name)
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError:
        raise TartError('Failed to suspend the VM: failed to send SIGUSR1 signal to the "tart run" '
                        'process running VM "%s"' % args.name) from None
    return 0
