"""The Orchard controller stand-in (scripts/orchard) through its HTTP API: real Tart stand-in
guests on two workers, scheduling, the pending queue, auth and the status codes."""

from __future__ import annotations

import base64
import os
import sys
import time

import pytest

from .conftest import SCRIPTS, processes_of

sys.path.insert(0, str(SCRIPTS))
from orchard_standin.harness import Fleet  # noqa: E402

pytestmark = pytest.mark.standin


@pytest.fixture(scope="module")
def shared_fleet(tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("orchard"), workers=2,
              args=["--scheduler-interval", "0.2", "--ssh-retry-delay", "0.02"])
    f.start()
    yield f
    f.down()
    leftovers = [p for i in (1, 2) for p in processes_of(f.worker_home(i))]
    assert not leftovers, "processes left behind: %r" % leftovers


@pytest.fixture
def fleet(shared_fleet):
    """The module's controller; each test's VMs are deleted and their guests gone after it."""
    yield shared_fleet
    for vm in shared_fleet.api("GET", "vms")[1] or []:
        shared_fleet.api("DELETE", "vms/" + vm["name"])
    assert shared_fleet.wait_no_guests(), shared_fleet.guests()


def vm_body(name, **extra):
    body = {"name": name, "image": "tahoe-base", "headless": True}
    body.update(extra)
    return body


def test_workers_are_listed_with_two_slots_each(fleet):
    status, workers = fleet.api("GET", "workers")
    assert status == 200
    assert sorted(w["name"] for w in workers) == ["worker-1", "worker-2"]
    assert all(w["resources"]["org.cirruslabs.tart-vms"] == 2 for w in workers)
    assert all(w["last_seen"].endswith("Z") and not w["last_seen"].startswith("0001") for w in workers)


def test_auth_401_and_unauthenticated_root(fleet):
    assert fleet.api("GET", "vms", auth=("vmtasks", "wrong"))[0] == 401
    assert fleet.api("GET", "vms", auth=("nobody", "s3cret"))[0] == 401
    assert fleet.api("GET", "vms", auth=None)[0] == 401
    assert fleet.api("GET", "", auth=None)[0] == 200  # as Orchard: the root needs no account...
    assert fleet.api("GET", "", auth=("vmtasks", "wrong"))[0] == 401  # ...but wrong ones are refused
    assert fleet.api("GET", "controller/info")[1]["version"]


def test_status_codes_404_409_412(fleet):
    assert fleet.api("GET", "vms/missing")[0] == 404
    assert fleet.api("DELETE", "vms/missing")[0] == 404
    assert fleet.api("GET", "vms/missing/events")[0] == 404
    assert fleet.api("POST", "vms", {"name": "x"})[0] == 412  # no image
    assert fleet.api("POST", "vms", {"name": "bad name", "image": "i"})[0] == 412
    status, vm = fleet.api("POST", "vms", vm_body("dup"))
    assert status == 200 and vm["status"] == "pending" and vm["uid"]
    status, body = fleet.api("POST", "vms", vm_body("dup"))
    assert status == 409 and "already exists" in body["message"]


def test_full_fleet_queues_pending_until_a_slot_frees(fleet):
    names = ["q1", "q2", "q3", "q4", "q5"]
    for name in names:
        assert fleet.api("POST", "vms", vm_body(name))[0] == 200
        time.sleep(0.01)  # distinct createdAt: the queue is ordered by it
    for name in names[:4]:
        fleet.wait_status(name, ("running",))
    status, vms = fleet.api("GET", "vms")
    by_name = {vm["name"]: vm for vm in vms}
    workers = [by_name[n]["worker"] for n in names[:4]]
    assert sorted(workers) == ["worker-1", "worker-1", "worker-2", "worker-2"]
    time.sleep(0.6)  # a few scheduler ticks: still no room
    q5 = fleet.vm("q5")
    assert q5["status"] == "pending" and q5["worker"] == ""
    assert len([g for g in fleet.guests() if g[2]]) == 4
    assert fleet.api("DELETE", "vms/q2")[0] == 200
    assert fleet.vm("q2") is None
    q5 = fleet.wait_status("q5", ("running",))
    assert q5["worker"] == by_name["q2"]["worker"]
    # the deleted VM's guest is torn down in the background
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(by_name["q2"]["localName"] == g[1] for g in fleet.guests()):
        time.sleep(0.1)
    assert all(g[1] != by_name["q2"]["localName"] for g in fleet.guests())


