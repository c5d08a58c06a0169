"""Shared fixtures. Autouse isolation: HOME, ~/.ssh, TART_HOME, the ledger's state dir and
the VMTASKS_VM_* (and OPENBOOT_VM_*) knobs are the test's own, so a developer's real setup
never leaks into a test and a test never touches it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

from vmtasks.transport.proc import Result

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items):
    """Everything under tests/e2e and tests/standin boots real guests: it is ``e2e``, so the
    fast command (``pytest -m "not e2e"``) runs exactly the tests that boot nothing."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        if ("e2e" in parts or "standin" in parts) and item.get_closest_marker("e2e") is None:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TART_HOME", str(home / ".tart"))
    monkeypatch.setenv("VMTASKS_STATE_DIR", str(home / "state"))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    for name in list(os.environ):
        if name.startswith(("OPENBOOT_VM_", "VMTASKS_VM_", "TART_STANDIN_")) or name in ("OPENBOOT_IN_VM",
                                                                                        "VMTASKS_IN_VM"):
            monkeypatch.delenv(name, raising=False)
    return home


class FakeRunner:
    """Records every argv; answers from ``responses`` keyed by the tart subcommand."""

    def __init__(self, responses: Optional[Dict[str, Callable[[List[str]], Result]]] = None) -> None:
        self.calls: List[List[str]] = []
        self.inputs: List[Optional[str]] = []
        self.responses = responses or {}

    def run(self, argv, *, timeout=None, input=None, **kwargs) -> Result:
        argv = list(argv)
        self.calls.append(argv)
        self.inputs.append(input)
        sub = argv[1] if len(argv) > 1 else ""
        handler = self.responses.get(sub)
        if handler is None:
            return Result(argv, 0, "", "")
        return handler(argv)

    def spawn(self, argv, log):
        self.calls.append(list(argv))
        raise AssertionError("spawn not expected in this test")


def ok(stdout: str = "") -> Callable[[List[str]], Result]:
    return lambda argv: Result(argv, 0, stdout, "")


def fail(code: int, stderr: str) -> Callable[[List[str]], Result]:
    return lambda argv: Result(argv, code, "", stderr)


def tart_list_json(*vms: dict) -> str:
    rows = []
    for vm in vms:
        row = {"Source": "local", "Disk": 50, "Size": 20, "Accessed": "2026-11-25T00:00:00Z",
               "Running": False, "State": "stopped"}
        row.update(vm)
        rows.append(row)
    return json.dumps(rows)


@pytest.fixture
def fake_runner():
    return FakeRunner()
