"""One run of the suite, on one VM or many.

The run's own stages (``run_stages``: pre-flight, sweep, build, image, compile) run in the main
thread; then one ``VmPipeline`` per VM runs in its own thread (vmtasks/lifecycle/vm.py). With one VM
the suite runs as one ``go test -json`` (as the old driver did); with several, the suite's
own listing feeds a shared queue (vmtasks/lifecycle/queue.py) that each VM takes tests from, longest
first. The main thread watches signals, waits, then merges the VMs' results into one
summary, one JUnit file, one durations update and one exit code.
"""

from __future__ import annotations

import dataclasses
import secrets
import shutil
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from vmtasks.guest import gotest, results, schedule
from vmtasks.guest.errors import Cancelled, Interrupted, StageError, VmtasksError, describe_unexpected
from vmtasks.settings.factory import task_command
from vmtasks.state import orphans
from vmtasks.transport.signals import SignalGuard

from . import images, prepare, replay
from .backend import Owner, PreparedImages, ResumableMachine
from .finish import RunEnd
from .pipeline import Stage, StageRunner, plan_lines
from .queue import TestQueue
from .vm import VmPipeline, VmServices, guest_env_words, tool_bundle


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


@dataclass(frozen=True)
class RunRequest:
    """What the user asked for, on top of the config."""

    test: Optional[str] = None  # a go test -run regex; None runs the whole suite
    vms: int = 1
    junitfile: Optional[str] = None
    jsonfile: Optional[str] = None
    allow_no_tests: bool = False
    rerun_source: str = ""  # "--rerun-failed took these from run X"
    prepared: str = "auto"  # auto: use a matching prepared image; build: make it if missing; never
    only_prepare: bool = False  # vm-prepare: build the image, run no tests
    retries: int = 0  # a failed test runs again up to this many times, each time alone on a fresh VM
    fail_on_flaky: bool = False  # a flaky test (failed, then passed on a fresh VM) fails the run
    replay: Any = None  # --replay: a vmtasks.lifecycle.replay.Replay, the tests one VM of a recorded run ran, in order
    isolate: bool = False  # --isolate: every test on its own fresh VM


class RunContext:
    """What the run's own stages share (deadline and status are set by the StageRunner)."""

    deadline = 0.0
    stage_status: Optional[str] = None
    stage_note = ""


