"""vm-doctor for the Tart backend (``tart_checks``, ``TartBackend.doctor``), and the
real-host conditions Tart depends on, checked from this Mac's own files (vm-doctor, the
boot stage's hint). Each check is a plain function of paths and strings, so it is tested on
any machine; on Linux with the stand-in the Mac-only ones say they were skipped.

Sources: Tart's FAQ (docs/faq.md: DHCP lease time, headless keychain), Orchard's worker
(internal/worker/dhcpleasetime: reads ``bootpd`` / ``DHCPLeaseTimeSecs`` from the Internet
Sharing plist, warns when it is missing or above an hour), Tart's Commands/Exec.swift (macOS 14+).
"""

from __future__ import annotations

import os
import platform
import plistlib
import re
import shutil
from pathlib import Path
from typing import List, Optional, Tuple

from vmtasks.guest.errors import VmtasksError
from vmtasks.lifecycle import prepare
from vmtasks.lifecycle.backend import Check as DoctorCheck
from vmtasks.transport import proc

from .cli import INSTALL_HINT
from .machine import MACOS_VM_LIMIT, exec_hint, is_standin

INTERNET_SHARING_PLIST = "/Library/Preferences/SystemConfiguration/com.apple.InternetSharing.default.plist"
LEASES_FILE = "/var/db/dhcpd_leases"
DEFAULT_LEASE_SECS = 86400
MAX_LEASE_SECS = 3600  # Orchard's worker warns above an hour
MANY_LEASES = 100  # the pool holds about 253 addresses (Tart FAQ)
LEASE_FIX = ("sudo defaults write " + INTERNET_SHARING_PLIST + " bootpd -dict DHCPLeaseTimeSecs -int 600 "
             "(Tart FAQ: DHCPLeaseTimeSecs 600); then sudo rm " + LEASES_FILE + " if it is full")
MIN_TART = (2, 27, 0)  # `tart exec`
MIN_TART_SUSPEND = (2, 27, 1)  # the guest agent runs in suspendable VMs
TART_UPGRADE = "brew upgrade cirruslabs/cli/tart"

Check = Tuple[str, str, str, str]  # name, status (ok/warn/fail), detail, hint


def is_mac() -> bool:
    return platform.system() == "Darwin"


def lease_time(plist_path: str = INTERNET_SHARING_PLIST) -> Tuple[Optional[int], str]:
    """bootpd's DHCPLeaseTimeSecs, or None for the default (no file or no key), and an error
    text when the file cannot be read."""
    try:
        with open(plist_path, "rb") as fh:
            data = plistlib.load(fh)
    except FileNotFoundError:
        return None, ""
    except (OSError, plistlib.InvalidFileException, ValueError) as exc:
        return None, "cannot read {}: {}".format(plist_path, exc)
    bootpd = data.get("bootpd") if isinstance(data, dict) else None
    value = bootpd.get("DHCPLeaseTimeSecs") if isinstance(bootpd, dict) else None
    return (int(value) if isinstance(value, int) and value > 0 else None), ""


