"""Prepared images: identity, hash, names, listings, records, the build lock, disk use.

Unit tests go through a fake runner; the last test drives the real Linux stand-in."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, FakeRunner, fail, ok, tart_list_json

from vmtasks.backends.tart import images as tart_images
from vmtasks.backends.tart.cli import Tart
from vmtasks.guest.errors import PreflightError, StateError
from vmtasks.lifecycle import images
from vmtasks.transport.proc import Runner

PREFIX = "openboot-ephemeral"
GET_JSON = json.dumps({"OS": "darwin", "CPU": 4, "Memory": 8192, "Disk": 50, "DiskFormat": "raw",
                       "Size": "21.042", "Display": "1024x768", "Running": False, "State": "stopped"})


def identity(**changes):
    base = {"name": "tahoe-base", "OS": "darwin", "Disk": 50, "DiskFormat": "raw", "Size": "21.042",
            "CPU": 4, "Memory": 8192}
    base.update(changes)
    return base


INPUTS = dict(identity=identity(), setup=["mise install go@latest", "pip install invoke"],
              prepare=["go mod download"], bundle_digest="0123abcd4567")


# --- identity and hash ----------------------------------------------------------------

def test_base_identity_from_tart_get():
    runner = FakeRunner({"get": ok(GET_JSON)})
    found = tart_images.base_identity(Tart(runner), "tahoe-base")
    assert runner.calls == [["tart", "get", "tahoe-base", "--format", "json"]]
    assert found == identity()
    # what changes with use, not content, is left out
    for key in ("Running", "State", "Display", "Accessed"):
        assert key not in found


def test_base_identity_ignores_running_and_state():
    running = json.dumps(dict(json.loads(GET_JSON), Running=True, State="running"))
    assert tart_images.base_identity(Tart(FakeRunner({"get": ok(running)})), "tahoe-base") == identity()


def test_base_identity_of_a_missing_or_remote_base():
    missing = Tart(FakeRunner({"get": fail(2, 'the specified VM "nope" does not exist')}))
    with pytest.raises(PreflightError) as err:
        tart_images.base_identity(missing, "nope")
    assert "nope" in err.value.message and "tart clone" in err.value.hint
    digest = "ghcr.io/cirruslabs/macos-tahoe-base@sha256:" + "a" * 64
    assert tart_images.base_identity(missing, digest) == {"name": digest}


def test_image_hash_is_short_hex_and_stable():
    first = images.image_hash(**INPUTS)
    assert len(first) == images.HASH_LENGTH and int(first, 16) >= 0
    assert images.image_hash(**INPUTS) == first
    reordered = dict(reversed(list(identity().items())))  # key order does not matter
    assert images.image_hash(**dict(INPUTS, identity=reordered)) == first
    # a literal value, computed once: the hash must not depend on the process (no hash())
    done = subprocess.run([sys.executable, "-c",
                           "import json, sys; from vmtasks.lifecycle import images; "
                           "print(images.image_hash(**json.loads(sys.argv[1])))", json.dumps(INPUTS)],
                          cwd=str(REPO), capture_output=True, text=True,
                          env=dict(os.environ, PYTHONHASHSEED="123"))
    assert done.stdout.strip() == first, done.stderr


@pytest.mark.parametrize("change", [
    dict(identity=identity(Size="21.043")),
    dict(identity=identity(name="sequoia-base")),
    dict(identity=identity(Disk=80)),
    dict(identity=identity(CPU=8)),
    dict(setup=["mise install go@1.23", "pip install invoke"]),
    dict(setup=["pip install invoke", "mise install go@latest"]),  # order matters
    dict(setup=["mise install go@latest"]),
    dict(prepare=[]),
    dict(bundle_digest="0123abcd4568"),
    dict(version=images.FORMAT_VERSION + 1),
])
def test_any_input_change_changes_the_hash(change):
    assert images.image_hash(**dict(INPUTS, **change)) != images.image_hash(**INPUTS)


def test_moving_a_step_between_setup_and_prepare_changes_the_hash():
    moved = dict(INPUTS, setup=INPUTS["setup"] + ["go mod download"], prepare=[])
    assert images.image_hash(**moved) != images.image_hash(**INPUTS)


def inputs(**change):
    args = dict(INPUTS, **change)
    return images.image_inputs(args.pop("identity"), **args)


def test_explain_change_names_the_input():
    old = inputs()
    assert images.explain_change(old, inputs()) == "no input changed"
    assert images.explain_change(None, inputs()) == "no earlier prepared image is recorded"
    assert images.explain_change(old, inputs(setup=["mise install go@1.23", "pip install invoke"])) == \
        "setup step 1 changed: 'mise install go@latest' -> 'mise install go@1.23'"
    assert images.explain_change(old, inputs(prepare=["go mod download", "go build ./..."])) == \
        "prepare step 2 added: 'go build ./...'"
    assert images.explain_change(old, inputs(prepare=[])) == "prepare step 1 removed: 'go mod download'"
    assert images.explain_change(old, inputs(identity=identity(Size="22.000"))) == \
        "the base image tahoe-base changed (Size 21.042 -> 22.000)"
    assert images.explain_change(old, inputs(identity=identity(name="sequoia-base"))) == \
        "the base image changed (tahoe-base -> sequoia-base)"
    assert images.explain_change(old, inputs(bundle_digest="ffff")) == \
        "the guest tool bundle changed (0123abcd4567 -> ffff)"
    both = images.explain_change(old, inputs(version=9, bundle_digest="ffff"))
    assert both.startswith("the image format version changed (1 -> 9); ") and "tool bundle" in both


def tar_gz(members, mtime):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_bundle_digest_covers_contents_not_dates_nor_config():
    files = {"tasks.py": b"ns = 1\n", "vmtasks/a.py": b"x = 1\n", "config.json": b'{"test": "A"}'}
    first = images.bundle_digest(tar_gz(files, mtime=1))
    assert images.bundle_digest(tar_gz(files, mtime=2)) == first
    assert images.bundle_digest(tar_gz(dict(files, **{"config.json": b'{"test": "B"}'}), 3)) == first
    assert images.bundle_digest(tar_gz(dict(files, **{"vmtasks/a.py": b"x = 2\n"}), 1)) != first
    assert images.bundle_digest(tar_gz(dict(files, **{"vmtasks/b.py": b""}), 1)) != first
    assert images.bundle_digest(tar_gz(files, 1), exclude=()) != first


def test_bundle_digest_of_the_real_tool_bundle_is_stable():
    from vmtasks.guest.config import Config
    from vmtasks.lifecycle.vm import tool_bundle

    first = images.bundle_digest(tool_bundle(Config()))
    time.sleep(1.1)  # tool_bundle stamps config.json with the current time
    assert images.bundle_digest(tool_bundle(Config())) == first


# --- names and listings ---------------------------------------------------------------

H1, H2, H3 = "0123456789ab", "ba9876543210", "00000000ffff"


def test_names_and_parsers():
    assert images.prepared_name(PREFIX, H1) == "openboot-ephemeral-prepared-0123456789ab"
    assert images.prepared_name(PREFIX, H1, slot=2) == "openboot-ephemeral-prepared-0123456789ab-s2"
    assert images.building_name(PREFIX, H1) == "openboot-ephemeral-building-0123456789ab"
    assert images.building_name(PREFIX, H1, 1) == "openboot-ephemeral-building-0123456789ab-s1"
    for slot in (None, 1, 12):
        assert images.parse_prepared(PREFIX, images.prepared_name(PREFIX, H1, slot)) == \
            images.ImageName(images.PREPARED, H1, slot)
        assert images.parse_building(PREFIX, images.building_name(PREFIX, H1, slot)) == \
            images.ImageName(images.BUILDING, H1, slot)
    for name in ("openboot-ephemeral-20261201-abc", "openboot-ephemeral-prepared-0123",
                 "openboot-ephemeral-prepared-0123456789ab-s0", "openboot-ephemeral-prepared-0123456789ab-x",
                 "openboot-ephemeral-prepared-0123456789AB", "other-prepared-0123456789ab",
                 "openboot-ephemeral-building-0123456789ab"):
        assert images.parse_prepared(PREFIX, name) is None, name
    assert images.parse_building(PREFIX, images.prepared_name(PREFIX, H1)) is None
    # a prefix that is the start of another prefix does not claim its images
    assert images.parse_prepared("openboot", images.prepared_name(PREFIX, H1)) is None
    with pytest.raises(ValueError):
        images.prepared_name(PREFIX, "not-a-hash")
    with pytest.raises(ValueError):
        images.building_name(PREFIX, H1, slot=0)


def listing():
    names = [images.prepared_name(PREFIX, H1), images.prepared_name(PREFIX, H1, 1),
             images.prepared_name(PREFIX, H2), images.prepared_name(PREFIX, H2, 1),
             images.prepared_name("other", H3), images.building_name(PREFIX, H1, 2),
             images.building_name(PREFIX, H3), "openboot-ephemeral-20261201-abc", "tahoe-base"]
    rows = [{"Name": n} for n in names]
    rows[1].update(State="suspended")
    rows.append({"Name": images.prepared_name(PREFIX, H3), "Source": "OCI"})  # not local: dropped
    return Tart(FakeRunner({"list": ok(tart_list_json(*rows))})).list()


def test_find_prepared():
    vms = listing()
    assert images.find_prepared(vms, PREFIX, H1).name == images.prepared_name(PREFIX, H1)
    slot = images.find_prepared(vms, PREFIX, H1, slot=1)
    assert (slot.name, slot.state) == (images.prepared_name(PREFIX, H1, 1), "suspended")
    assert images.find_prepared(vms, PREFIX, H1, slot=2) is None  # only a build of it exists
    assert images.find_prepared(vms, PREFIX, H3) is None  # other prefix / OCI only
    assert images.find_prepared([v.name for v in vms], PREFIX, H2) == images.prepared_name(PREFIX, H2)


def test_stale_images_keep_every_image_of_the_current_hash():
    vms = listing()
    assert [v.name for v in images.stale_images(vms, PREFIX, H1)] == [
        images.prepared_name(PREFIX, H2), images.prepared_name(PREFIX, H2, 1)]
    assert [v.name for v in images.stale_images(vms, PREFIX, H2)] == [
        images.prepared_name(PREFIX, H1), images.prepared_name(PREFIX, H1, 1)]
    assert len(images.stale_images(vms, PREFIX, H3)) == 4  # a hash nobody built: all four go
    assert images.stale_images(vms, "nobody", H1) == []


def test_leftover_builds_and_prepared_images():
    vms = listing()
    assert [v.name for v in images.leftover_builds(vms, PREFIX)] == [
        images.building_name(PREFIX, H1, 2), images.building_name(PREFIX, H3)]
    found = images.prepared_images(vms, PREFIX)
    assert [(p.hash, p.slot, p.state) for p in found] == [
        (H1, None, "stopped"), (H1, 1, "suspended"), (H2, None, "stopped"), (H2, 1, "stopped")]


# --- records ----------------------------------------------------------------------------

def test_records_store_inputs_and_explain_the_latest(tmp_path):
    old, new = inputs(), inputs(setup=["mise install go@1.23", "pip install invoke"])
    old_name = images.prepared_name(PREFIX, images.hash_inputs(old))
    assert images.load_record(tmp_path, old_name) is None and images.latest_record(tmp_path, PREFIX) is None
    saved = images.save_record(tmp_path, old_name, old, run_id="20261201-aaaa")
    assert saved["hash"] == images.image_hash(**INPUTS)
    assert images.load_record(tmp_path, old_name)["inputs"] == old
    assert json.loads((tmp_path / "images" / (old_name + ".json")).read_text())["built_by"] == "20261201-aaaa"
    time.sleep(0.01)
    images.save_record(tmp_path, images.prepared_name(PREFIX, images.hash_inputs(new), 1), new)
    images.save_record(tmp_path, images.prepared_name("other", H3), old)  # other prefix: ignored
    latest = images.latest_record(tmp_path, PREFIX)
    assert latest["inputs"] == new
    assert "setup step 1 changed" in images.explain_change(images.load_record(tmp_path, old_name)["inputs"],
                                                           latest["inputs"])
    (tmp_path / "images" / "broken.json").write_text("{")
    assert images.load_record(tmp_path, "broken") is None
    images.remove_record(tmp_path, old_name)
    images.remove_record(tmp_path, old_name)  # twice is fine
    assert images.load_record(tmp_path, old_name) is None


def test_save_record_failure_is_a_state_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StateError):
        images.save_record(blocker, "x", inputs())


# --- the build lock ---------------------------------------------------------------------

def test_build_lock_serialises_and_tells_the_waiter(tmp_path):
    messages, order = [], []
    first = images.BuildLock(tmp_path, H1, image="img-1", run_id="run-A")
    first.acquire()
    assert images.BuildLock.holder(tmp_path, H1)["run_id"] == "run-A"

    def second():
        with images.BuildLock(tmp_path, H1, image="img-1", run_id="run-B", on_wait=messages.append):
            order.append("B")

    thread = threading.Thread(target=second)
    thread.start()
    deadline = time.monotonic() + 5
    while not messages and time.monotonic() < deadline:
        time.sleep(0.01)
    assert messages == ["waiting for run run-A (pid {}) to finish building image img-1".format(os.getpid())]
    assert order == []  # still waiting
    order.append("A")
    first.release()
    thread.join(5)
    assert order == ["A", "B"] and len(messages) == 1  # said once
    assert images.BuildLock.holder(tmp_path, H1) is None
    with images.BuildLock(tmp_path, H2, on_wait=messages.append):  # another hash: no wait
        pass
    assert len(messages) == 1


def test_build_lock_timeout_says_who_holds_it(tmp_path):
    with images.BuildLock(tmp_path, H1, image="img-1", run_id="run-A"):
        with pytest.raises(StateError) as err:
            images.BuildLock(tmp_path, H1, timeout=0.3).acquire()
    assert "gave up after 0.3s waiting for run run-A" in err.value.message
    assert "kill {}".format(os.getpid()) in err.value.hint


def test_build_lock_of_a_killed_process_is_free(tmp_path):
    code = ("import sys, time; sys.path.insert(0, {!r}); from vmtasks.lifecycle import images; "
            "lock = images.BuildLock({!r}, {!r}, run_id='doomed'); lock.acquire(); "
            "print('locked', flush=True); time.sleep(60)").format(str(REPO), str(tmp_path), H1)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert images.BuildLock.holder(tmp_path, H1)["run_id"] == "doomed"
        with pytest.raises(StateError):
            images.BuildLock(tmp_path, H1, timeout=0.2).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
    assert images.BuildLock.holder(tmp_path, H1) is None
    with images.BuildLock(tmp_path, H1, timeout=1) as lock:
        assert lock.waited < 1


def test_abandoned_builds_are_those_without_a_live_builder(tmp_path):
    vms = listing()  # builds of H1 (slot 2) and H3
    with images.BuildLock(tmp_path, H1, run_id="live"):
        assert [v.name for v in images.abandoned_builds(vms, PREFIX, tmp_path)] == [
            images.building_name(PREFIX, H3)]
    assert len(images.abandoned_builds(vms, PREFIX, tmp_path)) == 2


def test_build_lock_file_removed_by_its_holder_is_not_split(tmp_path):
    first = images.BuildLock(tmp_path, H1, run_id="A")
    first.acquire()
    waiter = images.BuildLock(tmp_path, H1, run_id="B", timeout=5)
    thread = threading.Thread(target=waiter.acquire)
    thread.start()
    time.sleep(0.3)  # B now waits on the file A holds
    first.path.unlink()  # e.g. a clean-up removing a stale hash's lock while holding it
    first.release()
    thread.join(5)
    assert waiter.fd is not None
    third = images.BuildLock(tmp_path, H1, timeout=0.3)
    with pytest.raises(StateError):  # B holds the file now at the path, not an orphaned inode
        third.acquire()
    waiter.release()


# --- disk use ---------------------------------------------------------------------------

def test_disk_use(tmp_path):
    suspended = json.dumps(dict(json.loads(GET_JSON), State="suspended"))
    tart = Tart(FakeRunner({"get": ok(suspended)}))
    home = tmp_path / "tart-home"
    (home / "vms" / "img").mkdir(parents=True)
    (home / "vms" / "img" / "state.vzvmsave").write_bytes(b"x" * 3_000_000)
    use = tart_images.disk_use(tart, "img", tart_home=home)
    assert (use.name, use.size_gb, use.disk_gb, use.state) == ("img", 21.042, 50, "suspended")
    assert 0.002 < use.saved_state_gb < 0.004 and use.total_gb == pytest.approx(21.042 + use.saved_state_gb)
    assert tart_images.disk_use(tart, "other", tart_home=home).saved_state_gb == 0
    assert tart_images.disk_use(Tart(FakeRunner({"get": fail(2, "does not exist")})), "gone") is None


# --- against the real stand-in ----------------------------------------------------------

def _standin_missing():
    if os.geteuid() != 0:
        return "root"
    if not os.access("/usr/sbin/sshd", os.X_OK):
        return "/usr/sbin/sshd"
    return None


class StandinVm:
    """`tart run` of the stand-in, started the way the driver does (own session, log file)."""

    def __init__(self, tart: Tart, env, name: str, log: Path, suspendable: bool = False) -> None:
        self.name, self.log = name, log
        argv = ["tart", "run", "--no-graphics"] + (["--suspendable"] if suspendable else []) + [name]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.tart = tart

    def wait_agent(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while True:
            # `tart exec` tries the agent about 10 s before it fails (the stand-in as Tart)
            result = self.tart.exec(self.name, ["true"], timeout=30)
            if result.ok:
                return
            assert self.proc.poll() is None, self.output
            assert time.monotonic() < deadline, result.stderr
            time.sleep(0.05)

    @property
    def output(self) -> str:
        return self.log.read_text()


@pytest.mark.e2e
@pytest.mark.skipif(_standin_missing() is not None, reason="needs the stand-in's {}".format(_standin_missing()))
def test_prepared_image_cycle_through_the_stand_in(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TART_STANDIN_")}
    env.update(TART_HOME=str(tmp_path / "tart-home"), PATH=str(REPO / "scripts") + os.pathsep + env["PATH"])
    runner = Runner(env=env)
    tart = Tart(runner)
    run = lambda *argv: runner.run(["tart", *argv], timeout=60)  # noqa: E731  (not in the driver yet)
    vms = []
    try:
        assert run("create", "base").ok
        ident = tart_images.base_identity(tart, "base")
        tart.clone("base", "scratch", timeout=60)  # a clone bumps Accessed, not the identity
        assert tart_images.base_identity(tart, "base") == ident
        h = images.image_hash(ident, ["echo setup"], [], "bundle")

        # build under the temporary name, suspended for slot 1
        building = images.building_name(PREFIX, h, slot=1)
        tart.clone("base", building, timeout=60)
        vm = StandinVm(tart, env, building, tmp_path / "build.log", suspendable=True)
        vms.append(vm)
        vm.wait_agent()
        assert tart.exec(building, ["sh", "-c", "echo prepared > ~/marker"]).ok
        assert run("suspend", building).ok
        assert vm.proc.wait(15) == 0, vm.output
        listed = tart.list()
        assert [v.name for v in images.leftover_builds(listed, PREFIX)] == [building]
        assert images.find_prepared(listed, PREFIX, h, slot=1) is None  # not finished: not found

        # promote it: now it is found, suspended, and the build is no longer left over
        prepared = images.prepared_name(PREFIX, h, slot=1)
        assert run("rename", building, prepared).ok
        listed = tart.list()
        found = images.find_prepared(listed, PREFIX, h, slot=1)
        assert (found.name, found.state) == (prepared, "suspended")
        assert images.leftover_builds(listed, PREFIX) == []
        assert images.stale_images(listed, PREFIX, h) == []
        assert [v.name for v in images.stale_images(listed, PREFIX, "f" * 12)] == [prepared]
        use = tart_images.disk_use(tart, prepared)
        assert use.state == "suspended" and use.saved_state_gb >= 0

        # a run's clone resumes, with the file written during the build
        tart.clone(prepared, "run-1", timeout=60)
        assert tart.get("run-1")["State"] == "suspended"
        vm = StandinVm(tart, env, "run-1", tmp_path / "run-1.log")
        vms.append(vm)
        vm.wait_agent()
        assert "resuming VM..." in vm.output
        assert tart.exec("run-1", ["cat", "marker"]).stdout == "prepared\n"
        assert tart.stop("run-1")
        assert vm.proc.wait(15) == 0

        # a new MAC: the saved state no longer restores (Tart: exit 1); stop drops it; cold boot
        tart.clone(prepared, "run-2", timeout=60)
        tart.set("run-2", random_mac=True)
        vm = StandinVm(tart, env, "run-2", tmp_path / "run-2.log")
        assert vm.proc.wait(30) == 1 and "failed to restore" in vm.output
        assert tart.get("run-2")["State"] == "suspended"
        assert tart.stop("run-2")  # discards the saved state
        vm = StandinVm(tart, env, "run-2", tmp_path / "run-2b.log")
        vms.append(vm)
        vm.wait_agent()
        assert "restoring" not in vm.output
        assert tart.exec("run-2", ["cat", "marker"]).stdout == "prepared\n"

        assert tart.stop("run-2")
        vms[-1].proc.wait(15)

        # the base's content changes (a boot that writes 3 MB): so do its identity and the hash
        vm = StandinVm(tart, env, "base", tmp_path / "base.log")
        vms.append(vm)
        vm.wait_agent()
        assert tart.exec("base", ["dd", "if=/dev/urandom", "of=blob", "bs=1M", "count=3"]).ok
        assert tart.stop("base")
        vm.proc.wait(15)
        changed = tart_images.base_identity(tart, "base")
        assert changed["Size"] != ident["Size"]
        assert images.image_hash(changed, ["echo setup"], [], "bundle") != h
    finally:
        for vm in vms:
            if vm.proc.poll() is None:
                tart.stop(vm.name, timeout=5)
                vm.proc.wait(15)
        names = [v.name for v in tart.list()]
        for name in names:
            tart.delete(name)
        shutil.rmtree(str(tmp_path / "tart-home"), ignore_errors=True)