class Run:
    def __init__(self, parts, request: RunRequest, run_id: Optional[str] = None) -> None:
        self.parts = parts
        self.cfg = parts.cfg
        self.request = request
        self.backend = parts.backend
        self.ledger = parts.ledger
        self.reporter = parts.reporter
        self.run_id = run_id or new_run_id()
        self.record = parts.new_record(self.run_id)
        self.runner = parts.runner_for(self.record)
        self.cleanup_command = parts.cleanup_command
        self.cancel = threading.Event()
        self.vm_count = 1 if request.replay is not None else max(1, request.vms)
        # The queue runs each test as its own invocation: with several VMs, and with --changes
        # (what each test changed is only known test by test), one VM too.
        self.queued = self.vm_count > 1 or self.cfg.suite.changes or request.replay is not None or request.isolate
        self.queue: Optional[TestQueue] = None
        self.image = getattr(self.backend, "image", None) or self.cfg.vm.base
        self.skip_setup = False
        self.sync_excludes = parts.sync_excludes
        self.pipelines: List[VmPipeline] = []  # the VMs that run tests
        self.retry_pipelines: List[VmPipeline] = []  # fresh VMs that each ran one failed test again
        self.retries: Dict[gotest.TestId, List[Tuple[str, VmPipeline]]] = {}  # test -> (vm, pipeline) per retry
        self.running: List[VmPipeline] = []  # the pipelines started last (tests, or an image build)
        self.image_name = ""
        self._bundle: Optional[bytes] = None
        self._bundle_lock = threading.Lock()
        self.expected: List[gotest.TestItem] = []
        self.listed_tests: Optional[List[gotest.TestId]] = None  # one VM: the tests that count
        self.no_test_matched = False  # one VM: the host's listing matched nothing, so no VM boots
        self.listed = None
        self.bin_dir: Optional[Path] = None
        self.guard = SignalGuard(self.cancel, in_teardown=self._in_teardown)
        self.host_runner: Optional[StageRunner] = None
        self.ctx = RunContext()
        self.exit_code = 1
        self.notes: List[str] = []
        self.vm_errors: List[str] = []
        self.summary = None

    # -- the stage table -------------------------------------------------------
    def run_stages(self) -> List[Stage]:
        cfg = self.cfg
        return [
            Stage("preflight", "check tools, base image, state dir and run records; create nothing",
                  self._preflight, None, lambda ctx: ["{}: {} must exist".format(self.backend.describe(), self.image)]),
            Stage("sweep", "remove {}-* VMs whose owning run is gone (never a live run's)".format(cfg.vm.name_prefix),
                  self._sweep),
            Stage("build", "host build commands (config: build)", self._build, "build",
                  lambda ctx: list(cfg.build), enabled=lambda ctx: bool(cfg.build)),
            Stage("image", "pick the prepared image matching this setup{}".format(
                      ", build it if missing" if self.request.prepared == "build" or self.request.only_prepare
                      else " (`invoke vm-prepare` builds one)"), self._image, "prepare",
                  enabled=lambda ctx: self._images_apply()),
            Stage("compile", "list the suite's tests and compile one test binary per package (`go test -c`)",
                  self._compile, "build", lambda ctx: ["go list ...; go test -c -o <bin>/<pkg>.test ...; "
                                                       "<pkg>.test -test.list <regex>"],
                  enabled=lambda ctx: self.queued and not self.request.only_prepare),
            Stage("list", "list the suite's tests on the host (`go test -list`, never destructive): only they "
                  "count, whatever a test prints", self._list, "build",
                  lambda ctx: ["go test -list <regex> -json <build flags> <packages>"],
                  enabled=lambda ctx: not self.queued and not self.request.only_prepare),
        ]

    def plan(self) -> List[str]:
        """--dry-run: the same tables the run walks."""
        lines = ["Plan for run {} (dry run: nothing is created)".format(self.run_id),
                 "  config: {}".format(self.cfg.source), "  project: {}".format(self.cfg.project_dir),
                 "  backend: {}, {} VM{}".format(self.backend.describe(), self.vm_count,
                                                  "s" if self.vm_count > 1 else "")]
        lines += plan_lines(self.run_stages(), self.ctx, self.cfg)
        if self.queued:
            self.queue = TestQueue([], gotest.GoSuite((), (), (), self.request.test), Path("<bin>"), True, [])
        name = "{}-{}".format(self.cfg.vm.name_prefix, self.run_id)
        example = self._pipeline(name)
        if self.vm_count > 1:
            lines.append("  then, for each of the {} VMs ({}-{}-<n>), in its own thread:".format(
                self.vm_count, self.cfg.vm.name_prefix, self.run_id))
        else:
            lines.append("  then, for the VM:")
        lines += ["  " + line for line in plan_lines(example.stages() + [example.teardown_stage()], example.ctx,
                                                      self.cfg)]
        self.queue = None
        if self.request.retries:
            lines.append("  then, for each failed test, up to {} time{}: run it again alone on a fresh VM ({}-{}-r<n>, "
                         "the same stages; at most {} at once)".format(
                             self.request.retries, "s" if self.request.retries > 1 else "", self.cfg.vm.name_prefix,
                             self.run_id, self.vm_count))
        lines.append("  finally: one summary, JUnit, durations update, exit code")
        return lines

    # -- the whole run ---------------------------------------------------------
    def execute(self) -> int:
        """The whole run under one guard: a signal, an error or a bug anywhere (the host
        stages, starting the VMs, the merge) still ends in teardown and result.json."""
        with self.guard:
            try:
                try:
                    self._run_level()
                    if not self.cancel.is_set() and not self.request.only_prepare and not self.no_test_matched:
                        if self.request.isolate:
                            self._isolated()
                        else:
                            self._vms()
                        self._retry_failed()
                except (Interrupted, Cancelled):
                    pass
                except VmtasksError as exc:
                    self.exit_code = exc.exit_code
                    self.reporter.error(exc.render())
                    self.vm_errors.append(exc.message)
                except Exception as exc:  # a bug: stop the VMs, keep its traceback, still finish
                    self.cancel.set()
                    self._note_bug("run", exc)
                finally:
                    self._wait_for_teardown(self.pipelines + self.retry_pipelines)
                self._announce_signals()
                return self._finish()
            except Exception as exc:  # a bug in the merge or the result files: the record still ends
                self._note_bug("finish", exc)
                return self._finish_after_bug()

    def _note_bug(self, where: str, exc: Exception) -> None:
        """An unexpected error outside any stage: its traceback goes to errors.log."""
        text = traceback.format_exc()
        path = self.record.note_traceback("host", where, text)
        if getattr(self.reporter, "verbose", False):
            self.reporter.error(text.rstrip())
        error = VmtasksError("unexpected error ({}): {}".format(where, describe_unexpected(exc)),
                             "this is a bug in vmtasks; the traceback is in " + path)
        self.reporter.error(error.render())
        self.vm_errors.append(error.message)
        self.exit_code = 1

    def _finish_after_bug(self) -> int:
        """result.json when the normal end failed: exit 1, what is known of the run."""
        interrupted = self.guard.received is not None
        code = (self.guard.exit_code or 130) if interrupted else 1
        try:
            every = self.pipelines + self.retry_pipelines
            self.record.finish(vms=[p.name for p in every], exit_code=code,
                               kept=[p.name for p in every if p.ctx.kept], test=self.request.test,
                               interrupted=interrupted, errors=list(self.vm_errors))
        except Exception:  # noqa: BLE001 - the record itself is what broke: the exit code still says it
            pass
        self.exit_code = code
        return code

    def _run_level(self) -> None:
        runner = self.host_runner = StageRunner(self.cfg, self.reporter, self.record, "host", self.cancel)
        for stage in self.run_stages():
            if self.cancel.is_set():
                raise Cancelled("the run is stopping")
            if stage.enabled(self.ctx):
                runner.run(stage, self.ctx)
            self._announce_signals()

    def _preflight(self, ctx) -> None:
        self.record.create(self.cfg.to_json())
        self.parts.check_host_paths()
        self.listed = self.backend.preflight(self.image)
        self.ledger.ensure()

    def _sweep(self, ctx) -> None:
        orphans.sweep(self.reporter, self.parts, listed=self.listed, quiet=True)

    def _build(self, ctx) -> None:
        for command in self.cfg.build:
            self.reporter.info("   $ " + command)
            left = max(1.0, ctx.deadline - time.monotonic())
            done = self.runner.run(command, shell=True, cwd=self.cfg.project_dir, timeout=left, cancel=self.cancel)
            if not done.ok:
                raise StageError("build", "host", "`{}` exited {}".format(command, done.returncode),
                                 "fix the build on the host first (config: build)",
                                 (done.stdout + done.stderr).splitlines()[-15:])

    def _compile(self, ctx) -> None:
        suite = gotest.parse_suite(self.cfg.suite.all, self.request.test)
        self.bin_dir = Path(tempfile.mkdtemp(prefix="vmtasks-testbin-"))
        left = lambda: max(1.0, ctx.deadline - time.monotonic())  # noqa: E731
        packages = gotest.list_packages(self.runner, self.cfg.project_dir, suite, left(), self.cancel)
        items: List[gotest.TestItem] = []
        for package in packages:
            gotest.compile_package(self.runner, self.cfg.project_dir, suite, package, self.bin_dir, left(), self.cancel)
            items += gotest.list_tests(self.runner, self.cfg.project_dir, suite, package, self.bin_dir,
                                       cancel=self.cancel, on_note=self._listing_note)
        framing = bool(packages) and gotest.supports_test2json_framing(
            self.runner, self.bin_dir / packages[0].binary, str(Path(self.cfg.project_dir) / packages[0].rel_dir))
        history = results.History.load(self.cfg.suite.durations)
        ids = {i.key: i for i in items}
        estimates = {t: history.estimate(t.package, t.name) for t in ids}
        ordered = [ids[t] for t in schedule.longest_first(list(ids), estimates.get)]
        if self.request.replay is not None:  # one fresh VM, the recorded VM's tests in its order
            ordered, missing = replay.order(ordered, self.request.replay)
            if missing:
                self.notes.append("replay: the suite no longer has {}: left out".format(", ".join(missing)))
        self.expected = ordered
        self.queue = TestQueue(ordered, suite, self.bin_dir, framing, guest_env_words(self.cfg))
        total = sum(estimates[i.key] for i in ordered)
        ctx.stage_note = "{} tests in {} packages, ~{:.0f}s of work".format(len(ordered), len(packages), total)
        ctx.stage_status = "ok"
        self.reporter.info("   {} tests, {}, over {} VMs (estimated {:.0f}s of work, ".format(
            len(ordered), "longest first" if self.request.replay is None else "in the replayed order",
            self.vm_count, total) + "lower bound {:.0f}s)".format(
                schedule.lower_bound([estimates[i.key] for i in ordered], self.vm_count)))

    def _list(self, ctx) -> None:
        """One VM: the suite's own listing decides which of go's test events count (go before
        1.20 turns a test's printed `--- FAIL: TestX` into an event for TestX). Best effort:
        a suite the host cannot list runs as before, and the run says so."""
        try:
            suite = gotest.parse_suite(self.cfg.suite.all, self.request.test)
            listed = gotest.list_suite(self.runner, self.cfg.project_dir, suite,
                                       max(1.0, ctx.deadline - time.monotonic()), self.cancel,
                                       on_note=self._listing_note)
        except (Cancelled, Interrupted):
            raise
        except VmtasksError as exc:
            # go's own last line says why (a wrong module root, a build error): show it.
            tail = getattr(exc, "tail", None) or []
            listed, why = [], exc.message + ("; go said: " + tail[-1].strip() if tail else "")
        else:
            if not listed:  # nothing matches: say so now, with the nearest names, and boot no VM
                self.no_test_matched = bool(self.request.test)
                if self.no_test_matched:
                    left = max(1.0, ctx.deadline - time.monotonic())
                    self.notes.append(gotest.no_match_note(self.runner, self.cfg.project_dir, self.cfg.suite.all,
                                                           self.request.test or "", left, self.cancel))
                ctx.stage_status, ctx.stage_note = "ok", "no test listed" + (": no VM booted" * self.no_test_matched)
                return
        if not listed:
            note = "the suite's tests could not be listed on the host ({}): every test go reports counts".format(why)
            self.reporter.warn(note)
            self.notes.append(note)
            ctx.stage_status, ctx.stage_note = "ok", "not listed: every reported test counts"
            return
        self.listed_tests = listed
        ctx.stage_status, ctx.stage_note = "ok", "{} tests".format(len(listed))

    def _listing_note(self, text: str) -> None:
        self.reporter.warn(text)
        self.notes.append(text)

    def tool_bundle(self) -> bytes:
        """The guest-side tool bundle, built once per run (every VM and the image hash use it)."""
        with self._bundle_lock:
            if self._bundle is None:
                self._bundle = tool_bundle(self.cfg)
            return self._bundle

    # -- prepared images -------------------------------------------------------
    def _images_apply(self) -> bool:
        if not isinstance(self.backend, PreparedImages) or self.request.prepared == "never":
            return False
        return self.request.only_prepare or self.request.prepared == "build" or self.cfg.prepared

    def _image(self, ctx) -> None:
        plan = prepare.image_plan(self.parts, self.listed, bundle=self.tool_bundle())
        building = self.request.only_prepare or self.request.prepared == "build"
        if plan.exists:
            if self.request.only_prepare:
                ctx.stage_note = "up to date: " + plan.name
            else:
                self.image, self.skip_setup = plan.name, True
                ctx.stage_note = "using {} (setup steps skipped)".format(plan.name)
        if building:
            made = self._build_image(plan)
            if not plan.exists:
                ctx.stage_note = "built " + plan.name
            if not self.request.only_prepare:
                self.image, self.skip_setup = plan.name, True
            if made:
                ctx.stage_note += "; suspended for resume: " + ", ".join(made)
        elif not plan.exists:
            self.reporter.info("   no prepared image for this setup ({}): the VM runs the setup steps; "
                               "`{}` builds one (or pass --prepare)".format(
                                   plan.why, task_command(self.cfg, "vm-prepare")))
            ctx.stage_note = "none: plain path"
        ctx.stage_status = "ok"
        self.image_name = plan.name

    def _build_image(self, plan) -> List[str]:
        """Under the image's lock: build it unless it exists (another run may have built it
        while we waited), then its suspended slot copies. Returns the slot images made."""
        prefix, state = self.cfg.vm.name_prefix, self.ledger.state_dir
        with images.BuildLock(state, plan.hash, image=plan.name, run_id=self.run_id, on_wait=self.reporter.info,
                              timeout=self.cfg.timeouts.prepare, cancel=self.cancel):
            listing = self.backend.list_vms()
            if images.find_prepared(listing, prefix, plan.hash) is None:
                self._build_stopped_image(plan, listing)
            elif not plan.exists:
                self.reporter.info("   {} was built meanwhile by another run".format(plan.name))
            slots = min(self.vm_count, self.backend.slots() or self.vm_count)
            assert isinstance(self.backend, PreparedImages)  # the image stage runs only then
            return self.backend.build_suspended_slots(self.services(), plan, slots)

    def _build_stopped_image(self, plan, listing) -> None:
        prefix = self.cfg.vm.name_prefix
        # We hold the build lock: a VM under this build's name is a dead build's.
        for vm in images.leftover_builds(listing, prefix):
            building = images.parse_building(prefix, vm.name)
            if building is not None and building.hash == plan.hash:
                self.backend.remove(vm.name, self.cfg.timeouts.teardown)
                self.ledger.remove(vm.name)
        self.reporter.info("   building prepared image {}: {}".format(plan.name, plan.why))
        builder = VmPipeline(self.services(), plan.building,
                             self.backend.machine(plan.building, self._owner(), self.cfg), image=self.cfg.vm.base,
                             building=plan)
        self.reporter.vm_added(plan.building)
        self._start([builder])
        self._wait_for_teardown([builder])
        if self.cancel.is_set():
            raise Cancelled("the run is stopping")
        if builder.ctx.error is not None:
            raise builder.ctx.error

    # -- the VMs ---------------------------------------------------------------
    def _owner(self) -> Owner:
        return self.parts.owner(self.run_id)

    def _isolated(self) -> None:
        """--isolate: every test on its own fresh VM (a new clone of the run's image on which
        nothing else ran), at most ``vms`` at once, each torn down once its test (and its
        evidence) is done. The summary says what that costs per test."""
        assert self.queue is not None  # isolation runs each test as its own invocation
        items = list(self.queue.items)
        started = time.monotonic()
        for start in range(0, len(items), self.vm_count):
            if self.cancel.is_set() or self.guard.abandon.is_set():
                break
            batch = []
            for item in items[start:start + self.vm_count]:
                number = len(self.pipelines) + 1
                name = "{}-{}-t{}".format(self.cfg.vm.name_prefix, self.run_id, number)
                queue = TestQueue([item], self.queue.suite, self.queue.bin_dir, self.queue.framing,
                                  self.queue.env_words)
                pipeline = VmPipeline(dataclasses.replace(self.services(), queue=queue), name,
                                      self.backend.machine(name, self._owner(), self.cfg), image=self.image,
                                      prepared=self.skip_setup, own_folder=True)
                batch.append(pipeline)
                self.pipelines.append(pipeline)
                self.reporter.vm_added(name, label="t{}".format(number))
            self._start(batch)
            self._wait_for_teardown(batch)
        ran = [p for p in self.pipelines if p.ctx.tests_run]
        if ran:
            wall = time.monotonic() - started
            per_test = max(0.0, wall * min(self.vm_count, len(ran)) - sum(p.ctx.busy for p in ran)) / len(ran)
            self.notes.append("isolation: {} test{} on {} fresh VMs, about {:.1f}s per test for its VM (clone to "
                              "teardown) beyond the test itself".format(len(ran), "" if len(ran) == 1 else "s",
                                                                         len(ran), per_test))

    def _vms(self) -> None:
        count = self.vm_count
        if self.queue is not None:
            count = min(count, len(self.queue.items))
            if count == 0:
                return
        names = ["{}-{}".format(self.cfg.vm.name_prefix, self.run_id)] if self.vm_count == 1 else \
            ["{}-{}-{}".format(self.cfg.vm.name_prefix, self.run_id, n + 1) for n in range(count)]
        suspended = self._suspended_slots() if self.skip_setup else {}
        for index, name in enumerate(names, 1):
            pipeline = self._pipeline(name)
            if index in suspended and isinstance(pipeline.ctx.machine, ResumableMachine):
                # Slot N's saved state serves the run's N-th VM: one saved state per MAC.
                pipeline.image = suspended[index]
                pipeline.ctx.machine.resume_saved_state()
            self.pipelines.append(pipeline)
            self.reporter.vm_added(name, label="vm{}".format(index) if len(names) > 1 else "")
        # Lines and rows say vm1, vm2: the full names once, here.
        self.reporter.info("run {}: {} from {}{}".format(
            self.run_id, ", ".join(names) if len(names) == 1 else
            ", ".join("vm{} = {}".format(i, n) for i, n in enumerate(names, 1)), self.image,
            ", test regex {!r}".format(self.request.test) if self.request.test else ""))
        self._start(self.pipelines)

    # -- retries -----------------------------------------------------------------
    def _retry_failed(self) -> None:
        """--retries: after the first pass, each failed test runs again alone on a fresh VM
        (a new clone of the run's image, never one that ran anything), up to N times or until
        it passes; at most ``vms`` retry VMs at once. One VM: the retry runs the suite command
        with ``-run ^TestX$``; a queue: the queue's own per-test command."""
        if self.request.retries <= 0:
            return
        self._wait_for_teardown(self.pipelines)
        first = [s for p in self.pipelines for s in p.ctx.summaries]
        failing = [r.key for s in first for r in s.results if r.status == results.FAIL and "/" not in r.name]
        failing = list(dict.fromkeys(failing))
        for round_no in range(1, self.request.retries + 1):
            if not failing or self.cancel.is_set() or self.guard.abandon.is_set():
                return
            self.reporter.info("retry {} of {}: {} on fresh VMs".format(
                round_no, self.request.retries, ", ".join(name for _, name in failing)))
            for start in range(0, len(failing), self.vm_count):
                batch = [self._retry_pipeline(key, index) for index, key in
                         enumerate(failing[start:start + self.vm_count], 1)]
                self._start(batch)
                self._wait_for_teardown(batch)
                if self.cancel.is_set():
                    return
            failing = [key for key in failing
                       if results.attempt_failed(self._last_attempt(key), key)]

    def _retry_results(self):
        """Each retried test's attempts as (vm, summary); a retry that a stop (Ctrl-C) kept from
        running its test is no attempt at all (a retry VM that failed is a failed attempt)."""
        out = {}
        for key, tries in self.retries.items():
            ran = [(vm, p.ctx.summaries[-1] if p.ctx.summaries else None) for vm, p in tries
                   if p.ctx.summaries or not self.cancel.is_set()]
            if ran:
                out[key] = ran
        return out

    def _last_attempt(self, key):
        pipeline = self.retries[key][-1][1]
        return pipeline.ctx.summaries[-1] if pipeline.ctx.summaries else None

    def _retry_pipeline(self, key: gotest.TestId, slot: int) -> VmPipeline:
        number = len(self.retry_pipelines) + 1
        name = "{}-{}-r{}".format(self.cfg.vm.name_prefix, self.run_id, number)
        machine = self.backend.machine(name, self._owner(), self.cfg)
        if self.queue is not None:
            item = next(i for i in self.expected if i.key == key)
            queue = TestQueue([item], self.queue.suite, self.queue.bin_dir, self.queue.framing,
                              self.queue.env_words)
            services = dataclasses.replace(self.services(), queue=queue)
            pipeline = VmPipeline(services, name, machine, image=self.image, prepared=self.skip_setup,
                                  own_folder=True)
        else:
            pipeline = VmPipeline(self.services(), name, machine, image=self.image, prepared=self.skip_setup,
                                  own_folder=True, test=results.rerun_regex([key.name]), expected=[key])
        suspended = self._suspended_slots() if self.skip_setup else {}
        if slot in suspended and isinstance(machine, ResumableMachine):
            pipeline.image = suspended[slot]
            machine.resume_saved_state()
        self.retry_pipelines.append(pipeline)
        self.retries.setdefault(key, []).append((name, pipeline))
        self.reporter.vm_added(name, label="retry{}".format(number))
        return pipeline

    def services(self) -> VmServices:
        """What a VM pipeline gets of this run."""
        return VmServices(cfg=self.cfg, backend=self.backend, cancel=self.cancel, ledger=self.ledger,
                          record=self.record, reporter=self.reporter, runner=self.runner, run_id=self.run_id,
                          tool_bundle=self.tool_bundle, sync_excludes=self.sync_excludes,
                          cleanup_command=self.cleanup_command, queue=self.queue)

    def _pipeline(self, name: str) -> VmPipeline:
        """A VM that runs tests (all of them, or its share of the queue)."""
        return VmPipeline(self.services(), name, self.backend.machine(name, self._owner(), self.cfg),
                          image=self.image, prepared=self.skip_setup, own_folder=self.vm_count > 1,
                          test=self.request.test, expected=self.listed_tests)

    def _start(self, pipelines: List[VmPipeline]) -> None:
        self.running = pipelines
        for pipeline in pipelines:
            threading.Thread(target=pipeline.execute, name=pipeline.name, daemon=True).start()

    def _suspended_slots(self):
        """{slot: image} of the prepared image's suspended copies (vm-prepare makes them
        where the backend can suspend)."""
        prefix = self.cfg.vm.name_prefix
        plan = images.parse_prepared(prefix, self.image)
        if plan is None or not isinstance(self.backend, PreparedImages):
            return {}
        out = {}
        for vm in self.backend.list_vms():
            parsed = images.parse_prepared(prefix, vm.name)
            if parsed is not None and parsed.hash == plan.hash and parsed.slot and vm.state == "suspended":
                out[parsed.slot] = vm.name
        return out

    def _in_teardown(self) -> bool:
        return bool(self.running) and all(p.tearing_down for p in self.running)

    def _wait_for_teardown(self, pipelines: Optional[List[VmPipeline]] = None) -> None:
        """Wait for the VMs' pipelines (teardown included), watching for signals."""
        pipelines = self.pipelines if pipelines is None else pipelines
        while not all(p.teardown_done.is_set() for p in pipelines):
            self._announce_signals()
            if self.guard.abandon.is_set():
                for p in pipelines:
                    if not p.teardown_done.is_set():
                        self.reporter.error(p.leftovers())
                        self.vm_errors.append("teardown of {} abandoned".format(p.name))
                return
            for p in pipelines:
                p.teardown_done.wait(0.1)

    def _announce_signals(self) -> None:
        for line in self.guard.news():
            self.reporter.warn(line)

    # -- results -----------------------------------------------------------------
    def _finish(self) -> int:
        runners = [self.host_runner] + [p.runner for p in self.pipelines + self.retry_pipelines]
        where = [r.interrupted_at for r in runners if r is not None and r.interrupted_at]
        end = RunEnd(cfg=self.cfg, request=self.request, record=self.record, reporter=self.reporter,
                     pipelines=self.pipelines,
                     vm_count=max(self.vm_count, len(self.pipelines)) if self.request.isolate else self.vm_count,
                     queued=self.queue is not None,
                     expected=self.expected, notes=self.notes, vm_errors=self.vm_errors, exit_code=self.exit_code,
                     signal=self.guard.received, signal_exit_code=self.guard.exit_code,
                     interrupted_at=where[0] if where else "", image_name=self.image_name,
                     no_test_matched=self.no_test_matched,
                     retries=self._retry_results(),
                     retry_pipelines=self.retry_pipelines)
        try:
            self.exit_code = end.finish()
        finally:
            self.summary = end.summary
            if self.bin_dir is not None:
                shutil.rmtree(str(self.bin_dir), ignore_errors=True)
        return self.exit_code