def lease_count(leases_path: str = LEASES_FILE) -> Tuple[int, int]:
    """(lease blocks, bytes) of bootpd's lease file; (0, 0) when there is none."""
    try:
        with open(leases_path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return 0, 0
    return sum(1 for line in text.splitlines() if line.strip() == "{"), len(text.encode())


def lease_check(plist_path: str = INTERNET_SHARING_PLIST, leases_path: str = LEASES_FILE) -> Check:
    secs, error = lease_time(plist_path)
    count, size = lease_count(leases_path)
    held = "; {} leases in {} ({} bytes)".format(count, leases_path, size)
    if error:
        return ("DHCP leases", "warn", error + held, LEASE_FIX)
    if secs is None or secs > MAX_LEASE_SECS:
        what = "the default of {} s (1 day)".format(DEFAULT_LEASE_SECS) if secs is None else "{} s".format(secs)
        return ("DHCP leases", "warn", "lease time is {}: every new VM MAC holds an address that long, "
                "and about 253 VMs a day exhaust the pool (stale or duplicate IPs){}".format(what, held), LEASE_FIX)
    return ("DHCP leases", "ok", "lease time {} s{}".format(secs, held), "")


def many_leases(plist_path: str = INTERNET_SHARING_PLIST, leases_path: str = LEASES_FILE) -> str:
    """For the boot stage's hint: a sentence when the lease file is crowded, else ""."""
    if leases_path == LEASES_FILE and not is_mac():
        return ""
    count, _ = lease_count(leases_path)
    if count < MANY_LEASES:
        return ""
    secs, _ = lease_time(plist_path)
    return "{} holds {} DHCP leases (lease time {} s): the pool may be exhausted; {}".format(
        leases_path, count, secs or DEFAULT_LEASE_SECS, LEASE_FIX)


def parse_version(text: str) -> Optional[Tuple[int, int, int]]:
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    if not match:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def tart_version_check(version: str) -> Check:
    found = parse_version(version)
    if found is None:
        return ("tart version", "warn", "cannot tell the version from {!r}".format(version),
                "needs Tart 2.27.1+: " + TART_UPGRADE)
    shown = ".".join(map(str, found))
    if found < MIN_TART:
        return ("tart version", "fail", "{} has no `tart exec` (2.27+)".format(shown), TART_UPGRADE)
    if found < MIN_TART_SUSPEND:
        return ("tart version", "warn", "{}: the guest agent does not run in suspended VMs before 2.27.1".format(
            shown), TART_UPGRADE)
    return ("tart version", "ok", shown, "")


def macos_check(release: Optional[str] = None) -> Check:
    release = platform.mac_ver()[0] if release is None else release
    found = parse_version(release + ".0" if release and release.count(".") == 0 else release)
    if found is None:
        return ("macOS", "warn", "cannot tell the macOS version", "")
    if found[0] < 14:
        return ("macOS", "fail", "macOS {}: `tart exec` and suspend need macOS 14+".format(release),
                "upgrade the host to macOS 14 (Sonoma) or newer")
    note = ""
    if found[0] >= 15:
        note = ("; macOS 15: a headless host needs an unlocked login keychain, and Local Network privacy "
                "may block apps other than Terminal.app and SSH sessions from reaching VMs")
    return ("macOS", "ok", "macOS {}{}".format(release, note), "")


# --- vm-doctor for the Tart backend ---------------------------------------------------------


def _tart_home() -> Path:
    return Path(os.environ.get("TART_HOME") or Path.home() / ".tart")


def tart_checks(parts) -> List[DoctorCheck]:
    """vm-doctor's checks of the Tart backend: tools, tart, the host, the guest agent, the
    base image, disk, VM slots and prepared images (``TartBackend.doctor``)."""
    cfg = parts.cfg
    out: List[DoctorCheck] = []
    add = out.append
    for tool in ("ssh", "rsync"):
        path = proc.which(tool)
        add(DoctorCheck(tool, "ok", path) if path else DoctorCheck(tool, "fail", "not on PATH", "install " + tool))
    tart = parts.backend.tart
    if proc.which("tart") is None:
        add(DoctorCheck("tart", "fail", "not on PATH", INSTALL_HINT))
        return out
    version = tart.version()
    standin = is_standin(version)
    add(DoctorCheck("tart", "ok", "{} ({})".format(proc.which("tart"), version or "version unknown")))
    mac = platform.system() == "Darwin" and platform.machine() == "arm64"
    if mac:
        add(DoctorCheck("host", "ok", "Apple Silicon Mac"))
    elif standin or platform.system() == "Linux":
        # Tart itself only runs on macOS: a `tart` on Linux is a stand-in.
        add(DoctorCheck("host", "ok", "{} {}: a stand-in `tart` is in use".format(
            platform.system(), platform.machine())))
    else:
        add(DoctorCheck("host", "fail", "{} {} is not an Apple Silicon Mac".format(
            platform.system(), platform.machine()),
            "run on an Apple Silicon Mac, or put scripts/ first on PATH for the stand-in"))
    out += host_checks(version, mac)
    try:
        vms = tart.list()
    except VmtasksError as exc:
        add(DoctorCheck("tart list", "fail", exc.message, exc.hint))
        return out
    out.append(agent_user_check(tart, vms, cfg))
    base = next((vm for vm in vms if vm.name == cfg.vm.base), None)
    if base is None:
        add(DoctorCheck("base image", "fail", "'{}' is not in `tart list`".format(cfg.vm.base),
                        parts.backend.base_image_hint(cfg.vm.base)))
    else:
        add(DoctorCheck("base image", "ok", cfg.vm.base))
        info = tart.get(cfg.vm.base) or {}
        try:
            size_gb = float(info.get("Size", base.size_gb) or 0)
        except (TypeError, ValueError):
            size_gb = base.size_gb
        home = _tart_home()
        probe = home if home.exists() else Path.home()
        free_gb = shutil.disk_usage(str(probe)).free / 1e9
        status = "ok" if free_gb >= max(size_gb, 1) else "warn"
        add(DoctorCheck("disk", status, "{:.1f} GB free in {}; the base image uses {:.1f} GB".format(
            free_gb, probe, size_gb),
            "" if status == "ok" else "free space: clones grow as the suite writes (tart #989)"))
    running = [vm.name for vm in vms if vm.running]
    if len(running) >= MACOS_VM_LIMIT:
        add(DoctorCheck("VM slots", "warn", "{} VMs running ({}); macOS allows {}".format(
            len(running), ", ".join(running), MACOS_VM_LIMIT), "test-vm will wait for a slot; stop one to go now"))
    else:
        add(DoctorCheck("VM slots", "ok", "{} of {} running".format(len(running), MACOS_VM_LIMIT)))
    if base is not None:
        out += [DoctorCheck(*row) for row in prepare.doctor_checks(parts, parts.backend.list_vms())]
    return out


def host_checks(version: str, mac: bool) -> List[DoctorCheck]:
    """Tart's own version, and on a Mac the host conditions Tart needs (this module)."""
    out = [DoctorCheck(*tart_version_check(version))]
    if not mac:
        out.append(DoctorCheck("Mac-only", "ok", "skipped on {}: macOS version, DHCP lease time and lease file, "
                         "Local Network privacy, login keychain (they matter on a Mac host only)".format(
                             platform.system())))
        return out
    return out + [DoctorCheck(*macos_check()), DoctorCheck(*lease_check())]


def agent_user_check(tart, vms, cfg) -> DoctorCheck:
    """The guest agent answers and runs as vm.user (the key goes into the agent user's home),
    asked of a running VM of ours if there is one; doctor boots none."""
    running = [vm.name for vm in vms if vm.running and vm.name.startswith(cfg.vm.name_prefix)]
    if not running:
        return DoctorCheck("guest agent", "ok", "not checked: no running VM of ours to ask; test-vm checks it "
                     "(`tart exec NAME whoami`) at its key stage")
    try:
        result = tart.exec(running[0], ["whoami"], timeout=30)
    except VmtasksError as exc:
        return DoctorCheck("guest agent", "warn", "`tart exec {} whoami`: {}".format(running[0], exc.message), exc.hint)
    if not result.ok:
        return DoctorCheck("guest agent", "warn", "`tart exec {} whoami` exited {}: {}".format(
            running[0], result.returncode, (result.stderr or result.stdout).strip()[-200:]), exec_hint(result))
    user = result.stdout.strip()
    if user != cfg.vm.user:
        return DoctorCheck("guest agent", "fail", "the agent in {} runs as '{}' but vm.user is '{}'".format(
            running[0], user, cfg.vm.user), "set vm.user: " + user)
    return DoctorCheck("guest agent", "ok", "answers in {} as {}".format(running[0], user))
