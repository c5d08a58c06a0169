"""TART_HOME layout, VM directories, config.json, locks and runtime state."""

import errno
import fcntl
import json
import os
import random
import shutil
import time
import uuid

from . import linux
from .errors import RuntimeErr, VMDoesNotExist

# The guest user, as on the Cirrus Labs macOS images.
GUEST_USER = "admin"
GUEST_UID = 501
GUEST_GID = 501
GUEST_HOME = "/Users/admin"

STANDIN_DIR = "standin"          # vms/<name>/standin/: stand-in-only files
HOME_DIR = "home"                # vms/<name>/standin/home -> guest /Users/admin
RUN_DIR = "run"                  # vms/<name>/standin/run: exists while `tart run` runs
HOST_KEY = "ssh_host_ed25519_key"
STATE_FILE = "state.json"
SAVED_STATE = "state.vzvmsave"   # vms/<name>/state.vzvmsave: Tart's saved state of a suspended VM


def tart_home():
    home = os.environ.get("TART_HOME")
    if not home:
        home = os.path.join(os.path.expanduser("~"), ".tart")
    return os.path.realpath(home)


def vms_dir():
    return os.path.join(tart_home(), "vms")


def tmp_dir():
    path = os.path.join(tart_home(), "tmp")
    os.makedirs(path, exist_ok=True)
    return path


def storage_lock():
    """Tart's global lock: flock(2) on the TART_HOME directory. Returns the fd."""
    home = tart_home()
    os.makedirs(home, exist_ok=True)
    fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def gc_tmp():
    """Like Tart's Config.gc(): remove unlocked leftovers of interrupted clones."""
    path = os.path.join(tart_home(), "tmp")
    try:
        entries = os.listdir(path)
    except FileNotFoundError:
        return
    now = time.time()
    for entry in entries:
        full = os.path.join(path, entry)
        try:
            if now - os.lstat(full).st_mtime < 60:
                continue  # possibly being set up right now (before its creator locks it)
            fd = os.open(full, os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full, ignore_errors=True)
            else:
                os.unlink(full)
        except OSError:
            pass
        finally:
            os.close(fd)


def random_mac():
    octets = [random.randint(0, 255) for _ in range(6)]
    octets[0] = (octets[0] & 0xFC) | 0x02  # locally administered, unicast
    return ":".join("%02x" % o for o in octets)


def default_config():
    return {
        "version": 1,
        "os": "darwin",
        "arch": "arm64",
        "ecid": "standin-" + uuid.uuid4().hex,
        "hardwareModel": "standin",
        "cpuCountMin": 2,
        "cpuCount": 4,
        "memorySizeMin": 4 * 1024 ** 3,
        "memorySize": 8 * 1024 ** 3,
        "macAddress": random_mac(),
        "display": {"width": 1024, "height": 768},
        "diskFormat": "raw",
    }


def _allocated(path):
    try:
        return os.lstat(path).st_blocks * 512
    except OSError:
        return 0


def _tree_allocated(path):
    total = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            total += _allocated(os.path.join(root, name))
    return total


