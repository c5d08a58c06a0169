"""The host-side lifecycle of one ephemeral VM run.

``VmRun`` owns all of its state (VM name, key, Connection, ``tart run`` process, lease,
record), so one invocation can later drive several at once. Teardown is in ``finally`` and
runs on every exit path: success, failure, exception, and SIGINT/SIGTERM/SIGHUP.
"""

from __future__ import annotations

import io
import secrets
import shlex
import shutil
import subprocess
import tarfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

from . import results, ssh, sync
from .config import Config
from .errors import Interrupted, PreflightError, StageError, TartError, VmtasksError
from .ledger import Ledger, Lease
from .proc import CommandTimeout, Runner, output_text, tail, tail_file, which
from .records import RunRecord
from .signals import SignalGuard, TeardownAbandoned
from .tart import INSTALL_HINT, Tart, VmInfo
from .ui import Ui

LIMIT_MESSAGE = "exceeds the system limit"
TOOL_ROOT = Path(__file__).resolve().parent.parent


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def backoff(poll: float, first: float = 0.02) -> Iterator[float]:
    """Polling intervals: 20 ms at first, doubling up to ``poll``. A guest that is up within
    moments is noticed within moments; a slow boot still sees one poll per ``poll`` seconds."""
    delay = min(first, poll)
    while True:
        yield delay
        delay = min(delay * 2, poll)


@dataclass(frozen=True)
class RunRequest:
    """What the user asked for, on top of the config."""

    test: Optional[str] = None  # a go test -run regex; None runs the whole suite
    json_output: bool = True


def preflight(cfg: Config, tart: Tart, ledger: Ledger) -> List[VmInfo]:
    """Checks that create no state: tools on PATH, base image present, state dir writable.
    Returns the `tart list` it read (the orphan sweep reuses it: one `tart list` per run)."""
    missing = [tool for tool in ("tart", "rsync", "ssh") if which(tool) is None]
    if missing:
        hint = INSTALL_HINT if "tart" in missing else "install them (macOS: brew install rsync; Debian: apt-get install rsync openssh-client)"
        raise PreflightError("not found on PATH: " + ", ".join(missing), hint)
    vms = tart.list()
    names = {vm.name for vm in vms}
    if cfg.vm.base not in names:
        raise PreflightError(
            "base image '{}' is not in `tart list`".format(cfg.vm.base),
            "one-time setup: tart pull ghcr.io/cirruslabs/tahoe-base:latest && "
            "tart clone ghcr.io/cirruslabs/tahoe-base:latest {} (or set OPENBOOT_VM_BASE)".format(cfg.vm.base),
        )
    ledger.ensure()
    return vms


