"""Run records: ``.vmtasks/runs/<run-id>/`` with stage timings, console log, raw suite
output, JUnit, summary and the resolved config; a ``latest`` pointer; the last N kept."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional


class RunRecord:
    def __init__(self, root: Path, run_id: str) -> None:
        self.root = root
        self.run_id = run_id
        self.dir = root / run_id
        self.stages: List[Dict[str, Any]] = []
        self.meta: Dict[str, Any] = {"run_id": run_id, "started": time.time()}
        self.problems: List[str] = []
        self.multi = False

    def create(self, config_json: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        gitignore = self.root.parent / ".gitignore"
        if not gitignore.exists():
            gitignore.write_text("# vmtasks run records and benchmarks\n*\n")
        (self.dir / "config.json").write_text(config_json)
        self._point_latest()

    def path(self, name: str) -> Path:
        return self.dir / name

    def stage_done(self, vm: str, name: str, started: float, elapsed: float, status: str) -> None:
        entry = {"stage": name, "started": started, "seconds": round(elapsed, 4), "status": status}
        if vm and vm != "host":
            entry["vm"] = vm
        self.stages.append(entry)
        self._write_json("stages.json", self.stages)

    def seconds(self, stage: str) -> float:
        return sum(s["seconds"] for s in self.stages if s["stage"] == stage)

    def total_seconds(self) -> float:
        return time.time() - self.meta["started"]

    def vm_dir(self, vm: str) -> Path:
        if not self.multi:
            return self.dir
        path = self.dir / "vms" / vm
        path.mkdir(parents=True, exist_ok=True)
        return path

    def note_traceback(self, vm: str, stage: str, text: str) -> str:
        path = self.dir / "errors.log"
        with open(path, "a") as fh:
            fh.write("--- {} stage {}\n{}\n".format(vm, stage, text))
        return str(path)

    def command_ran(self, vm: str, text: str, code, seconds: float) -> None:
        if not self.dir.is_dir():
            return
        with open(self.dir / "commands.log", "a") as fh:
            fh.write("{} [{}] exit {} in {:.3f}s: {}\n".format(time.strftime("%H:%M:%S"), vm, code, seconds, text))

    def open_stream(self, vm: str, name: str):
        return open(self.vm_dir(vm) / name, "a", encoding="utf-8")

    def write_text(self, name: str, text: str) -> None:
        (self.dir / name).write_text(text)

    def copy_streams(self, target: Path, vms) -> None:
        with open(target, "w") as out:
            for vm in vms:
                path = self.vm_dir(vm) / "suite-output.txt"
                if path.is_file():
                    out.write(path.read_text())

    def finish(self, **fields: Any) -> None:
        self.meta.update(fields)
        self.meta["finished"] = time.time()
        self._write_json("result.json", self.meta)

    def _write_json(self, name: str, data: Any) -> None:
        if not self.dir.is_dir():
            return
        tmp = self.dir / (name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.dir / name)

    def _point_latest(self) -> None:
        latest = self.root / "latest"
        tmp = self.root / ".latest.tmp"
        try:
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            tmp.symlink_to(self.run_id)
            os.replace(tmp, latest)
        except OSError:
            pass

    def prune(self, keep_last: int) -> None:
        runs = sorted((p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink()),
                      key=lambda p: p.name)
        for old in runs[:-keep_last] if keep_last > 0 else []:
            if old.name != self.run_id:
                shutil.rmtree(old, ignore_errors=True)


def latest_run(root: Path) -> Optional[Path]:
    latest = root / "latest"
    return latest.resolve() if latest.exists() else None
