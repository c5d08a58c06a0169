"""Each TART_STANDIN_* knob does what scripts/README.md says."""

from __future__ import annotations

import json
import time

import pytest

from .conftest import processes_of, ssh_banner, sshd_processes, wait_until

pytestmark = pytest.mark.standin

AGENT_DOWN_PREFIX = "Failed to connect to the VM using its control socket: "
AGENT_DOWN_SUFFIX = ", is the Tart Guest Agent running?\n"


# `tart exec` tries the agent's socket about 10 s before failing (TART_STANDIN_AGENT_CONNECT_WAIT);
# these checks want the failure at once.
NO_CONNECT_WAIT = {"TART_STANDIN_AGENT_CONNECT_WAIT": "0"}


def test_exec_waits_for_a_late_agent_then_gives_up_like_tart(tart, base):
    """The agent answers 10 s after boot unless told otherwise; an exec meanwhile keeps trying
    for the connect wait, then fails with Tart's agent error."""
    run = tart.spawn_run(base, env={"TART_STANDIN_AGENT_DELAY": ""})  # the default, as real
    tart.wait_running(run)
    started = time.monotonic()
    early = tart("exec", base, "true", env={"TART_STANDIN_AGENT_CONNECT_WAIT": "1"})
    assert early.returncode == 1 and early.stderr.endswith(AGENT_DOWN_SUFFIX)
    assert 0.9 <= time.monotonic() - started < 5
    waited = tart("exec", base, "id", "-un", timeout=30)  # waits (up to 10 s) for the agent
    assert (waited.returncode, waited.stdout) == (0, "admin\n"), waited.stderr
    assert time.monotonic() - run.started >= 9.5


def test_boot_delay_hides_the_ip_until_boot(tart, base):
    run = tart.spawn_run(base, env={"TART_STANDIN_BOOT_DELAY": "1"})
    tart.wait_running(run)
    early = tart("ip", base)
    # running, so Tart does not ask "is your VM running?"
    assert (early.returncode, early.stderr) == (1, "no IP address found\n")
    exec_early = tart("exec", base, "true", env=NO_CONNECT_WAIT)
    assert exec_early.returncode == 1 and exec_early.stderr.startswith(AGENT_DOWN_PREFIX)
    ip = tart("ip", "--wait", "5", base)
    assert ip.returncode == 0 and ip.stdout.strip().startswith("127.")
    assert time.monotonic() - run.started >= 0.9
    assert wait_until(lambda: ssh_banner(ip.stdout.strip()), 5)


def test_sshd_delay_ip_before_ssh(tart, base):
    run = tart.spawn_run(base, env={"TART_STANDIN_SSHD_DELAY": "1.2"})
    tart.wait_running(run)
    ip = tart.wait_ip(base)
    assert time.monotonic() - run.started < 1.0
    assert not ssh_banner(ip)  # IP known is not SSH ready
    assert tart.exec_ok(base, "true") == ""  # the agent does not wait for sshd
    assert wait_until(lambda: ssh_banner(ip), 5)
    assert time.monotonic() - run.started >= 1.1


def test_agent_delay_fails_exec_with_tarts_message(tart, base):
    run = tart.spawn_run(base, env={"TART_STANDIN_AGENT_DELAY": "1"})
    tart.wait_running(run)
    ip = tart.wait_ip(base)  # the default resolver does not need the agent...
    agent = tart("ip", "--resolver", "agent", base)  # ...the agent resolver does
    assert agent.returncode == 1
    early = tart("exec", base, "true", env=NO_CONNECT_WAIT)
    assert early.returncode == 1
    assert early.stderr.startswith(AGENT_DOWN_PREFIX) and early.stderr.endswith(AGENT_DOWN_SUFFIX)
    assert wait_until(lambda: ssh_banner(ip), 5)
    assert tart.exec_ok(base, "id", "-un") == "admin\n"
    assert time.monotonic() - run.started >= 0.9
    assert tart.ok("ip", "--resolver", "agent", base) == ip + "\n"


