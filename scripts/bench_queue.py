#!/usr/bin/env python3
"""Benchmark the many-VM test queue (issue 11): `invoke test-vm --vms N` against its lower bound.

usage: python3 scripts/bench_queue.py [--runs N] [--scale S] [--vms 1,2] [--out DIR] [--tmp DIR]

Runs the uneven sample suite (examples/uneven: 4+3+2+2 + 10 x 0.5 + 3 x 0.25 units, each unit
UNEVEN_SCALE seconds; --scale, default 1.5: 25 s of work, the longest test 6 s, under a
quarter of it) through the Linux stand-in `tart`, with no artificial delays, the same way
scripts/bench.py does (its Bench: own TART_HOME and state in a temporary directory under
/dev/shm/bench, a prepared base image, removed at the end and on Ctrl-C). Needs root.

Each run is timed from spawn to exit (the wall time) and taken apart from its run record:

* stages.json: each VM's clone start and teardown end; the run's own stages;
* each VM's suite-output.txt (`go test -json` events, Time and Elapsed fields): when its
  first test started and its last test ended, and the seconds each test took.

From those, per run:

* work = the sum of the tests' Elapsed, longest = the largest;
* the fixed cost of one VM = clone start to its first test + its last test to the end of
  its teardown (the mean over the run's VMs);
* the run's own cost = the wall time outside every VM's life (Python start-up, pre-flight,
  sweep, the queue's host compile stage, exit);
* bound = run's own cost + fixed cost of one VM + max(longest, work / N): what a perfect
  schedule with no per-test cost would take with these VMs on this machine;
* idle per VM, inside the test window (first test start to last test end, over every VM):
  gaps between its own tests, waiting before its first test, and after its last.

Medians over the runs; the order of the modes alternates, --vms 1 first so that the queue
runs have durations to sort by (as any run after the first has). Results:
.vmtasks/bench/queue-<stamp>.{json,md} and queue-latest.{json,md}; the table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (scripts/bench.py: the Bench harness)

REPO = bench.REPO
UNEVEN = REPO / "examples" / "uneven"


def parse_time(text: str) -> float:
    """A go test -json ``Time`` (RFC 3339, nanoseconds) as a POSIX timestamp."""
    text = re.sub(r"(\.\d{6})\d+", r"\1", text.replace("Z", "+00:00"))
    return datetime.fromisoformat(text).timestamp()


def test_events(path: Path):
    """The top-level tests of one VM's suite-output.txt: [(name, start, end, elapsed)]."""
    started = {}
    tests = []
    with open(str(path), encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            name = event.get("Test")
            if not name or "/" in name or "Time" not in event:
                continue
            action = event.get("Action")
            if action == "run":
                started[name] = parse_time(event["Time"])
            elif action in ("pass", "fail", "skip") and name in started:
                start, end = started.pop(name), parse_time(event["Time"])
                tests.append((name, start, end, float(event.get("Elapsed", end - start))))
    return tests


def analyze(row, vms: int):
    """Take one run apart (see the module docstring); adds its numbers to ``row``."""
    record = Path(row["record"])
    stages = json.loads((record / "stages.json").read_text())
    names = sorted({s["vm"] for s in stages if s.get("vm")})
    per_vm = {}
    all_tests = []
    for vm in names:
        mine = [s for s in stages if s.get("vm") == vm]
        clone = min(s["started"] for s in mine if s["stage"] == "clone")
        teardown_end = max(s["started"] + s["seconds"] for s in mine if s["stage"] == "teardown")
        output = record / "suite-output.txt" if vms == 1 else record / vm / "suite-output.txt"
        tests = test_events(output) if output.exists() else []
        all_tests += tests
        # Its slot: from its first stage after the clone (a clone made ahead holds none).
        slot_start = min((s["started"] for s in mine if s["stage"] != "clone"), default=clone)
        info = {"clone": clone, "slot_start": slot_start, "teardown_end": teardown_end, "tests": len(tests),
                "busy": sum(t[3] for t in tests),
                "stages": {s["stage"]: s["seconds"] for s in mine}}
        if tests:
            info["first_start"] = min(t[1] for t in tests)
            info["last_end"] = max(t[2] for t in tests)
            info["fixed"] = (info["first_start"] - clone) + (teardown_end - info["last_end"])
            spans = sorted((t[1], t[2]) for t in tests)
            info["gaps"] = sum(max(0.0, b[0] - a[1]) for a, b in zip(spans, spans[1:]))
        per_vm[vm] = info
    ran = [v for v in per_vm.values() if v["tests"]]
    if not all_tests or not ran:
        raise bench.Abort("run {} has no test events".format(record))
    window = (min(v["first_start"] for v in ran), max(v["last_end"] for v in ran))
    for v in ran:
        v["idle_before"] = v["first_start"] - window[0]
        v["idle_after"] = window[1] - v["last_end"]
        v["idle"] = v["idle_before"] + v["gaps"] + v["idle_after"]
    life = (min(v["clone"] for v in per_vm.values()), max(v["teardown_end"] for v in per_vm.values()))
    work = sum(t[3] for t in all_tests)
    longest = max(t[3] for t in all_tests)
    vm_fixed = sum(v["fixed"] for v in ran) / len(ran)
    run_fixed = row["total"] - (life[1] - life[0])
    ideal = max(longest, work / vms)
    row.update({"vms": vms, "vm_names": names, "per_vm": per_vm, "work": work, "longest": longest,
                "tests": len(all_tests), "vm_fixed": vm_fixed, "run_fixed": run_fixed, "ideal": ideal,
                "bound": run_fixed + vm_fixed + ideal, "test_window": window[1] - window[0],
                "timeline": (record / "timeline.txt").read_text() if (record / "timeline.txt").exists() else ""})
    row["ratio"] = row["total"] / row["bound"]
    return row


def median(values):
    return bench.median(list(values))


def summarize(rows):
    keys = ("total", "bound", "ratio", "work", "longest", "ideal", "vm_fixed", "run_fixed", "test_window",
            "compile", "peak_rss_mb")
    out = {k: median(r.get(k) for r in rows) for k in keys}
    # Balance: per VM slot (1st, 2nd, ... VM by name), medians over the runs.
    slots = max(len(r["vm_names"]) for r in rows)
    out["per_vm"] = []
    for i in range(slots):
        infos = [r["per_vm"][r["vm_names"][i]] for r in rows if i < len(r["vm_names"])]
        out["per_vm"].append({k: median(v.get(k) for v in infos)
                              for k in ("tests", "busy", "idle", "idle_before", "gaps", "idle_after", "fixed")})
    return out


def markdown(result) -> str:
    m = result["machine"]
    lines = ["vmtasks queue benchmark, {}: {} ({} cores), Linux {}, Python {}; stand-in tart, no delays; "
             "VMs in {}; examples/uneven at UNEVEN_SCALE={} ({} tests); medians of {} runs per mode, modes "
             "alternating. Load average (1/5/15 min) {} before, {} after; prepared images: {}.".format(
                 result["date"], m["cpu"], m["cores"], m["kernel"], m["python"], result["tmp"], result["scale"],
                 result["modes"][next(iter(result["modes"]))]["median"].get("tests", "?"), result["runs"],
                 "/".join("{:.2f}".format(x) for x in result["load_before"]),
                 "/".join("{:.2f}".format(x) for x in result["load_after"]), result["prepared"]), ""]
    lines += ["| mode | wall | bound | wall / bound | work | longest | max(longest, work/N) | fixed, one VM "
              "| run's own | of which compile | wall / --vms 1 |", "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    base = result["modes"].get("1", {}).get("median", {}).get("total")
    for vms, entry in result["modes"].items():
        md = entry["median"]
        lines.append("| `--vms {}` | {:.2f} s | {:.2f} s | {:.3f}x | {:.2f} s | {:.2f} s | {:.2f} s | {:.2f} s "
                     "| {:.2f} s | {} | {} |".format(
                         vms, md["total"], md["bound"], md["ratio"], md["work"], md["longest"], md["ideal"],
                         md["vm_fixed"], md["run_fixed"],
                         "{:.2f} s".format(md["compile"]) if md.get("compile") is not None else "-",
                         "{:.3f}x".format(md["total"] / base) if base else "-"))
    lines += ["", "Bound = run's own cost (wall time outside every VM's life: start-up, pre-flight, sweep, "
              "compile, exit) + fixed cost of one VM (clone to its first test + its last test to the end of its "
              "teardown, mean over the run's VMs) + max(longest test, work / N). Goals (issue 11): `--vms 2` "
              "within 1.05x of its bound and within 0.55x of `--vms 1`.", "",
              "Balance, per VM (medians; idle inside the test window = before its first test + between its "
              "tests + after its last):", "",
              "| mode | VM | tests | busy | idle | before first | between | after last | fixed |",
              "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for vms, entry in result["modes"].items():
        for i, v in enumerate(entry["median"]["per_vm"]):
            lines.append("| `--vms {}` | {} | {:.0f} | {:.2f} s | {:.2f} s | {:.2f} s | {:.2f} s | {:.2f} s "
                         "| {:.2f} s |".format(vms, i + 1, v["tests"], v["busy"], v["idle"] or 0.0,
                                               v["idle_before"] or 0.0, v["gaps"] or 0.0, v["idle_after"] or 0.0,
                                               v["fixed"]))
    lines += ["", "Every run:", "", "| mode | run | wall | bound | wall / bound | load (1 min) |",
              "|---|--:|--:|--:|--:|--:|"]
    for vms, entry in result["modes"].items():
        for i, r in enumerate(entry["rows"]):
            lines.append("| `--vms {}` | {} | {:.2f} s | {:.2f} s | {:.3f}x | {:.2f} |".format(
                vms, i + 1, r["total"], r["bound"], r["ratio"], r["load"]))
    last = [r for e in result["modes"].values() for r in e["rows"] if r.get("timeline")]
    if last:
        lines += ["", "timeline.txt of the last `--vms {}` run:".format(last[-1]["vms"]), "", "```",
                  last[-1]["timeline"].rstrip(), "```"]
    lines += ["", "Whole benchmark: {:.0f} s.".format(result["seconds"])]
    return "\n".join(lines) + "\n"


class QueueBench(bench.Bench):
    def write_uneven_config(self, tree: Path, scale: float) -> Path:
        import yaml

        data = yaml.safe_load((UNEVEN / "vm.yaml").read_text())
        data["project_dir"] = str(tree)
        data.setdefault("guest", {}).setdefault("env", {})["UNEVEN_SCALE"] = "{:g}".format(scale)
        path = self.root / "config-uneven.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def main(self):
        from vmtasks.guest import config as config_mod

        opts = self.opts
        started = time.monotonic()
        result = {"machine": bench.machine(), "runs": opts.runs, "scale": opts.scale, "modes": {},
                  "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "prepared": bench.prepared_images(),
                  "load_before": os.getloadavg(),
                  "tmp": "{} ({})".format(self.root.parent, "tmpfs" if bench.in_memory(str(self.root.parent), 0)
                                          else "disk")}
        tree = self.root / "trees" / "uneven"
        shutil.copytree(str(UNEVEN), str(tree), ignore=shutil.ignore_patterns(".vmtasks"))
        cfg_path = self.write_uneven_config(tree, opts.scale)
        cfg = config_mod.load(cfg_path, {}, {}, self.cwd)
        t = time.monotonic()
        # Before 67888ee the suite's work() wrote each subtest's mark at ~/.uneven-ran/<t.Name()>
        # with only ~/.uneven-ran made, so every subtest of TestWithSubtests failed; the base
        # image has the directory, so the benchmark runs on trees with and without the fix.
        self.prepare_base(cfg, [(tree, cfg.guest.dir)], guest_script="mkdir -p .uneven-ran/TestWithSubtests")
        self.log("base image prepared in {:.1f}s".format(time.monotonic() - t))
        # The host's Go build cache (under our own HOME) warmed too, as a developer's is: the
        # queue's compile stage builds the test binary on the host.
        import subprocess

        subprocess.run(["go", "test", "-c", "-tags=e2e,vm", "-o", str(self.root / "warm.test"), "./test/e2e"],
                       cwd=str(tree), env=self.env, check=True, capture_output=True, timeout=300)
        modes = {str(n): {"rows": []} for n in opts.vms}
        for i in range(opts.runs):
            order = list(opts.vms) if i % 2 == 0 else list(reversed(opts.vms))
            for n in order:
                self.warm(tree)
                row = self.run_vmtasks(cfg_path, extra=["--vms", str(n)])
                row["load"] = os.getloadavg()[0]
                analyze(row, n)
                modes[str(n)]["rows"].append(row)
                self.log("  --vms {} run {}: wall {:.2f}s, bound {:.2f}s ({:.3f}x), work {:.2f}s, longest {:.2f}s, "
                         "fixed/VM {:.2f}s, run's own {:.2f}s, idle {}, load {:.2f}".format(
                             n, i + 1, row["total"], row["bound"], row["ratio"], row["work"], row["longest"],
                             row["vm_fixed"], row["run_fixed"],
                             " ".join("{:.2f}".format(v.get("idle", 0.0)) for v in row["per_vm"].values()),
                             row["load"]))
        for entry in modes.values():
            entry["median"] = summarize(entry["rows"])
            entry["median"]["tests"] = median(r["tests"] for r in entry["rows"])
        result["modes"] = modes
        if "1" in modes:
            base = modes["1"]["median"]["total"]
            for entry in modes.values():
                entry["median"]["vs_one_vm"] = entry["median"]["total"] / base
        result["load_after"] = os.getloadavg()
        result["seconds"] = time.monotonic() - started
        return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per mode (default 3)")
    parser.add_argument("--scale", type=float, default=1.5,
                        help="UNEVEN_SCALE, seconds per unit (default 1.5: 25 s of work)")
    parser.add_argument("--vms", default="1,2", help="comma list of VM counts (default 1,2)")
    parser.add_argument("--out", default=str(REPO / ".vmtasks" / "bench"), help="where the results go")
    parser.add_argument("--tmp", default=None, help="where TART_HOME and the VMs go (default: /dev/shm/bench "
                                                    "when /dev/shm is a tmpfs with 2 GB free, else /tmp/bench)")
    opts = parser.parse_args(argv)
    try:
        opts.vms = [int(x) for x in opts.vms.split(",") if x.strip()]
    except ValueError:
        parser.error("--vms takes whole numbers, e.g. 1,2")
    if not opts.vms or min(opts.vms) < 1 or opts.runs < 1 or opts.scale <= 0:
        parser.error("nothing to run")
    if opts.tmp is None:
        opts.tmp = "/dev/shm/bench" if bench.in_memory("/dev/shm", 2 << 30) else "/tmp/bench"
    os.makedirs(opts.tmp, exist_ok=True)
    problem = bench.host_problem("bench_queue")
    if problem:
        print(problem, file=sys.stderr)
        return 2
    result, code = bench.run_guarded(QueueBench(opts))
    if code:
        return code
    bench.write_results(Path(opts.out), "queue-", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
