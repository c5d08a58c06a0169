"""One VM's pipeline: clone, boot, IP + SSH, key, setup, sync, suite (or its share of the
test queue), and teardown on every exit path.

``VmPipeline`` owns all of its VM's state (machine, key, Connection, lease, stream), so a
run drives several at once, each in its own thread; the run's ``cancel`` event stops them.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shlex
import shutil
import tarfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

from vmtasks.guest import evidence, gotest, results
from vmtasks.guest.errors import (
    Cancelled,
    Interrupted,
    NoLongerNeeded,
    RemoteTimeout,
    SshError,
    StageError,
    VmtasksError,
    describe_unexpected,
)
from vmtasks.guest.evidence import guest_command
from vmtasks.settings.factory import task_command
from vmtasks.transport import ssh, sync

from . import images
from .backend import Machine, SealableMachine, SuspendableMachine
from .pipeline import Stage, StageRunner
from .queue import TestQueue

PACKAGE_DIR = Path(__file__).resolve().parent.parent
GUEST_DIR = PACKAGE_DIR / "guest"  # the guest-safe folder: all the guest gets of vmtasks
GUEST_TASKS = ('"""vmtasks in the guest: its two tasks, from the bundled guest-safe folder."""\n'
               "from vmtasks.guest.tasks import ns  # noqa: F401\n")


def tool_bundle(cfg) -> bytes:
    """The guest-safe folder of the vmtasks package (as installed: ``vmtasks/guest``, and the
    package's ``__init__``), a two-line tasks.py and the resolved config, as a tar.gz for the
    guest's ``guest.tool_dir``. No host module goes: the guest has Python 3.9 and Invoke only."""
    buf = io.BytesIO()
    # Each file is read whole before it goes in: a file edited meanwhile cannot make a
    # member whose size and content disagree.
    members = [("vmtasks/" + path.relative_to(PACKAGE_DIR).as_posix(), path.read_bytes())
               for path in [PACKAGE_DIR / "__init__.py"] + sorted(GUEST_DIR.rglob("*.py"))]
    members += [("tasks.py", GUEST_TASKS.encode()), ("config.json", cfg.to_json().encode())]
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def guest_env_words(cfg) -> List[str]:
    """``env`` assignments for anything run in the guest: CI, VMTASKS_IN_VM (and openboot's
    OPENBOOT_IN_VM), guest.env."""
    env = {"CI": "true", "VMTASKS_IN_VM": "1", "OPENBOOT_IN_VM": "1"}
    env.update(cfg.guest.env)
    return [shlex.quote("{}={}".format(k, v)) for k, v in env.items()]


MAX_EVIDENCE_TESTS = 20  # one `go test` with more failures than this: the first ones only


def tool_path(cfg) -> str:
    return '"$HOME"/' + shlex.quote(cfg.guest.tool_dir)


def running_pid_file(cfg) -> str:
    """Where the guest command running the suite or a test notes its process group."""
    return tool_path(cfg) + "/running.pid"


class TestTimedOut(VmtasksError):
    """A suite or test command outlived its deadline and was killed; the VM is fine.
    Raised and caught inside this module (the queue goes on; the suite stage fails)."""

    __test__ = False

    def __init__(self, reason: str) -> None:
        super().__init__(reason, "raise the timeout in the config if the test is just slow")
        self.reason = reason


def inner_command(cfg, test: Optional[str], json_output: bool = True) -> str:
    """The shell command line run over SSH in the guest (every word quoted: a test regex
    with quotes, ``$( )``, ``;`` or newlines arrives literally)."""
    tool = tool_path(cfg)
    words = ["exec", "env"] + guest_env_words(cfg)
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


@dataclasses.dataclass
class VmContext:
    """What one VM's stages share."""

    name: str
    machine: Machine
    dir: Path  # this VM's folder in the run record
    deadline: float = 0.0
    lease: Any = None
    key: Optional[ssh.RunKey] = None
    conn: Any = None
    summaries: List[Any] = dataclasses.field(default_factory=list)  # one per suite run / test
    exit_code: int = 1
    kept: bool = False
    stage_status: Optional[str] = None
    stage_note: str = ""
    error: Optional[VmtasksError] = None
    lost: bool = False
    teardown_failed: bool = False
    tests_run: int = 0
    busy: float = 0.0
    evidence: List[str] = dataclasses.field(default_factory=list)  # what was collected of failures, for the summary
    changed: List[Tuple[str, int]] = dataclasses.field(default_factory=list)  # suite.changes: (test, lines), in order
    changes_seconds: float = 0.0  # suite.changes: what the snapshots and diffs cost on this VM


@dataclasses.dataclass
class VmServices:
    """What a VM pipeline may use of the run it belongs to, and nothing more (as nox's
    ``Session`` is a small facade over its runner): a pipeline can be built and tested
    without a ``Run``."""

    cfg: Any
    backend: Any
    cancel: threading.Event
    ledger: Any
    record: Any  # the run record (vmtasks/state/records.py)
    reporter: Any
    runner: Any  # the process runner (rsync)
    run_id: str
    tool_bundle: Callable[[], bytes]
    sync_excludes: List[str]
    cleanup_command: str
    queue: Optional[TestQueue] = None  # several VMs: the shared test queue
    # --retries: told (from this VM's thread) the moment a queued test fails, so the retry
    # can go to a fresh VM while this one goes on with the queue
    on_test_failed: Optional[Callable[[Any, gotest.TestId], None]] = None


class VmPipeline:
    """One VM, from clone to teardown. ``image``: what it is created from; ``prepared``:
    that image is a prepared one (the setup steps are skipped); ``own_folder``: its files
    go to its own folder of the run record (several VMs); ``test``: the ``--test`` regex;
    ``expected``: one VM, the listed ``(package, name)`` tests whose events count;
    ``building``: an ImagePlan when this VM builds a prepared image (vm-prepare) instead
    of running tests: it then ends by sealing itself as the image."""

    def __init__(self, services: VmServices, name: str, machine: Machine, *, image: str, prepared: bool = False,
                 own_folder: bool = False, test: Optional[str] = None,
                 expected: Optional[Sequence[Tuple[str, str]]] = None, building=None) -> None:
        self.services = services
        self.cfg = services.cfg
        self.queue = services.queue if building is None else None
        self.building = building
        self.image = image
        self.prepared = prepared
        self.test = test
        self.expected = expected
        self.record_key = name if own_folder else None  # one VM: its files at the record's top
        self.ctx = VmContext(name=name, machine=machine,
                             dir=services.record.vm_dir(name) if self.record_key else services.record.dir)
        self.runner = StageRunner(self.cfg, services.reporter, services.record, name, services.cancel,
                                  console_tail=machine.console_tail)
        self.teardown_done = threading.Event()
        self.tearing_down = False
        # A fresh VM of the scheduler (vmtasks/lifecycle/fresh.py): cloned ahead, it waits here before
        # its boot until its slot frees. None: it boots as soon as it is cloned.
        self.gate: Any = None
        self.slot_wait = 0.0  # how long it waited for its slot after its clone
        self.started_at: Optional[float] = None  # time.monotonic(): execute() began, and ended
        self.ended_at: Optional[float] = None

    @property
    def name(self) -> str:
        return self.ctx.name

    # -- the stage table -------------------------------------------------------
    def stages(self) -> List[Stage]:
        cfg, queue = self.cfg, self.queue
        q = shlex.quote
        testing = self.building is None
        return [
            Stage("clone", "lease, run key, then create {} from {}".format(self.name, self.image), self._clone,
                  "clone", lambda ctx: ctx.machine.plan("create", image=self.image)),
            Stage("boot", "start the VM (console or events to the run record), wait until it runs",
                  self._boot, "boot", lambda ctx: ctx.machine.plan("start")),
            Stage("ip+ssh", "wait for sshd's banner on port 22 (same deadline as boot)", self._wait_ssh, "boot"),
            Stage("key", "install the run's ED25519 key, log in over SSH",
                  self._key, "key", lambda ctx: ctx.machine.plan("install_key")),
            Stage("setup", "unpack vmtasks into ~/{}{}".format(
                      cfg.guest.tool_dir, " (prepared image: setup steps already done)" if self.prepared
                      else ", run the setup steps"),
                  self._setup, "setup", lambda ctx: [] if self.prepared else list(cfg.setup)),
            Stage("sync", "rsync the project tree{}".format(
                      " and the test binaries" if queue is not None and testing else ""),
                  self._sync, "sync", lambda ctx: [" ".join(q(a) for a in self._rsync_argv(placeholder=True))],
                  enabled=lambda ctx: testing or bool(cfg.prepare)),
            Stage("suite", "run the suite in the guest over SSH, stream its events home", self._suite, "suite",
                  lambda ctx: ["ssh: " + inner_command(cfg, self.test)],
                  enabled=lambda ctx: testing and queue is None),
            Stage("tests", "take tests from the shared queue, longest first, until it is empty", self._tests,
                  None, lambda ctx: ["ssh: " + queue.command_for_display(cfg)] if queue is not None else [],
                  enabled=lambda ctx: testing and queue is not None),
            Stage("prepare", "the config's prepare steps (warm caches from the synced tree)", self._prepare_steps,
                  "prepare", lambda ctx: list(cfg.prepare), enabled=lambda ctx: not testing and bool(cfg.prepare)),
            Stage("seal", "remove the build's key, flush the disks, stop, become the image",
                  self._seal, "teardown", lambda ctx: ctx.machine.plan(
                      "seal", into=self.building.name if self.building else "<image>"),
                  enabled=lambda ctx: not testing),
        ]

    def teardown_stage(self) -> Stage:
        return Stage("teardown", "keep={}: stop and delete the VM, remove its key and lease".format(self.cfg.keep),
                     self._teardown, "teardown", lambda ctx: ctx.machine.plan("destroy"), cancellable=False)

    # -- the whole pipeline ----------------------------------------------------
    def execute(self) -> None:
        """Run every stage in this thread; teardown always runs. Errors end up in ctx.error."""
        ctx = self.ctx
        self.started_at = time.monotonic()
        try:
            for stage in self.stages():
                if self.queue is not None and self.queue.exhausted():
                    # The other VMs took every test while this one was starting: stop here.
                    ctx.stage_note = "no tests left for this VM"
                    ctx.exit_code = 0
                    break
                if stage.name == "boot" and self.gate is not None:
                    self.slot_wait = self.gate.wait(
                        self.services.cancel, lambda text: self.services.reporter.vm_waiting(self.name, text))
                if stage.enabled(ctx):
                    self.runner.run(stage, ctx)
        except NoLongerNeeded:
            ctx.exit_code = 0  # the others took every test while it waited for a slot
            ctx.stage_note = "no tests left for this VM"
        except (Interrupted, Cancelled) as exc:
            ctx.error = exc if isinstance(exc, Interrupted) else None
        except VmtasksError as exc:
            ctx.error = exc
        except BaseException as exc:  # noqa: BLE001 - a bug: still tear down, keep the traceback
            where = self.services.record.note_traceback(self.name, self.runner.current, traceback.format_exc())
            ctx.error = StageError(self.runner.current or "?", self.name, "unexpected error: " +
                                   describe_unexpected(exc), "this is a bug in vmtasks; the traceback is in " + where)
        finally:
            self.tearing_down = True
            try:
                self.runner.run(self.teardown_stage(), ctx)
            except VmtasksError:
                pass  # reported by _teardown itself
            finally:
                self.ended_at = time.monotonic()
                self.teardown_done.set()

    # -- stages ------------------------------------------------------------
    def _clone(self, ctx: VmContext) -> None:
        svc = self.services
        # The lease comes first: from here on, whatever exists is ours and sweepable.
        lease = svc.ledger.new_lease(self.name, svc.run_id, keep=False, base=self.image)
        # One key per VM: a kept VM's key must not go when its sibling's teardown runs.
        ctx.lease = dataclasses.replace(lease, key_dir=str(svc.ledger.keys_dir / self.name))
        svc.ledger.write(ctx.lease)
        ctx.key = ssh.generate_key(Path(ctx.lease.key_dir), "vmtasks-" + svc.run_id)
        ctx.machine.prepare_key(ctx.key.public_line)
        # A local child (a clone) that outlives a killed run would make an unleased VM after the
        # sweep: the ledger notes the child, and a sweep waits for it (vmtasks/state/sweep.py).
        try:
            ctx.machine.create(self.image, ctx.deadline, svc.cancel,
                               on_start=lambda pid, argv: svc.ledger.note_child(self.name, pid, argv))
        finally:
            svc.ledger.clear_child(self.name)

    def _boot(self, ctx: VmContext) -> None:
        def on_wait(text: str) -> None:
            self.services.reporter.vm_waiting(self.name, text)

        queue = self.queue
        ctx.machine.start(ctx.dir / "console.log", ctx.deadline, self.services.cancel, on_wait,
                          still_wanted=lambda: queue is None or not queue.exhausted())
        path = ctx.machine.boot_note()
        if path and self.image != self.cfg.vm.base:
            ctx.stage_note, ctx.stage_status = "{} ({})".format(path, self.image), "ok"
        address = ctx.machine.address()
        if address:
            ctx.lease = dataclasses.replace(ctx.lease, ip=address)
            self.services.ledger.write(ctx.lease)

    def _wait_ssh(self, ctx: VmContext) -> None:
        ctx.machine.wait_ssh(ctx.deadline, self.services.cancel)

    def _run_key(self) -> ssh.RunKey:
        """The VM's key (made in the clone stage, before any stage that needs it)."""
        assert self.ctx.key is not None
        return self.ctx.key

    def _key(self, ctx: VmContext) -> None:
        ctx.machine.install_key(self._run_key().public_line, ctx.deadline, self.services.cancel)
        target = ctx.machine.ssh_target()
        ctx.conn = ssh.open_when_ready(ctx.machine.open_socket, target.host, self.cfg.vm.user, self._run_key(),
                                       ctx.deadline, min(self.cfg.timeouts.poll, 0.5), self.services.cancel)

    def remote(self, command: str, timeout: float, on_output=None, stdin: Optional[bytes] = None) -> ssh.RemoteResult:
        started = time.monotonic()
        try:
            result = ssh.remote_exec(self.ctx.conn, command, timeout=timeout, on_output=on_output, stdin=stdin,
                                     cancel=self.services.cancel)
        except VmtasksError:
            self.services.record.command_ran(self.name, "ssh: " + command, None, time.monotonic() - started)
            raise
        self.services.record.command_ran(self.name, "ssh: " + command, result.exit_code, time.monotonic() - started)
        return result

    def _setup(self, ctx: VmContext) -> None:
        tool = tool_path(self.cfg)
        if self.prepared:
            # The image holds this very bundle (its digest is in the image's hash): only the
            # resolved config, which changes from run to run, goes in.
            command = "cat > {}/config.json".format(tool)
            payload = self.cfg.to_json().encode()
        else:
            command = "rm -rf {0} && mkdir -p {0} && tar -xzf - -C {0}".format(tool)
            payload = self.services.tool_bundle()
        result = self.remote(command, self.cfg.timeouts.setup, stdin=payload)
        if result.exit_code != 0:
            raise StageError("setup", self.name, "copying vmtasks into the guest failed (exit {})".format(
                result.exit_code), "check free space in the guest", result.output.splitlines()[-15:])
        if self.prepared:
            ctx.stage_note = "prepared image: steps skipped"
            ctx.stage_status = "ok"
            return
        self._steps(ctx, "setup", self.cfg.setup)

    def _steps(self, ctx: VmContext, key: str, steps) -> None:
        """Run guest shell steps in order, within the stage's deadline."""
        for step in steps:
            remaining = ctx.deadline - time.monotonic()
            if remaining <= 0:
                raise RemoteTimeout(step, getattr(self.cfg.timeouts, key), "")
            self.services.reporter.info("   $ " + step)
            result = self.remote(step, remaining, on_output=self._raw)
            if result.exit_code != 0:
                raise StageError(key, self.name, "`{}` exited {}".format(step, result.exit_code),
                                 "fix the step in config ({}) or the base image".format(key),
                                 result.output.splitlines()[-15:])

    def _prepare_steps(self, ctx: VmContext) -> None:
        self._steps(ctx, "prepare", self.cfg.prepare)

    def _seal(self, ctx: VmContext) -> None:
        """Make this build the prepared image: no key of ours stays in it, the guest's
        writes are on disk (`tart stop` is a hard power-off), and the finished name appears
        only now, in one rename."""
        result = self.remote("rm -f ~/.ssh/authorized_keys && sync", self.cfg.timeouts.teardown)
        if result.exit_code != 0:
            raise StageError("seal", self.name, "cleaning the image failed (exit {})".format(result.exit_code),
                             "check the guest's disk", result.output.splitlines()[-15:])
        ctx.conn.close()
        ctx.conn = None
        if not isinstance(ctx.machine, SealableMachine):
            raise StageError("seal", self.name, "this backend cannot make prepared images")
        ctx.machine.seal(self.building.name, self.cfg.timeouts.teardown)
        images.save_record(self.services.ledger.state_dir, self.building.name, self.building.inputs,
                           self.services.run_id, config=self.cfg.source)
        ctx.exit_code = 0
        ctx.stage_note = "image " + self.building.name

    def _on_test_event(self, event) -> None:
        reporter = self.services.reporter
        if event.kind in ("pass", "fail", "skip", "interrupted") and not event.subtest:
            reporter.test_finished(self.name, event.test, event.kind, event.elapsed, event.output)
        elif event.kind == "run" and not event.subtest:
            # A queued test has its own deadline (timeouts.test): its row shows it.
            reporter.test_started(self.name, event.test,
                                  self.cfg.timeouts.test if self.services.queue is not None else None)
        elif event.kind == "package-fail":
            reporter.package_failed(self.name, event.package, event.output)

    def _raw(self, text: str) -> None:
        self.services.reporter.raw_output(self.name, text)

    def _rsync_argv(self, placeholder: bool = False, source: Optional[Path] = None, dest: Optional[str] = None,
                    excludes=None, delete: bool = True) -> List[str]:
        ctx = self.ctx
        if placeholder:  # --dry-run: the machine says how it is reached, before it exists
            key_dir = Path("<run key dir>")
            key = ssh.RunKey(key_dir, key_dir / "id_ed25519", "", key_dir / "known_hosts")
            target = ctx.machine.ssh_target()
            host, proxy = target.host or "<vm address>", target.proxy_command
        else:
            key = self._run_key()
            target = ctx.machine.ssh_target()
            host, proxy = target.host, target.proxy_command
        return sync.rsync_argv(source or Path(self.cfg.project_dir), self.cfg.vm.user, host,
                               dest or self.cfg.guest.dir, key,
                               self.services.sync_excludes if excludes is None else excludes,
                               compress=self.cfg.sync.compress, proxy_command=proxy, delete=delete)

    def _sync(self, ctx: VmContext) -> None:
        dirs = [self.cfg.guest.dir] + ([self.queue.guest_bin_dir(self.cfg)] if self.queue is not None else [])
        mkdir = "mkdir -p " + " ".join(shlex.quote(d) for d in dirs)
        result = self.remote(mkdir, self.cfg.timeouts.sync)
        if result.exit_code != 0:
            raise StageError("sync", self.name, "cannot create {} in the guest".format(self.cfg.guest.dir),
                             "check guest.dir in the config", result.output.splitlines()[-15:])
        argvs = [self._rsync_argv()]
        if self.queue is not None:
            argvs.append(self._rsync_argv(source=self.queue.bin_dir, dest=dirs[1], excludes=[]))
        for done in self._run_at_once(argvs, max(1.0, ctx.deadline - time.monotonic()), self._rsync_env()):
            if not done.ok:
                raise StageError("sync", self.name, "rsync exited {}".format(done.returncode),
                                 "check the project tree and free space in the guest",
                                 (done.stderr + done.stdout).splitlines()[-15:])

    def _run_at_once(self, argvs: List[List[str]], timeout: float, env) -> list:
        """Run ``argvs`` side by side (the tree and the test binaries go to different places,
        each rsync over its own SSH connection: together they take the longer one's time, not
        the sum, which a fresh VM per test pays every time). Their results in order; the
        first error (a timeout, a stop) is raised once all have ended."""
        outcomes: list = [None] * len(argvs)

        def one(index: int) -> None:
            try:
                outcomes[index] = self.services.runner.run(argvs[index], timeout=timeout,
                                                           cancel=self.services.cancel, env=env)
            except BaseException as exc:  # noqa: BLE001 - raised in the stage's thread below
                outcomes[index] = exc

        others = [threading.Thread(target=one, args=(i,), name="{}-sync{}".format(self.name, i), daemon=True)
                  for i in range(1, len(argvs))]
        for thread in others:
            thread.start()
        one(0)
        for thread in others:
            thread.join()
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return outcomes

    def _rsync_env(self):
        extra = self.ctx.machine.ssh_target().env
        if not extra:
            return None
        return dict(os.environ, **extra)

    def _suite(self, ctx: VmContext) -> None:
        """Single-VM mode: the whole suite (or the --test regex) as one `go test -json`."""
        command = gotest.note_pid(running_pid_file(self.cfg)) + inner_command(self.cfg, self.test, True)
        try:
            ctx.exit_code = self._stream_command(ctx, command, "suite", expected=self.expected)
        except TestTimedOut as exc:
            raise StageError("suite", self.name, exc.reason + "; the suite was stopped in the guest",
                             "raise timeouts.suite in the config if the suite is just slow") from None
        if ctx.exit_code != 0:
            ctx.stage_status = "failed"
            ctx.stage_note = results.no_test_reason(ctx.summaries[-1], ctx.exit_code) if ctx.summaries else ""
            failed = results.failed_tests(ctx.summaries[-1]) if ctx.summaries else []
            # One `go test` for the whole suite: collected once it is over, for each failed test.
            self._collect_evidence(ctx, [name for name in failed if "/" not in name][:MAX_EVIDENCE_TESTS])

    def _collect_evidence(self, ctx: VmContext, tests: Sequence[str]) -> None:
        """Copy the config's ``artifacts`` and the output of its ``collect`` commands out of
        this VM into the run record (``artifacts/<test>/<vm>/``), bounded by
        ``artifacts_max_mb`` and ``timeouts.collect``. Never fails the run: what went wrong
        is a note in the summary. Named in the summary and in JUnit (an attachment line)."""
        if not (self.cfg.artifacts or self.cfg.collect) or not tests or ctx.conn is None:
            return
        command = evidence.pack_command(self.cfg.guest.python, tool_path(self.cfg), guest_env_words(self.cfg),
                                        self.cfg.artifacts, self.cfg.collect, self.cfg.artifacts_max_mb << 20,
                                        self.cfg.timeouts.collect)
        for test in tests:
            dest = self.services.record.dir / "artifacts" / evidence.safe_part(test) / self.name
            started = time.monotonic()
            files, notes = evidence.fetch(self.remote, command, str(dest), self.cfg.artifacts_max_mb << 20,
                                          self.cfg.timeouts.collect + 15)
            if notes:  # all of them, for a person; the summary shows the first few
                try:
                    (dest / "collection-notes.txt").write_text("".join(n + "\n" for n in notes))
                except OSError:
                    pass
            shown = dest.relative_to(self.services.record.dir).as_posix()
            line = "evidence of {} ({}): {} file{} in {}{}".format(
                test, self.name, len(files), "" if len(files) == 1 else "s", shown,
                "; " + "; ".join(notes[:3]) + (" (+{} more notes)".format(len(notes) - 3) if len(notes) > 3 else "")
                if notes else "")
            ctx.evidence.append(line)
            self.services.reporter.info("{}: {} ({:.1f}s)".format(self.name, line, time.monotonic() - started))
            for summary in ctx.summaries[-1:]:
                for result in summary.results:
                    if result.name == test:
                        result.attachments.extend(str(dest / f) for f in files)

    def _stream_command(self, ctx: VmContext, command: str, timeout_key: str, expected=None, label: str = "") -> int:
        """Run a `go test -json`-speaking command, parse its events live, keep its summary.

        ``expected``: the ``(package, name)`` tests whose events count (see SuiteStream).
        When ``timeouts.<timeout_key>`` runs out, the command's processes in the guest are
        killed, what was running fails as timed out, and :class:`TestTimedOut` says so: the
        VM itself is fine. A broken session is a lost VM (StageError)."""
        timeout = getattr(self.cfg.timeouts, timeout_key)
        raw = self.services.record.open_stream("suite-output.txt", self.record_key)
        stream = results.SuiteStream(on_event=self._on_test_event,
                                     on_output=self._raw, expected=expected)
        reason = None
        code = -1
        try:
            def on_output(text: str) -> None:
                raw.write(text)
                stream.feed(text)

            try:
                result = self.remote(command, timeout, on_output=on_output)
            except (Cancelled, Interrupted):
                reason = "interrupted"
                raise
            except RemoteTimeout:
                reason = "timeouts.{} ({:g}s) ran out{}".format(timeout_key, timeout, " for " + label if label else "")
                self._kill_running(ctx, reason)
                raise TestTimedOut(reason) from None
            except VmtasksError as exc:
                reason = self._lost_reason(exc.message)
                raise StageError(self.runner.current, self.name, reason, "see the VM console in the run record",
                                 ctx.machine.console_tail()) from None
            if result.exit_code < 0:
                reason = self._lost_reason("the SSH session ended without an exit status")
                raise StageError(self.runner.current, self.name, reason,
                                 "see the VM console in the run record", ctx.machine.console_tail())
            code = result.exit_code
            return code
        finally:
            raw.close()
            stream.close(reason)
            summary = stream.summary()
            if reason is None and code > 0 and self.queue is not None and not summary.results:
                # A shipped test binary that did not even start: say why (once per VM).
                hint = gotest.launch_failure_hint(summary.raw_output)
                if hint and hint not in ctx.evidence:
                    ctx.evidence.append(hint)
                    self.services.reporter.warn("{}: {}".format(self.name, hint))
            if reason is None and code > 0:
                # The verdict and the exit code agree: a failure no test reported is an error.
                summary = results.explain_exit(summary, code, "the test {}".format(label) if label else "the suite",
                                               package=expected[0][0] if label and expected else "(suite)")
            ctx.summaries.append(summary)

    def _kill_running(self, ctx: VmContext, reason: str) -> None:
        """Kill the timed-out command's process group in the guest (it ignores a closed
        channel: nothing reads its output, but a hung test writes nothing). A VM that cannot
        even do that is lost."""
        self.services.reporter.warn("{}: {}: killing it in the guest".format(self.name, reason))
        try:
            result = self.remote(gotest.kill_command(running_pid_file(self.cfg)), min(30.0, self.cfg.timeouts.teardown))
        except VmtasksError as exc:
            lost = self._lost_reason("{}, and then {}".format(reason, exc.message))
            raise StageError(self.runner.current, self.name, lost, "see the VM console in the run record",
                             ctx.machine.console_tail()) from None
        if result.exit_code != 0:
            self.services.reporter.warn("{}: the kill exited {} (the command may have ended meanwhile)".format(
                self.name, result.exit_code))

    def _lost_reason(self, what: str) -> str:
        self.ctx.lost = True
        if not self.ctx.machine.alive():
            return "VM lost: {} ({})".format(self.ctx.machine.why_dead(), what)
        return "VM lost: {} (lost connection, or the guest crashed?)".format(what)

    def _tests(self, ctx: VmContext) -> None:
        """Queue mode: run one test at a time from the shared queue until it is empty. A test
        that outlives timeouts.test is killed and failed; the VM takes the next one."""
        queue = self.queue
        assert queue is not None  # the stage runs only with a queue
        pid_file = running_pid_file(self.cfg)
        while not self.services.cancel.is_set():
            item = queue.take(self.name)
            if item is None:
                break
            if self.cfg.suite.changes:
                self._snapshot(ctx, "before")
            started = time.monotonic()
            try:
                # Only this test and its subtests count: whatever else go reports, a test printed.
                code = self._stream_command(ctx, queue.command_for(self.cfg, item, pid_file=pid_file), "test",
                                            expected=[item.key], label=item.name)
            except TestTimedOut:
                code = 1
            finally:
                ctx.busy += time.monotonic() - started
                ctx.tests_run += 1
                queue.done(item)
            if self.services.on_test_failed is not None and ctx.summaries and \
                    results.attempt_failed(ctx.summaries[-1], item.key):
                self.services.on_test_failed(self, item.key)
            if self.cfg.suite.changes:
                self._record_changes(ctx, item.name, failed=code != 0)
            if code != 0:
                ctx.exit_code = code
                # Evidence first: nothing else may touch this VM before it is copied out.
                self._collect_evidence(ctx, [item.name])
                if self.cfg.keep == "on-failure" and self.record_key:  # one of several VMs
                    # Kept for this failure: it stays as the failure left it; the queue's
                    # other VMs take the remaining tests.
                    self.services.reporter.info("{}: kept for the failure of {}: it takes no more tests".format(
                        self.name, item.name))
                    break
        if ctx.exit_code == 1 and ctx.tests_run and all(s.exit_ok for s in ctx.summaries):
            ctx.exit_code = 0
        if ctx.tests_run == 0:
            ctx.exit_code = 0
        ctx.stage_note = "{} tests".format(ctx.tests_run)

    # -- what each test changed (suite.changes) --------------------------------
    def _evidence_command(self, *words: str) -> str:
        return guest_command(self.cfg.guest.python, tool_path(self.cfg), guest_env_words(self.cfg), words)

    def _snapshot(self, ctx: VmContext, which: str) -> bool:
        """Record the guest home's state (and the probes') in the guest; False if it failed
        (a note, never a failed test)."""
        words = ["snapshot", ".vmtasks/changes/{}.json".format(which), "--timeout", "{:g}".format(
            self.cfg.timeouts.collect)]
        home = "/Users/" + self.cfg.vm.user + "/"
        if self.cfg.guest.dir.startswith(home):  # the synced tree is not the test's doing
            synced = self.cfg.guest.dir[len(home):]
            words += ["--exclude", synced, "--exclude", synced + "/*"]
        for pattern in self.cfg.changes.exclude:
            words += ["--exclude", pattern]
        for name, command in self.cfg.changes.probes.items():
            words += ["--probe", "{}={}".format(name, command)]
        started = time.monotonic()
        try:
            result = self.remote("cd && " + self._evidence_command(*words),
                                 self.cfg.timeouts.collect * (1 + len(self.cfg.changes.probes)) + 30)
            ok = result.exit_code == 0
        except (RemoteTimeout, SshError) as exc:
            ctx.evidence.append("changes: the {} snapshot failed on {}: {}".format(which, self.name, exc.message))
            ok = False
        ctx.changes_seconds += time.monotonic() - started
        return ok

    def _record_changes(self, ctx: VmContext, test: str, failed: bool) -> None:
        """After a test: snapshot again, keep the difference in ``changes/<test>.txt``; for a
        failed test, the summary gets its first lines and what the tests before it changed."""
        if not self._snapshot(ctx, "after"):
            return
        out: List[str] = []
        started = time.monotonic()
        try:
            self.remote("cd && " + self._evidence_command("diff", ".vmtasks/changes/before.json",
                                                          ".vmtasks/changes/after.json"),
                        self.cfg.timeouts.collect, on_output=out.append)
        except (RemoteTimeout, SshError) as exc:
            ctx.evidence.append("changes of {}: the comparison failed: {}".format(test, exc.message))
            return
        finally:
            ctx.changes_seconds += time.monotonic() - started
        text = "".join(out)
        lines = [line for line in text.splitlines() if line.strip()]
        name = evidence.safe_part(test) + ".txt"
        if self.record_key:  # several VMs (or attempts) may run the same test: name the VM
            name = evidence.safe_part(test) + "." + evidence.safe_part(self.name) + ".txt"
        try:
            path = self.services.record.dir / "changes" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        except OSError as exc:
            ctx.evidence.append("changes of {}: not kept: {}".format(test, exc.strerror or exc))
        if failed:
            head = "; ".join(lines[:3]) + (" (+{} more)".format(len(lines) - 3) if len(lines) > 3 else "")
            before = ", ".join("{} ({} change{})".format(t, n, "" if n == 1 else "s") for t, n in ctx.changed)
            ctx.evidence.append("changes of {} on {}: {}{}".format(
                test, self.name, head or "none", "; before it on this VM: " + before if before else
                "; it was the first test on this VM"))
        ctx.changed.append((test, len(lines)))

    # -- teardown ----------------------------------------------------------
    def keep_wanted(self) -> bool:
        failed = self.ctx.error is not None or self.ctx.exit_code != 0
        return self.cfg.keep == "always" or (self.cfg.keep == "on-failure" and failed)

    def _teardown(self, ctx: VmContext) -> None:
        if ctx.conn is not None:
            try:
                ctx.conn.close()
            except Exception:  # noqa: BLE001 - a broken transport is already closed for us
                pass
        if self.keep_wanted() and ctx.machine.alive() and ctx.key is not None:
            self._keep(ctx)
            ctx.stage_status, ctx.stage_note = "ok", "kept"
            return
        try:
            ctx.machine.destroy(self.cfg.timeouts.teardown)
            if ctx.lease is not None:
                self.services.ledger.release(self.name)
                shutil.rmtree(ctx.lease.key_dir, ignore_errors=True)
        except VmtasksError as exc:
            self.services.reporter.error("teardown of {} failed: {}".format(self.name, exc.message))
            self.services.reporter.error(self.leftovers())
            ctx.teardown_failed = True
            raise

    def _keep(self, ctx: VmContext) -> None:
        ctx.kept = True
        ctx.lease = dataclasses.replace(ctx.lease, keep=True, keep_until=time.time() + self.cfg.keep_for * 3600)
        self.services.ledger.write(ctx.lease)
        target = ctx.machine.ssh_target()
        attach = ssh.attach_command(target.host, self.cfg.vm.user, self._run_key(), target.proxy_command)
        until = time.strftime("%Y-%m-%d %H:%M", time.localtime(ctx.lease.keep_until))
        slot = ""
        if isinstance(ctx.machine, SuspendableMachine):
            # Its evidence is collected and its tests are over: suspended, it holds no VM slot.
            why = ctx.machine.suspend_kept(self.cfg.timeouts.teardown)
            slot = "; suspended: it holds no VM slot, vm-login resumes it" if not why else \
                "; not suspended ({}): it holds a VM slot until it is removed".format(why)
            if not why:
                attach += "   (once vm-login has resumed it)"
        self.services.reporter.vm_kept(self.name, attach, self.remove_command(),
                                       sweep_cmd=self.services.cleanup_command + " --include-kept",
                                       login_cmd=task_command(self.cfg, "vm-login " + self.name),
                                       until="until {} (keep_for {:g} h); then cleanup-orphans removes it{}".format(
                                           until, self.cfg.keep_for, slot))

    def remove_command(self) -> str:
        """Paste-able: removes the VM, its key dir and its lease."""
        parts = [self.ctx.machine.remove_by_hand()]
        if self.ctx.lease is not None:
            parts.append(self.services.ledger.forget_command(self.name, self.ctx.lease.key_dir))
        return "; ".join(parts)

    def leftovers(self) -> str:
        return ("left behind: VM {vm} and its key (the lease stays so the sweep can find them)\n"
                "  remove with: {sweep}\n  or by hand:  {hand}".format(
                    vm=self.name, sweep=self.services.cleanup_command, hand=self.remove_command()))
