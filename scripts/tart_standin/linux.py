"""Thin ctypes wrappers for the Linux system calls the stand-in needs.

Python 3.11 has no os.setns/os.unshare, so they are called through libc.
"""

import ctypes
import fcntl
import os
import struct

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWPID = 0x20000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15

_libc = None


def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                ctypes.c_ulong, ctypes.c_char_p]
        _libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
        _libc.unshare.argtypes = [ctypes.c_int]
        _libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong,
                                ctypes.c_ulong, ctypes.c_ulong]
    return _libc


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))


def _b(value):
    if value is None:
        return None
    return os.fsencode(value)


def mount(source, target, fstype=None, flags=0, data=None):
    _check(_lib().mount(_b(source), _b(target), _b(fstype), flags, _b(data)),
           "mount %s on %s" % (source, target))


def unshare(flags):
    _check(_lib().unshare(flags), "unshare")


def setns(fd, nstype=0):
    _check(_lib().setns(fd, nstype), "setns")


def sethostname(name):
    raw = name.encode()[:64]
    _check(_lib().sethostname(raw, len(raw)), "sethostname")


def set_pdeathsig(sig):
    _check(_lib().prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def set_comm(name):
    """Set the process name shown by ps -o comm / top (15 bytes max); best effort."""
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _lib().prctl(PR_SET_NAME, ctypes.cast(buf, ctypes.c_void_p).value, 0, 0, 0)


# struct flock on Linux (x86_64 and aarch64): short l_type, short l_whence,
# off_t l_start, off_t l_len, pid_t l_pid (+ padding).
_FLOCK = "hhqqi4x"


def lock_holder(fd):
    """PID of the process holding a conflicting POSIX (fcntl) lock on fd, else 0.

    Same query as Tart's PIDLock.pid(): F_GETLK for a read lock over the whole file.
    """
    req = struct.pack(_FLOCK, fcntl.F_RDLCK, os.SEEK_SET, 0, 0, 0)
    res = fcntl.fcntl(fd, fcntl.F_GETLK, req)
    l_type, _, _, _, l_pid = struct.unpack(_FLOCK, res)
    if l_type == fcntl.F_UNLCK:
        return 0
    return l_pid


def try_write_lock(fd):
    """Take a POSIX write lock on the whole file; False if someone else holds one."""
    req = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLK, req)
    except OSError as exc:
        if exc.errno in (11, 13):  # EAGAIN, EACCES
            return False
        raise
    return True


def proc_starttime(pid):
    """Start time (clock ticks since boot) of a live process; None if gone or a zombie."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses
    rest = data[data.rfind(b")") + 2:].split()
    if rest[0] in (b"Z", b"X"):
        return None
    return int(rest[19])
