"""The stand-in's guests: run/stop lifecycle, exec, SSH and rsync, isolation, teardown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from .conftest import SSH_OPTS, inject_key, processes_of, ssh, sshd_processes, wait_until

pytestmark = pytest.mark.standin

def gone(tart, name: str, timeout: float = 5) -> bool:
    config = tart.sshd_config(name)
    return wait_until(lambda: not sshd_processes(config) and not tart.running(name), timeout)


def test_run_blocks_until_stop_and_leaves_nothing(tart, base):
    tart.ok("clone", base, "vm")
    run = tart.start("vm")
    assert run.ip.startswith("127.") and run.ip != "127.0.0.1"
    assert sshd_processes(tart.sshd_config("vm"))  # a real sshd, on the VM's own config
    time.sleep(0.3)
    assert run.proc.poll() is None  # foreground until stopped
    row = {r["Name"]: r for r in json.loads(tart.ok("list", "--format", "json"))}["vm"]
    assert (row["Running"], row["State"]) == (True, "running")
    info = json.loads(tart.ok("get", "vm", "--format", "json"))
    assert (info["Running"], info["State"]) == (True, "running")
    assert tart.ok("ip", "vm") == run.ip + "\n"

    again = tart("run", "--no-graphics", "vm")
    assert (again.returncode, again.stderr) == (2, 'VM "vm" is already running!\n')
    delete = tart("delete", "vm")
    assert (delete.returncode, delete.stderr) == (1, 'VM "vm" is running\n')

    stop = tart("stop", "vm")
    assert (stop.returncode, stop.stdout, stop.stderr) == (0, "", "")
    assert run.wait() == 0 and "Stopping VM..." in run.stdout
    assert gone(tart, "vm", timeout=0.5)  # `tart stop` returns once the guest is gone
    assert not (tart.home / "vms" / "vm" / "standin" / "run").exists()

    second = tart.start("vm")  # runs again, on the same address (stable per name)
    assert second.ip == run.ip
    tart.ok("stop", "vm")
    assert second.wait() == 0
    assert tart.ok("delete", "vm") == ""


def test_sigint_to_run_stops_the_vm(tart, base):
    run = tart.start(base)
    run.proc.send_signal(signal.SIGINT)
    assert run.wait() == 0
    assert run.stdout == "Stopping VM...\n"
    assert gone(tart, base, timeout=0.5)


def test_sigkill_of_run_takes_the_guest_down(tart, base):
    run = tart.start(base)
    config = tart.sshd_config(base)
    assert sshd_processes(config)
    run.proc.kill()
    run.wait()
    assert gone(tart, base, timeout=3), sshd_processes(config)
    assert wait_until(lambda: not processes_of(tart.home), 3), processes_of(tart.home)
    again = tart.start(base)  # the lock is not stale
    assert tart.ok("stop", base) == ""
    assert again.wait() == 0


def test_stop_timeout_sigkills_an_unresponsive_run(tart, base):
    run = tart.start(base)
    os.kill(run.proc.pid, signal.SIGSTOP)  # SIGINT cannot be handled now
    started = time.monotonic()
    stop = tart("stop", "--timeout", "1", base)
    assert (stop.returncode, stop.stderr) == (0, "")
    assert 0.9 <= time.monotonic() - started < 5
    assert run.wait() == -signal.SIGKILL
    assert gone(tart, base, timeout=0.5)


def test_exec_contract(tart, base):
    tart.start(base, ssh=False)
    assert tart.exec_ok(base, "id", "-un") == "admin\n"
    assert tart.exec_ok(base, "id", "-u") == "501\n"
    assert tart.exec_ok(base, "pwd") == "/Users/admin\n"
    assert tart.exec_ok(base, "hostname") == base + "\n"
    env = dict(line.split("=", 1) for line in tart.exec_ok(base, "env").splitlines())
    assert env == {"PATH": "/bin:/usr/bin:/usr/sbin:/usr/local/bin:/opt/homebrew/bin",
                   "HOME": "/Users/admin", "USER": "admin", "LOGNAME": "admin"}
    assert tart.exec_ok(base, "echo", "$HOME", "a  b", "*") == "$HOME a  b *\n"  # no shell
    assert tart.exec_ok(base, "ls", "-A", "/Users/admin") == ""  # fresh image: no .ssh
    assert tart.exec_ok(base, "sh", "-c", "cat; echo end", input="ignored\n") == "end\n"  # no -i
    piped = tart("exec", "-i", base, "sh", "-c", "tr a-z A-Z", input="hello\n")
    assert (piped.returncode, piped.stdout) == (0, "HELLO\n")
    code = tart("exec", base, "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (code.returncode, code.stdout, code.stderr) == (7, "out\n", "err\n")
    killed = tart("exec", base, "sh", "-c", "kill -9 $$")
    assert killed.returncode == 255
    missing = tart("exec", base, "no-such-command")
    assert missing.returncode == 127 and "no-such-command" in missing.stderr
    # the guest has its own PID namespace: its init is PID 1 and no host process is visible
    assert tart.exec_ok(base, "cat", "/proc/1/comm") == "tart-vm-init\n"
    assert len(tart.exec_ok(base, "ps", "-eo", "pid").split()) < 10  # header, init, sshd, ps
    tty = tart("exec", "-t", base, "true")  # -t without a terminal crashes, as in Tart
    assert tty.returncode != 0 and "Fatal error" in tty.stderr


def test_only_the_injected_key_logs_in(tart, base, keypair, tmp_path):
    tart.ok("clone", base, "ssh-vm")
    run = tart.start("ssh-vm")
    key, public = keypair("run")
    other, _ = keypair("other")
    known = tmp_path / "known_hosts"

    before = ssh(run.ip, key, known, "true")
    assert before.returncode == 255 and "Permission denied" in before.stderr  # no key yet
    inject_key(tart, "ssh-vm", public)
    done = ssh(run.ip, key, known, "id -un; hostname; pwd")
    assert (done.returncode, done.stdout) == (0, "admin\nssh-vm\n/Users/admin\n"), done.stderr
    code = ssh(run.ip, key, known, "exit 5")
    assert code.returncode == 5

    wrong = ssh(run.ip, other, known, "true")
    assert wrong.returncode == 255 and "Permission denied" in wrong.stderr
    password = ssh(run.ip, None, known, "true", opts=[
        "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "BatchMode=yes",
        "-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password,keyboard-interactive"])
    assert password.returncode == 255 and "Permission denied (publickey)" in password.stderr

    # An agent offering several keys first exhausts MaxAuthTries, as against a real Mac...
    agent = subprocess.run(["ssh-agent", "-s"], capture_output=True, text=True, check=True).stdout
    sock = agent.split("SSH_AUTH_SOCK=")[1].split(";")[0]
    agent_pid = int(agent.split("SSH_AGENT_PID=")[1].split(";")[0])
    try:
        env = dict(os.environ, SSH_AUTH_SOCK=sock)
        for i in range(4):
            decoy, _ = keypair("decoy%d" % i)
            subprocess.run(["ssh-add", "-q", str(decoy)], env=env, check=True, capture_output=True)
        flooded = ssh(run.ip, key, known, "true", opts=[
            "-o", "IdentityAgent=" + sock, "-o", "BatchMode=yes"])
        assert flooded.returncode == 255
        assert "Too many authentication failures" in flooded.stderr or "Permission denied" in flooded.stderr
        # ...while offering only the run's key works
        only = ssh(run.ip, key, known, "true", opts=SSH_OPTS)
        assert only.returncode == 0, only.stderr
    finally:
        os.kill(agent_pid, signal.SIGTERM)

    # rsync over SSH, both ways
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "file.txt").write_text("payload\n")
    rsh = "ssh " + " ".join(SSH_OPTS) + " -o UserKnownHostsFile=%s -i %s" % (known, key)
    push = subprocess.run(["rsync", "-az", "--delete", "-e", rsh, str(src) + "/",
                           "admin@%s:/Users/admin/openboot/" % run.ip], capture_output=True, text=True)
    assert push.returncode == 0, push.stderr
    assert tart.exec_ok("ssh-vm", "cat", "/Users/admin/openboot/sub/file.txt") == "payload\n"
    back = tmp_path / "back"
    pull = subprocess.run(["rsync", "-az", "-e", rsh, "admin@%s:/Users/admin/openboot/" % run.ip,
                           str(back) + "/"], capture_output=True, text=True)
    assert pull.returncode == 0 and (back / "sub" / "file.txt").read_text() == "payload\n"


def test_guests_are_isolated_and_homes_persist(tart, base):
    tart.ok("clone", base, "a")
    tart.ok("clone", base, "b")
    a, b = tart.start("a", ssh=False), tart.start("b", ssh=False)
    assert a.ip != b.ip
    marker = "standin-isolation-%d" % os.getpid()
    tart.exec_ok("a", "sh", "-c", "echo a > ~/%s && echo a > /tmp/%s && echo a > /var/tmp/%s"
                 % (marker, marker, marker))
    assert tart.exec_ok("a", "cat", "/Users/admin/" + marker) == "a\n"
    check = "ls -A ~ /tmp /var/tmp /dev/shm"
    assert marker not in tart.exec_ok("b", "sh", "-c", check)
    for host_dir in ("/tmp", "/var/tmp", os.path.expanduser("~"), "/Users"):
        assert not os.path.exists(os.path.join(host_dir, marker)), host_dir
    assert os.listdir("/Users") == []  # only a mount point on the host
    assert tart.exec_ok("a", "hostname") == "a\n" and tart.exec_ok("b", "hostname") == "b\n"
    # sshd of guest b is not visible from guest a (own PID namespace)
    assert tart.sshd_config("b") not in tart.exec_ok("a", "ps", "-eo", "args")
    # a guest cannot write outside its home and private dirs
    denied = tart("exec", "a", "touch", "/etc/standin-denied")
    assert denied.returncode != 0 and not os.path.exists("/etc/standin-denied")

    tart.ok("stop", "a")
    a.wait()
    tart.ok("clone", "a", "a2")  # the home is part of the VM: clones carry it
    a2 = tart.start("a2", ssh=False)
    assert tart.exec_ok("a2", "cat", "/Users/admin/" + marker) == "a\n"
    assert tart("exec", "a2", "test", "-e", "/tmp/" + marker).returncode == 1  # /tmp is not kept
    tart.ok("stop", "a2")
    tart.ok("stop", "b")
    a2.wait()
    b.wait()


def test_host_sshd_on_all_addresses_is_detected(tart, base):
    """In a private network namespace, something listening on 0.0.0.0:22 (like Debian's
    default sshd) makes `tart run` fail with a message saying how to fix it."""
    listener = ("import os, socket; s = socket.socket(); s.bind(('0.0.0.0', 22)); s.listen(); "
                "os.set_inheritable(s.fileno(), True); "
                "os.execvp('tart', ['tart', 'run', '--no-graphics', %r])" % base)
    done = subprocess.run(["unshare", "--net", "--", "sh", "-c",
                           'ip link set lo up && exec "$0" -c "$1"', "python3", listener],
                          env=tart.env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "listens on 0.0.0.0:22" in done.stderr and "ListenAddress" in done.stderr
    assert not tart.running(base)
