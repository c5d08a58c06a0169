"""The run as a picture: ``report.html`` in a run record, built from the record's files only.

``write_for_run`` (called once at the end of every run, also a failed or interrupted one)
keeps the merged results as ``tests.json`` in the record, then renders ``report.html``
from the record directory; ``invoke vm-report`` calls ``write_report`` on any record, so
an old record is drawn the same way (one without ``tests.json`` falls back to its
``junit.xml``: names, verdicts and output, no placement in time).

The page is one self-contained file: inline CSS, no script at all, and a Content Security
Policy that forbids scripts and every network fetch, so it opens offline and a test that
prints ``<script>`` cannot run code in it. Jinja2 autoescapes everything; test names,
output and file names from the guest are also made visible (control characters as text),
and links to files in the record are relative, percent-encoded paths (a file named
``javascript:...`` is a relative path, never a scheme).

The layout (lanes, bar positions, axis ticks) and the history (median and p95 of each
stage over this config's earlier records, the slowest tests against theirs, the trend of
recent runs) are computed here; the template only places what it is given.
"""

from __future__ import annotations

import json
import math
import statistics
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Iterable, List, Optional, Tuple
from urllib.parse import quote

from vmtasks.guest.atomic import write_atomic
from vmtasks.guest.errors import ConfigError, StateError
from vmtasks.guest.visible import visible, visible_line

from .report import vm_shares

REPORT_NAME = "report.html"
TESTS_NAME = "tests.json"
TESTS_VERSION = 1
OUTPUT_LINES = 60  # of a failed, flaky or interrupted test's output, as on screen
OUTPUT_CHARS = 16000
HISTORY_RUNS = 20  # earlier records read for medians and the trend
SLOWEST = 10
IDLE_MIN = 0.5  # seconds: a gap between a VM's tests shorter than this is not drawn

# Verdict word -> (css class, label). "flaky": failed, then passed on a fresh VM (--retries).
VERDICTS = {
    "pass": ("pass", "passed"), "fail": ("fail", "failed"), "flaky": ("flaky", "flaky"),
    "skip": ("skip", "skipped"), "interrupted": ("interrupted", "interrupted"), "notrun": ("notrun", "not run"),
}
PROBLEM_ORDER = ("fail", "flaky", "interrupted", "notrun")
STAGE_ORDER = ("preflight", "sweep", "build", "image", "compile", "list", "clone", "boot", "ip+ssh", "key",
               "setup", "sync", "suite", "tests", "teardown")


# -- what a run leaves: tests.json ------------------------------------------------
def _tail(text: str, lines: int = OUTPUT_LINES, chars: int = OUTPUT_CHARS) -> str:
    kept = (text or "").rstrip("\n").splitlines()[-lines:]
    joined = "\n".join(kept)
    return joined[-chars:]


def tests_data(summary, verdict: str = "") -> Dict[str, Any]:
    """The merged results as plain JSON data (what ``tests.json`` holds)."""
    tests = []
    for r in summary.results:
        entry: Dict[str, Any] = {
            "package": r.package, "name": r.name, "status": r.status, "elapsed": round(r.elapsed or 0.0, 4),
            "started": r.started, "vm": r.vm, "unreported": bool(r.unreported),
            "subtests": [{"name": s.name, "status": s.status, "elapsed": round(s.elapsed or 0.0, 4)}
                         for s in r.walk() if s is not r],
        }
        if r.status != "pass":
            failed = [a for a in r.attempts if a.status == "fail"]
            entry["output"] = _tail(failed[0].output if r.status == "flaky" and failed else r.output)
        if r.attempts:  # --retries: every run of the test, the first on the VM that ran the suite's share
            entry["attempts"] = len(r.attempts)
            entry["tries"] = [{"vm": a.vm, "started": a.started, "elapsed": round(a.elapsed or 0.0, 4),
                               "status": a.status, "ran_after": list(a.ran_after)} for a in r.attempts]
        tests.append(entry)
    return {"version": TESTS_VERSION, "verdict": verdict, "elapsed": summary.elapsed,
            "started": summary.started, "finished": summary.finished, "tests": tests,
            "package_errors": [{"package": e.package, "vm": e.vm, "build_failed": e.build_failed,
                                "text": _tail(e.text)} for e in summary.package_errors]}


