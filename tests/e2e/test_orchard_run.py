"""Whole `invoke test-vm` runs with ``backend: orchard`` through the controller stand-in
(scripts/orchard): real Tart stand-in guests on two workers with one VM slot each, Paramiko
and rsync through the port-forward WebSocket. Green and red runs, the pending queue, a worker
going offline mid-run, Ctrl-C, kill -9 + cleanup-orphans (and a live run's VM surviving a
concurrent one), pre-flight errors, and vm-doctor."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import yaml

from .conftest import REPO, junit_cases, junit_counts, top_level_results

pytestmark = pytest.mark.e2e

sys.path.insert(0, str(REPO / "scripts"))
from orchard_standin.harness import Fleet  # noqa: E402

EXAMPLE = REPO / "examples" / "gosuite"
UNEVEN = REPO / "examples" / "uneven"
# examples/uneven's TestWithSubtests writes its mark to ~/.uneven-ran/<Test>/<sub>, a directory
# its work() helper never creates (MkdirAll makes ~/.uneven-ran only), so the test fails on any
# backend. Until the example is fixed, the setup makes that directory (reported to the lead).
UNEVEN_SUBTEST_DIR = "mkdir -p ~/.uneven-ran/TestWithSubtests"


def EXAMPLE_VM(**keys) -> dict:  # noqa: N802 - reads as the section it returns
    """The example config's `vm:` section with ``keys`` set."""
    return dict(yaml.safe_load((EXAMPLE / "vm.yaml").read_text())["vm"], **keys)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("orchard"), workers=2,
              args=["--worker-slots", "1", "--scheduler-interval", "0.2", "--worker-offline-timeout", "1"])
    f.start()
    yield f
    f.down()


def suite_list(project: Path) -> List[str]:
    done = subprocess.run(["go", "test", "-list", ".*", "-tags=e2e,vm", "./test/e2e/..."], cwd=str(project),
                          capture_output=True, text=True, timeout=120, check=True)
    return sorted(line for line in done.stdout.splitlines() if line.startswith("Test"))


class Client:
    """One test's side of the fleet: its HOME, state dir, run records and config files."""

    def __init__(self, root: Path, fleet: Fleet) -> None:
        self.root, self.fleet = root, fleet
        self.home, self.state, self.cwd = root / "home", root / "state", root / "cwd"
        for d in (self.home, self.cwd):
            d.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("OPENBOOT_", "TART_STANDIN_", "ORCHARD_")) and k != "SSH_AUTH_SOCK"}
        self.env.update(HOME=str(self.home), VMTASKS_STATE_DIR=str(self.state), CI="true")
        self.env.update({k: v for k, v in fleet.env().items() if k != "ORCHARD_URL"})  # the account, if any

    def config(self, project: Path = EXAMPLE, name: str = "vm.yaml", url: Optional[str] = None,
               guest_env: Optional[Dict[str, str]] = None, **sections) -> Path:
        data = yaml.safe_load((project / "vm.yaml").read_text())
        data["project_dir"] = str(project)
        data["backend"] = "orchard"
        data["orchard"] = {"url": url or self.fleet.url}
        data["guest"]["env"] = dict(data["guest"].get("env") or {}, **(guest_env or {}))
        if project == UNEVEN:
            data["setup"] = list(data["setup"]) + [UNEVEN_SUBTEST_DIR]
        data.update(sections)
        path = self.root / name
        path.write_text(yaml.safe_dump(data))
        return path

    def argv(self, *args: str, config: Path) -> List[str]:
        return [sys.executable, "-m", "invoke", "--search-root", str(REPO), *args, "--config", str(config)]

    def invoke(self, *args: str, config: Path, env: Optional[Dict[str, str]] = None, timeout: float = 180):
        done = subprocess.run(self.argv(*args, config=config), cwd=str(self.cwd), env=dict(self.env, **(env or {})),
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        return done.returncode, done.stdout + done.stderr

    def invoke_with_input(self, *args: str, config: Path, text: str, timeout: float = 60):
        done = subprocess.run(self.argv(*args, config=config), cwd=str(self.cwd), env=self.env, input=text,
                              capture_output=True, text=True, timeout=timeout)
        return done.returncode, done.stdout, done.stderr

    def start(self, *args: str, config: Path) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*args, config=config), cwd=str(self.cwd), env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                stdin=subprocess.DEVNULL, start_new_session=True)

    def record(self) -> Path:
        return (self.root / ".vmtasks" / "runs" / "latest").resolve()

    def key_dirs(self) -> List[str]:
        keys = self.state / "keys"
        return sorted(p.name for p in keys.iterdir()) if keys.is_dir() else []

    def leases(self) -> List[str]:
        leases = self.state / "leases"
        return sorted(p.name for p in leases.glob("*.json")) if leases.is_dir() else []

    def assert_nothing_left(self) -> None:
        assert self.fleet.vms() == [], "VMs left on the controller"
        assert self.key_dirs() == [], "key dirs left"
        assert self.leases() == [], "leases left"
        assert self.fleet.wait_no_guests(), self.fleet.guests()


