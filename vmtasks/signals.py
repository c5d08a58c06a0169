"""Turn SIGINT, SIGTERM and SIGHUP into an ``Interrupted`` exception, so teardown runs in
``finally`` on every exit path; during teardown, a repeated signal is noted, not obeyed,
until it comes a second time (then we say exactly what is left behind)."""

from __future__ import annotations

import signal
import threading
from typing import Callable, Dict, Optional

from .errors import Interrupted

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class TeardownAbandoned(Interrupted):
    """A second signal during teardown: stop cleaning up now."""


class SignalGuard:
    def __init__(self, on_warning: Callable[[str], None] = lambda text: None) -> None:
        self.on_warning = on_warning
        self.received: Optional[int] = None
        self.stage = ""
        self._tearing_down = False
        self._teardown_signals = 0
        self._saved: Dict[int, object] = {}

    def __enter__(self) -> "SignalGuard":
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self._saved[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]

    def teardown_mode(self) -> None:
        self._tearing_down = True

    def _handle(self, signum: int, frame) -> None:
        if self._tearing_down:
            self._teardown_signals += 1
            if self._teardown_signals == 1:
                self.on_warning("teardown in progress: repeat the signal to abandon it "
                                "(the VM and key would be left for `invoke cleanup-orphans`)")
                return
            raise TeardownAbandoned(signum, "teardown")
        if self.received is None:
            self.received = signum
        raise Interrupted(signum, self.stage)
