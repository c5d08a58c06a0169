"""TEMPORARY shim over vmtasks.ui until the reporter lands (replaced by the real one)."""
from __future__ import annotations

import threading

from .ui import Ui


class Reporter:
    def __init__(self, quiet=False, verbose=False, console=None):
        self.ui = Ui(console=console, quiet=quiet, verbose=verbose)
        self.lock = threading.RLock()
        self.verbose = verbose

    def _vm(self, vm):
        return "" if vm in ("", "host") else "[{}] ".format(vm)

    def stage_started(self, vm, stage, seconds):
        with self.lock:
            self.ui.stage_started(stage)

    def stage_finished(self, vm, stage, seconds, status, note=""):
        with self.lock:
            self.ui.stage_finished(stage, seconds, status == "ok", note)

    def vm_added(self, vm):
        pass

    def vm_waiting(self, vm, text):
        self.info("   " + self._vm(vm) + text)

    def test_started(self, vm, name):
        pass

    def test_finished(self, vm, name, status, seconds, output):
        with self.lock:
            self.ui.test_finished(name, status, seconds, output)

    def package_failed(self, vm, package, output):
        with self.lock:
            self.ui.print("   FAIL package {}".format(package), style="red")
            self.ui.print(output.rstrip())

    def raw_output(self, vm, text):
        with self.lock:
            self.ui.raw(text)

    def vm_kept(self, vm, attach, cleanup):
        with self.lock:
            self.ui.print("kept VM {}".format(vm), style="bold")
            self.ui.print("  attach:   " + attach)
            self.ui.print("  clean up: " + cleanup)

    def info(self, text):
        with self.lock:
            self.ui.info(text)

    def warn(self, text):
        with self.lock:
            self.ui.warn(text)

    def error(self, text):
        with self.lock:
            self.ui.error(text)

    def print(self, text, style=None):
        with self.lock:
            self.ui.print(text, style=style)

    def run_done(self, summary, seconds, verdict, record_dir, extra_lines, write_summary=None):
        with self.lock:
            self.ui.close()
            for line in extra_lines:
                self.ui.print(line)
            if summary is not None:
                for r in summary.failures:
                    self.ui.print("--- FAIL: {}".format(r.name), style="bold red")
            print(verdict)
            print("run record: " + record_dir)
            if write_summary is not None:
                write_summary("summary.txt", verdict + "\n")

    def close(self):
        with self.lock:
            self.ui.close()