@pytest.fixture
def client(tmp_path, fleet):
    c = Client(tmp_path, fleet)
    yield c
    # Whatever a failed test left on the shared controller goes, so the next test starts clean.
    for name in fleet.vms():
        fleet.api("DELETE", "vms/" + name)
    fleet.wait_no_guests()


def wait_until(what: str, check, timeout: float = 60, proc: Optional[subprocess.Popen] = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError("the run ended before {}: {}".format(what, proc.stdout.read()))
        time.sleep(0.1)
    raise AssertionError("timed out waiting for " + what)


def started_tests(client: Client, vms: int):
    """VM names whose raw stream has a `run` event, once ``vms`` of them have one."""
    record = client.root / ".vmtasks" / "runs" / "latest"
    busy = [p.name for p in sorted(record.glob("*")) if (p / "suite-output.txt").is_file()
            and '"Action":"run"' in (p / "suite-output.txt").read_text()]
    return busy if len(busy) >= vms else None


def in_suite(client: Client):
    """True once the one-VM run's stream has a `run` event (the suite is running in the guest)."""
    stream = client.root / ".vmtasks" / "runs" / "latest" / "suite-output.txt"
    return stream.is_file() and '"Action":"run"' in stream.read_text()


# --- green, red -------------------------------------------------------------------------------------


def test_a_green_and_a_red_run_of_the_example_suite(client, fleet):
    code, text = client.invoke("test-vm", config=client.config())
    assert code == 0, text
    stages = [s["stage"] for s in json.loads((client.record() / "stages.json").read_text())]
    assert stages[:4] == ["preflight", "sweep", "list", "clone"] and stages[-1] == "teardown", stages
    assert sorted(junit_cases(client.record() / "junit.xml")) == suite_list(EXAMPLE)
    assert "orchard: " in (client.record() / "console.log").read_text()  # the VM's status changes
    client.assert_nothing_left()

    code, text = client.invoke("test-vm", config=client.config(guest_env={"GOSUITE_FAIL": "1"}))
    assert code == 1, text
    assert "TestExampleFailure" in text
    assert junit_counts(client.record() / "junit.xml")["failures"] == 1
    client.assert_nothing_left()


# --- the pending queue ---------------------------------------------------------------------------


def test_four_vms_on_two_single_slot_workers_queue_as_pending_and_run_every_test_once(client, fleet):
    code, text = client.invoke("test-vm", "--vms", "4",
                               config=client.config(UNEVEN, guest_env={"UNEVEN_SCALE": "0.3"}))
    record = client.record()
    cases = junit_cases(record / "junit.xml")
    assert sorted(cases) == suite_list(UNEVEN) and len(cases) == len(set(cases))
    vms = sorted(p.name for p in record.iterdir() if p.is_dir())
    assert len(vms) == 4, vms
    # Two VMs fit; the others wait as `pending` (saying so), and either start once a slot
    # frees up or, when the others have taken every test meanwhile, give up without
    # booting (a VM nobody needs is not started). (A third may wait a moment too: the image
    # probe's guest holds its slot while it goes.)
    # Lines name the VMs vm1 .. vm4 (the run's N-th VM, its name's -N), the full names once.
    labels = {vm: "vm" + vm.rsplit("-", 1)[1] for vm in vms}
    assert all("{} = {}".format(label, vm) in text for vm, label in labels.items()), text
    pending = [labels[vm] for vm in vms if "[{}]    waiting: pending on Orchard: position".format(labels[vm]) in text]
    assert len(pending) >= 2, text
    for vm in pending:
        waited = text.index("[{}]    waiting: pending on Orchard".format(vm))
        started = text.find("[{}]    waiting: starting on Orchard worker".format(vm), waited) > 0
        gave_up = text.find("[{}]    boot skipped".format(vm), waited) > 0 and "no tests left" in text
        assert started or gave_up, text
    ran = {vm: sum(top_level_results(record / vm / "suite-output.txt").values()) for vm in vms
           if (record / vm / "suite-output.txt").is_file()}
    assert sum(ran.values()) == len(cases), ran
    assert junit_counts(record / "junit.xml")["failures"] == 0
    client.assert_nothing_left()
    # VMs that found the queue empty (or gave up waiting) do not fail a green run.
    assert code == 0, text


# --- a worker goes offline ----------------------------------------------------------------------


def test_a_worker_going_offline_fails_its_test_and_the_rest_go_to_the_other_vm(client, fleet):
    proc = client.start("test-vm", "--vms", "2", config=client.config(UNEVEN, guest_env={"UNEVEN_SCALE": "0.6"}))
    try:
        victim, survivor = wait_until("tests on both VMs", lambda: started_tests(client, 2), proc=proc)
        worker = fleet.vm(victim)["worker"]
        fleet.worker_offline(worker)
        try:
            out, _ = proc.communicate(timeout=120)
        finally:
            fleet.worker_offline(worker, offline=False)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, out
    assert "VM lost" in out, out
    record = client.record()
    cases = junit_cases(record / "junit.xml")
    assert sorted(cases) == suite_list(UNEVEN), "every test reported once, the lost one as failed"
    counts = junit_counts(record / "junit.xml")
    assert counts["failures"] + counts["errors"] == 1, counts
    on_victim = sum(top_level_results(record / victim / "suite-output.txt").values())
    on_survivor = sum(top_level_results(record / survivor / "suite-output.txt").values())
    assert on_victim + on_survivor + 1 == len(cases), (on_victim, on_survivor)
    assert on_survivor > on_victim
    client.assert_nothing_left()


# --- signals and the sweep -----------------------------------------------------------------------------


def test_ctrl_c_leaves_nothing(client, fleet):
    proc = client.start("test-vm", "--vms", "2", config=client.config(UNEVEN, guest_env={"UNEVEN_SCALE": "1"}))
    try:
        wait_until("tests on both VMs", lambda: started_tests(client, 2), proc=proc)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out
    assert "interrupted by SIGINT" in out, out
    client.assert_nothing_left()


def test_kill_9_then_cleanup_orphans_leaves_nothing_and_spares_a_live_run(client, fleet, tmp_path):
    live = Client(tmp_path / "live", fleet)  # another checkout's run: its own state dir and records
    live_proc = live.start("test-vm", config=live.config(guest_env={"GOSUITE_SLEEP": "6"}))
    dead_proc = client.start("test-vm", config=client.config(guest_env={"GOSUITE_SLEEP": "60"}))
    try:
        wait_until("the live run's suite", lambda: in_suite(live), proc=live_proc)
        wait_until("the doomed run's suite", lambda: in_suite(client), proc=dead_proc)
        live_vm, = live.leases()
        dead_vm, = client.leases()
        live_vm, dead_vm = live_vm[:-len(".json")], dead_vm[:-len(".json")]
        os.kill(dead_proc.pid, signal.SIGKILL)
        dead_proc.wait(timeout=10)
        assert sorted(fleet.vms()) == sorted([live_vm, dead_vm])

        # From a third state dir, neither VM has a lease: the owner records decide.
        stranger = Client(tmp_path / "stranger", fleet)
        code, text = stranger.invoke("vm-doctor", config=stranger.config())
        assert code == 0 and "warn  leftovers   vm {}".format(dead_vm) in text, text
        code, text = stranger.invoke("cleanup-orphans", config=stranger.config())
        assert code == 0, text
        assert "removing vm {}".format(dead_vm) in text and "owner process {}".format(dead_proc.pid) in text, text
        assert "live (not touched): {}".format(live_vm) in text, text
        assert fleet.vms() == [live_vm]
        # From the dead run's own state dir: its lease and key go; the live VM is still not touched.
        code, text = client.invoke("cleanup-orphans", config=client.config())
        assert code == 0, text
        assert client.leases() == [] and client.key_dirs() == []
        # From the live run's own state dir: its lease says alive.
        code, text = live.invoke("cleanup-orphans", config=live.config())
        assert code == 0 and "live (not touched): {}".format(live_vm) in text, text
        assert fleet.vms() == [live_vm]
        out, _ = live_proc.communicate(timeout=120)
        assert live_proc.returncode == 0, out
    finally:
        for proc in (live_proc, dead_proc):
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever the killed run's session still had
            except ProcessLookupError:
                pass
    client.assert_nothing_left()
    live.assert_nothing_left()


# --- issue 19: vm-login on a kept Orchard VM goes through the controller -------------------------------------


def test_vm_login_on_a_kept_orchard_vm_opens_a_shell_through_the_controller(client, fleet):
    config = client.config(keep="always")
    code, text = client.invoke("test-vm", config=config)
    assert code == 0, text
    vm, = [name[:-len(".json")] for name in client.leases()]
    assert fleet.vms() == [vm]
    run_id = json.loads((client.record() / "result.json").read_text())["run_id"]
    try:
        for target in (run_id, vm):
            # Like `ssh host`, vm-login reads the session from stdin; the exit code comes home.
            code, out, err = client.invoke_with_input("vm-login", target, config=config,
                                                      text="echo login-ok-$((6 * 7)); cat .gosuite-ran/TestShellRC; "
                                                           "exit 3\n")
            assert "login-ok-42" in out, out + err
            assert "OPENBOOT_IN_VM=1" in out, "not the VM the run used: " + out + err
            assert code == 3, out + err
            assert "Traceback" not in err
    finally:
        code, text = client.invoke("cleanup-orphans", "--include-kept", config=config)
    assert code == 0, text
    client.assert_nothing_left()


# --- pre-flight errors, vm-doctor ---------------------------------------------------------------------------


def _free_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return "http://127.0.0.1:%d" % s.getsockname()[1]


def test_wrong_credentials_unreachable_controller_and_missing_image_fail_before_any_vm(client, fleet):
    log_start = os.path.getsize(fleet.log_path)
    code, text = client.invoke("test-vm", config=client.config(),
                               env={"ORCHARD_SERVICE_ACCOUNT_TOKEN": "wrong"})
    assert code == 1, text
    assert "stage 'preflight' failed" in text and fleet.url in text and "HTTP 401" in text, text
    assert "ORCHARD_SERVICE_ACCOUNT_TOKEN" in text, text

    url = _free_port_url()
    code, text = client.invoke("test-vm", config=client.config(url=url))
    assert code == 1, text
    assert "cannot reach the Orchard controller at " + url in text and "orchard.url" in text, text

    code, text = client.invoke("test-vm", "--base", "no-such-image", config=client.config())
    assert code == 1, text
    assert "image 'no-such-image' cannot be started" in text and "tart pull no-such-image" in text, text
    with open(fleet.log_path) as fh:
        fh.seek(log_start)
        log = fh.read()
    # Only the image probe was ever scheduled; no run VM (vmtasks-example-<run id>) was created.
    assert log.count("scheduled VM") == 1 and "scheduled VM vmtasks-example-probe-" in log, log
    client.assert_nothing_left()


def test_vm_doctor_checks_the_controller(client, fleet):
    code, text = client.invoke("vm-doctor", config=client.config())
    assert code == 0, text
    for line in ("ok    orchard controller " + fleet.url, "ok    orchard credentials", "ok    orchard workers 2 of 2",
                 "ok    orchard slots 2 of 2 VM slots free", "ok    leftovers   none"):
        assert line in text, text
    code, text = client.invoke("vm-doctor", config=client.config(), env={"ORCHARD_SERVICE_ACCOUNT_TOKEN": "wrong"})
    assert code == 1, text
    assert "fail  orchard credentials" in text and "ORCHARD_SERVICE_ACCOUNT_TOKEN" in text, text


# --- issue 17: the worker's password login, `orchard dev`; issue 18: teardown through a restart -------------


def test_orchard_dev_passes_preflight_and_the_startup_script_logs_in_with_vm_password(tmp_path):
    """`orchard dev` (no auth, Swagger's HTML at /v1/, RPC v1): a wrong vm.password fails the
    pre-flight probe before any run VM, never showing it; the default config (admin/admin, as
    Cirrus Labs' images) passes pre-flight despite the HTML and gives a green run."""
    fleet = Fleet(tmp_path / "orchard", workers=1, account=None,
                  args=["--dev", "--ssh-retry-delay", "0.02", "--scheduler-interval", "0.2"])
    fleet.start()
    try:
        client = Client(tmp_path / "client", fleet)  # no service account: `orchard dev` has none
        code, text = client.invoke("test-vm", config=client.config(vm=EXAMPLE_VM(password="wrong-pw-3")))
        assert code == 1, text
        assert "stage 'preflight' failed" in text and "unable to authenticate" in text, text
        assert "vm.password" in text and "wrong-pw-3" not in text, text
        scheduled = [line for line in fleet.log().splitlines() if "scheduled VM" in line]
        assert len(scheduled) == 1 and "scheduled VM vmtasks-example-probe-" in scheduled[0], scheduled

        code, text = client.invoke("test-vm", config=client.config(name="default.yaml"))
        assert code == 0, text
        client.assert_nothing_left()
        for path in (client.root / ".vmtasks").rglob("*"):  # the records never hold a password
            if path.is_file():
                assert b"wrong-pw-3" not in path.read_bytes(), path
    finally:
        fleet.down()


def test_a_controller_restart_during_the_suite_leaves_no_vm_running(client, fleet):
    """Issue 18: the controller dies mid-suite (tunnel cut, the run fails) and comes back a few
    seconds later; teardown's DELETE is retried until it answers, so the guest goes too."""
    proc = client.start("test-vm", config=client.config(guest_env={"GOSUITE_SLEEP": "60"}))
    try:
        wait_until("the suite", lambda: in_suite(client), proc=proc)
        fleet.stop(kill=True)
        time.sleep(8)  # teardown's first DELETEs meet a dead controller
        fleet.start()
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, out
    assert "teardown of" not in out, out  # it did not fail
    client.assert_nothing_left()


# --- retries -------------------------------------------------------------------------------------


def test_retries_run_on_fresh_orchard_vms(client, fleet):
    """--retries on the fleet: the polluted test ends flaky, the broken one fails on two VMs."""
    env = {"UNEVEN_SCALE": "0.05", "UNEVEN_POLLUTER": "TestShort01", "UNEVEN_POLLUTED": "TestShort02",
           "UNEVEN_FAIL": "TestShort03"}
    code, text = client.invoke("test-vm-run", "--test", "TestShort0[123]$", "--vms", "1", "--retries", "1",
                               config=client.config(UNEVEN, guest_env=env))
    assert code == 1, text
    result = json.loads((client.record() / "result.json").read_text())
    assert result["flaky_tests"] == ["TestShort02"] and result["failed_tests"] == ["TestShort03"], result
    broken = result["attempts"]["TestShort03"]
    assert [t["result"] for t in broken] == ["fail", "fail"] and broken[0]["vm"] != broken[1]["vm"]
    assert "DONE 3 tests, 1 flaky, 1 failure in" in text
    client.assert_nothing_left()


def test_isolate_and_replay_on_the_fleet(client, fleet):
    """--isolate on the fleet: every test on its own fresh Orchard VM (two workers, one slot
    each: never more than --vms at once), the polluted test passes, only the broken one
    fails. Then --replay of a shared run on the fleet reproduces the order-dependent failure."""
    env = {"UNEVEN_SCALE": "0.05", "UNEVEN_POLLUTER": "TestShort01", "UNEVEN_POLLUTED": "TestShort02",
           "UNEVEN_FAIL": "TestShort03"}
    config = client.config(UNEVEN, guest_env=env)
    code, text = client.invoke("test-vm-run", "--test", "TestShort0[123]$", "--vms", "2", "--isolate",
                               config=config, timeout=300)
    assert code == 1, text
    tests = json.loads((client.record() / "tests.json").read_text())["tests"]
    assert {t["name"]: t["status"] for t in tests} == {"TestShort01": "pass", "TestShort02": "pass",
                                                       "TestShort03": "fail"}, text
    vms = [t["vm"] for t in tests]
    assert len(set(vms)) == 3 and all(vm.rsplit("-", 1)[1].startswith("t") for vm in vms), vms
    assert "isolation: 3 tests on 3 fresh VMs" in text and "DONE 3 tests, 1 failure" in text, text
    # Never more than 2 VMs held a slot (boot to the end of teardown), from the record.
    spans: Dict[str, Dict[str, float]] = {}
    for s in json.loads((client.record() / "stages.json").read_text()):
        if s.get("vm") and s["stage"] == "boot":
            spans.setdefault(s["vm"], {})["boot"] = s["started"]
        elif s.get("vm") and s["stage"] == "teardown":
            spans.setdefault(s["vm"], {})["end"] = s["started"] + s["seconds"]
    edges = sorted([(v["boot"], 1) for v in spans.values()] + [(v["end"], -1) for v in spans.values()])
    running = [sum(step for _, step in edges[:i + 1]) for i in range(len(edges))]
    assert max(running) <= 2, spans
    client.assert_nothing_left()

    code, text = client.invoke("test-vm-run", "--test", "TestShort0[12]$", "--vms", "1", config=config, timeout=300)
    assert code == 1 and "TestShort02" in text, text
    run_id = client.record().name
    code, text = client.invoke("test-vm", "--replay", run_id, config=config, timeout=300)
    assert code == 1, text
    assert "replay of {} (2 tests, the same order); reproduced: TestShort02".format(run_id) in text, text
    tests = json.loads((client.record() / "tests.json").read_text())["tests"]
    assert [t["name"] for t in sorted(tests, key=lambda t: t["started"] or 0)] == ["TestShort01", "TestShort02"]
    client.assert_nothing_left()
