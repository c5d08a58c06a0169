"""Real-host checks (vm-doctor, hints) from files and strings, and the driver's pieces that
read Tart's output: testable on any machine."""

import json
import plistlib
import subprocess
import types

import pytest
from conftest import FakeRunner, fail, ok

from vmtasks.backends.tart import hostchecks
from vmtasks.backends.tart.cli import Tart
from vmtasks.backends.tart.machine import TartMachine, exec_hint
from vmtasks.guest.errors import StageError


def write_plist(path, data):
    path.write_bytes(plistlib.dumps(data))
    return str(path)


def leases_file(path, count):
    block = "{\n\tname=vm\n\tip_address=192.168.64.%d\n\thw_address=1,2:0:0:0:0:%x\n\tlease=0x7fffffff\n}\n"
    path.write_text("".join(block % (i % 250 + 2, i) for i in range(count)))
    return str(path)


def test_lease_time_default_long_and_short(tmp_path):
    leases = leases_file(tmp_path / "leases", 3)
    missing = hostchecks.lease_check(str(tmp_path / "none.plist"), leases)
    assert missing[1] == "warn" and "86400" in missing[2] and "3 leases" in missing[2]
    assert "DHCPLeaseTimeSecs -int 600" in missing[3]
    long = hostchecks.lease_check(write_plist(tmp_path / "a.plist", {"bootpd": {"DHCPLeaseTimeSecs": 7200}}), leases)
    assert long[1] == "warn" and "7200 s" in long[2]
    short = hostchecks.lease_check(write_plist(tmp_path / "b.plist", {"bootpd": {"DHCPLeaseTimeSecs": 600}}), leases)
    assert short[1] == "ok" and "600 s" in short[2]
    broken = tmp_path / "c.plist"
    broken.write_bytes(b"not a plist")
    assert hostchecks.lease_check(str(broken), leases)[1] == "warn"


def test_many_leases_goes_into_the_boot_hint(tmp_path):
    crowded = leases_file(tmp_path / "leases", 150)
    text = hostchecks.many_leases(str(tmp_path / "none.plist"), crowded)
    assert "150 DHCP leases" in text and "DHCPLeaseTimeSecs" in text
    assert hostchecks.many_leases(str(tmp_path / "none.plist"), leases_file(tmp_path / "few", 5)) == ""


@pytest.mark.parametrize("version, status", [
    ("2.26.0", "fail"), ("2.27.0", "warn"), ("2.27.1", "ok"), ("2.32.0-linux-standin", "ok"), ("", "warn")])
def test_tart_version(version, status):
    assert hostchecks.tart_version_check(version)[1] == status


@pytest.mark.parametrize("release, status", [("13.6", "fail"), ("14.5", "ok"), ("15.1", "ok"), ("", "warn")])
def test_macos_version(release, status):
    check = hostchecks.macos_check(release)
    assert check[1] == status
    if release.startswith("15"):
        assert "keychain" in check[2] and "Local Network" in check[2]


def test_doctor_on_linux_says_what_it_skipped(monkeypatch):
    monkeypatch.setattr(hostchecks.platform, "system", lambda: "Linux")
    checks = hostchecks.host_checks("2.32.0-linux-standin", mac=False)
    assert [c.status for c in checks] == ["ok", "ok"]
    assert "skipped on Linux" in checks[1].detail and "DHCP lease time" in checks[1].detail


def cfg(user="admin"):
    return types.SimpleNamespace(vm=types.SimpleNamespace(user=user, name_prefix="p", cpu=None, memory=None,
                                                         random_mac=False),
                                 timeouts=types.SimpleNamespace(poll=0.01, key=1, boot=5, slot_wait=5, clone=5))


def test_doctor_agent_user_check():
    vm = types.SimpleNamespace(name="p-1", running=True)
    assert hostchecks.agent_user_check(Tart(FakeRunner({"exec": ok("admin\n")})), [vm], cfg()).status == "ok"
    wrong = hostchecks.agent_user_check(Tart(FakeRunner({"exec": ok("admin\n")})), [vm], cfg("runner"))
    assert wrong.status == "fail" and "vm.user: admin" in wrong.hint
    down = hostchecks.agent_user_check(Tart(FakeRunner({"exec": fail(1, "Failed to connect ... is the Tart Guest "
                                                                    "Agent running?")})), [vm], cfg())
    assert down.status == "warn" and "Guest Agent" in down.hint
    none = hostchecks.agent_user_check(Tart(FakeRunner()), [], cfg())
    assert none.status == "ok" and "not checked" in none.detail


def test_resume_outcome_from_the_console():
    assert TartMachine.resume_outcome("restoring VM state from a snapshot...") is None
    assert TartMachine.resume_outcome("restoring VM state from a snapshot...\nresuming VM...") == "resumed"
    assert TartMachine.resume_outcome("There is already a running VM with the same MAC address!\n"
                                      "Resetting VM to assign a new MAC address...") == "mac reset"