def tool_bundle(cfg: Config) -> bytes:
    """tasks.py, the vmtasks package and the resolved config, as a tar.gz for the guest."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(str(TOOL_ROOT / "tasks.py"), arcname="tasks.py")
        for path in sorted((TOOL_ROOT / "vmtasks").glob("*.py")):
            tar.add(str(path), arcname="vmtasks/" + path.name)
        data = cfg.to_json().encode()
        info = tarfile.TarInfo("config.json")
        info.size = len(data)
        info.mtime = int(time.time())
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def inner_command(cfg: Config, test: Optional[str], json_output: bool) -> str:
    """The shell command line run over SSH in the guest (every word quoted: a test regex
    with quotes, ``$( )``, ``;`` or newlines arrives literally)."""
    tool = '"$HOME"/' + shlex.quote(cfg.guest.tool_dir)
    env = {"CI": "true", "OPENBOOT_IN_VM": "1"}
    env.update(cfg.guest.env)
    words = ["exec", "env"] + [shlex.quote("{}={}".format(k, v)) for k, v in env.items()]
    words.append("OPENBOOT_VM_CONFIG=" + tool + "/config.json")
    words += [shlex.quote(w) for w in shlex.split(cfg.guest.command_prefix)]
    words += [shlex.quote(cfg.guest.python), "-m", "invoke", "--search-root", tool]
    if test is None:
        words.append("test-vm-inner")
    else:
        # One word, `--test=...`, so a regex starting with "-" is not taken for a flag.
        words += ["test-vm-inner-run", shlex.quote("--test=" + test)]
    if json_output:
        words.append("--json-output")
    return " ".join(words)


KEY_SCRIPT = (
    # Relative paths: `tart exec` runs in the guest user's home.
    'umask 077 && mkdir -p .ssh && printf "%s\\n" "$1" >> .ssh/authorized_keys '
    "&& chmod 700 .ssh && chmod 600 .ssh/authorized_keys"
)


class VmRun:
    def __init__(self, cfg: Config, request: RunRequest, *, tart: Tart, ledger: Ledger, ui: Ui,
                 records_root: Path, runner: Optional[Runner] = None, run_id: Optional[str] = None) -> None:
        self.cfg = cfg
        self.request = request
        self.tart = tart
        self.ledger = ledger
        self.ui = ui
        self.runner = runner or Runner()
        self.run_id = run_id or new_run_id()
        self.vm = "{}-{}".format(cfg.vm.name_prefix, self.run_id)
        self.record = RunRecord(records_root, self.run_id)
        self.key: Optional[ssh.RunKey] = None
        self.lease: Optional[Lease] = None
        self.conn = None
        self.proc: Optional[subprocess.Popen] = None
        self.ip: Optional[str] = None
        self.clone_attempted = False
        self.stage = ""
        self.stream: Optional[results.SuiteStream] = None
        self.summary: Optional[results.Summary] = None
        self.exit_code = 1
        self.kept = False
        self.guard = SignalGuard(on_warning=ui.warn)

    # -- the whole run -----------------------------------------------------
    def execute(self) -> int:
        """Run every stage; return the exit code (the in-VM suite's, or ours on failure)."""
        failed = True
        error: Optional[BaseException] = None
        with self.guard:
            try:
                self.record.create(self.cfg.to_json())
                self._stages()
                failed = self.exit_code != 0
            except VmtasksError as exc:
                error = exc
                self.exit_code = exc.exit_code
                if isinstance(exc, StageError):
                    exc.record_path = str(self.record.dir)
            finally:
                self.guard.teardown_mode()
                try:
                    self._teardown(failed)
                except TeardownAbandoned as exc:
                    self.exit_code = exc.exit_code
                    self._report_leftovers()
            if error is not None:
                self.ui.error(error.render())
        self.record.finish(vm=self.vm, exit_code=self.exit_code, kept=self.kept,
                           failed_tests=self._failed_tests(), test=self.request.test)
        self.record.prune(self.cfg.records.keep_last)
        return self.exit_code

    def _stages(self) -> None:
        with self._stage("build"):
            self._build()
        with self._stage("clone"):
            self._clone()
        boot_deadline = 0.0
        with self._stage("boot"):
            boot_deadline = self._boot()
        with self._stage("ip+ssh"):
            self._wait_for_sshd(boot_deadline)
        with self._stage("key"):
            self._inject_key()
        with self._stage("setup"):
            self._setup()
        with self._stage("sync"):
            self._sync()
        with self._stage("suite"):
            self.exit_code = self._suite()

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        if name == "build" and not self.cfg.build:
            yield
            return
        self.stage = self.guard.stage = name
        started_wall, started = time.time(), time.monotonic()
        self.ui.stage_started(name)
        status = "ok"
        try:
            yield
        except Interrupted:
            status = "interrupted"  # raised by the SignalGuard, which knows the stage
            raise
        except StageError:
            status = "failed"
            raise
        except VmtasksError as exc:
            status = "failed"
            raise StageError(name, self.vm, exc.message, exc.hint, self._log_tail()) from None
        except (CommandTimeout, ssh.RemoteTimeout, TimeoutError) as exc:
            status = "failed"
            out = getattr(exc, "output", "")
            raise StageError(name, self.vm, "timed out: {}".format(exc),
                             "raise timeouts.{} in the config if the stage is just slow".format(name),
                             tail(out) if out else self._log_tail()) from None
        except Exception as exc:  # OSError, paramiko's errors and other library errors
            status = "failed"
            raise StageError(name, self.vm, "{}: {}".format(type(exc).__name__, exc),
                             "see the run record for the VM console", self._log_tail()) from None
        finally:
            elapsed = time.monotonic() - started
            if name == "suite" and status == "ok" and self.exit_code != 0:
                status = "failed"
            self.record.stage_done(name, started_wall, elapsed, status)
            self.ui.stage_finished(name, elapsed, status == "ok")

    def _log_tail(self) -> List[str]:
        return tail_file(self.record.path("console.log"))

    def _deadline(self, seconds: float) -> float:
        return time.monotonic() + seconds

    # -- stages ------------------------------------------------------------
    def _build(self) -> None:
        for command in self.cfg.build:
            try:
                result = subprocess.run(command, shell=True, cwd=self.cfg.project_dir, capture_output=True,
                                        text=True, stdin=subprocess.DEVNULL, timeout=self.cfg.timeouts.build)
            except subprocess.TimeoutExpired as exc:
                raise CommandTimeout([command], self.cfg.timeouts.build, output_text(exc.stdout) + output_text(exc.stderr)) from None
            if result.returncode != 0:
                raise StageError("build", self.vm, "`{}` exited {}".format(command, result.returncode),
                                 "fix the build on the host first (config: build)",
                                 tail(result.stdout + result.stderr))

    def _clone(self) -> None:
        # The lease comes first: from here on, whatever exists is ours and sweepable.
        self.lease = self.ledger.new_lease(self.vm, self.run_id, keep=False, base=self.cfg.vm.base)
        self.ledger.write(self.lease)
        self.key = ssh.generate_key(Path(self.lease.key_dir), "vmtasks-" + self.run_id)
        self.clone_attempted = True
        self.tart.clone(self.cfg.vm.base, self.vm, timeout=self.cfg.timeouts.clone)
        self.tart.set(self.vm, cpu=self.cfg.vm.cpu, memory=self.cfg.vm.memory,
                      random_mac=self.cfg.vm.random_mac)

    def _boot(self) -> float:
        """Start ``tart run`` (waiting for a free slot if the host is at its VM limit) and wait
        for the VM's IP. Returns the boot deadline, shared with the SSH wait."""
        poll = self.cfg.timeouts.poll
        slot_deadline = self._deadline(self.cfg.timeouts.slot_wait)
        log_path = self.record.path("console.log")
        waited_for_slot = False
        while True:
            with open(log_path, "ab") as log:
                self.proc = self.tart.start(self.vm, log)
            deadline = self._deadline(self.cfg.timeouts.boot)
            waits = backoff(poll)
            while True:
                if self.proc.poll() is not None:
                    break
                self.ip = self.tart.ip(self.vm, timeout=max(5, poll * 5))
                if self.ip:
                    self.lease = self._update_lease(ip=self.ip)
                    if waited_for_slot:
                        self.ui.info("   got a VM slot")
                    return deadline
                if time.monotonic() > deadline:
                    raise StageError("boot", self.vm, "no IP address after {:g}s".format(self.cfg.timeouts.boot),
                                     "the VM console is in the run record; raise timeouts.boot if the guest is slow",
                                     self._log_tail())
                time.sleep(next(waits))
            # `tart run` ended before the VM got an IP.
            console = "\n".join(tail_file(log_path, 5))
            if LIMIT_MESSAGE in console and time.monotonic() < slot_deadline:
                if not waited_for_slot:
                    self.ui.info("   host is at its limit of running VMs: waiting for a slot "
                                 "(up to {:g}s, timeouts.slot_wait)".format(self.cfg.timeouts.slot_wait))
                waited_for_slot = True
                time.sleep(max(poll, 1.0) + secrets.randbelow(1000) / 1000)
                continue
            hint = ("other VMs hold the host's slots: wait for them or stop one (`tart list`)"
                    if LIMIT_MESSAGE in console else "read the VM console in the run record")
            raise StageError("boot", self.vm, "`tart run` exited with code {} before the VM got an IP".format(
                self.proc.returncode), hint, self._log_tail())

    def _update_lease(self, **fields) -> Lease:
        import dataclasses

        lease = dataclasses.replace(self.lease, **fields)
        self.ledger.write(lease)
        return lease

    def _vm_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _require_alive(self) -> None:
        if not self._vm_alive():
            raise StageError(self.stage, self.vm, "the VM stopped (`tart run` exited {})".format(
                self.proc.returncode if self.proc else "?"),
                "the guest crashed or was stopped; see the VM console in the run record", self._log_tail())

    def _wait_for_sshd(self, deadline: float) -> None:
        # An IP is not SSH ready: wait for sshd's banner on port 22.
        waits = backoff(min(self.cfg.timeouts.poll, 0.2))
        while not ssh.sshd_banner(self.ip, timeout=min(2.0, max(0.2, deadline - time.monotonic()))):
            self._require_alive()
            if time.monotonic() > deadline:
                raise StageError("ip+ssh", self.vm, "sshd on {}:22 did not answer within {:g}s".format(
                    self.ip, self.cfg.timeouts.boot),
                    "check Remote Login in the base image; on macOS 15 allow Local Network access for your terminal",
                    self._log_tail())
            time.sleep(next(waits))

    def _inject_key(self) -> None:
        # Keys go in through the guest agent, not SSH: the image has no authorized keys and a
        # local agent offering many keys would exhaust MaxAuthTries before any real one.
        deadline = self._deadline(self.cfg.timeouts.key)
        argv = ["sh", "-c", KEY_SCRIPT, "vmtasks-key", self.key.public_line]
        waits = backoff(min(self.cfg.timeouts.poll, 0.5))
        while True:
            self._require_alive()
            result = self.tart.exec(self.vm, argv, timeout=max(5, self.cfg.timeouts.key))
            if result.ok:
                break
            retryable = Tart.agent_not_ready(result) or result.returncode == 2
            if not retryable or time.monotonic() > deadline:
                raise StageError("key", self.vm, "`tart exec` exited {}: {}".format(
                    result.returncode, (result.stderr or result.stdout).strip()[-300:]),
                    "is the Tart Guest Agent in the base image? (it is in Cirrus Labs images)",
                    tail(result.stderr + result.stdout))
            time.sleep(next(waits))
        self.conn = ssh.open_when_ready(self.ip, self.cfg.vm.user, self.key, deadline,
                                        min(self.cfg.timeouts.poll, 0.5))
        # Notice a dead guest within a minute even if no FIN/RST ever arrives.
        self.conn.client.get_transport().set_keepalive(15)

    def _remote(self, command: str, timeout: float, on_output=None) -> ssh.RemoteResult:
        return ssh.remote_exec(self.conn, command, timeout=timeout, on_output=on_output)

    def _setup(self) -> None:
        deadline = self._deadline(self.cfg.timeouts.setup)
        bundle = tool_bundle(self.cfg)
        tool = '"$HOME"/' + shlex.quote(self.cfg.guest.tool_dir)
        unpack = "rm -rf {0} && mkdir -p {0} && tar -xzf - -C {0}".format(tool)
        result = ssh.remote_exec(self.conn, unpack, stdin=bundle, timeout=self.cfg.timeouts.setup)
        if result.exit_code != 0:
            raise StageError("setup", self.vm, "copying vmtasks into the guest failed (exit {})".format(
                result.exit_code), "check free space in the guest", tail(result.output))
        for step in self.cfg.setup:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ssh.RemoteTimeout(step, self.cfg.timeouts.setup, "")
            self.ui.info("   $ " + step)
            result = self._remote(step, remaining, on_output=self.ui.raw)
            if result.exit_code != 0:
                raise StageError("setup", self.vm, "`{}` exited {}".format(step, result.exit_code),
                                 "fix the step in config (setup) or the base image", tail(result.output))

    def _sync(self) -> None:
        mkdir = "mkdir -p " + shlex.quote(self.cfg.guest.dir)
        result = self._remote(mkdir, self.cfg.timeouts.sync)
        if result.exit_code != 0:
            raise StageError("sync", self.vm, "cannot create {} in the guest".format(self.cfg.guest.dir),
                             "check guest.dir in the config", tail(result.output))
        argv = sync.rsync_argv(Path(self.cfg.project_dir), self.cfg.vm.user, self.ip, self.cfg.guest.dir,
                               self.key, self.cfg.sync.excludes, compress=self.cfg.sync.compress)
        done = self.runner.run(argv, timeout=self.cfg.timeouts.sync)
        if not done.ok:
            raise StageError("sync", self.vm, "rsync exited {}".format(done.returncode),
                             "check the project tree and free space in the guest", tail(done.stderr + done.stdout))

    def _suite(self) -> int:
        raw = open(self.record.path("suite-output.txt"), "w", encoding="utf-8")
        self.stream = results.SuiteStream(on_event=self._on_test_event)

        def on_output(text: str) -> None:
            raw.write(text)
            raw.flush()
            self.stream.feed(text)
            self.ui.raw(text)
            counts = self.stream.counts
            self.ui.suite_progress(counts.passed, counts.failed, counts.skipped, list(self.stream.running))

        command = inner_command(self.cfg, self.request.test, self.request.json_output)
        try:
            result = self._remote(command, self.cfg.timeouts.suite, on_output=on_output)
        finally:
            raw.close()
            self.stream.close()
            self.summary = self.stream.summary()
        if result.exit_code < 0:
            self._require_alive()
            raise StageError("suite", self.vm, "the SSH session ended without an exit status",
                             "the guest may have crashed; see the run record", tail(result.output))
        return result.exit_code

    def _on_test_event(self, event: "results.TestEvent") -> None:
        """A test finished: show it now (a failing test's output at once, not at the end)."""
        if event.kind in ("pass", "fail", "skip") and not event.subtest:
            self.ui.test_finished(event.test, event.kind, event.elapsed, event.output)
        elif event.kind == "package-fail":
            self.ui.print("   FAIL package {}".format(event.package), style="red")
            self.ui.print(event.output.rstrip())

    def _failed_tests(self) -> List[str]:
        if self.summary is None:
            return []
        return results.failed_tests(self.summary)

    # -- teardown ----------------------------------------------------------
    def _teardown(self, failed: bool) -> None:
        keep = self.cfg.keep == "always" or (self.cfg.keep == "on-failure" and failed)
        started_wall, started = time.time(), time.monotonic()
        self.stage = self.guard.stage = "teardown"
        self.ui.stage_started("teardown")
        ok = True
        try:
            if self.conn is not None:
                self.conn.close()
            if keep and self._vm_alive() and self.key is not None:
                self._keep()
                return
            if self.clone_attempted:
                self._destroy_vm()
            if self.lease is not None:
                shutil.rmtree(self.lease.key_dir, ignore_errors=True)
                self.ledger.remove(self.vm)
        except (TartError, CommandTimeout, OSError) as exc:
            ok = False
            self.ui.error("teardown of {} failed: {}".format(self.vm, getattr(exc, "message", exc)))
            self._report_leftovers()
            if self.exit_code == 0:
                self.exit_code = 1
        finally:
            elapsed = time.monotonic() - started
            self.record.stage_done("teardown", started_wall, elapsed, "ok" if ok else "failed")
            self.ui.stage_finished("teardown", elapsed, ok, "kept" if self.kept else "")
            self.ui.close()

    def _destroy_vm(self) -> None:
        timeout = self.cfg.timeouts.teardown
        self.tart.stop(self.vm, timeout=min(30, timeout))
        if self.proc is not None:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        deadline = self._deadline(timeout)
        while True:
            try:
                self.tart.delete(self.vm)
                return
            except TartError:
                # `tart list` can show a VM stopped while it still runs (tart #967): stop again.
                if time.monotonic() > deadline:
                    raise
                self.tart.stop(self.vm, timeout=10)
                time.sleep(0.5)

    def _keep(self) -> None:
        self.kept = True
        self.lease = self._update_lease(keep=True)
        attach = ssh.attach_command(self.ip, self.cfg.vm.user, self.key)
        self.ui.print("kept VM {} at {} (keep={})".format(self.vm, self.ip, self.cfg.keep), style="bold")
        self.ui.print("  attach:   " + attach)
        self.ui.print("  clean up: tart stop {0}; tart delete {0}; rm -rf {1}".format(
            shlex.quote(self.vm), shlex.quote(str(self.key.dir))))
        self.ui.print("            (or: invoke cleanup-orphans --include-kept)")

    def _report_leftovers(self) -> None:
        self.ui.error(
            "left behind: VM {vm} and key dir {key} (lease kept so the sweep can find them)\n"
            "  remove with: invoke cleanup-orphans   or by hand: tart stop {vm}; tart delete {vm}; rm -rf {key}".format(
                vm=shlex.quote(self.vm), key=shlex.quote(self.lease.key_dir if self.lease else "?")))
