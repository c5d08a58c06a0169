"""The exact `tart` commands the driver issues, through an injected fake runner."""

import pytest
from conftest import FakeRunner, fail, ok, tart_list_json

from vmtasks.backends.tart.cli import Tart, TartError


def test_list_parses_json_and_keeps_local_vms():
    runner = FakeRunner({"list": ok(tart_list_json(
        {"Name": "tahoe-base"}, {"Name": "openboot-ephemeral-1", "Running": True, "State": "running"},
        {"Name": "ghcr.io/cirruslabs/tahoe-base:latest", "Source": "OCI"}))})
    vms = Tart(runner).list()
    assert runner.calls == [["tart", "list", "--format", "json"]]
    assert [(v.name, v.running) for v in vms] == [("tahoe-base", False), ("openboot-ephemeral-1", True)]


def test_list_garbage_is_a_clear_error():
    with pytest.raises(TartError, match="unparseable"):
        Tart(FakeRunner({"list": ok("not json")})).list()


def test_clone_set_run_argv():
    runner = FakeRunner()
    tart = Tart(runner)
    tart.clone("tahoe-base", "vm-1", timeout=10)
    tart.set("vm-1", cpu=4, memory=8192, random_mac=True)
    tart.set("vm-1")  # nothing to set: no command
    assert runner.calls == [
        ["tart", "clone", "tahoe-base", "vm-1"],
        ["tart", "set", "vm-1", "--cpu", "4", "--memory", "8192", "--random-mac"],
    ]
    assert tart.run_argv("vm-1") == ["tart", "run", "--no-graphics", "vm-1"]


def test_clone_failure_raises_with_stderr():
    with pytest.raises(TartError) as err:
        Tart(FakeRunner({"clone": fail(1, "no space left on device")})).clone("b", "v", timeout=5)
    assert "no space left" in err.value.message and err.value.returncode == 1


def test_ip_none_while_not_ready():
    assert Tart(FakeRunner({"ip": fail(1, "no IP address found, is your VM running?")})).ip("v") is None
    runner = FakeRunner({"ip": ok("192.168.64.5\n")})
    assert Tart(runner).ip("v") == "192.168.64.5"
    assert runner.calls == [["tart", "ip", "v"]]


def test_exec_without_and_with_stdin():
    runner = FakeRunner({"exec": ok("hi\n")})
    tart = Tart(runner)
    tart.exec("v", ["sh", "-c", "echo hi; exit 3", "arg0"])
    tart.exec("v", ["cat"], stdin="data")
    assert runner.calls[0] == ["tart", "exec", "v", "sh", "-c", "echo hi; exit 3", "arg0"]
    assert runner.calls[1] == ["tart", "exec", "-i", "v", "cat"]
    assert runner.inputs == [None, "data"]
    assert "-t" not in runner.calls[0]  # -t crashes tart when stdout is not a terminal


def test_agent_not_ready_detection():
    tart = Tart(FakeRunner({"exec": fail(1, "Failed to connect to the VM using its control socket: "
                                           "x, is the Tart Guest Agent running?")}))
    assert Tart.agent_not_ready(tart.exec("v", ["true"]))
    other = Tart(FakeRunner({"exec": fail(1, "permission denied")})).exec("v", ["true"])
    assert not Tart.agent_not_ready(other)


def test_stop_and_delete_exit_codes():
    runner = FakeRunner({"stop": fail(2, 'VM "v" is not running'),
                         "delete": fail(2, 'the specified VM "v" does not exist')})
    tart = Tart(runner)
    assert tart.stop("v", timeout=7) is False
    assert tart.delete("v") is False
    assert runner.calls == [["tart", "stop", "--timeout", "7", "v"], ["tart", "delete", "v"]]
    assert Tart(FakeRunner()).stop("v") is True
    with pytest.raises(TartError, match="is running"):
        Tart(FakeRunner({"delete": fail(1, 'VM "v" is running')})).delete("v")
