"""ssh.remote_exec's control flow: a cancelled run stops a remote command as ``Cancelled``
(recognised by its class), never as a broken session."""

from __future__ import annotations

import socket
import threading
import types

import pytest

from vmtasks.guest.errors import Cancelled, SshError
from vmtasks.transport import ssh


class Channel:
    """A session whose command prints one line and then never ends."""

    def __init__(self, on_recv=None):
        self.sent, self.on_recv, self.closed = [], on_recv, False

    def set_combine_stderr(self, value):
        pass

    def settimeout(self, value):
        pass

    def exec_command(self, command):
        self.command = command

    def shutdown_write(self):
        pass

    def recv(self, size):
        if self.on_recv is not None:
            self.on_recv()
        raise socket.timeout()

    def exit_status_ready(self):
        return False

    def close(self):
        self.closed = True


def connection(channel):
    transport = types.SimpleNamespace(open_session=lambda: channel, is_active=lambda: True)
    return types.SimpleNamespace(client=types.SimpleNamespace(get_transport=lambda: transport))


def test_a_cancel_stops_a_remote_command_as_cancelled():
    cancel = threading.Event()
    channel = Channel(on_recv=cancel.set)
    with pytest.raises(Cancelled):
        ssh.remote_exec(connection(channel), "sleep 1000", timeout=30, cancel=cancel)
    assert channel.closed


def test_a_cancelled_from_a_callback_is_not_a_broken_session():
    """A Cancelled raised anywhere under the session (here: by the output callback) keeps
    its class; any other exception is a broken session (SshError)."""

    class Cancelling(Channel):
        def recv(self, size):
            return b"line\n"

    def stop(text):
        raise Cancelled("the run is stopping")

    with pytest.raises(Cancelled):
        ssh.remote_exec(connection(Cancelling()), "true", timeout=30, on_output=stop)

    def crash(text):
        raise OSError("pipe broke")

    with pytest.raises(SshError, match="the SSH session broke"):
        ssh.remote_exec(connection(Cancelling()), "true", timeout=30, on_output=crash)
