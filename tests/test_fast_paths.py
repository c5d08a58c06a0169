"""What keeps a run's own overhead small (see scripts/bench.py): fast first polls, one
`tart list` per run, Nagle off on the SSH socket."""

from __future__ import annotations

import itertools
import socket

from conftest import FakeRunner, ok, tart_list_json

from vmtasks.backends.tart import machine as run_mod
from vmtasks.backends.tart.cli import Tart
from vmtasks.guest import config
from vmtasks.state import sweep
from vmtasks.state.ledger import Ledger
from vmtasks.transport import ssh


def test_backoff_starts_at_20ms_and_doubles_up_to_poll():
    assert list(itertools.islice(run_mod.backoff(0.2), 6)) == [0.02, 0.04, 0.08, 0.16, 0.2, 0.2]
    assert list(itertools.islice(run_mod.backoff(1.0), 8))[-1] == 1.0
    assert list(itertools.islice(run_mod.backoff(0.01), 3)) == [0.01, 0.01, 0.01]


def test_the_sweep_reuses_preflights_tart_list(tmp_path, monkeypatch):
    monkeypatch.setattr(run_mod, "which", lambda name: "/usr/bin/" + name)
    runner = FakeRunner({"list": ok(tart_list_json({"Name": "tahoe-base"}, {"Name": "p-orphan"}))})
    tart = Tart(runner)
    ledger = Ledger(tmp_path / "state")
    cfg = config.load(None, environ={}, cwd=tmp_path)
    listed = run_mod.TartBackend(tart).preflight(cfg.vm.base)
    assert [vm.name for vm in listed] == ["tahoe-base", "p-orphan"]

    plan = sweep.plan(tart, ledger, "p", listed=listed, include_unleased=True)
    assert [(a.kind, a.name) for a in plan.actions] == [("vm", "p-orphan")]
    assert [c[1] for c in runner.calls] == ["list"]
    sweep.plan(tart, ledger, "p")  # on its own (cleanup-orphans) it lists for itself
    assert [c[1] for c in runner.calls] == ["list", "list"]


def test_the_ssh_socket_has_nagle_off(monkeypatch):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    monkeypatch.setattr(ssh, "SSH_PORT", server.getsockname()[1])
    try:
        sock = ssh.nodelay_socket("127.0.0.1", timeout=5)
        try:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        finally:
            sock.close()
    finally:
        server.close()
