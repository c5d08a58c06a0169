#!/usr/bin/env python3
"""Benchmark report.html (issue 22): a synthetic run of 500 tests over 4 VMs, with 19 earlier
records of the same config for the history, rendered by vmtasks.ui.html_report; then its size,
the time to build it, and the time headless Chromium takes to load and lay it out.

usage: python3 scripts/bench_report.py [--tests 500] [--vms 4] [--loads 5] [--out DIR]
       python3 scripts/bench_report.py --screenshot PNG --record RUN_DIR [--width 1200 --height 900]

Render time is measured in the browser: from navigation start to the load event end
(``performance.timing``) and to the first contentful paint (when the browser reports one), after which a forced layout
(``document.body.offsetHeight``) must be cheap; each of ``--loads`` loads uses a fresh page, the median is reported. The
browser is Debian's chromium through Selenium and chromium-driver (tests/e2e/browser.py).
Results: JSON on stdout and in .vmtasks/bench/report-latest.json. Not a timed test: the
goal (under 2 s and under 2 MB) is read from the numbers.

``--screenshot`` saves a PNG of a record's report (the README's picture) instead.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.e2e.browser import chromium, missing  # noqa: E402
from vmtasks.guest.results.model import FAIL, PASS, SKIP, Summary, TestResult, merge  # noqa: E402
from vmtasks.state.records import RunRecord  # noqa: E402
from vmtasks.ui import html_report  # noqa: E402

VM_STAGES = (("clone", 0.4), ("boot", 14.0), ("ip+ssh", 1.5), ("key", 0.6), ("setup", 20.0), ("sync", 3.0))


def synthetic_record(root: Path, run_id: str, tests: int, vms: int, seed: int) -> Path:
    """A record as a run leaves it: stages.json, result.json, tests.json, report.html."""
    rng = random.Random(seed)
    record = RunRecord(root, run_id)
    record.create("{}")
    t0 = record.meta["started"]
    record.stage_done("preflight", t0, 0.3, "ok")
    record.stage_done("sweep", t0 + 0.3, 0.1, "ok")
    record.stage_done("compile", t0 + 0.4, 6.0, "ok")
    names = ["{}-{}".format(run_id, n + 1) for n in range(vms)]
    clock = {}
    for vm in names:
        at = t0 + 6.5 + rng.uniform(0, 1)
        for stage, seconds in VM_STAGES:
            seconds *= rng.uniform(0.8, 1.4)
            record.stage_done(stage, at, seconds, "ok", vm=vm)
            at += seconds
        clock[vm] = at
    parts = {vm: [] for vm in names}
    for i in range(tests):
        vm = min(clock, key=clock.get)  # the queue: the first free VM takes the next test
        elapsed = rng.expovariate(1 / 2.5)
        status = FAIL if i % 97 == 13 else SKIP if i % 41 == 5 else PASS
        output = "".join("    e2e_test.go:{}: step {} of test {}\n".format(40 + k, k, i) for k in range(40)) \
            if status == FAIL else ""
        parts[vm].append(TestResult("github.com/openbootdotdev/openboot/test/e2e", "TestE2E_{:04d}_Case".format(i),
                                    status, elapsed, output=output, started=clock[vm]))
        clock[vm] += elapsed + rng.uniform(0.05, 0.3)
    for vm in names:
        start = min((r.started for r in parts[vm]), default=clock[vm])
        record.stage_done("tests", start, clock[vm] - start, "ok", vm=vm)
        record.stage_done("teardown", clock[vm], rng.uniform(0.5, 2.0), "ok", vm=vm)
    summary = merge([(vm, Summary(results=rs, failures=[r for r in rs if r.status == FAIL]))
                     for vm, rs in parts.items()])
    record.finish(vms=names, exit_code=1 if summary.failures else 0,
                  failed_tests=[r.name for r in summary.failures], interrupted=False)
    record.meta["finished"] = max(clock.values()) + 2.0
    record._write_json("result.json", record.meta)
    html_report.write_for_run(record, summary, "DONE {} tests".format(tests))
    return record.dir


def load_times(report: Path, loads: int):
    out = []
    with chromium() as driver:
        for _ in range(loads):
            driver.get("about:blank")
            driver.get(report.as_uri())
            timing = driver.execute_script(
                "var t = performance.timing; var s = performance.now(); var h = document.body.offsetHeight;"
                "var p = performance.getEntriesByType('paint').filter(function (e) {"
                " return e.name === 'first-contentful-paint'; });"
                "return [t.loadEventEnd - t.navigationStart, performance.now() - s,"
                " document.querySelectorAll('.bar').length, h, p.length ? p[0].startTime : null];")
            out.append(timing)
        errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    return out, errors


def screenshot(record: Path, target: Path, width: int, height: int) -> None:
    html_report.write_report(record)
    with chromium(width, height) as driver:
        driver.get((record / html_report.REPORT_NAME).as_uri())
        driver.save_screenshot(str(target))
    print("{} ({} bytes)".format(target, target.stat().st_size))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", type=int, default=500)
    parser.add_argument("--vms", type=int, default=4)
    parser.add_argument("--history", type=int, default=19, help="earlier records of the same config")
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / ".vmtasks" / "bench"))
    parser.add_argument("--screenshot", help="save a PNG of --record's report instead")
    parser.add_argument("--record", help="a run record directory (with --screenshot)")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args()
    why = missing()
    if why:
        print("bench_report: " + why, file=sys.stderr)
        return 2
    if args.screenshot:
        if not args.record:
            parser.error("--screenshot needs --record RUN_DIR")
        screenshot(Path(args.record), Path(args.screenshot), args.width, args.height)
        return 0
    with tempfile.TemporaryDirectory(prefix="vmtasks-bench-report-") as tmp:
        root = Path(tmp) / "runs"
        for n in range(args.history):
            synthetic_record(root, "20261201-{:06d}-hist".format(n), args.tests, args.vms, seed=n)
        start = time.perf_counter()
        run_dir = synthetic_record(root, "20261202-000000-this", args.tests, args.vms, seed=1000)
        build_all = time.perf_counter() - start
        start = time.perf_counter()
        html_report.write_report(run_dir)
        build = time.perf_counter() - start
        report = run_dir / html_report.REPORT_NAME
        loads, errors = load_times(report, args.loads)
        result = {
            "tests": args.tests, "vms": args.vms, "earlier_records": args.history,
            "bytes": report.stat().st_size, "build_seconds": round(build, 3),
            "record_and_build_seconds": round(build_all, 3),
            "load_ms_median": round(statistics.median(t[0] for t in loads), 1),
            "load_ms_all": [round(t[0], 1) for t in loads],
            "relayout_ms_median": round(statistics.median(t[1] for t in loads), 2),
            # headless Chromium may not report paint entries: None then
            "first_contentful_paint_ms": [t[4] for t in loads],
            "bars": loads[0][2], "console_errors": len(errors),
            "goal": "under 2 s to render, under 2 MB",
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report-latest.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