def test_crash_after_kills_the_guest_and_fails_run(tart, base):
    run = tart.start(base, env={"TART_STANDIN_CRASH_AFTER": "1"}, ssh=False)
    config = tart.sshd_config(base)
    assert tart.exec_ok(base, "true") == "" and run.proc.poll() is None
    assert run.wait(timeout=10) == 1
    assert "guest has stopped the virtual machine due to error" in run.stdout
    assert not sshd_processes(config) and not tart.running(base)
    assert wait_until(lambda: not processes_of(tart.home), 3), processes_of(tart.home)


def test_max_vms_default_two_and_zero_unlimited(tart, base):
    for name in ("a", "b", "c"):
        tart.ok("clone", base, name)
    tart.start("a", ssh=False)
    tart.start("b", ssh=False)
    third = tart("run", "--no-graphics", "c", timeout=30)
    assert third.returncode == 1
    assert third.stderr == "The number of VMs exceeds the system limit (other running VMs: a, b)\n"
    assert not tart.running("c")
    c = tart.start("c", env={"TART_STANDIN_MAX_VMS": "0"}, ssh=False)
    assert tart.exec_ok("c", "hostname") == "c\n"
    one = tart("run", "--no-graphics", base, env={"TART_STANDIN_MAX_VMS": "1"}, timeout=30)
    assert one.returncode == 1 and "other running VMs: a, b, c" in one.stderr
    tart.ok("stop", "c")
    assert c.wait() == 0


def test_fail_knob_for_run_and_stop(tart, base):
    run = tart("run", "--no-graphics", base, env={"TART_STANDIN_FAIL": "run"}, timeout=30)
    assert run.returncode == 1 and "simulated failure" in run.stderr
    assert not tart.running(base)
    started = tart.start(base, ssh=False)
    stop = tart("stop", base, env={"TART_STANDIN_FAIL": "stop,exec"})
    assert stop.returncode == 1 and tart.running(base)
    assert tart("exec", base, "true", env={"TART_STANDIN_FAIL": "stop,exec"}).returncode == 1
    tart.ok("stop", base)
    assert started.wait() == 0


def test_stop_delay_makes_stop_slow(tart, base):
    run = tart.start(base, env={"TART_STANDIN_STOP_DELAY": "1"}, ssh=False)
    began = time.monotonic()
    assert tart.ok("stop", base) == ""
    assert time.monotonic() - began >= 0.9
    assert run.wait() == 0


def test_log_knob_tracks_a_run_while_it_runs(tart, base, tmp_path):
    log = tmp_path / "tart.jsonl"
    env = {"TART_STANDIN_LOG": str(log)}
    run = tart.start(base, env=env, ssh=False)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    run_record = [r for r in records if r["argv"][1] == "run"]
    assert len(run_record) == 1 and run_record[0]["exit"] is None  # still running
    assert run_record[0]["pid"] == run.proc.pid
    tart.ok("stop", base, env=env)
    assert run.wait() == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["argv"][1:] for r in records] == [["run", "--no-graphics", base], ["stop", base]]
    assert [r["exit"] for r in records] == [0, 0]


def test_invalid_knob_value_is_reported(tart, base):
    done = tart("run", "--no-graphics", base, env={"TART_STANDIN_BOOT_DELAY": "soon"})
    assert done.returncode == 1 and "TART_STANDIN_BOOT_DELAY" in done.stderr


def test_run_dir_and_sshd_log_level_knobs(tart, base, tmp_path):
    registry = tmp_path / "registry"
    env = {"TART_STANDIN_RUN_DIR": str(registry), "TART_STANDIN_SSHD_LOG_LEVEL": "QUIET"}
    run = tart.spawn_run(base, env=env)
    tart.wait_running(run)
    # The DHCP lease table lives in the registry directory too: `tart ip` must see the knob.
    run.ip = tart.ok("ip", "--wait", "5", base, env=env).strip()
    assert (registry / "dhcpd_leases").read_text().count("hw_address=1,") == 1
    reservation = registry / "ips" / run.ip
    assert json.loads(reservation.read_text())["name"] == base
    tart.ok("stop", base)
    assert run.wait() == 0
    assert not reservation.exists()  # released with the guest
    assert "Server listening" not in run.stderr
