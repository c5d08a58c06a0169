"""What real Tart does that surprises a driver (issue 17): `tart ip` answers from the host's
DHCP leases whether or not the VM runs, a resume at the VM limit prints both restore lines
before failing, and the Mac-host failures the stand-in can be told to show."""

from __future__ import annotations

import time

import pytest

from .conftest import ssh_banner, wait_until
from .test_standin_suspend import RESUME_LINES, suspend

pytestmark = pytest.mark.standin


def test_a_stopped_vm_answers_tart_ip_from_its_lease_until_it_expires(tart, base, tmp_path):
    env = {"TART_STANDIN_RUN_DIR": str(tmp_path / "registry"), "TART_STANDIN_DHCP_LEASE_TIME": "3"}
    tart.ok("clone", base, "vm")
    never = tart("ip", "vm", env=env)
    assert (never.returncode, never.stderr) == (1, "no IP address found, is your VM running?\n")  # no lease yet
    run = tart.spawn_run("vm", env=env)
    tart.wait_running(run)
    ip = tart.ok("ip", "--wait", "5", "vm", env=env).strip()
    tart.ok("stop", "vm")
    assert run.wait() == 0
    assert tart.ok("ip", "vm", env=env).strip() == ip  # stopped, and still answers (Leases.swift)
    agent = tart("ip", "--resolver", "agent", "vm", env=env)
    assert agent.returncode == 1 and "is your VM running?" in agent.stderr
    leases = (tmp_path / "registry" / "dhcpd_leases").read_text()
    assert "ip_address=" + ip in leases and "lease=0x" in leases  # bootpd's block format
    assert wait_until(lambda: tart("ip", "vm", env=env).returncode == 1, 6)  # expired
    # A new MAC has no lease: nothing until the guest boots.
    tart.ok("set", "vm", "--random-mac")
    assert tart("ip", "vm", env=env).returncode == 1


def test_a_clone_of_a_suspended_vm_answers_before_it_runs_and_keeps_its_address(tart, base):
    tart.ok("clone", base, "slot")
    suspend(tart, "slot")
    slot_ip = tart.ok("ip", "slot").strip()
    tart.ok("clone", "slot", "job")
    assert tart.ok("ip", "job").strip() == slot_ip  # never ran: the slot's lease (same MAC)
    refused = tart("run", "--no-graphics", "job", env={"TART_STANDIN_REFUSE_RESTORE": "1"})
    assert refused.returncode == 1
    assert tart.ok("ip", "job").strip() == slot_ip  # the restore failed: still answers
    run = tart.start("job", ssh=True)
    assert run.stdout == RESUME_LINES and run.ip == slot_ip  # same MAC, same lease, same IP
    tart.ok("stop", "job")
    assert run.wait() == 0


def test_a_resume_at_the_vm_limit_restores_first_and_loses_its_state(tart, base):
    for name in ("a", "b"):
        tart.ok("clone", base, name)  # from a stopped VM: their own MACs
    suspend(tart, base)
    tart.ok("clone", base, "job")
    others = [tart.start(name, ssh=False) for name in ("a", "b")]
    limited = tart("run", "--no-graphics", "job", timeout=30)
    # Run.swift: both restore lines, then the start fails at the limit; the state is gone.
    assert (limited.returncode, limited.stdout) == (1, RESUME_LINES)
    assert limited.stderr == "The number of VMs exceeds the system limit (other running VMs: a, b)\n"
    assert tart.state("job") == "stopped"
    for run in others:
        tart.ok("stop", run.name)
        assert run.wait() == 0


def test_locked_keychain_and_local_network_knobs(tart, base):
    locked = tart("run", "--no-graphics", base, env={"TART_STANDIN_LOCKED_KEYCHAIN": "1"}, timeout=30)
    assert locked.returncode == 1 and "Failed to generate keypair" in locked.stderr
    assert "SecKeyCreateRandomKey" in locked.stderr
    run = tart.spawn_run(base, env={"TART_STANDIN_LOCAL_NETWORK_DENIED": "1"})
    tart.wait_running(run)
    ip = tart.wait_ip(base)
    assert tart.exec_ok(base, "true") == ""  # the guest is up: the agent answers
    time.sleep(0.5)
    assert not ssh_banner(ip)  # but this host cannot reach its port 22
