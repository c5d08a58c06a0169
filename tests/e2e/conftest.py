"""End-to-end fixtures: real `invoke` processes driving the Linux stand-in `tart`
(scripts/tart) with real OpenSSH and rsync. Needs root (namespaces, port 22)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
EXAMPLE = REPO / "examples" / "gosuite"
BASE = "tahoe-base"
PREFIX = "vmtasks-example"
# The stand-in's guest agent answers 10 s after boot by default, as the real one does. The
# suite shortens that to keep its 13 minutes; tests/e2e/test_resume_races.py runs a VM with
# the real delay, so the driver is still checked against it.
AGENT_DELAY = "TART_STANDIN_AGENT_DELAY"
SHORT_AGENT_DELAY = "0.5"


def _missing() -> List[str]:
    if os.geteuid() != 0:
        return ["root (the stand-in needs namespaces and port 22)"]
    need = {"sshd": "/usr/sbin/sshd", "rsync": None, "go": None, "unshare": None, "nsenter": None}
    return [name for name, path in need.items()
            if not (path and os.path.exists(path)) and shutil.which(name) is None]


def pytest_collection_modifyitems(config, items):
    missing = _missing()
    if not missing:
        return
    skip = pytest.mark.skip(reason="e2e needs " + ", ".join(missing) + " (bash scripts/setup.sh; run as root)")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)


class Totals:
    """What the fault matrix saw, printed at the end of the session."""

    def __init__(self) -> None:
        self.scenarios: List[str] = []
        self.vms = self.keys = self.leases = 0

    def record(self, scenario: str, vms: int, keys: int, leases: int) -> None:
        self.scenarios.append(scenario)
        self.vms += vms
        self.keys += keys
        self.leases += leases


TOTALS = Totals()


def pytest_terminal_summary(terminalreporter):
    if TOTALS.scenarios:
        terminalreporter.write_line(
            "fault matrix: {} scenarios run, {} VMs leaked, {} keys leaked, {} leases leaked".format(
                len(TOTALS.scenarios), TOTALS.vms, TOTALS.keys, TOTALS.leases))


@pytest.fixture(scope="session")
def tart_home(tmp_path_factory):
    """One TART_HOME for the session, with a base image whose guest already has Invoke
    (a "prepared image": the example's setup step then finds it and installs nothing)."""
    home = tmp_path_factory.mktemp("tart-home")
    env = dict(os.environ, TART_HOME=str(home), PATH=str(SCRIPTS) + os.pathsep + os.environ["PATH"])
    for name in list(env):
        if name.startswith("TART_STANDIN_"):
            del env[name]
    env[AGENT_DELAY] = SHORT_AGENT_DELAY
    subprocess.run(["tart", "create", BASE], env=env, check=True, timeout=60)
    run = subprocess.Popen(["tart", "run", "--no-graphics", BASE], env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        bake = "python3 -c 'import invoke' 2>/dev/null || PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install " \
               "--user --quiet --disable-pip-version-check 'invoke>=2,<3'"
        for _ in range(100):
            done = subprocess.run(["tart", "exec", BASE, "sh", "-c", bake], env=env, capture_output=True,
                                  text=True, timeout=300)
            if done.returncode == 0:
                break
            import time

            time.sleep(0.2)
        assert done.returncode == 0, done.stderr
    finally:
        subprocess.run(["tart", "stop", BASE], env=env, timeout=60)
        run.wait(timeout=60)
    yield home
    for vm in _list(env):
        subprocess.run(["tart", "stop", vm], env=env, timeout=60)
        subprocess.run(["tart", "delete", vm], env=env, timeout=60)


def _list(env) -> List[str]:
    out = subprocess.run(["tart", "list", "-q"], env=env, capture_output=True, text=True, timeout=60).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


@dataclass
class Done:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


class Env:
    """A test's world: its HOME, state dir, cwd (run records) and the shared TART_HOME."""

    def __init__(self, root: Path, tart_home: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.state = root / "state"
        self.cwd = root / "cwd"
        for d in (self.home, self.cwd):
            d.mkdir(parents=True, exist_ok=True)
        self.env: Dict[str, str] = {
            k: v for k, v in os.environ.items()
            if not (k.startswith(("OPENBOOT_", "VMTASKS_VM_", "TART_STANDIN_")) or k in ("SSH_AUTH_SOCK",
                                                                                          "VMTASKS_IN_VM"))
        }
        self.env.update(HOME=str(self.home), TART_HOME=str(tart_home), VMTASKS_STATE_DIR=str(self.state),
                        PATH=str(SCRIPTS) + os.pathsep + os.environ["PATH"], CI="true")
        self.env[AGENT_DELAY] = SHORT_AGENT_DELAY

    def invoke(self, *args: str, env: Optional[Dict[str, str]] = None, timeout: float = 300,
               config: Optional[Path] = None) -> Done:
        argv = [sys.executable, "-m", "invoke", "--search-root", str(REPO), *args]
        config = config or self.default_config()
        if args and args[0] not in ("test-vm-inner", "test-vm-inner-run"):
            argv += ["--config", str(config)]
        proc = subprocess.run(argv, cwd=str(self.cwd), env=dict(self.env, **(env or {})),
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        return Done(proc.returncode, proc.stdout, proc.stderr)

    def tart(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["tart", *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def vms(self) -> List[str]:
        return _list(self.env)

    def resume(self, vm: str, timeout: float = 60) -> None:
        """Resume a kept VM (kept VMs are suspended: they hold no slot) so a test can look
        inside with `tart exec`; the sweep or the fixture removes it afterwards."""
        with open(str(self.root / (vm + ".resume.log")), "wb") as log:
            subprocess.Popen(["tart", "run", "--no-graphics", vm], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.tart("exec", vm, "true").returncode != 0:
            assert time.monotonic() < deadline, "kept VM {} did not resume".format(vm)
            time.sleep(0.3)

    def ephemeral_vms(self) -> List[str]:
        """The run VMs with our prefix (prepared images are kept on purpose: not counted)."""
        return [vm for vm in self.vms() if vm.startswith(PREFIX + "-") and not vm.startswith(PREFIX + "-prepared-")]

    def key_dirs(self) -> List[Path]:
        keys = self.state / "keys"
        return sorted(keys.iterdir()) if keys.is_dir() else []

    def leases(self) -> List[Path]:
        leases = self.state / "leases"
        return sorted(leases.glob("*.json")) if leases.is_dir() else []

    def assert_nothing_left(self) -> None:
        assert self.ephemeral_vms() == [], "VMs leaked"
        assert self.key_dirs() == [], "key dirs leaked"
        assert self.leases() == [], "leases leaked"

    def latest_record(self) -> Path:
        return (self.root / ".vmtasks" / "runs" / "latest").resolve()

    def default_config(self) -> Path:
        """The example's config, copied beside this test's records (records belong to
        their config file's directory)."""
        path = self.root / "vm.yaml"
        if not path.exists():
            self.write_config()
        return path

    def write_config(self, name: str = "vm.yaml", **sections) -> Path:
        """The example config with some sections replaced (project_dir stays the example)."""
        import yaml

        data = yaml.safe_load((EXAMPLE / "vm.yaml").read_text())
        data["project_dir"] = str(EXAMPLE)
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = dict(data[key], **value)
            else:
                data[key] = value
        path = self.root / name
        path.write_text(yaml.safe_dump(data))
        return path


@pytest.fixture
def world(tmp_path, tart_home) -> Env:
    env = Env(tmp_path, tart_home)
    yield env
    # Whatever a failed test left, remove it so the next test starts clean.
    for vm in env.ephemeral_vms():
        env.tart("stop", vm)
        env.tart("delete", vm)


def junit_counts(path: Path) -> Dict[str, int]:
    import xml.etree.ElementTree as ET

    root = ET.parse(str(path)).getroot()
    return {k: int(root.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def junit_cases(path: Path) -> List[str]:
    import xml.etree.ElementTree as ET

    return [case.get("name") for case in ET.parse(str(path)).getroot().iter("testcase")]


def top_level_results(stream: Path) -> Dict[str, int]:
    """pass/fail/skip counts of top-level tests in one VM's raw `go test -json` stream."""
    from collections import Counter

    counts: Counter = Counter()
    for line in stream.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("Test") and "/" not in event["Test"] and \
                event.get("Action") in ("pass", "fail", "skip"):
            counts[event["Action"]] += 1
    return counts
