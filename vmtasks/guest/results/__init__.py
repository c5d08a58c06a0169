"""Test results: the model, the ``go test -json`` stream parser, JUnit, the durations history.

Split by job, as gotestsum splits ``testjson/`` and ``junitxml/``:

* :mod:`.model`: :class:`TestResult`, :class:`Summary`, :class:`Counts`, statuses,
  :func:`merge` (several VMs), :func:`mark_not_run`, :func:`verdict_line`.
* :mod:`.stream`: :class:`SuiteStream`, fed the guest's output as it arrives.
* :mod:`.junit`: :func:`write_junit`.
* :mod:`.history`: :class:`History`, durations that the scheduler reads.
* :mod:`.rerun`: :func:`rerun_regex` for ``--rerun-failed``.

Imported inside the guest (Python 3.9, standard library only).
"""

from .history import DEFAULT_PATH as DURATIONS_PATH
from .history import History
from .junit import write_junit
from .model import (
                    FAIL,
                    FLAKY,
                    INTERRUPTED,
                    NOTRUN,
                    PASS,
                    SKIP,
                    Counts,
                    PackageError,
                    PackageResult,
                    Summary,
                    TestResult,
                    attempt_failed,
                    attempts_data,
                    explain_exit,
                    failed_tests,
                    format_duration,
                    mark_not_run,
                    merge,
                    no_test_reason,
                    retry_notes,
                    verdict_line,
                    with_retries,
)
from .rerun import go_quote_meta, rerun_regex
from .stream import SuiteStream, TestEvent

__all__ = [
    "Counts", "DURATIONS_PATH", "FAIL", "FLAKY", "History", "INTERRUPTED", "NOTRUN", "PASS",
    "PackageError", "PackageResult", "SKIP", "Summary", "SuiteStream", "TestEvent", "TestResult",
    "attempt_failed", "attempts_data", "explain_exit", "failed_tests", "format_duration", "go_quote_meta",
    "mark_not_run", "merge", "no_test_reason",
    "rerun_regex", "retry_notes",
    "verdict_line", "with_retries", "write_junit",
]
