"""The host's DHCP lease table, as macOS's bootpd keeps it in /var/db/dhcpd_leases.

Tart's default `tart ip` resolver (Sources/tart/MACAddressResolver/Leases.swift, Lease.swift)
parses that file, keeps the leases whose expiry lies in the future and answers with the one
for the VM's MAC address, whether or not the VM runs. The stand-in keeps the same kind of
table host-wide (in the registry directory, beside the address reservations) with the same
block format, so that a stopped VM, a clone of a suspended VM (it keeps the MAC) or a VM
that has not resumed yet answers `tart ip` with an old lease exactly as on a Mac.

A lease is written when a guest has booted (or resumed) and lasts
TART_STANDIN_DHCP_LEASE_TIME seconds (bootpd's default: 86400, `DHCPLeaseTimeSecs`).
"""

import fcntl
import os
import time

from . import storage

LEASE_FILE = "dhcpd_leases"


def _path():
    from .guest import registry_dir

    return os.path.join(registry_dir(), LEASE_FILE)


def normalize_mac(mac):
    """bootpd writes octets without leading zeros ("1,2:a:3:..."); compare them as numbers."""
    try:
        return ":".join("%02x" % int(part, 16) for part in mac.strip().split(":"))
    except ValueError:
        return mac.strip().lower()


def parse(text):
    """The lease blocks of a dhcpd_leases file: a list of dicts (key=value lines)."""
    blocks, current = [], None
    for line in text.splitlines():
        line = line.strip()
        if line == "{":
            current = {}
        elif line == "}":
            if current is not None:
                blocks.append(current)
            current = None
        elif current is not None and "=" in line:
            key, _, value = line.partition("=")
            current[key] = value
    return blocks


def _lease(block):
    """(mac, ip, expires) of a block, or None if it lacks a field (Lease.swift skips those)."""
    try:
        proto, _, mac = block["hw_address"].partition(",")
        if proto != "1":
            return None
        return normalize_mac(mac), block["ip_address"], int(block["lease"], 16)
    except (KeyError, ValueError):
        return None


def read_blocks():
    try:
        with open(_path()) as fh:
            return parse(fh.read())
    except FileNotFoundError:
        return []


def active(now=None):
    """Unexpired leases: {mac: (ip, expires)}, the newest per MAC (as Leases.swift keeps)."""
    now = time.time() if now is None else now
    found = {}
    for block in read_blocks():
        lease = _lease(block)
        if lease is None or lease[2] <= now:
            continue
        mac, ip, expires = lease
        if mac not in found or found[mac][1] < expires:
            found[mac] = (ip, expires)
    return found


def ip_for(mac):
    """What `tart ip` (dhcp resolver) answers for this MAC: an unexpired lease's IP, or None."""
    lease = active().get(normalize_mac(mac or ""))
    return lease[0] if lease else None


def leased_to_others(mac):
    """Addresses bootpd would not hand to ``mac``: unexpired leases of other MACs."""
    mac = normalize_mac(mac or "")
    return {ip for other, (ip, _) in active().items() if other != mac}


def _format(block):
    lines = ["{"] + ["\t%s=%s" % (key, block[key]) for key in
                     ("name", "ip_address", "hw_address", "identifier", "lease") if key in block] + ["}"]
    return "\n".join(lines) + "\n"


def grant(name, mac, ip, seconds):
    """Record (or renew) the lease of ``mac`` for ``ip``, expiring ``seconds`` from now.
    Expired blocks are dropped, as bootpd prunes them."""
    path = _path()
    os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        now = time.time()
        short = ":".join("%x" % int(part, 16) for part in normalize_mac(mac).split(":"))
        keep = []
        for block in read_blocks():
            lease = _lease(block)
            if lease is None or lease[2] <= now or lease[0] == normalize_mac(mac) or lease[1] == ip:
                continue
            keep.append(block)
        keep.insert(0, {"name": name, "ip_address": ip, "hw_address": "1," + short,
                        "identifier": "1," + short, "lease": "0x%x" % int(now + seconds)})
        storage.atomic_write(path, "".join(_format(block) for block in keep))
    finally:
        os.close(lock)
