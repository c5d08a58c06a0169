"""The shared test queue of a many-VM run: tests go out longest first (by the durations of
earlier runs) to whichever VM is free, so the run ends when the last test does. Every test
is handed out at most once; what is never handed out is reported as not run."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from vmtasks.guest import gotest
from vmtasks.guest.gotest import GoSuite, TestItem

GUEST_BIN_DIR = ".vmtasks/testbin"  # relative to the guest user's home


@dataclass
class Assignment:
    item: TestItem
    vm: str
    started: float  # wall clock
    finished: Optional[float] = None


class TestQueue:
    """Thread-safe: VMs take tests from it concurrently."""

    __test__ = False  # not a pytest test class despite the name
    def __init__(self, items: Sequence[TestItem], suite: GoSuite, bin_dir: Path, framing: bool,
                 env_words: Sequence[str]) -> None:
        self.items = list(items)  # in hand-out order
        self.suite = suite
        self.bin_dir = bin_dir
        self.framing = framing
        self.env_words = list(env_words)
        self._next = 0
        self._lock = threading.Lock()
        self.assignments: List[Assignment] = []
        self._by_key: Dict[tuple, Assignment] = {}

    def take(self, vm: str) -> Optional[TestItem]:
        with self._lock:
            if self._next >= len(self.items):
                return None
            item = self.items[self._next]
            self._next += 1
            assignment = Assignment(item, vm, time.time())
            self.assignments.append(assignment)
            self._by_key[item.key] = assignment
            return item

    def done(self, item: TestItem) -> None:
        with self._lock:
            self._by_key[item.key].finished = time.time()

    def exhausted(self) -> bool:
        with self._lock:
            return self._next >= len(self.items)

    def remaining(self) -> List[TestItem]:
        with self._lock:
            return self.items[self._next:]

    @staticmethod
    def guest_bin_dir(cfg) -> str:
        return GUEST_BIN_DIR

    def command_for(self, cfg, item: TestItem, pid_file: Optional[str] = None) -> str:
        return gotest.test_command(cfg, item, self.suite, '"$HOME"/' + GUEST_BIN_DIR, self.framing, self.env_words,
                                   pid_file=pid_file)

    def command_for_display(self, cfg) -> str:
        if self.items:
            return self.command_for(cfg, self.items[0]) + "   (one per test)"
        return "(no tests)"