class VMDir:
    def __init__(self, name, path=None):
        self.name = name
        self.path = path or os.path.join(vms_dir(), name)

    # --- paths -----------------------------------------------------------
    @property
    def config_path(self):
        return os.path.join(self.path, "config.json")

    @property
    def disk_path(self):
        return os.path.join(self.path, "disk.img")

    @property
    def nvram_path(self):
        return os.path.join(self.path, "nvram.bin")

    @property
    def saved_state_path(self):
        return os.path.join(self.path, SAVED_STATE)

    @property
    def standin_path(self):
        return os.path.join(self.path, STANDIN_DIR)

    @property
    def home_path(self):
        return os.path.join(self.standin_path, HOME_DIR)

    @property
    def run_path(self):
        return os.path.join(self.standin_path, RUN_DIR)

    @property
    def host_key_path(self):
        return os.path.join(self.standin_path, HOST_KEY)

    @property
    def state_path(self):
        return os.path.join(self.run_path, STATE_FILE)

    @property
    def sshd_config_path(self):
        return os.path.join(self.run_path, "sshd_config")

    # --- existence -------------------------------------------------------
    def initialized(self):
        return all(os.path.exists(p) for p in (self.config_path, self.disk_path, self.nvram_path))

    def validate(self):
        """Tart's VMStorageLocal.open(): exists, complete, bump access date."""
        if not os.path.isdir(self.path):
            raise VMDoesNotExist(self.name)
        if not self.initialized():
            raise RuntimeErr("VM is missing some of its files (config.json, disk.img or nvram.bin)")
        try:
            st = os.stat(self.path)
            os.utime(self.path, ns=(time.time_ns(), st.st_mtime_ns))
        except OSError:
            pass
        return self

    # --- config ----------------------------------------------------------
    def read_config(self):
        with open(self.config_path) as fh:
            return json.load(fh)

    def write_config(self, config):
        # Rewrite in place (same inode): a rename would drop the fcntl lock that a
        # running `tart run` holds on config.json and make the VM look stopped.
        data = json.dumps(config, indent=2, sort_keys=True).encode() + b"\n"
        fd = os.open(self.config_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)

    # --- running state ---------------------------------------------------
    def running_pid(self):
        """PID of the `tart run` holding config.json's write lock, else 0."""
        try:
            fd = os.open(self.config_path, os.O_RDWR)
        except OSError:
            return 0
        try:
            return linux.lock_holder(fd)
        except OSError:
            return 0
        finally:
            os.close(fd)

    def state(self):
        """Tart's VMDirectory.state(): running (lock held), suspended (saved state), stopped."""
        if self.running_pid():
            return "running"
        if os.path.exists(self.saved_state_path):
            return "suspended"
        return "stopped"

    # --- saved state (suspend / resume) ----------------------------------
    def read_saved_state(self):
        """The saved state written by a suspend, or None if there is none (or it is unreadable,
        which a restore would refuse as well)."""
        try:
            with open(self.saved_state_path) as fh:
                saved = json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return saved if isinstance(saved, dict) else {}

    def drop_saved_state(self):
        """Remove the saved state, as Tart does on a new MAC address or `tart stop`."""
        try:
            os.unlink(self.saved_state_path)
        except FileNotFoundError:
            pass

    def read_runtime(self):
        """Runtime state written by `tart run`, if it belongs to the live run process."""
        pid = self.running_pid()
        if not pid:
            return None, 0
        try:
            with open(self.state_path) as fh:
                state = json.load(fh)
        except (OSError, ValueError):
            return None, pid
        if state.get("run_pid") != pid:
            return None, pid
        return state, pid

    # --- sizes -----------------------------------------------------------
    def size_bytes(self):
        total = 0
        for p in (self.config_path, self.disk_path, self.nvram_path):
            try:
                total += os.stat(p).st_size
            except OSError:
                pass
        return total

    def allocated_bytes(self):
        total = sum(_allocated(p) for p in (self.config_path, self.disk_path, self.nvram_path))
        # what the guest wrote lives in the home directory, not in disk.img
        return total + _tree_allocated(self.home_path)

    def access_time(self):
        return os.stat(self.path).st_atime


def list_vms():
    try:
        names = sorted(os.listdir(vms_dir()))
    except FileNotFoundError:
        return []
    result = []
    for name in names:
        vm = VMDir(name)
        if os.path.isdir(vm.path) and vm.initialized():
            result.append(vm)
    return result


def open_vm(name):
    return VMDir(name).validate()


def atomic_write(path, data, mode=0o644):
    tmp = "%s.tmp-%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data if isinstance(data, bytes) else data.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def remove_tree(path):
    """rmtree that tolerates concurrent removal."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
