#!/usr/bin/env python3
"""Benchmark a many-VM run on an Orchard fleet (the controller stand-in) against its bound,
and the port-forward tunnel against direct SSH.

usage: python3 scripts/bench_fleet.py [--vms 2,4,8] [--workers 4] [--slots 2] [--scale 1]
                                      [--runs 1] [--reps 5] [--out DIR] [--tmp DIR]

Needs root (the Tart stand-in's guests). Everything (controller data, worker TART_HOMEs,
guests, state dir, run records) lives in one temporary directory, in /dev/shm when it can,
removed at the end (also on failure and Ctrl-C).

* Fleet: ``scripts/orchard`` with ``--workers`` workers of ``--slots`` Tart VM slots each,
  scheduler tick 0.2 s, no artificial delays.
* Runs: ``invoke test-vm --vms N`` of examples/uneven (UNEVEN_SCALE=``--scale``: 16.75 units
  of work, the longest test 4 units) with ``backend: orchard``, after one unmeasured warm-up
  run that fills the durations file (so the queue hands tests out longest first, as it does
  from the second run on). Timed from spawn to exit.
* The bound for N VMs: W = max(longest test, total / N), from this run's own test durations
  (JUnit), plus F, one VM's fixed cost from the run record's stages.json: clone start to the
  start of its tests stage, plus the end of its tests stage to the end of its teardown: the
  fastest VM's (every VM pays at least that, so W + F is a lower bound; the median is shown
  too). ``ratio`` = wall / (W + F), the issue's goal: <= 1.10 at N = 8.
  ``pre`` (spawn to the first clone: Python, pre-flight with the image probe, sweep, compile)
  and ``post`` (the last teardown to exit) are shown to say where the rest goes.
* Tunnel: in one VM made through the backend, ``--reps`` alternating pairs of (a) rsync of
  examples/uneven plus 1 000 small files into a fresh directory and (b) the uneven suite
  (``go test -json``, UNEVEN_SCALE=0) over one Paramiko session, each through the
  port-forward WebSocket (the ProxyCommand helper; ``open_socket``) and directly to the
  guest's IP with the same key and pinned host key. Medians.
Results: .vmtasks/bench/fleet-<stamp>.{json,md} and fleet-latest.{json,md}; the table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import yaml  # noqa: E402
from orchard_standin.harness import Fleet  # noqa: E402

UNEVEN = REPO / "examples" / "uneven"


def tmp_root(choice):
    base = choice or ("/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None)
    return Path(tempfile.mkdtemp(prefix="vmtasks-bench-fleet-", dir=base))


class Bench:
    def __init__(self, root: Path, args) -> None:
        self.root = root
        self.args = args
        self.fleet = Fleet(root / "orchard", workers=args.workers,
                           args=["--worker-slots", str(args.slots), "--scheduler-interval", "0.2"])
        self.home, self.state, self.cwd = root / "home", root / "state", root / "cwd"
        for d in (self.home, self.cwd):
            d.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("OPENBOOT_", "TART_STANDIN_", "ORCHARD_")) and k not in
                    ("SSH_AUTH_SOCK", "PYTHONDONTWRITEBYTECODE")}
        self.env.update(HOME=str(self.home), VMTASKS_STATE_DIR=str(self.state), CI="true",
                        TART_STANDIN_AGENT_DELAY="0")  # no artificial delay: the workers' guests answer at once

    def start(self) -> None:
        self.fleet.start()
        self.env.update(ORCHARD_SERVICE_ACCOUNT_NAME=self.fleet.account[0],
                        ORCHARD_SERVICE_ACCOUNT_TOKEN=self.fleet.account[1])
        data = yaml.safe_load((UNEVEN / "vm.yaml").read_text())
        data["project_dir"] = str(UNEVEN)
        data["backend"] = "orchard"
        data["orchard"] = {"url": self.fleet.url}
        data["guest"]["env"] = dict(data["guest"]["env"], UNEVEN_SCALE=str(self.args.scale))
        # examples/uneven's TestWithSubtests needs this directory (its work() does not make it).
        data["setup"] = list(data["setup"]) + ["mkdir -p ~/.uneven-ran/TestWithSubtests"]
        self.config = self.root / "uneven.yaml"
        self.config.write_text(yaml.safe_dump(data))

    # --- one run ---

    def run(self, vms: int) -> dict:
        argv = [sys.executable, "-m", "invoke", "--search-root", str(REPO), "test-vm", "--vms", str(vms), "--quiet",
                "--config", str(self.config)]
        spawned = time.time()
        started = time.monotonic()
        done = subprocess.run(argv, cwd=str(self.cwd), env=self.env, capture_output=True, text=True, timeout=600,
                              stdin=subprocess.DEVNULL)
        wall = time.monotonic() - started
        record = (self.root / ".vmtasks" / "runs" / "latest").resolve()
        if done.returncode not in (0, 1):
            raise SystemExit("test-vm --vms {} exited {}:\n{}".format(vms, done.returncode, done.stdout + done.stderr))
        return analyse(record, vms, wall, spawned, done.returncode)

    # --- the tunnel against direct SSH ---

    def tunnel(self, reps: int) -> dict:
        from vmtasks.backends.orchard.backend import OrchardBackend
        from vmtasks.backends.orchard.settings import load_settings
        from vmtasks.lifecycle.backend import Owner
        from vmtasks.transport import ssh

        settings = load_settings(env=dict(self.fleet.env(), HOME=str(self.home)))
        backend = OrchardBackend(settings, "tahoe-base", prefix="bench", poll=0.1, probe_image=False)
        key = ssh.generate_key(self.root / "tunnel-key", "vmtasks bench")
        owner = Owner.this_process("bench")
        machine = backend.machine("bench-tunnel-1", owner, None, public_key=key.public_line)
        cancel = threading.Event()
        deadline = time.monotonic() + 60
        tree = self.root / "tree"
        shutil.copytree(str(UNEVEN), str(tree))
        filler = tree / "filler"
        filler.mkdir()
        for i in range(1000):
            (filler / "f{:04d}.txt".format(i)).write_bytes(os.urandom(512))
        try:
            machine.create("tahoe-base", deadline, cancel)
            machine.start(self.root / "tunnel-console.log", deadline, cancel, lambda text: None)
            machine.wait_ssh(deadline, cancel)
            machine.install_key(key.public_line, deadline, cancel)
            ip = self.fleet.api("GET", "vms/{}/ip".format(machine.name))[1]["ip"]
            target = machine.ssh_target()
            ways = {
                "tunnel": (lambda t: machine.open_socket(t), ["-o", "ProxyCommand=" + target.proxy_command],
                           dict(os.environ, **target.env)),
                # The same guest at its own address: same key, same pinned host key (by alias).
                "direct": (lambda t: ssh.nodelay_socket(ip, t), ["-o", "HostKeyAlias=" + machine.name,
                                                                 "-o", "HostName=" + ip], dict(os.environ)),
            }
            # First contact pins the host key under the VM's name (what the run does).
            conn = ssh.connect(machine.name, "admin", key, connect_timeout=10, sock=machine.open_socket(10))
            conn.open()
            conn.close()
            suite = ("mkdir -p ~/.uneven-ran/TestWithSubtests && cd uneven && "
                     "env OPENBOOT_IN_VM=1 UNEVEN_SCALE=0 go test -json -count=1 -tags=e2e,vm "
                     "./test/e2e/... > ../suite.json 2>&1 || { tail -20 ../suite.json; exit 1; }")
            times = {"sync": {"tunnel": [], "direct": []}, "suite": {"tunnel": [], "direct": []}}
            for rep in range(reps + 1):  # rep 0 warms the guest's Go build cache, not counted
                order = ["tunnel", "direct"] if rep % 2 == 0 else ["direct", "tunnel"]
                for way in order:
                    sock_for, options, env = ways[way]
                    ssh_cmd = " ".join(shlex.quote(a) for a in ["ssh", *ssh.ssh_options(key), *options])
                    dest = "sync-{}-{}".format(way, rep)
                    t0 = time.monotonic()
                    done = subprocess.run(["rsync", "-a", "--delete", "-e", ssh_cmd, str(tree) + "/",
                                           "admin@{}:{}/".format(machine.name, dest)], env=env,
                                          capture_output=True, text=True, timeout=120)
                    seconds = time.monotonic() - t0
                    if done.returncode != 0:
                        raise SystemExit("rsync ({}) failed: {}".format(way, done.stderr))
                    conn = ssh.connect(machine.name, "admin", key, connect_timeout=10, sock=sock_for(10))
                    conn.open()
                    try:
                        ssh.remote_exec(conn, "rm -rf uneven && mv {} uneven".format(dest), timeout=60)
                        t0 = time.monotonic()
                        result = ssh.remote_exec(conn, suite, timeout=120)
                        suite_seconds = time.monotonic() - t0
                    finally:
                        conn.close()
                    if result.exit_code != 0:
                        raise SystemExit("suite ({}) exited {}: {}".format(way, result.exit_code, result.output))
                    if rep:
                        times["sync"][way].append(seconds)
                        times["suite"][way].append(suite_seconds)
            return {part: {way: statistics.median(v) for way, v in ways_.items()} | {"runs": ways_}
                    for part, ways_ in times.items()}
        finally:
            machine.destroy(10)


def stage_map(record: Path):
    """{vm: {stage: (start, end)}} and the run-level stages, from stages.json."""
    per_vm, host = {}, {}
    for entry in json.loads((record / "stages.json").read_text()):
        span = (entry["started"], entry["started"] + entry["seconds"])
        if entry.get("vm"):
            per_vm.setdefault(entry["vm"], {})[entry["stage"]] = span
        else:
            host[entry["stage"]] = span
    return per_vm, host


def analyse(record: Path, vms: int, wall: float, spawned: float, code: int) -> dict:
    root = ET.parse(str(record / "junit.xml")).getroot()
    durations = [float(case.get("time") or 0) for case in root.iter("testcase") if "/" not in (case.get("name") or "")]
    total, longest = sum(durations), max(durations) if durations else 0.0
    per_vm, host = stage_map(record)
    fixed = []
    for stages in per_vm.values():
        if "clone" in stages and "tests" in stages and "teardown" in stages:
            fixed.append((stages["tests"][0] - stages["clone"][0]) + (stages["teardown"][1] - stages["tests"][1]))
    first_clone = min(s["clone"][0] for s in per_vm.values() if "clone" in s)
    last_teardown = max(s["teardown"][1] for s in per_vm.values() if "teardown" in s)
    names = sorted({name for stages in per_vm.values() for name in stages})
    medians = {name: statistics.median(s[name][1] - s[name][0] for s in per_vm.values() if name in s)
               for name in names}
    medians.update({"host:" + name: end - start for name, (start, end) in host.items()})
    if host:
        # Spawn to the first run-level stage (Python, Invoke, the config, the backend), and
        # the last run-level stage to the first clone (the VM threads starting).
        medians["host:startup"] = min(start for start, _ in host.values()) - spawned
        medians["host:to-clone"] = min(s["clone"][0] for s in per_vm.values() if "clone" in s) - \
            max(end for _, end in host.values())
    work = max(longest, total / vms)
    f = min(fixed) if fixed else 0.0
    return {"vms": vms, "exit": code, "wall": wall, "tests": len(durations), "total": total, "longest": longest,
            "work_bound": work, "fixed": f, "fixed_median": statistics.median(fixed) if fixed else 0.0,
            "bound": work + f, "ratio": wall / (work + f) if work + f else 0.0,
            "pre": first_clone - spawned, "post": (spawned + wall) - last_teardown,
            "vms_with_tests": len(fixed), "stages": medians, "record": str(record)}


def markdown(results, tunnel, args) -> str:
    lines = ["Fleet: {} workers x {} slots (controller stand-in), UNEVEN_SCALE={}, medians of {} run(s)".format(
        args.workers, args.slots, args.scale, args.runs), "",
             "| VMs | wall | W = max(longest, total/N) | F (fastest VM; median) | bound W+F | ratio | pre | post "
             "| tests | exit |",
             "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in results:
        lines.append("| {vms} | {wall:.2f} s | {work_bound:.2f} s (longest {longest:.2f}, total {total:.2f}) | "
                     "{fixed:.2f} s; {fixed_median:.2f} s | {bound:.2f} s | {ratio:.2f}x | {pre:.2f} s | {post:.2f} s "
                     "| {tests} | {exit} |".format(**r))
    order = ["host:startup", "host:preflight", "host:sweep", "host:compile", "host:to-clone", "clone", "boot", "ip+ssh",
             "key", "setup", "sync",
             "tests", "teardown"]
    lines += ["", "Stage seconds (median over the run's VMs; host: the run's own stages):", "",
              "| VMs | " + " | ".join(order) + " |", "|--:|" + "--:|" * len(order)]
    for r in results:
        lines.append("| {} | ".format(r["vms"]) + " | ".join(
            "{:.2f}".format(r["stages"][name]) if name in r["stages"] else "-" for name in order) + " |")
    if tunnel:
        lines += ["", "| through | sync (rsync, {} files) | suite (go test -json, one session) |".format("1k+"),
                  "|---|--:|--:|"]
        for way in ("direct", "tunnel"):
            lines.append("| {} | {:.3f} s | {:.3f} s |".format(way, tunnel["sync"][way], tunnel["suite"][way]))
        lines.append("| tunnel / direct | {:.2f}x | {:.2f}x |".format(
            tunnel["sync"]["tunnel"] / tunnel["sync"]["direct"], tunnel["suite"]["tunnel"] / tunnel["suite"]["direct"]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vms", default="2,4,8")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5, help="tunnel vs direct pairs (0: skip)")
    parser.add_argument("--out", default=str(REPO / ".vmtasks" / "bench"))
    parser.add_argument("--tmp", default=None)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_fleet: needs root (the Tart stand-in's guests)", file=sys.stderr)
        return 2
    counts = [int(n) for n in args.vms.split(",") if n.strip()]
    root = tmp_root(args.tmp)
    bench = Bench(root, args)

    def stop(signum, frame):
        raise KeyboardInterrupt

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    try:
        bench.start()
        print("warm-up run (fills the durations file) ...", flush=True)
        bench.run(max(counts))
        results = []
        for vms in counts:
            runs = [bench.run(vms) for _ in range(args.runs)]
            best = sorted(runs, key=lambda r: r["wall"])[len(runs) // 2]
            results.append(best)
            print("--vms {vms}: {wall:.2f} s, bound {bound:.2f} s, ratio {ratio:.2f}x".format(**best), flush=True)
        tunnel = bench.tunnel(args.reps) if args.reps else None
    finally:
        bench.fleet.down()
        shutil.rmtree(str(root), ignore_errors=True)
    text = markdown(results, tunnel, args)
    print()
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    payload = json.dumps({"args": vars(args), "runs": results, "tunnel": tunnel}, indent=2)
    for name in ("fleet-" + stamp, "fleet-latest"):
        (out / (name + ".json")).write_text(payload)
        (out / (name + ".md")).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
