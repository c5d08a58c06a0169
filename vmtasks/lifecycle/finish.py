"""The end of a run: merge the VMs' results, mark what nobody ran, decide the exit code,
write the result files (JUnit, --jsonfile, durations), show the summary and finish the
record. Reads what the run's stages and VM pipelines left; never touches a VM."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from vmtasks.guest import results
from vmtasks.guest.errors import Interrupted, NoSlot, VmtasksError
from vmtasks.ui.html_report import write_for_run
from vmtasks.ui.report import timeline_text

from .replay import verdict as replay_verdict

EXIT_NO_TESTS = 5  # as pytest: nothing was collected / ran


@dataclass
class RunEnd:
    """What the end of a run reads: the request, the record and reporter, the VM pipelines
    (``ctx``: error, summaries, exit code, kept), the tests the queue expected, the notes and
    errors gathered so far, and the signal that stopped the run (if any)."""

    cfg: Any
    request: Any
    record: Any
    reporter: Any
    pipelines: List[Any]
    vm_count: int
    queued: bool = False  # several VMs shared a queue: its tests nobody ran are "not run"
    expected: List[Any] = field(default_factory=list)  # gotest.TestItem, the queue's tests
    notes: List[str] = field(default_factory=list)
    vm_errors: List[str] = field(default_factory=list)
    exit_code: int = 1  # so far (a host stage's error)
    signal: Optional[int] = None
    signal_exit_code: Optional[int] = None
    interrupted_at: str = ""  # the stage a signal stopped
    image_name: str = ""  # vm-prepare: the image it made
    no_test_matched: bool = False  # one VM: the host's listing matched nothing, so no VM booted
    retries: Dict[Any, List[Any]] = field(default_factory=dict)  # TestId -> [(vm, Summary or None)] per retry
    retry_pipelines: List[Any] = field(default_factory=list)  # the fresh VMs the retries ran on
    summary: Any = None

    def finish(self) -> int:
        """Merge, not-run, exit code, result files, summary; returns the exit code."""
        interrupted = self.signal is not None
        if self.signal is not None:
            self.reporter.error(Interrupted(self.signal, self.interrupted_at).render())
        if self.request.only_prepare:
            return self._finish_prepare(interrupted)
        parts = []
        for p in self.pipelines + self.retry_pipelines:
            error = p.ctx.error
            if error is not None and not isinstance(error, Interrupted):
                if isinstance(error, NoSlot) and self.vm_count > 1:
                    self.notes.append("{} got no VM slot: its tests went to the other VMs".format(p.name))
                elif p in self.retry_pipelines and p.ctx.lost:
                    # The attempt is "lost" (its test's verdict says so); the VM's end alone
                    # does not fail the run: the test's other attempts decide.
                    self.reporter.warn(error.render())
                else:
                    self.reporter.error(error.render())
                    self.vm_errors.append(error.message)
            if p.ctx.teardown_failed:
                self.vm_errors.append("teardown of {} failed".format(p.name))
            if p in self.retry_pipelines:
                continue  # a retry's results are its test's attempts (below), not more tests
            for summary in p.ctx.summaries:  # named when the results come from several VMs
                parts.append((p.name if self.vm_count > 1 or self.retries else "", summary))
        summary = results.merge(parts) if parts else None
        if self.queued and self.expected:
            summary = results.mark_not_run(summary or results.merge([]),
                                           [i.key for i in self.expected])
        if summary is not None and self.retries:
            summary = results.with_retries(summary, self.retries)
            self.notes.extend(results.retry_notes(summary))
        self.summary = summary
        code = self._exit_code(summary, interrupted)
        if summary is not None:
            for problem in self._write_results(summary):
                self.reporter.error(problem)
                code = code or 1
        self.exit_code = code
        every = self.pipelines + self.retry_pipelines
        self.record.finish(vms=[p.name for p in every], exit_code=code,
                           kept=[p.name for p in every if p.ctx.kept],
                           failed_tests=results.failed_tests(summary) if summary is not None else [],
                           flaky_tests=[r.name for r in summary.flaky] if summary is not None else [],
                           attempts=results.attempts_data(summary) if summary is not None else {},
                           tests_run=summary.total if summary is not None else 0,
                           unfinished_tests=_unfinished(summary),
                           test=self.request.test, interrupted=interrupted)
        seconds = self.record.total_seconds()
        stopped_by = signal.Signals(self.signal).name if self.signal is not None else ""
        verdict = results.verdict_line(summary, seconds, stopped_by) if summary is not None else \
            "DONE: no test ran ({})".format("interrupted" if interrupted else "the run failed before the suite")
        if self.no_test_matched and summary is None and not interrupted:
            verdict = results.verdict_line(results.Summary(), seconds).replace(" in ", ", no test matched in ", 1)
        extra = self.notes + self._evidence_lines()
        extra += [self.record.incomplete()] if self.record.incomplete() else []
        if self.request.rerun_source:
            extra.append("rerun of the failed tests of " + self.request.rerun_source)
        if self.request.replay is not None:
            extra.append(replay_verdict(self.request.replay,
                                        results.failed_tests(summary) if summary is not None else []))
        extra += filter(None, [write_for_run(self.record, summary, verdict)])  # never raises: "report: <path>"
        text = self.reporter.run_done(summary, seconds, verdict, str(self.record.dir), extra)
        self.record.write_text("summary.txt", text)
        if summary is not None and self.vm_count > 1:
            self.record.write_text("timeline.txt", timeline_text(summary))
        self.record.prune(self.cfg.records.keep_last)
        return code

    def _evidence_lines(self) -> List[str]:
        """What the VMs collected, for the summary: every VM's evidence lines (a retry's fresh VM
        too: a failure there, on a clean machine, is the telling one), then where what each
        test changed went."""
        every = self.pipelines + self.retry_pipelines
        lines = [line for p in every for line in p.ctx.evidence]
        changed = sum(len(p.ctx.changed) for p in every)
        if changed:
            cost = sum(p.ctx.changes_seconds for p in every) / changed
            lines.append("changes: what each of {} test{} changed is in {}/changes/ ({:.2f}s per test for the "
                         "snapshots and the comparison)".format(changed, "" if changed == 1 else "s",
                                                                 self.record.dir, cost))
        return lines

    def _finish_prepare(self, interrupted: bool) -> int:
        """vm-prepare's end: one line saying which image is ready (or why not)."""
        code = (self.signal_exit_code or 130) if interrupted else (self.exit_code or 1 if self.vm_errors else 0)
        self.record.finish(image=self.image_name, exit_code=code, interrupted=interrupted)
        verdict = "DONE prepared image {} ready".format(self.image_name) if code == 0 else \
            "FAILED: no prepared image built (exit {})".format(code)
        self.reporter.run_done(None, self.record.total_seconds(), verdict, str(self.record.dir), self.notes)
        return code

    def _exit_code(self, summary, interrupted: bool) -> int:
        code = self._tests_exit_code(summary, interrupted)
        if code == 0 and summary is not None and summary.flaky and self.request.fail_on_flaky:
            self.notes.append("--fail-on-flaky: {} flaky: exit 1".format(", ".join(r.name for r in summary.flaky)))
            return 1
        return code

    def _tests_exit_code(self, summary, interrupted: bool) -> int:
        if interrupted:
            return self.signal_exit_code or 130
        pipeline_codes = [p.ctx.exit_code for p in self.pipelines if p.ctx.error is None]
        if self.vm_errors:
            return next((p.ctx.error.exit_code for p in self.pipelines
                         if p.ctx.error is not None and not isinstance(p.ctx.error, NoSlot)),
                        self.exit_code) or 1  # a run-level error's own code (a config error: 2)
        if self.vm_count == 1 and self.pipelines:
            code = self.pipelines[0].ctx.exit_code
            if code == 0 and summary is not None and summary.total == 0 and not self.request.allow_no_tests:
                self.notes.append("no test ran: check the --test regex (exit {}; --allow-no-tests to accept)"
                                  .format(EXIT_NO_TESTS))
                return EXIT_NO_TESTS
            if code != 0 and self.retries and summary is not None and summary.exit_ok and summary.total:
                return 0  # every test the suite failed passed on a fresh VM: flaky, not failed
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
        if self.retries:
            return 0 if summary.exit_ok else 1  # the pipelines' codes count the first attempts
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


def _unfinished(summary) -> List[str]:
    """Top-level tests a run listed but did not finish (interrupted, not run): what
    --rerun-failed offers after an interrupted run."""
    if summary is None:
        return []
    return [r.name for r in summary.results if "/" not in r.name and r.status in (results.INTERRUPTED, results.NOTRUN)]