def test_key_stage_names_the_agent_user_and_old_tart():
    machine = TartMachine(Tart(FakeRunner()), "vm", cfg("runner"))
    with pytest.raises(StageError, match="vm.user is 'runner'"):
        machine.check_agent_user("admin\n")
    machine.check_agent_user("")  # nothing printed: nothing to compare
    old = Tart(FakeRunner({"exec": fail(64, "Error: Unexpected argument 'exec'")})).exec("vm", ["true"])
    assert "2.27+" in exec_hint(old)
    sonoma = Tart(FakeRunner({"exec": fail(1, '"tart exec" is only available on macOS 14 (Sonoma) or newer')}))
    assert "macOS 14" in exec_hint(sonoma.exec("vm", ["true"]))


class SlowProc:
    def wait(self, timeout=None):
        raise subprocess.TimeoutExpired("tart run", timeout)

    def poll(self):
        return None


def test_stop_cleanly_does_not_leak_a_timeout():
    machine = TartMachine(Tart(FakeRunner()), "vm", cfg())
    machine.proc = SlowProc()
    with pytest.raises(StageError, match="did not exit within 3s"):
        machine.stop_cleanly(3)


def test_a_suspend_that_outlasts_the_teardown_timeout_leaves_no_slot_and_no_traceback(tmp_path):
    """A large VM's `tart suspend` can take longer than timeouts.teardown: no TimeoutExpired
    escapes; the slot is skipped (runs boot cold) and the half-saved VM is removed."""
    import threading

    from vmtasks.backends.tart import images as tart_images
    from vmtasks.lifecycle import images, prepare
    from vmtasks.lifecycle.vm import VmServices
    from vmtasks.state.records import RunRecord

    class Runner(FakeRunner):
        def spawn(self, argv, log):
            self.calls.append(list(argv))
            return SlowProc()

    runner = Runner()
    warnings = []
    ledger = types.SimpleNamespace(new_lease=lambda *a, **k: None, write=lambda lease: None,
                                   remove=lambda name: None, state_dir=tmp_path)
    record = RunRecord(tmp_path / "runs", "r")
    record.create("{}")

    class Reporter(types.SimpleNamespace):
        def stage_started(self, *args):
            pass

        def stage_finished(self, *args):
            pass

    services = VmServices(
        cfg=types.SimpleNamespace(vm=types.SimpleNamespace(name_prefix="p"), source="vm.yaml",
                                  timeouts=types.SimpleNamespace(clone=5, boot=5, teardown=3)),
        backend=types.SimpleNamespace(list_vms=lambda: []), cancel=threading.Event(), ledger=ledger,
        record=record, reporter=Reporter(warn=warnings.append), runner=runner, run_id="r",
        tool_bundle=lambda: b"", sync_excludes=[], cleanup_command="")
    digest = "0" * images.HASH_LENGTH
    plan = prepare.ImagePlan(digest, "p-prepared-" + digest, "p-building-" + digest, {}, True, "")
    assert tart_images.build_suspended_slots(services, Tart(runner), plan, 1) == []
    assert any("took longer than 3s" in w for w in warnings), warnings
    subs = [call[1] for call in runner.calls]
    assert subs[-2:] == ["stop", "delete"], runner.calls
    # The slot copy walked the stage table: each stage is in the record, the failed one says so.
    stages = [(s["stage"], s["status"], s["vm"]) for s in json.loads(record.path("stages.json").read_text())]
    assert stages[-1] == ("suspend", "failed", "p-building-" + digest + "-s1"), stages


def test_tart_doctor_rows_are_checks_when_tools_are_missing(tmp_path, monkeypatch):
    """vm-doctor through the backend (``TartBackend.doctor``): a missing tool is a failed
    check with a hint, and nothing that needs the tool is tried after it."""
    from vmtasks.guest import config
    from vmtasks.transport import proc
    from vmtasks.ui import doctor

    (tmp_path / "project").mkdir()
    (tmp_path / "vm.yaml").write_text("project_dir: project\nstate_dir: state\n")
    monkeypatch.setattr(proc, "which", lambda tool: None if tool in ("rsync", "tart") else "/usr/bin/" + tool)
    rows = doctor.checks(lambda: config.load(tmp_path / "vm.yaml", environ={}, cwd=tmp_path))
    assert all(isinstance(row, doctor.Check) for row in rows), rows
    by_name = {row.name: row for row in rows}
    assert by_name["rsync"].status == "fail" and by_name["rsync"].hint == "install rsync"
    assert by_name["tart"].status == "fail" and "brew" in by_name["tart"].hint
    assert "base image" not in by_name and "leftovers" not in by_name
