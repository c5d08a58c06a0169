"""`tart exec`: run a command in the guest as admin (the Tart Guest Agent's job).

The command joins the guest's PID, mount and UTS namespaces (setns), drops to the
guest user and is exec'ed directly (no shell). The exit code passes through.
"""

import os
import resource
import select
import signal
import sys
import time

from . import linux, storage
from .errors import TartError, VMNotRunning

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
RESET = FORWARDED + (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD)


def agent_error(detail):
    return TartError("Failed to connect to the VM using its control socket: %s, "
                     "is the Tart Guest Agent running?" % detail)


def simulated_tty_crash():
    # Real `tart exec -t` crashes (a Swift try! on the terminal size) when stdout is not a
    # terminal; the stand-in dies the same way so that drivers notice the mistake.
    sys.stderr.write("Fatal error: 'try!' expression unexpectedly raised an error: "
                     "standard output is not a terminal (tart exec -t; simulated crash of "
                     "the Linux stand-in)\n")
    sys.stderr.flush()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGTRAP, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTRAP)
    time.sleep(1)
    raise SystemExit(133)


def cmd_exec(args):
    vm = storage.open_vm(args.name)
    if not vm.running_pid():
        raise VMNotRunning(args.name)
    if args.tty and not os.isatty(1):
        simulated_tty_crash()
    state, _ = vm.read_runtime()
    if not state:
        raise agent_error("connection refused (the VM is still starting)")
    if time.monotonic() < state["agent_at"]:
        # Tart's gRPC channel pool keeps trying to connect to the agent's control socket for
        # a while (about 10 s) before it gives up: wait for the agent that long, no longer.
        from .guest import knob_seconds

        wait = knob_seconds("TART_STANDIN_AGENT_CONNECT_WAIT", 10.0)
        give_up = time.monotonic() + wait
        while time.monotonic() < min(state["agent_at"], give_up):
            if not vm.running_pid():
                raise VMNotRunning(args.name)
            time.sleep(max(0.001, min(0.05, min(state["agent_at"], give_up) - time.monotonic())))
        if time.monotonic() < state["agent_at"]:
            raise agent_error("connection refused (the guest agent is not up yet)")

    init_pid = state["init_pid"]
    try:
        ns = {name: os.open("/proc/%d/ns/%s" % (init_pid, name), os.O_RDONLY | os.O_CLOEXEC)
              for name in ("pid", "mnt", "uts")}
    except OSError:
        raise VMNotRunning(args.name) from None
    if linux.proc_starttime(init_pid) != state["init_starttime"]:
        raise VMNotRunning(args.name)

    uid, gid, home, user = state["uid"], state["gid"], state["home"], state["user"]
    env = {"PATH": state["path"], "HOME": home, "USER": user, "LOGNAME": user}
    if args.tty and os.environ.get("TERM"):
        env["TERM"] = os.environ["TERM"]
    command = args.command

    try:
        linux.setns(ns["pid"], linux.CLONE_NEWPID)  # applies to our next child
    except OSError as exc:
        raise VMNotRunning(args.name) from exc
    alive_r, alive_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    try:
        child = os.fork()
    except OSError as exc:  # the namespace's init is gone
        raise VMNotRunning(args.name) from exc
    if child == 0:
        code = 126
        try:
            os.close(alive_w)
            linux.setns(ns["mnt"], linux.CLONE_NEWNS)
            linux.setns(ns["uts"], linux.CLONE_NEWUTS)
            os.chdir(home)
            os.setgroups([gid])
            os.setgid(gid)
            os.setuid(uid)
            linux.set_pdeathsig(signal.SIGKILL)  # after setuid, which clears it
            if select.select([alive_r], [], [], 0)[0]:
                os._exit(255)  # `tart exec` already gone
            os.close(alive_r)
            if not args.interactive:
                null = os.open("/dev/null", os.O_RDONLY)
                os.dup2(null, 0)
                os.close(null)
            os.umask(0o022)
            for sig in RESET:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            code = 127
            os.execvpe(command[0], command, env)
        except FileNotFoundError as exc:
            if code == 127:
                sys.stderr.write("tart exec: %s: command not found\n" % command[0])
            else:
                sys.stderr.write("tart exec: %s\n" % exc)
        except PermissionError as exc:
            code = 126
            sys.stderr.write("tart exec: %s: %s\n" % (command[0], exc.strerror))
        except BaseException as exc:  # noqa: BLE001 - report anything, never return
            code = 126
            sys.stderr.write("tart exec: cannot run %s: %s\n" % (command[0], exc))
        finally:
            try:
                sys.stderr.flush()
            finally:
                os._exit(code)

    os.close(alive_r)
    for fd in ns.values():
        os.close(fd)

    def forward(signum, _frame):
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    os.close(alive_w)
    if os.WIFSIGNALED(status):
        return 255
    return os.WEXITSTATUS(status)