def write_for_run(record, summary, verdict: str) -> str:
    """At the end of a run: ``tests.json`` (when there are results) and ``report.html`` in
    the record. Never raises: returns the line the summary shows, ``report: <path>`` or
    why the report is missing ("" when the run made no record)."""
    try:
        if not record.created:
            return ""  # nothing to draw from (the summary already says the record is missing)
        data = tests_data(summary, verdict) if summary is not None else \
            {"version": TESTS_VERSION, "verdict": verdict, "tests": [], "package_errors": []}
        record.write_text(TESTS_NAME, json.dumps(data, indent=1, default=str))
        return "report: {}".format(write_report(record.dir))
    except Exception as exc:  # the report is a view: a failure to draw it never fails the run
        message = getattr(exc, "message", None) or "{}: {}".format(type(exc).__name__, exc)
        return "report not written: {}".format(message)


# -- finding records ----------------------------------------------------------------
def _runs(root: Path) -> List[Path]:
    try:
        return sorted((p for p in root.iterdir() if p.is_dir() and not p.is_symlink()
                       and not p.name.startswith(".")), key=lambda p: p.name)
    except OSError:
        return []


def find_run(records_root: Path, run: Optional[str] = None) -> Path:
    """The record directory of ``run`` (a run id, a unique prefix of one, or a path to a
    record), or the latest run of this config. ``ConfigError`` naming the runs that exist."""
    root = Path(records_root)
    runs = _runs(root)
    if not run:
        latest = root / "latest"
        try:
            if latest.exists():
                return latest.resolve()
        except (OSError, RuntimeError):
            pass
        if runs:
            return runs[-1]
        raise ConfigError("no run recorded in {}".format(root),
                          "run `invoke test-vm` first (or pass --config for another config's runs)")
    given = Path(run).expanduser()
    if given.is_dir() and ((given / "result.json").exists() or (given / "stages.json").exists()):
        return given.resolve()
    matches = [p for p in runs if p.name == run] or [p for p in runs if p.name.startswith(run)]
    if len(matches) == 1:
        return matches[0]
    names = [p.name for p in runs]
    if matches:
        raise ConfigError("run {!r} is ambiguous in {}: {}".format(run, root, ", ".join(p.name for p in matches)),
                          "give more of the run id")
    shown = ", ".join(names[-10:]) if names else "none"
    more = " (the last 10 of {})".format(len(names)) if len(names) > 10 else ""
    raise ConfigError("no run {!r} in {}; runs recorded{}: {}".format(run, root, more, shown),
                      "pass one of those run ids, or none for the latest")


# -- reading a record ------------------------------------------------------------------
def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError):
        return default


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _junit_tests(path: Path) -> List[Dict[str, Any]]:
    """Tests of a record from before ``tests.json``: names, verdicts, output; no VM or time."""
    try:
        root = ET.parse(str(path)).getroot()
    except (OSError, ET.ParseError):
        return []
    tests = []
    for case in root.iter("testcase"):
        name = case.get("name") or ""
        if name.startswith("["):
            continue  # a package error's testcase
        status, output = "pass", ""
        for child in case:
            if child.tag == "failure":
                status, output = "fail", child.text or ""
            elif child.tag == "error":
                status = "notrun" if child.get("message") == "not run" else "interrupted"
                output = child.text or ""
            elif child.tag == "skipped":
                status, output = "skip", child.get("message") or ""
        tests.append({"package": case.get("classname") or "", "name": name, "status": status,
                      "elapsed": _number(_float(case.get("time"))) or 0.0, "started": None, "vm": "",
                      "output": _tail(output), "subtests": []})
    return tests


def _float(text: Optional[str]) -> Optional[float]:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def load_record(run_dir: Path) -> Dict[str, Any]:
    """A record's files as plain data: ``result``, ``stages``, ``tests``, ``package_errors``,
    ``verdict``, ``timed`` (False when the tests came from junit.xml)."""
    run_dir = Path(run_dir)
    result = _read_json(run_dir / "result.json", {})
    stages = _read_json(run_dir / "stages.json", [])
    data = _read_json(run_dir / TESTS_NAME, None)
    timed = isinstance(data, dict) and isinstance(data.get("tests"), list)
    if not timed:
        data = {"tests": _junit_tests(run_dir / "junit.xml"), "package_errors": [], "verdict": ""}
    tests = [t for t in data.get("tests", []) if isinstance(t, dict) and isinstance(t.get("name"), str)]
    return {
        "dir": run_dir,
        "run_id": str(result.get("run_id") or run_dir.name) if isinstance(result, dict) else run_dir.name,
        "result": result if isinstance(result, dict) else {},
        "stages": [s for s in stages if isinstance(s, dict) and _number(s.get("started")) is not None
                   and _number(s.get("seconds")) is not None] if isinstance(stages, list) else [],
        "tests": tests, "package_errors": [e for e in data.get("package_errors", []) if isinstance(e, dict)],
        "verdict": str(data.get("verdict") or ""), "timed": timed,
    }


