"""SIGINT, SIGTERM and SIGHUP for a run that drives VMs from worker threads.

The handler raises nothing: an exception thrown at an arbitrary bytecode could land in the
middle of a lease write. It only records what came and sets the run's ``cancel`` event;
every wait in the pipeline watches that event, and the main thread polls the guard.

- The first signal before teardown stops the run: no more tests are handed out, every VM
  is torn down, the exit code becomes 128 + the signal number.
- During teardown (the run was stopping anyway, or its suite had finished) a signal is
  noted, not obeyed: teardown goes on. A second one abandons teardown; the run then says
  exactly what is left and how to remove it.
Children run in their own sessions (vmtasks/transport/proc.py), so a terminal's Ctrl-C, which goes to
the whole foreground process group, reaches only us.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable, Dict, List, Optional

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class SignalGuard:
    def __init__(self, cancel: threading.Event, in_teardown: Callable[[], bool] = lambda: False) -> None:
        self.cancel = cancel
        self.in_teardown = in_teardown
        self.received: Optional[int] = None  # the signal that stopped the run
        self.noted: List[int] = []  # signals that came during teardown
        self.abandon = threading.Event()
        self._announced = 0
        self._saved: Dict[int, object] = {}

    def __enter__(self) -> "SignalGuard":
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self._saved[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame) -> None:
        if self.received is None and not self.in_teardown():
            self.received = signum
            self.cancel.set()
            return
        self.noted.append(signum)
        if len(self.noted) >= 2:
            self.abandon.set()

    @property
    def exit_code(self) -> Optional[int]:
        return 128 + self.received if self.received is not None else None

    def news(self) -> List[str]:
        """Messages for signals not yet announced (printed by the main thread's loop)."""
        out = []
        events = ([self.received] if self.received is not None else []) + self.noted
        while self._announced < len(events):
            index, signum = self._announced, events[self._announced]
            self._announced += 1
            name = signal.Signals(signum).name
            if index == 0 and self.received is not None:
                out.append("{}: stopping, tearing down every VM (repeat to abandon teardown)".format(name))
            elif not self.abandon.is_set():
                out.append("{}: teardown in progress, noted; repeat the signal to abandon it "
                           "(the VM and key would be left for cleanup-orphans)".format(name))
        return out
