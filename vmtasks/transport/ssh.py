"""SSH: the run's ephemeral key, the one Fabric Connection factory, host-key pinning.

Only the run's own key is ever offered: no agent, no ``~/.ssh`` keys, no ``~/.ssh/config``.
An agent offering many keys (1Password, gpg-agent) would exhaust the guest's MaxAuthTries
before the real key is tried. The guest's host key seen at first connect is pinned in a
per-run known_hosts file, which rsync's ssh uses too; the user's known_hosts is never read
or written.
"""

from __future__ import annotations

import codecs
import os
import shlex
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

from vmtasks.guest.atomic import write_hint
from vmtasks.guest.errors import Cancelled, RemoteTimeout, SshError, StateError

SSH_PORT = 22


@dataclass(frozen=True)
class RunKey:
    """A run's key material: private key (0600) in its own 0700 directory."""

    dir: Path
    private: Path
    public_line: str
    known_hosts: Path


def generate_key(key_dir: Path, comment: str) -> RunKey:
    """Generate an ED25519 key pair in-process (no ssh-keygen argv, no passphrase prompt).
    A full or unwritable state dir is a ``StateError`` that says what to do."""
    try:
        return _generate_key(key_dir, comment)
    except OSError as exc:
        raise StateError("cannot write the run's SSH key in {}: {}".format(key_dir, exc.strerror or exc),
                         write_hint(exc)) from None


def _generate_key(key_dir: Path, comment: str) -> RunKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(key_dir, 0o700)
    key = Ed25519PrivateKey.generate()
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    private = key_dir / "id_ed25519"
    # Create with 0600 from the start: the secret is never world-readable, even briefly.
    fd = os.open(str(private), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_bytes)
    public_line = public.decode() + " " + comment
    (key_dir / "id_ed25519.pub").write_text(public_line + "\n")
    known_hosts = key_dir / "known_hosts"
    known_hosts.touch(mode=0o600)
    return RunKey(key_dir, private, public_line, known_hosts)