# -- statistics ------------------------------------------------------------------------
def p95(samples: List[float]) -> float:
    """Nearest-rank 95th percentile (not empty)."""
    ordered = sorted(samples)
    return ordered[max(1, int(math.ceil(0.95 * len(ordered)))) - 1]


def _wall(result: Dict[str, Any]) -> Optional[float]:
    start, end = _number(result.get("started")), _number(result.get("finished"))
    return end - start if start is not None and end is not None and end >= start else None


def secs(value: Optional[float]) -> str:
    """A duration for the page: ``0.42 s``, ``19.2 s``, ``3m05s``."""
    if value is None or not math.isfinite(value):
        return "-"
    value = max(0.0, value)
    if value < 10:
        return "{:.2f} s".format(value)
    if value < 60:
        return "{:.1f} s".format(value)
    minutes, rest = divmod(int(round(value)), 60)
    if minutes >= 60:
        return "{}h{:02d}m".format(minutes // 60, minutes % 60)
    return "{}m{:02d}s".format(minutes, rest)


def _nice_step(span: float, ticks: int = 8) -> float:
    for step in (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200):
        if span / step <= ticks:
            return float(step)
    return float(math.ceil(span / ticks / 3600) * 3600)


# -- the view --------------------------------------------------------------------------
def _verdict(status: str) -> Tuple[str, str]:
    return VERDICTS.get(status, ("other", visible_line(str(status))))


def _links(run_dir: Path, test: Dict[str, Any]) -> List[Dict[str, str]]:
    """Files the run collected for a test (its VM's raw output and console log, anything
    under an ``artifacts/<test>`` folder), as relative, percent-encoded links."""
    names: List[str] = []
    vm = test.get("vm") or ""
    candidates = []
    if vm and "/" not in vm and vm not in (".", ".."):
        candidates += [vm + "/suite-output.txt", vm + "/console.log"]
    candidates += ["suite-output.txt", "console.log"]
    for base in ([vm] if vm and "/" not in vm and vm not in (".", "..") else []) + [""]:
        folder = run_dir / base / "artifacts" / test["name"].replace("/", "_")
        try:
            if folder.is_dir() and not folder.is_symlink() and ".." not in test["name"]:
                candidates += [p.relative_to(run_dir).as_posix() for p in sorted(folder.rglob("*"))[:50]
                               if p.is_file() and not p.is_symlink()]
        except (OSError, ValueError):
            continue
    for name in candidates:
        path = run_dir / name
        if name not in names and path.is_file() and not path.is_symlink():
            names.append(name)
    return [{"href": "./" + quote(name, safe="/"), "text": visible_line(name)} for name in names]


def _record_files(run_dir: Path) -> List[Dict[str, str]]:
    wanted = ("summary.txt", "junit.xml", "timeline.txt", "stages.json", "result.json", TESTS_NAME,
              "commands.log", "errors.log", "config.json")
    # summary.txt and timeline.txt are written just after the report, at the end of a run.
    ended = (run_dir / "result.json").is_file()
    return [{"href": "./" + quote(n), "text": n} for n in wanted
            if (run_dir / n).is_file() or (ended and n == "summary.txt")]


def _stage_key(stage: Dict[str, Any]) -> Tuple[int, str]:
    name = str(stage.get("stage"))
    return (STAGE_ORDER.index(name) if name in STAGE_ORDER else len(STAGE_ORDER), name)


def build_view(run_dir: Path, history_dirs: Optional[Iterable[Path]] = None) -> Dict[str, Any]:
    """Everything the template shows, computed from the record at ``run_dir`` and the
    earlier records beside it (or ``history_dirs``)."""
    run_dir = Path(run_dir)
    rec = load_record(run_dir)
    result, stages, tests = rec["result"], rec["stages"], rec["tests"]
    if history_dirs is None:
        history_dirs = [p for p in _runs(run_dir.parent) if p.name < run_dir.name][-HISTORY_RUNS:]
    history = [load_record(p) for p in history_dirs if p.resolve() != run_dir.resolve()]
    for index, t in enumerate(tests):
        t["_index"] = index  # the anchor of its entry under "failures first"

    # The time window: every stage and every timed test.
    spans: List[Tuple[float, float]] = [(float(s["started"]), float(s["started"]) + float(s["seconds"]))
                                        for s in stages]
    for t in tests:
        start = _number(t.get("started"))
        if start is not None:
            spans.append((start, start + max(0.0, _number(t.get("elapsed")) or 0.0)))
    run_start = _number(result.get("started"))
    origin = min([s for s, _ in spans] + ([run_start] if run_start is not None else [])) if spans else 0.0
    end = max([e for _, e in spans] + ([_number(result.get("finished")) or origin])) if spans else 0.0
    span = max(end - origin, 0.001)

    def pos(start: float, seconds: float) -> Dict[str, str]:
        left = (start - origin) / span * 100
        width = max(seconds / span * 100, 0.0)
        return {"left": "{:.3f}".format(max(0.0, min(left, 100.0))), "width": "{:.3f}".format(min(width, 100.0))}

    # Lanes: the host, then each VM (stages and tests), in name order.
    vm_names = sorted({str(s.get("vm")) for s in stages if s.get("vm")} |
                      {str(t.get("vm")) for t in tests if t.get("vm")})
    lanes = []
    for lane_vm in [""] + vm_names:
        lane_stages = []
        for s in sorted((s for s in stages if str(s.get("vm") or "") == lane_vm), key=lambda s: s["started"]):
            name = str(s.get("stage"))
            where = pos(float(s["started"]), float(s["seconds"]))
            lane_stages.append(dict(where, name=visible_line(name), wide=float(where["width"]) >= 6,
                                    css=_css_word(name), status=_css_word(str(s.get("status"))),
                                    status_text=visible_line(str(s.get("status"))),
                                    at=secs(float(s["started"]) - origin), seconds=secs(float(s["seconds"]))))
        bars, idle = [], []
        mine = sorted((t for t in tests if (t.get("vm") or "") == lane_vm and _number(t.get("started")) is not None),
                      key=lambda t: t["started"])
        busy_until = None
        for t in mine:
            start, elapsed = float(t["started"]), max(0.0, _number(t.get("elapsed")) or 0.0)
            if busy_until is not None and start - busy_until >= IDLE_MIN:
                idle.append(dict(pos(busy_until, start - busy_until), seconds=secs(start - busy_until)))
            busy_until = max(busy_until or start, start + elapsed)
            bars.append(_bar(t, pos(start, elapsed), secs(start - origin)))
        if lane_vm == "" and not lane_stages and not bars:
            continue
        lost = any(_lost(t) for t in tests if (t.get("vm") or "") == lane_vm)
        failed_stage = any(s["status"] == "failed" for s in lane_stages)
        lanes.append({"vm": visible_line(lane_vm) if lane_vm else "host", "kind": "vm" if lane_vm else "host",
                      "label": _lane_label(lane_vm, rec["run_id"]),
                      "stages": lane_stages, "bars": bars, "idle": idle, "lost": lost, "failed": failed_stage,
                      "tests": len([t for t in tests if (t.get("vm") or "") == lane_vm])})
    untimed = [_bar(t, None, "") for t in tests if _number(t.get("started")) is None]

    step = _nice_step(span)
    ticks = [{"left": "{:.3f}".format(k * step / span * 100), "text": secs(k * step) if step < 60 else
              "{}m".format(int(k * step // 60)) if step % 60 == 0 else secs(k * step)}
             for k in range(int(span // step) + 1)]

    counts = {key: 0 for key in VERDICTS}
    for t in tests:
        counts[t.get("status")] = counts.get(t.get("status"), 0) + 1
    problems = []
    for status in PROBLEM_ORDER:
        for t in tests:
            if t.get("status") == status:
                problems.append(dict(_bar(t, None, ""), output=visible(str(t.get("output") or "")),
                                     subtests=[dict(name=visible_line(str(s.get("name"))), css=_verdict(
                                         str(s.get("status")))[0], label=_verdict(str(s.get("status")))[1],
                                         seconds=secs(_number(s.get("elapsed")))) for s in t.get("subtests", [])
                                         if isinstance(s, dict) and s.get("status") in PROBLEM_ORDER],
                                     attempts=int(t.get("attempts") or 1), links=_links(run_dir, t)))
    package_errors = [{"package": visible_line(str(e.get("package"))), "vm": visible_line(str(e.get("vm") or "")),
                       "text": visible(str(e.get("text") or ""))} for e in rec["package_errors"]]

    wall = _wall(result)
    exit_code = result.get("exit_code")
    return {
        "run_id": visible_line(rec["run_id"]), "verdict": visible_line(rec["verdict"] or _fallback_verdict(result)),
        "exit_code": exit_code if isinstance(exit_code, int) else None,
        "interrupted": bool(result.get("interrupted")), "wall": secs(wall), "test_filter": visible_line(
            str(result.get("test") or "")),
        "kept": [visible_line(str(v)) for v in result.get("kept") or []],
        "problems_noted": [visible_line(str(p)) for p in result.get("record_problems") or []],
        "timed": rec["timed"], "lanes": lanes, "untimed": untimed, "ticks": ticks, "span": secs(span),
        "counts": [{"css": VERDICTS[k][0], "label": VERDICTS[k][1], "n": counts.get(k, 0)} for k in VERDICTS
                   if counts.get(k, 0) or k in ("pass", "fail")],
        "total": len(tests), "problems": problems, "package_errors": package_errors,
        "files": _record_files(run_dir), "time": _time_went(stages, history), "vm_balance": _balance(tests),
        "slowest": _slowest(tests, history), "trend": _trend(history + [rec], rec["run_id"]),
        "history_runs": len(history),
    }


def _fallback_verdict(result: Dict[str, Any]) -> str:
    if result.get("interrupted"):
        return "interrupted"
    code = result.get("exit_code")
    return "exit {}".format(code) if code is not None else "the run did not finish"


def _lane_label(vm: str, run_id: str) -> str:
    """A VM's short name in its lane (``VM 2`` for ``<prefix>-<run id>-2``); the full name is beside it."""
    if not vm:
        return "host"
    tail = vm.split(run_id, 1)[1].strip("-") if run_id and run_id in vm else ""
    return "VM " + visible_line(tail) if tail else visible_line(vm)


def _css_word(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower())[:30] or "x"


def _lost(t: Dict[str, Any]) -> bool:
    """A test its VM took down with it (vmtasks/lifecycle/vm.py ends its stream with "VM lost: ...")."""
    return bool(t.get("unreported")) and t.get("status") == "fail" and "VM lost" in str(t.get("output") or "")


def _bar(t: Dict[str, Any], where: Optional[Dict[str, str]], at: str) -> Dict[str, Any]:
    css, label = _verdict(str(t.get("status")))
    bar = {"name": visible_line(str(t.get("name"))), "package": visible_line(str(t.get("package") or "")),
           "vm": visible_line(str(t.get("vm") or "")), "css": css, "label": label, "at": at,
           "seconds": secs(_number(t.get("elapsed"))), "lost": _lost(t),
           "retried": int(t.get("attempts") or 1) > 1, "anchor": "t{}".format(t.get("_index", 0)),
           "problem": t.get("status") in PROBLEM_ORDER}
    if where is not None:
        bar.update(where)
    return bar


def _balance(tests: List[Dict[str, Any]]) -> List[Dict[str, str]]:
    """Busy and idle time per VM, by the same rules as the terminal summary."""
    view = SimpleNamespace(results=[SimpleNamespace(name=str(t.get("name")), package=str(t.get("package") or ""),
                                                    status=str(t.get("status")),
                                                    elapsed=_number(t.get("elapsed")) or 0.0,
                                                    output="", vm=str(t.get("vm") or ""),
                                                    started=_number(t.get("started")), subtests=[])
                                    for t in tests], package_failures={})
    return [{"vm": visible_line(s.vm), "tests": str(s.tests), "busy": secs(s.busy), "idle": secs(s.idle)}
            for s in vm_shares(view)]


def _time_went(stages: List[Dict[str, Any]], history: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Each stage's time on each VM (the host for the run's own stages) against the same
    stage's median and p95 over the earlier records."""
    past: Dict[str, List[float]] = {}
    for rec in history:
        for s in rec["stages"]:
            past.setdefault(str(s.get("stage")), []).append(float(s["seconds"]))
    vms = sorted({str(s.get("vm") or "") for s in stages}, key=lambda v: (v != "", v))
    rows = []
    for name in sorted({str(s.get("stage")) for s in stages}, key=lambda n: _stage_key({"stage": n})):
        samples = past.get(name, [])
        median = statistics.median(samples) if samples else None
        high = p95(samples) if samples else None
        cells = []
        for vm in vms:
            mine = [float(s["seconds"]) for s in stages if str(s.get("stage")) == name and str(s.get("vm") or "") == vm]
            if not mine:
                cells.append({"text": "", "slow": False})
                continue
            seconds = sum(mine)
            slow = high is not None and len(samples) >= 3 and seconds > high and seconds - (median or 0) > 0.5
            cells.append({"text": secs(seconds), "slow": slow})
        rows.append({"stage": visible_line(name), "cells": cells, "median": secs(median), "p95": secs(high),
                     "n": len(samples),
                     "usual": "usual {}".format(secs(median)) if median is not None else "no history"})
    return {"vms": [visible_line(v) if v else "host" for v in vms], "rows": rows}


def _slowest(tests: List[Dict[str, Any]], history: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    past: Dict[Tuple[str, str], List[float]] = {}
    for rec in history:
        for t in rec["tests"]:
            if t.get("status") in ("pass", "fail", "flaky") and _number(t.get("elapsed")) is not None:
                past.setdefault((str(t.get("package") or ""), str(t.get("name"))), []).append(float(t["elapsed"]))
    ran = [t for t in tests if t.get("status") in ("pass", "fail", "flaky") and _number(t.get("elapsed")) is not None]
    rows = []
    for t in sorted(ran, key=lambda t: -float(t["elapsed"]))[:SLOWEST]:
        samples = past.get((str(t.get("package") or ""), str(t.get("name"))), [])
        median = statistics.median(samples) if samples else None
        elapsed = float(t["elapsed"])
        rows.append({"name": visible_line(str(t.get("name"))), "vm": visible_line(str(t.get("vm") or "")),
                     "css": _verdict(str(t.get("status")))[0], "seconds": secs(elapsed),
                     "median": secs(median), "p95": secs(p95(samples)) if samples else "-", "n": len(samples),
                     "slower": median is not None and len(samples) >= 3 and elapsed > p95(samples)})
    return rows


def _trend(records: List[Dict[str, Any]], current: str) -> Dict[str, Any]:
    """The last runs' wall time and failures, as SVG bar geometry."""
    points = []
    for rec in records[-HISTORY_RUNS:]:
        wall = _wall(rec["result"])
        if wall is None:
            continue
        failed = rec["result"].get("failed_tests")
        failures = len(failed) if isinstance(failed, list) else \
            sum(1 for t in rec["tests"] if t.get("status") == "fail")
        points.append((rec["run_id"], wall, failures, rec["result"].get("exit_code")))
    if not points:
        return {"bars": [], "width": 0, "height": 0}
    top = max(w for _, w, _, _ in points) or 1.0
    height, bar_w, gap = 60, 14, 4
    bars = []
    for i, (run_id, wall, failures, code) in enumerate(points):
        h = max(2.0, wall / top * (height - 12))
        bars.append({"x": i * (bar_w + gap), "y": "{:.1f}".format(height - h), "h": "{:.1f}".format(h), "w": bar_w,
                     "css": "bad" if failures or code not in (0, None) else "good",
                     "current": run_id == current, "failures": failures,
                     "title": "{}: {}, {} failed, exit {}".format(visible_line(run_id), secs(wall), failures, code)})
    return {"bars": bars, "width": len(points) * (bar_w + gap), "height": height}


# -- rendering ---------------------------------------------------------------------------
def _environment():
    try:
        import jinja2
    except ImportError as exc:  # a host dependency: pyproject declares it
        raise StateError("cannot draw the report: Jinja2 is not installed ({})".format(exc),
                         "pip install 'jinja2>=3,<4' (or reinstall vmtasks)") from None
    env = jinja2.Environment(loader=jinja2.PackageLoader("vmtasks.ui", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env


def render(view: Dict[str, Any]) -> str:
    """The page for a view made by :func:`build_view`."""
    return _environment().get_template("report.html.j2").render(**view)


def build_html(run_dir: Path, history_dirs: Optional[Iterable[Path]] = None) -> str:
    return render(build_view(Path(run_dir), history_dirs))


def write_report(run_dir: Path) -> Path:
    """(Re)write ``report.html`` in the record at ``run_dir``; returns its path.
    ``StateError`` when the record cannot be read or the file cannot be written."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise StateError("no run record at {}".format(run_dir), "check the run id (`invoke vm-report` lists them)")
    target = run_dir / REPORT_NAME
    write_atomic(target, build_html(run_dir))
    return target
