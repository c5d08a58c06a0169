"""The stand-in's CLI contract without a running guest: layout, output formats, errors."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time

import pytest

from .conftest import TART

pytestmark = pytest.mark.standin

LIST_KEYS = {"Source", "Name", "Disk", "Size", "Accessed", "Running", "State"}
GET_KEYS = {"OS", "CPU", "Memory", "Disk", "DiskFormat", "Size", "Display", "Running", "State"}


def test_create_makes_tart_layout_with_empty_home(tart):
    assert tart.ok("create", "tahoe-base") == ""
    vm = tart.home / "vms" / "tahoe-base"
    assert {"config.json", "disk.img", "nvram.bin", "standin"} <= set(os.listdir(vm))
    disk = os.stat(vm / "disk.img")
    assert disk.st_size == 50 * 1000 ** 3 and disk.st_blocks * 512 < 1024 ** 2  # sparse
    config = json.loads((vm / "config.json").read_text())
    assert config["os"] == "darwin" and config["cpuCount"] == 4 and config["memorySize"] == 8 * 1024 ** 3
    home = os.stat(vm / "standin" / "home")
    assert (home.st_uid, home.st_gid, stat.S_IMODE(home.st_mode)) == (501, 501, 0o750)
    assert os.listdir(vm / "standin" / "home") == []  # no .ssh: nothing can log in yet
    key = vm / "standin" / "ssh_host_ed25519_key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert tart.ok("create", "--linux", "--disk-size", "20", "small") == ""  # --linux ignored
    assert os.stat(tart.home / "vms" / "small" / "disk.img").st_size == 20 * 1000 ** 3


def test_list_formats(tart, base):
    assert tart.ok("list", "--format", "json", "--source", "oci") == "[]\n"
    tart.ok("clone", base, "a-clone")
    rows = json.loads(tart.ok("list", "--format", "json"))
    assert [r["Name"] for r in rows] == ["a-clone", "base"]
    for row in rows:
        assert set(row) == LIST_KEYS
        assert row["Source"] == "local" and row["Running"] is False and row["State"] == "stopped"
        assert isinstance(row["Disk"], int) and isinstance(row["Size"], int) and row["Disk"] == 50
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row["Accessed"])
    assert tart.ok("list", "-q") == "a-clone\nbase\n"
    assert tart.ok("list", "--quiet", "--source", "local") == "a-clone\nbase\n"
    text = tart.ok("list").splitlines()
    assert text[0].split() == ["Source", "Name", "Disk", "Size", "Accessed", "State"]
    assert text[1].split()[:4] == ["local", "a-clone", "50", "0"] and text[1].split()[-1] == "stopped"
    bad = tart("list", "--source", "s3")
    assert bad.returncode == 64 and "Error: 's3' is not a valid <source>" in bad.stderr
    assert "Usage: tart list" in bad.stderr and bad.stdout == ""


def test_get_json_and_text(tart, base):
    info = json.loads(tart.ok("get", base, "--format", "json"))
    assert set(info) == GET_KEYS
    assert info["OS"] == "darwin" and info["CPU"] == 4 and info["Memory"] == 8192
    assert info["Disk"] == 50 and info["DiskFormat"] == "raw" and info["Display"] == "1024x768"
    assert isinstance(info["Size"], str) and re.fullmatch(r"\d+\.\d{3}", info["Size"])
    assert info["Running"] is False and info["State"] == "stopped"
    lines = tart.ok("get", base).splitlines()
    assert lines[0].split() == ["OS", "CPU", "Memory", "Disk", "DiskFormat", "Size", "Display", "State"]
    missing = tart("get", "nope", "--format", "json")
    assert (missing.returncode, missing.stderr) == (2, 'the specified VM "nope" does not exist\n')


def test_set_is_silent_and_takes_effect(tart, base):
    mac = json.loads((tart.home / "vms" / base / "config.json").read_text())["macAddress"]
    assert tart.ok("set", base, "--cpu", "6", "--memory", "16384", "--random-mac",
                   "--disk-size", "80", "--display", "1920x1080") == ""
    info = json.loads(tart.ok("get", base, "--format", "json"))
    assert (info["CPU"], info["Memory"], info["Disk"], info["Display"]) == (6, 16384, 80, "1920x1080")
    assert json.loads((tart.home / "vms" / base / "config.json").read_text())["macAddress"] != mac
    shrink = tart("set", base, "--disk-size", "10")
    assert shrink.returncode == 1
    assert shrink.stderr == "new disk size of 10 GB should be larger than the current disk size of 80 GB\n"
    few = tart("set", base, "--cpu", "1")
    assert few.returncode == 1 and few.stderr.startswith("Error: ")
    assert tart("set", "nope", "--cpu", "4").returncode == 2


def test_clone_copies_replaces_and_validates(tart, base):
    home = tart.home / "vms" / base / "standin" / "home"
    (home / "marker").write_text("from base")
    assert tart.ok("clone", base, "c1") == ""
    c1 = tart.home / "vms" / "c1"
    assert (c1 / "standin" / "home" / "marker").read_text() == "from base"
    assert os.stat(c1 / "disk.img").st_blocks * 512 < 1024 ** 2  # stays sparse
    config = lambda vm: json.loads((tart.home / "vms" / vm / "config.json").read_text())  # noqa: E731
    assert config("c1")["macAddress"] != config(base)["macAddress"]
    tart.ok("set", "c1", "--cpu", "8")
    (c1 / "standin" / "home" / "extra").write_text("x")
    assert tart.ok("clone", base, "c1") == ""  # an existing target is silently replaced
    assert config("c1")["cpuCount"] == 4 and not (c1 / "standin" / "home" / "extra").exists()

    slash = tart("clone", base, "a/b")
    assert slash.returncode == 64
    assert slash.stderr.startswith("Error: <new-name> should be a local name\nUsage: tart clone")
    missing = tart("clone", "nope", "c2")
    assert (missing.returncode, missing.stderr) == (2, 'the specified VM "nope" does not exist\n')
    oci = tart("clone", "ghcr.io/cirruslabs/macos-tahoe-base:latest", "c3")
    assert oci.returncode == 1 and "tart create" in oci.stderr
    assert tart.ok("list", "-q").split() == ["base", "c1"]


def test_clone_is_fast(tart, base):
    started = time.monotonic()
    tart.ok("clone", base, "fast")
    assert time.monotonic() - started < 1.0


def test_delete(tart, base):
    for name in ("d1", "d2", "d3"):
        tart.ok("clone", base, name)
    assert tart.ok("delete", "d1", "d2") == ""
    stop_at_first = tart("delete", "d3", "nope", "base")
    assert (stop_at_first.returncode, stop_at_first.stderr) == (2, 'the specified VM "nope" does not exist\n')
    assert tart.ok("list", "-q").split() == ["base"]


def test_errors_for_a_missing_vm(tart):
    run = tart("run", "--no-graphics", "MISSING")
    assert (run.returncode, run.stderr) == (1, 'Error: the specified VM "MISSING" does not exist\n')
    for args in (["ip", "MISSING"], ["exec", "MISSING", "true"], ["stop", "MISSING"],
                 ["get", "MISSING"], ["set", "MISSING", "--cpu", "4"], ["delete", "MISSING"]):
        done = tart(*args)
        assert (done.returncode, done.stderr) == (2, 'the specified VM "MISSING" does not exist\n'), args
        assert done.stdout == ""


def test_errors_for_a_stopped_vm(tart, base):
    ip = tart("ip", base)
    assert (ip.returncode, ip.stdout, ip.stderr) == (1, "", "no IP address found, is your VM running?\n")
    started = time.monotonic()
    waited = tart("ip", "--wait", "1", base)
    assert waited.returncode == 1 and time.monotonic() - started >= 0.9
    agent = tart("ip", "--resolver", "agent", base)
    assert agent.returncode == 1 and "Guest agent for Tart" in agent.stderr
    for args in (["exec", base, "true"], ["stop", base], ["stop", "-t", "3", base]):
        done = tart(*args)
        assert (done.returncode, done.stderr) == (2, 'VM "base" is not running\n'), args


@pytest.mark.parametrize("args,message", [
    (["list", "--bogus"], "Error: Unknown option '--bogus'"),
    (["clone", "base"], "Error: Missing expected argument '<new-name>'"),
    (["ip", "base", "--wait", "soon"], "Error: The value 'soon' is invalid for '--wait <wait>'"),
    (["ip", "base", "--resolver", "mdns"], "Error: The value 'mdns' is invalid for '--resolver <resolver>'"),
    (["stop", "base", "-t"], "Error: Missing value for '--timeout <timeout>'"),
    (["get", "base", "extra"], "Error: Unexpected argument 'extra'"),
    (["exec", "base"], "Error: Missing expected argument '<command> ...'"),
    (["delete"], "Error: Missing expected argument '<name> ...'"),
    (["frobnicate"], "Error: Unexpected argument 'frobnicate'"),
])
def test_bad_arguments_exit_64_with_usage(tart, base, args, message):
    done = tart(*args)
    assert done.returncode == 64 and done.stdout == ""
    assert done.stderr.startswith(message) and "\nUsage: tart" in done.stderr


def test_unsupported_subcommand_says_so(tart):
    done = tart("pull", "ghcr.io/cirruslabs/macos-tahoe-base:latest")
    assert done.returncode == 1 and "not available in the Linux stand-in" in done.stderr


def test_version_names_the_stand_in(tart):
    assert "standin" in tart.ok("--version")


def test_refuses_to_run_without_root(tart, base):
    done = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                           sys.executable, str(TART), "list"],
                          env=tart.env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "must run as root" in done.stderr


def test_fail_knob_fails_named_subcommands_without_acting(tart, base):
    env = {"TART_STANDIN_FAIL": "clone, delete"}
    clone = tart("clone", base, "never", env=env)
    assert clone.returncode == 1 and "simulated failure" in clone.stderr and clone.stdout == ""
    delete = tart("delete", base, env=env)
    assert delete.returncode == 1
    assert tart.ok("list", "-q", env=env).split() == ["base"]  # list is not named: works


def test_log_knob_records_every_invocation(tart, tmp_path):
    log = tmp_path / "tart.jsonl"
    env = {"TART_STANDIN_LOG": str(log)}
    tart("create", "logged", env=env)
    tart("get", "nope", env=env)
    tart("list", "--bogus", env=env)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["argv"] for r in records] == [["tart", "create", "logged"], ["tart", "get", "nope"],
                                            ["tart", "list", "--bogus"]]
    assert [r["exit"] for r in records] == [0, 2, 64]
    for record in records:
        assert isinstance(record["pid"], int) and re.match(r"\d{4}-\d\d-\d\dT", record["time"])