def sshd_banner(host: str, timeout: float = 2.0) -> bool:
    """True when something answers on port 22 with an SSH banner (sshd is accepting)."""
    try:
        with socket.create_connection((host, SSH_PORT), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def _pinning_policy(known_hosts: Path):
    import paramiko

    class PinFirstSeen(paramiko.MissingHostKeyPolicy):
        """Trust the key seen on first contact and pin it in the run's known_hosts file.
        Later connects load that file and reject any other key."""

        def missing_host_key(self, client, hostname, key):  # noqa: D401 - paramiko API
            client.get_host_keys().add(hostname, key.get_name(), key)
            with open(known_hosts, "a") as fh:
                fh.write("{} {} {}\n".format(hostname, key.get_name(), key.get_base64()))

    return PinFirstSeen()


def nodelay_socket(host: str, timeout: float) -> socket.socket:
    """A TCP connection to sshd with Nagle's algorithm off. Paramiko leaves it on, so each
    small request that follows another unanswered one (key exchange, auth, channel open,
    exec) waits for the peer's delayed ACK: about 40 ms per round trip."""
    sock = socket.create_connection((host, SSH_PORT), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def connect(host: str, user: str, key: RunKey, connect_timeout: float = 10, sock=None):
    """The one Fabric Connection factory (open it with ``with``). ``sock``: an already
    connected socket to use (see nodelay_socket) instead of letting paramiko open one."""
    import paramiko
    from fabric import Config, Connection

    conn = Connection(
        host,
        user=user,
        port=SSH_PORT,
        connect_timeout=max(1, int(connect_timeout)),
        config=Config(overrides={"load_ssh_configs": False, "run": {"echo": False}}),
        connect_kwargs={
            "key_filename": [str(key.private)],
            "allow_agent": False,
            "look_for_keys": False,
            "banner_timeout": connect_timeout,
            "auth_timeout": connect_timeout,
            **({"sock": sock} if sock is not None else {}),
        },
    )
    if key.known_hosts.stat().st_size:
        conn.client.get_host_keys().load(str(key.known_hosts))
        conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    else:
        conn.client.set_missing_host_key_policy(_pinning_policy(key.known_hosts))
    return conn


def open_when_ready(open_socket: Callable[[float], socket.socket], host: str, user: str, key: RunKey,
                    deadline: float, poll: float, cancel=None):
    """Open a Connection over ``open_socket(timeout)`` (the backend's stream to port 22),
    retrying until ``deadline`` (time.monotonic()) while sshd is not accepting or the key is
    not authorized yet. Returns the open Connection; raises SshError at the deadline."""
    last_error: Optional[BaseException] = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SshError("SSH login as {}@{} did not succeed within the deadline: {}".format(
                user, host, describe(last_error)),
                "check that the key reached the guest's ~/.ssh/authorized_keys and that sshd allows keys")
        timeout = min(10, max(1, remaining))
        sock = conn = None
        try:
            sock = open_socket(timeout)
            conn = connect(host, user, key, connect_timeout=timeout, sock=sock)
            conn.open()
            # Notice a dead guest within a minute even if no FIN/RST ever arrives.
            conn.client.get_transport().set_keepalive(15)
            return conn
        except Exception as exc:  # paramiko auth/socket errors: retry until the deadline
            last_error = exc
            if conn is not None:
                conn.close()
            if sock is not None:
                sock.close()
            if "Host key for server" in str(exc) or type(exc).__name__ == "BadHostKeyException":
                raise SshError("the guest's SSH host key changed during the run ({})".format(exc),
                               "another machine answered at the VM's address: check for a stale DHCP lease "
                               "(vm.random_mac: true)") from None
        if cancel is not None and cancel.wait(min(poll, max(0, deadline - time.monotonic()))):
            raise Cancelled("the run is stopping")
        elif cancel is None:
            time.sleep(min(poll, max(0, deadline - time.monotonic())))


def describe(exc: Optional[BaseException]) -> str:
    if exc is None:
        return "no attempt finished"
    return "{}: {}".format(type(exc).__name__, exc) if str(exc) else type(exc).__name__


def ssh_options(key: RunKey, connect_timeout: int = 10, proxy_command: Optional[str] = None) -> List[str]:
    """OpenSSH client options equivalent to the Connection factory (used by rsync)."""
    options = [
        "-F", "/dev/null",  # never read ~/.ssh/config
        "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none",
        "-o", "IdentityFile=" + str(key.private),
        "-o", "UserKnownHostsFile=" + str(key.known_hosts),
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes",
        "-o", "PasswordAuthentication=no",
        "-o", "ConnectTimeout={}".format(connect_timeout),
        "-o", "LogLevel=ERROR",
    ]
    if proxy_command:
        options += ["-o", "ProxyCommand=" + proxy_command]
    return options


def attach_command(host: str, user: str, key: RunKey, proxy_command: Optional[str] = None) -> str:
    """The exact command a person can paste to attach to a kept VM."""
    return "ssh " + " ".join(shlex.quote(a) for a in ssh_options(key, proxy_command=proxy_command)) + \
        " " + shlex.quote(user + "@" + host)


@dataclass(frozen=True)
class RemoteResult:
    command: str
    exit_code: int  # -1: the session ended without an exit status (lost connection, crash)
    output: str  # the last TAIL_BYTES of the output: the whole of it goes to on_output


TAIL_BYTES = 64 * 1024


def remote_exec(conn, command: str, *, timeout: Optional[float] = None, on_output=None,
                stdin: Optional[bytes] = None, cancel=None) -> RemoteResult:
    """Run ``command`` (a shell command line) on the Connection's existing SSH transport.

    We drive the channel ourselves rather than through ``Connection.run``, for two measured
    reasons: ``run`` keeps every byte of output in memory for its Result (200 MB of guest
    output took 1.1 GB of host memory), and it blocks with no way to stop it from another
    thread (our signal handling lives in the main thread; VMs run in worker threads and
    stop through ``cancel``). stdout and stderr are merged, decoded, and handed to
    ``on_output(text)`` as they arrive; only a bounded tail is kept. No secret ever appears
    in ``command``.
    """
    try:
        chan = conn.client.get_transport().open_session()
    except Exception as exc:  # paramiko.SSHException, EOFError, OSError
        raise SshError("cannot open an SSH session: {}".format(describe(exc)),
                       "the guest may have crashed or dropped the connection; see the VM console") from None
    chan.set_combine_stderr(True)
    chan.settimeout(0.2)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    kept: List[str] = []
    kept_size = 0
    started = time.monotonic()

    def deliver(text: str) -> None:
        nonlocal kept_size
        kept.append(text)
        kept_size += len(text)
        while kept_size > TAIL_BYTES and len(kept) > 1:
            kept_size -= len(kept.pop(0))
        if on_output is not None and text:
            on_output(text)

    try:
        chan.exec_command(command)
        if stdin is not None:
            chan.sendall(stdin)
        chan.shutdown_write()
        while True:
            try:
                data = chan.recv(65536)
            except socket.timeout:
                data = None
            if data:
                deliver(decoder.decode(data))
            elif data == b"" and chan.exit_status_ready():
                break
            elif data == b"":
                if chan.closed or not conn.client.get_transport().is_active():
                    break
                # EOF came before the exit status: wake as soon as the status arrives.
                chan.status_event.wait(0.01)
            if timeout is not None and time.monotonic() - started > timeout:
                raise RemoteTimeout(command, timeout, "".join(kept)[-4096:])
            if cancel is not None and cancel.is_set():
                raise Cancelled("the run is stopping")
        rest = decoder.decode(b"", final=True)
        if rest:
            deliver(rest)
        code = chan.recv_exit_status() if chan.exit_status_ready() else -1
        return RemoteResult(command, code, "".join(kept)[-TAIL_BYTES:])
    except (RemoteTimeout, SshError, Cancelled):
        raise
    except Exception as exc:
        raise SshError("the SSH session broke: {}".format(describe(exc)),
                       "the guest may have crashed or dropped the connection; see the VM console") from None
    finally:
        chan.close()