def test_startup_script_runs_and_its_output_is_in_events(fleet):
    script = {"script_content": "echo \"hello $WHO\"\nid -un", "env": {"WHO": "orchard"}}
    assert fleet.api("POST", "vms", vm_body("s1", startup_script=script))[0] == 200
    fleet.wait_status("s1", ("running",))
    deadline = time.monotonic() + 20
    payloads = []
    while time.monotonic() < deadline and "admin" not in payloads:
        payloads = [e["payload"] for e in fleet.api("GET", "vms/s1/events")[1]]
        time.sleep(0.1)
    assert payloads[:2] == ["hello orchard", "admin"]
    status, last = fleet.api("GET", "vms/s1/events?order=desc&limit=1")
    assert status == 200 and [e["payload"] for e in last] == ["admin"] and last[0]["kind"] == "log_line"


def test_failing_startup_script_fails_the_vm(fleet):
    script = {"script_content": "echo about to fail\nexit 3"}
    assert fleet.api("POST", "vms", vm_body("f1", startup_script=script))[0] == 200
    vm = fleet.wait_status("f1", ("failed",))
    assert "startup script" in vm["status_message"] and "3" in vm["status_message"]
    assert [e["payload"] for e in fleet.api("GET", "vms/f1/events")[1]] == ["about to fail"]
    assert fleet.wait_no_guests()  # a failed VM's guest is stopped and deleted


def test_missing_image_fails_with_the_clone_error(fleet):
    assert fleet.api("POST", "vms", {"name": "m1", "image": "no-such-image"})[0] == 200
    vm = fleet.wait_status("m1", ("failed",))
    assert "clone" in vm["status_message"] and "no-such-image" in vm["status_message"]


def _ws_status(fleet, path):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    auth = "Basic " + base64.b64encode(b"vmtasks:s3cret").decode()
    try:
        with connect("ws" + fleet.url[4:] + "/v1/vms/" + path, additional_headers={"Authorization": auth},
                     open_timeout=15) as ws:
            return 101, ws.recv(timeout=5)
    except InvalidStatus as exc:
        return exc.response.status_code, None


def test_port_forward_codes_and_ssh_banner(fleet):
    assert _ws_status(fleet, "nope/port-forward?port=22")[0] == 404
    assert fleet.api("POST", "vms", {"name": "bad", "image": "no-such-image"})[0] == 200
    fleet.wait_status("bad", ("failed",))
    assert _ws_status(fleet, "bad/port-forward?port=22")[0] == 417
    assert fleet.api("POST", "vms", vm_body("pf"))[0] == 200
    code, banner = _ws_status(fleet, "pf/port-forward?port=22&wait=10")
    assert code == 101 and banner.startswith(b"SSH-2.0-")
    assert _ws_status(fleet, "pf/port-forward?port=0")[0] == 400
    started = time.monotonic()
    # RPC v2 (the default): the worker cannot connect, the wait runs out: 500 with no body
    assert _ws_status(fleet, "pf/port-forward?port=2222&wait=1")[0] == 500
    assert time.monotonic() - started < 5


def test_pending_vm_port_forward_408_after_wait(tmp_path):
    f = Fleet(tmp_path / "orchard", workers=1, args=["--worker-slots", "0"])
    f.start()
    try:
        assert f.api("POST", "vms", vm_body("w"))[0] == 200
        assert _ws_status(f, "w/port-forward?port=22&wait=1")[0] == 408
        assert f.vm("w")["status"] == "pending"
    finally:
        f.down()


def test_fail_start_knob_and_worker_offline(tmp_path):
    f = Fleet(tmp_path / "orchard", workers=2,
              args=["--fail-start", "boom-*", "--worker-offline-timeout", "1", "--scheduler-interval", "0.2"])
    f.start()
    try:
        assert f.api("POST", "vms", vm_body("boom-1"))[0] == 200
        vm = f.wait_status("boom-1", ("failed",))
        assert "simulated failure" in vm["status_message"]
        assert f.api("POST", "vms", vm_body("o1"))[0] == 200
        worker = f.wait_status("o1", ("running",))["worker"]
        os.system("%s %s standin worker-offline --data %s %s" % (sys.executable, SCRIPTS / "orchard", f.data, worker))
        vm = f.wait_status("o1", ("failed",), timeout=10)
        assert "lost connection" in vm["status_message"]
        status, workers = f.api("GET", "workers")
        # a new VM goes to the worker that still reports
        assert f.api("POST", "vms", vm_body("o2"))[0] == 200
        assert f.wait_status("o2", ("running",))["worker"] != worker
    finally:
        f.down()


