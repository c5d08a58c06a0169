"""One run of the suite, on one VM or many.

The run's own stages (``run_stages``: pre-flight, sweep, build, image, compile) run in the main
thread; then one ``VmPipeline`` per VM runs in its own thread (vmtasks/vm.py). With one VM
the suite runs as one ``go test -json`` (as the old driver did); with several, the suite's
own listing feeds a shared queue (vmtasks/queue.py) that each VM takes tests from, longest
first. The main thread watches signals, waits, then merges the VMs' results into one
summary, one JUnit file, one durations update and one exit code.
"""

from __future__ import annotations

import secrets
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from . import gotest, orphans, results, schedule
from .backend import Cancelled, NoSlot, Owner, PreparedImages, ResumableMachine
from .errors import Interrupted, StageError, VmtasksError
from .pipeline import Stage, StageRunner, plan_lines
from .queue import TestQueue
from .signals import SignalGuard
from .vm import VmPipeline, guest_env_words

EXIT_NO_TESTS = 5  # as pytest: nothing was collected / ran


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


class SummaryView:
    """The results model as the reporter reads it (vmtasks/report.py SummaryView)."""

    def __init__(self, summary) -> None:
        self.tests = summary.results
        self.package_errors = summary.package_failures


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
        self.vm_count = max(1, request.vms)
        self.queue: Optional[TestQueue] = None
        self.image = getattr(self.backend, "image", None) or self.cfg.vm.base
        self.skip_setup = False
        self.sync_excludes = parts.sync_excludes
        self.pipelines: List[VmPipeline] = []  # the VMs that run tests
        self.running: List[VmPipeline] = []  # the pipelines started last (tests, or an image build)
        self.image_name = ""
        self._bundle: Optional[bytes] = None
        self._bundle_lock = threading.Lock()
        self.expected: List[gotest.TestItem] = []
        self.listed_tests: Optional[List[Tuple[str, str]]] = None  # one VM: the tests that count
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
                  enabled=lambda ctx: self.vm_count > 1 and not self.request.only_prepare),
            Stage("list", "list the suite's tests on the host (`go test -list`, never destructive): only they "
                  "count, whatever a test prints", self._list, "build",
                  lambda ctx: ["go test -list <regex> -json <build flags> <packages>"],
                  enabled=lambda ctx: self.vm_count == 1 and not self.request.only_prepare),
        ]

    def plan(self) -> List[str]:
        """--dry-run: the same tables the run walks."""
        lines = ["Plan for run {} (dry run: nothing is created)".format(self.run_id),
                 "  config: {}".format(self.cfg.source), "  project: {}".format(self.cfg.project_dir),
                 "  backend: {}, {} VM{}".format(self.backend.describe(), self.vm_count,
                                                  "s" if self.vm_count > 1 else "")]
        lines += plan_lines(self.run_stages(), self.ctx, self.cfg)
        if self.vm_count > 1:
            self.queue = TestQueue([], gotest.GoSuite((), (), (), self.request.test), Path("<bin>"), True, [])
        name = "{}-{}".format(self.cfg.vm.name_prefix, self.run_id)
        example = VmPipeline(self, name, self.backend.machine(name, self._owner(), self.cfg))
        if self.vm_count > 1:
            lines.append("  then, for each of the {} VMs ({}-{}-<n>), in its own thread:".format(
                self.vm_count, self.cfg.vm.name_prefix, self.run_id))
        else:
            lines.append("  then, for the VM:")
        lines += ["  " + line for line in plan_lines(example.stages() + [example.teardown_stage()], example.ctx,
                                                      self.cfg)]
        self.queue = None
        lines.append("  finally: one summary, JUnit, durations update, exit code")
        return lines

    # -- the whole run ---------------------------------------------------------
    def execute(self) -> int:
        with self.guard:
            try:
                self._run_level()
                if not self.cancel.is_set() and not self.request.only_prepare:
                    self._vms()
            except (Interrupted, Cancelled):
                pass
            except VmtasksError as exc:
                self.exit_code = exc.exit_code
                self.reporter.error(exc.render())
                self.vm_errors.append(exc.message)
            finally:
                self._wait_for_teardown()
        self._announce_signals()
        return self._finish()

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
        ids = {schedule.TestId(i.package.import_path, i.name): i for i in items}
        estimates = {t: history.estimate(t.package, t.name) for t in ids}
        ordered = [ids[t] for t in schedule.longest_first(list(ids), estimates.get)]
        self.expected = ordered
        self.queue = TestQueue(ordered, suite, self.bin_dir, framing, guest_env_words(self.cfg))
        total = sum(estimates.values())
        ctx.stage_note = "{} tests in {} packages, ~{:.0f}s of work".format(len(ordered), len(packages), total)
        ctx.stage_status = "ok"
        self.reporter.info("   {} tests, longest first, over {} VMs (estimated {:.0f}s of work, "
                           "lower bound {:.0f}s)".format(len(ordered), self.vm_count, total,
                                                         schedule.lower_bound(list(estimates.values()), self.vm_count)))

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
            listed, why = [], exc.message
        else:
            if not listed:  # nothing matches: the suite will say "no test ran"
                ctx.stage_status, ctx.stage_note = "ok", "no test listed"
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
                from .vm import tool_bundle

                self._bundle = tool_bundle(self.cfg)
            return self._bundle

    # -- prepared images -------------------------------------------------------
    def _images_apply(self) -> bool:
        if not isinstance(self.backend, PreparedImages) or self.request.prepared == "never":
            return False
        return self.request.only_prepare or self.request.prepared == "build" or self.cfg.prepared

    def _image(self, ctx) -> None:
        from . import prepare

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
                               "`invoke vm-prepare` builds one (or pass --prepare)".format(plan.why))
            ctx.stage_note = "none: plain path"
        ctx.stage_status = "ok"
        self.image_name = plan.name

    def _build_image(self, plan) -> List[str]:
        """Under the image's lock: build it unless it exists (another run may have built it
        while we waited), then its suspended slot copies. Returns the slot images made."""
        from . import images

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
            return self.backend.build_suspended_slots(self, plan, slots)

    def _build_stopped_image(self, plan, listing) -> None:
        from . import images

        prefix = self.cfg.vm.name_prefix
        # We hold the build lock: a VM under this build's name is a dead build's.
        for vm in images.leftover_builds(listing, prefix):
            if images.parse_building(prefix, vm.name).hash == plan.hash:
                self.backend.remove(vm.name, self.cfg.timeouts.teardown)
                self.ledger.remove(vm.name)
        self.reporter.info("   building prepared image {}: {}".format(plan.name, plan.why))
        builder = VmPipeline(self, plan.building, self.backend.machine(plan.building, self._owner(), self.cfg),
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
            pipeline = VmPipeline(self, name, self.backend.machine(name, self._owner(), self.cfg))
            if index in suspended and isinstance(pipeline.ctx.machine, ResumableMachine):
                # Slot N's saved state serves the run's N-th VM: one saved state per MAC.
                pipeline.image = suspended[index]
                pipeline.ctx.machine.resume_saved_state()
            self.pipelines.append(pipeline)
            self.reporter.vm_added(name)
        self.reporter.info("run {}: {} from {}{}".format(
            self.run_id, ", ".join(names), self.image,
            ", test regex {!r}".format(self.request.test) if self.request.test else ""))
        self._start(self.pipelines)

    def _start(self, pipelines: List[VmPipeline]) -> None:
        self.running = pipelines
        for pipeline in pipelines:
            threading.Thread(target=pipeline.execute, name=pipeline.name, daemon=True).start()

    def _suspended_slots(self):
        """{slot: image} of the prepared image's suspended copies (vm-prepare makes them
        where the backend can suspend)."""
        from . import images

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
    def on_test_event(self, vm: str, event) -> None:
        if event.kind in ("pass", "fail", "skip", "interrupted") and not event.subtest:
            self.reporter.test_finished(vm, event.test, event.kind, event.elapsed, event.output)
        elif event.kind == "run" and not event.subtest:
            self.reporter.test_started(vm, event.test)
        elif event.kind == "package-fail":
            self.reporter.package_failed(vm, event.package, event.output)

    def _finish(self) -> int:
        interrupted = self.guard.received is not None
        if interrupted:
            where = [r.interrupted_at for r in [self.host_runner] + [p.runner for p in self.pipelines]
                     if r is not None and r.interrupted_at]
            self.reporter.error(Interrupted(self.guard.received, where[0] if where else "").render())
        if self.request.only_prepare:
            return self._finish_prepare(interrupted)
        parts = []
        for p in self.pipelines:
            error = p.ctx.error
            if error is not None and not isinstance(error, Interrupted):
                if isinstance(error, NoSlot) and self.vm_count > 1:
                    self.notes.append("{} got no VM slot: its tests went to the other VMs".format(p.name))
                else:
                    self.reporter.error(error.render())
                    self.vm_errors.append(error.message)
            if p.ctx.teardown_failed:
                self.vm_errors.append("teardown of {} failed".format(p.name))
            for summary in p.ctx.summaries:
                parts.append((p.name if self.vm_count > 1 else "", summary))
        summary = results.merge(parts) if parts else None
        if self.queue is not None and self.expected:
            summary = results.mark_not_run(summary or results.merge([]),
                                           [(i.package.import_path, i.name) for i in self.expected])
        self.summary = summary
        code = self._exit_code(summary, interrupted)
        if summary is not None:
            for problem in self._write_results(summary):
                self.reporter.error(problem)
                code = code or 1
        self.exit_code = code
        if self.bin_dir is not None:
            shutil.rmtree(str(self.bin_dir), ignore_errors=True)
        self.record.finish(vms=[p.name for p in self.pipelines], exit_code=code,
                           kept=[p.name for p in self.pipelines if p.ctx.kept],
                           failed_tests=results.failed_tests(summary) if summary is not None else [],
                           test=self.request.test, interrupted=interrupted)
        seconds = self.record.total_seconds()
        stopped_by = signal.Signals(self.guard.received).name if interrupted else ""
        verdict = results.verdict_line(summary, seconds, stopped_by) if summary is not None else \
            "DONE: no test ran ({})".format("interrupted" if interrupted else "the run failed before the suite")
        view = SummaryView(summary) if summary is not None else None
        extra = self.notes + ([self.record.incomplete()] if self.record.incomplete() else [])
        if self.request.rerun_source:
            extra.append("rerun of the failed tests of " + self.request.rerun_source)
        text = self.reporter.run_done(view, seconds, verdict, str(self.record.dir), extra)
        self.record.write_text("summary.txt", text)
        if view is not None and self.vm_count > 1:
            from .report import timeline_text

            self.record.write_text("timeline.txt", timeline_text(view))
        self.record.prune(self.cfg.records.keep_last)
        return code

    def _finish_prepare(self, interrupted: bool) -> int:
        """vm-prepare's end: one line saying which image is ready (or why not)."""
        code = (self.guard.exit_code or 130) if interrupted else (self.exit_code or 1 if self.vm_errors else 0)
        self.record.finish(image=self.image_name, exit_code=code, interrupted=interrupted)
        verdict = "DONE prepared image {} ready".format(self.image_name) if code == 0 else \
            "FAILED: no prepared image built (exit {})".format(code)
        self.reporter.run_done(None, self.record.total_seconds(), verdict, str(self.record.dir), self.notes)
        return code

    def _exit_code(self, summary, interrupted: bool) -> int:
        if interrupted:
            return self.guard.exit_code or 130
        pipeline_codes = [p.ctx.exit_code for p in self.pipelines if p.ctx.error is None]
        if self.vm_errors:
            return next((p.ctx.error.exit_code for p in self.pipelines
                         if p.ctx.error is not None and not isinstance(p.ctx.error, NoSlot)), 1) or 1
        if self.vm_count == 1 and self.pipelines:
            code = self.pipelines[0].ctx.exit_code
            if code == 0 and summary is not None and summary.total == 0 and not self.request.allow_no_tests:
                self.notes.append("no test ran: check the --test regex (exit {}; --allow-no-tests to accept)"
                                  .format(EXIT_NO_TESTS))
                return EXIT_NO_TESTS
            if code == 0 and summary is not None and not summary.exit_ok:
                # The verdict and the exit code agree: a failure the results count fails the run.
                self.notes.append("the suite exited 0, but its results have {}: exit 1".format(summary.headline()))
                return 1
            return code
        if summary is None or summary.total == 0:
            if self.request.allow_no_tests and not self.pipelines:
                return 0
            self.notes.append("no test ran: check the --test regex (exit {}; --allow-no-tests to accept)".format(
                EXIT_NO_TESTS))
            return EXIT_NO_TESTS
        if not summary.exit_ok or any(c != 0 for c in pipeline_codes):
            return 1
        return 0

    def _write_results(self, summary) -> List[str]:
        """JUnit, --jsonfile, durations. Returns what could not be written of what the user
        asked for by name (--junitfile, --jsonfile): that fails the run, as in gotestsum."""
        asked: List[str] = []
        try:
            results.write_junit(summary, self.record.path("junit.xml"))
        except VmtasksError as exc:
            self.record.note_problem("junit.xml", exc.message)
        if self.request.junitfile:
            try:
                results.write_junit(summary, Path(self.request.junitfile))
            except VmtasksError as exc:
                asked.append("--junitfile: " + exc.render())
        if self.request.jsonfile:
            problem = self.record.copy_streams(Path(self.request.jsonfile), "suite-output.txt",
                                               [p.record_key for p in self.pipelines])
            if problem:
                asked.append("--jsonfile: " + problem)
        try:
            note = results.History.update(self.cfg.suite.durations, summary)
            if note:
                self.reporter.warn(note)
        except VmtasksError as exc:
            self.record.note_problem("durations", exc.message)
        return asked
