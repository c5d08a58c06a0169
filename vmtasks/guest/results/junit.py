"""Write a :class:`~.model.Summary` as JUnit XML (the Jenkins/GitLab/GitHub flavour).

Imported inside the guest (Python 3.9, standard library only).
"""

from __future__ import annotations

import io
import math
import os
import re
import xml.etree.ElementTree as ET
from typing import IO, Any, Dict, List, Union

from ..atomic import write_atomic
from .model import FAIL, INTERRUPTED, NOTRUN, SKIP, Summary, TestResult

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")
_XML_FORBIDDEN = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# Framing lines go prints around a test's own output.
_FRAMING = re.compile(r"^\s*(=== (RUN|PAUSE|CONT|NAME)|--- (PASS|FAIL|SKIP|BENCH):)")


def _xml_text(text: str) -> str:
    """Make ``text`` storable in XML 1.0.

    ANSI colour/terminal escape sequences are removed; any other character XML 1.0
    forbids (control characters, lone surrogates, U+FFFE/U+FFFF) is replaced by a visible
    ``\\xNN`` / ``\\uNNNN`` escape.
    """
    text = _ANSI.sub("", text)

    def esc(m: "re.Match[str]") -> str:
        c = ord(m.group(0))
        return "\\x%02x" % c if c < 0x100 else "\\u%04x" % c

    return _XML_FORBIDDEN.sub(esc, text)


def _skip_reason(output: str) -> str:
    """The last line a skipped test logged (its ``t.Skip`` message), else ``"Skipped"``."""
    for line in reversed(output.splitlines()):
        if line.strip() and not _FRAMING.match(line):
            return line.strip()
    return "Skipped"


def _secs(value: float) -> str:
    return "%.3f" % (value if math.isfinite(value) and value > 0 else 0.0)


def _case(suite: ET.Element, package: str, r: TestResult, counts: Dict[str, int]) -> None:
    case = ET.SubElement(suite, "testcase", classname=_xml_text(package), name=_xml_text(r.name),
                         time=_secs(r.elapsed))
    counts["tests"] += 1
    out = _xml_text(r.output)
    if r.status == FAIL:
        counts["failures"] += 1
        ET.SubElement(case, "failure", message="Failed").text = out
        if r.attachments:
            # The Jenkins JUnit Attachments convention: one [[ATTACHMENT|path]] line each.
            ET.SubElement(case, "system-out").text = _xml_text(
                "".join("[[ATTACHMENT|{}]]\n".format(path) for path in r.attachments))
        return
    if r.status in (INTERRUPTED, NOTRUN):
        counts["errors"] += 1
        message = "interrupted" if r.status == INTERRUPTED else "not run"
        ET.SubElement(case, "error", message=message).text = out
        return
    if r.status == SKIP:
        counts["skipped"] += 1
        ET.SubElement(case, "skipped", message=_xml_text(_skip_reason(r.output)))
    if out:
        ET.SubElement(case, "system-out").text = out


def _render(summary: Summary, suite_name: str = "vmtasks", include_subtests: bool = False) -> "tuple":
    """The JUnit document as UTF-8 bytes, and its root counts (see :func:`write_junit`)."""
    by_package: Dict[str, List[TestResult]] = {name: [] for name in summary.packages}
    for e in summary.package_errors:
        by_package.setdefault(e.package, [])
    for r in summary.results:
        by_package.setdefault(r.package, []).append(r)
    errors_by_package: Dict[str, list] = {}
    for e in summary.package_errors:
        errors_by_package.setdefault(e.package, []).append(e)

    root = ET.Element("testsuites")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for pkg_name, top in by_package.items():
        pkg = summary.packages.get(pkg_name)
        pkg_errors = errors_by_package.get(pkg_name, [])
        if not top and not pkg_errors:
            continue  # no tests here ([no test files], filtered out by -run)
        suite = ET.SubElement(root, "testsuite")
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        for r in top:
            for attempt in r.attempts or [r]:  # a retried test: every attempt is its own testcase
                for each in (attempt.walk() if include_subtests else [attempt]):
                    _case(suite, pkg_name, each, counts)
        for e in pkg_errors:
            case = ET.SubElement(suite, "testcase", classname=_xml_text(pkg_name),
                                 name="[build failed]" if e.build_failed else "[package failed]",
                                 time=_secs(pkg.elapsed or 0.0) if pkg is not None else "0.000")
            counts["tests"] += 1
            counts["errors"] += 1
            ET.SubElement(case, "error", message="build failed" if e.build_failed else "package failed"
                          ).text = _xml_text(e.text)
        if pkg is not None and pkg.elapsed is not None:
            suite_time = pkg.elapsed
        else:
            suite_time = sum(r.elapsed for r in top)
        suite.set("name", _xml_text(pkg_name))
        for k in ("tests", "failures", "errors", "skipped"):
            suite.set(k, str(counts[k]))
            totals[k] += counts[k]
        suite.set("time", _secs(suite_time))
        if pkg is not None and pkg.output:
            ET.SubElement(suite, "system-out").text = _xml_text(pkg.output)

    root.set("name", _xml_text(suite_name))
    for k in ("tests", "failures", "errors", "skipped"):
        root.set(k, str(totals[k]))
    root.set("time", _secs(summary.elapsed))
    tree = ET.ElementTree(root)
    if hasattr(ET, "indent"):  # 3.9+
        ET.indent(tree, space="  ")
    buf = io.BytesIO()
    tree.write(buf, encoding="utf-8", xml_declaration=True)
    return buf.getvalue() + b"\n", totals


def write_junit(summary: Summary, target: Union[str, "os.PathLike[str]", IO[Any]], suite_name: str = "vmtasks",
                include_subtests: bool = False) -> Dict[str, int]:
    """Write ``summary`` as JUnit XML to ``target``: a path (written atomically) or an open
    text or binary file object. Returns the root counts ``{"tests", "failures", "errors", "skipped"}``.

    Layout: ``<testsuites name=suite_name>`` holding one ``<testsuite>`` per Go package
    (first-seen order) with ``<testcase classname=package name=test>``. A failed test has
    ``<failure message="Failed">`` holding its output, a skipped one ``<skipped
    message=reason/>``; passed/skipped tests keep their output in ``<system-out>``;
    package-level output goes to the suite's ``<system-out>``.

    Errors (``<error>``, counted in ``errors`` and, as JUnit does, in ``tests``): a package
    error (build failure, TestMain failure...) is one extra testcase named ``[build
    failed]`` or ``[package failed]``; a not-run test is its testcase with ``<error
    message="not run">`` (an error of the run, not of the test: CI shows it red, where a
    skip would look green); an interrupted test likewise with ``message="interrupted"``.

    A retried test (``--retries``) has one testcase per attempt, in order, each with its
    own result and output (as gotestsum writes its reruns): a flaky test is a failed
    testcase followed by a passed one of the same name.

    By default the testcases are the top-level tests (subtest output is inside the
    parent's); with ``include_subtests=True`` every subtest is a testcase too. In every
    case the attributes equal the number of matching elements. Text is sanitized so the
    file always parses.
    """
    data, totals = _render(summary, suite_name, include_subtests)
    if hasattr(target, "write"):
        stream: Any = target
        if isinstance(stream, io.TextIOBase):
            stream.write(data.decode("utf-8"))
        else:
            try:
                stream.write(data)
            except TypeError:  # a text stream that is not an io.TextIOBase
                stream.write(data.decode("utf-8"))
        return totals
    write_atomic(os.fspath(target), data, make_dirs=True)
    return totals