def test_controller_restart_keeps_running_vms(fleet):
    assert fleet.api("POST", "vms", vm_body("r1"))[0] == 200
    before = fleet.wait_status("r1", ("running",))
    assert fleet.api("POST", "vms", vm_body("r2"))[0] == 200
    fleet.wait_status("r2", ("running",))
    assert fleet.api("DELETE", "vms/r2")[0] == 200
    fleet.restart(kill=True)
    after = fleet.vm("r1")
    assert after["status"] == "running" and after["uid"] == before["uid"] and after["worker"] == before["worker"]
    code, banner = _ws_status(fleet, "r1/port-forward?port=22")
    assert code == 101 and banner.startswith(b"SSH-")
    assert fleet.vm("r2") is None
    # the guest of the VM deleted just before the crash is still removed
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(fleet.guests()) != 1:
        time.sleep(0.1)
    assert [g[1] for g in fleet.guests()] == [before["localName"]]


def _wait_events(fleet, name, done, timeout=40):
    deadline = time.monotonic() + timeout
    while True:
        payloads = [e["payload"] for e in fleet.api("GET", "vms/%s/events" % name)[1] or []]
        vm = fleet.vm(name)
        if done(payloads) or vm["status"] == "failed" or time.monotonic() > deadline:
            return vm, payloads
        time.sleep(0.1)


def test_the_startup_script_logs_in_over_ssh_with_the_vms_username_and_password(fleet):
    """base.go: password authentication as username/password; admin/admin only when both are
    empty. A username with no password (what vmtasks sent before vm.password) fails the VM."""
    script = {"script_content": "id -un", "env": {}}
    for name, extra in (("both", {"username": "admin", "password": "admin"}), ("neither", {})):
        assert fleet.api("POST", "vms", vm_body(name, startup_script=script, **extra))[0] == 200
    for name, extra in (("nopass", {"username": "admin"}), ("wrong", {"username": "admin", "password": "x"})):
        assert fleet.api("POST", "vms", vm_body(name, startup_script=script, **extra))[0] == 200
    for name in ("both", "neither"):
        vm, payloads = _wait_events(fleet, name, lambda p: "admin" in p)
        assert vm["status"] == "running" and payloads[-1] == "admin", (vm, payloads)
    for name in ("nopass", "wrong"):
        vm = fleet.wait_status(name, ("failed",), timeout=40)
        message = vm["status_message"]
        assert message.startswith("VM failed: failed to run startup script: failed to establish SSH connection: "
                                  "All attempts fail:\n#1: SSH handshake with "), message
        assert "unable to authenticate, attempted methods [none password]" in message and "#10: " in message
        payloads = [e["payload"] for e in fleet.api("GET", "vms/%s/events" % name)[1]]
        assert len(payloads) == 10 and payloads[0].startswith("attempt 0 to establish SSH connection failed: ")
    deadline = time.monotonic() + 30  # the failed ones' guests are stopped and deleted
    while time.monotonic() < deadline and len(fleet.guests()) > 2:
        time.sleep(0.1)
    assert sorted(g[1].split("-")[1] for g in fleet.guests()) == ["both", "neither"]


def test_image_password_knob_and_dev_mode(tmp_path):
    """--image-password: the images' admin password; --dev: `orchard dev` (no auth, Swagger's
    HTML at /v1/, RPC v1: a port nobody listens on is an upgrade closed at once)."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    f = Fleet(tmp_path / "orchard", workers=1, account=None,
              args=["--dev", "--image-password", "pw-1", "--ssh-retry-delay", "0.02", "--scheduler-interval", "0.2"])
    f.start()
    try:
        status, page = f.api("GET", "", auth=None)
        assert status == 200 and page.lstrip().startswith("<!DOCTYPE html>")
        assert "rpc-v2" not in f.api("GET", "controller/info", auth=None)[1]["capabilities"]
        assert f.api("GET", "vms", auth=("who", "wrong"))[0] == 401  # the middleware still checks given ones
        script = {"script_content": "id -un", "env": {}}
        assert f.api("POST", "vms", vm_body("ok", startup_script=script, username="admin", password="pw-1"),
                     auth=None)[0] == 200
        assert f.api("POST", "vms", vm_body("default", startup_script=script), auth=None)[0] == 200
        vm, payloads = _wait_events(f, "ok", lambda p: "admin" in p)
        assert vm["status"] == "running" and payloads[-1] == "admin", (vm, payloads)
        assert "unable to authenticate" in f.wait_status("default", ("failed",), timeout=40)["status_message"]
        with connect("ws" + f.url[4:] + "/v1/vms/ok/port-forward?port=2222&wait=1", open_timeout=15) as ws:
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=5)
    finally:
        f.down()
