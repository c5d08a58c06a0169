"""How long each test took in earlier runs, and how long it will probably take next time.

The scheduler reads this (:func:`vmtasks.guest.schedule.longest_first`, ``partition``) to hand
out the longest tests first and to cut CI shards of equal length. The file is
``.vmtasks/durations.json`` beside the config (the caller chooses; see
:data:`DEFAULT_PATH`)::

    {"version": 2, "keep": 10,
     "tests": {"example.com/e2e::TestBoot": [11.9, 12.5, 30.2]}}

Each test keeps its last :data:`KEEP` durations, oldest first. Imported inside the guest
(shards are computed there): Python 3.9, standard library only.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from typing import Dict, Iterable, List, Optional, Tuple, Union

from ..atomic import write_atomic
from .model import FAIL, FLAKY, PASS, Summary, TestResult

DEFAULT_PATH = os.path.join(".vmtasks", "durations.json")
KEEP = 10
PERCENTILE = 0.85
UNKNOWN = 1.0  # seconds, for a test when nothing at all is known
VERSION = 2
MAX_BYTES = 64 * 2 ** 20  # a durations file of 10 samples per test is far smaller

PathLike = Union[str, "os.PathLike[str]"]


def _seconds(value: object) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    f = float(value)
    return f if math.isfinite(f) and f >= 0 else None


def _key(package: str, name: str) -> str:
    return "%s::%s" % (package, name)


def percentile(samples: List[float], q: float = PERCENTILE) -> float:
    """The nearest-rank ``q`` percentile of ``samples`` (not empty)."""
    ordered = sorted(samples)
    rank = max(1, int(math.ceil(q * len(ordered))))
    return ordered[rank - 1]


class History:
    """Per-test durations across runs, and an estimate for the next run.

    The estimate is the 85th percentile (nearest rank) of the last :data:`KEEP` runs, not a
    mean. A scheduler pays more for guessing short than long: a long test started last
    decides when the run ends, so the estimate leans high (a test that usually takes 10 s
    and sometimes 30 s is planned near the top of its range). A percentile over a window
    also shrugs off one outlier (of 10 samples, p85 is the second largest: one stalled run
    does not move it, where a mean or an EWMA would jump), and forgets a test's old speed
    after :data:`KEEP` runs. A test with no samples is estimated at the median of the
    known tests' estimates (a typical test), or :data:`UNKNOWN` when nothing is known.

    Recorded: top-level tests that passed or failed with a duration go reported. Not
    recorded: skips (near zero, not representative), subtests (they run inside their
    parent), and tests whose result vmtasks decided (interrupted, lost, not run: their
    duration is not the test's).
    """

    def __init__(self, path: Optional[PathLike] = None, keep: int = KEEP) -> None:
        if keep < 1:
            raise ValueError("History keep must be at least 1")
        self.path = os.fspath(path) if path is not None else None
        self.keep = keep
        self._samples: Dict[str, List[float]] = {}
        self._median: Optional[float] = None
        self.problem = ""  # why the file was not used (it exists but is not a durations file)

    @classmethod
    def load(cls, path: PathLike, keep: int = KEEP) -> "History":
        """The history at ``path``; a missing, unreadable or corrupt file gives an empty one.

        Never raises for the file's content: bad entries are dropped, the rest kept. The
        version 1 format (``{"ema": ..}`` entries) is read as one sample each.
        """
        history = cls(path, keep)
        try:
            with open(os.fspath(path), "rb") as fh:
                raw = fh.read(MAX_BYTES + 1)
        except OSError:
            return history  # missing (the first run) or unreadable: start empty
        if len(raw) > MAX_BYTES:
            history.problem = "it is larger than {} MB".format(MAX_BYTES // 2 ** 20)
            return history
        try:
            data = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, or nested too deep to parse
            history.problem = "it is not JSON ({})".format(type(exc).__name__ if isinstance(exc, RecursionError)
                                                           else str(exc).splitlines()[0][:120])
            return history
        tests = data.get("tests") if isinstance(data, dict) else None
        if not isinstance(tests, dict):
            history.problem = "it has no \"tests\" table"
            return history
        for key, entry in tests.items():
            if not isinstance(key, str) or "::" not in key:
                continue
            if isinstance(entry, dict):  # version 1: {"ema": 2.0, "last": 1.0, "count": 3}
                entry = [entry.get("ema")]
            if not isinstance(entry, list):
                continue
            samples = [s for s in (_seconds(v) for v in entry) if s is not None][-keep:]
            if samples:
                history._samples[key] = samples
        return history

    def record(self, results: Union[Summary, Iterable[TestResult]]) -> int:
        """Add one run's durations (a :class:`Summary` or top-level results); returns how many."""
        items = results.results if isinstance(results, Summary) else results
        recorded = 0
        for r in items:
            if r.is_subtest or r.unreported or r.status not in (PASS, FAIL, FLAKY):  # flaky: its passing run
                continue
            value = _seconds(r.elapsed)
            if value is None:
                continue
            samples = self._samples.setdefault(_key(r.package, r.name), [])
            samples.append(value)
            del samples[:-self.keep]
            recorded += 1
        self._median = None
        return recorded

    def samples(self, package: str, name: str) -> List[float]:
        """The recorded durations of a test, oldest first (empty when unknown)."""
        return list(self._samples.get(_key(package, name), []))

    def known(self, package: str, name: str) -> bool:
        """True when the test has at least one recorded duration."""
        return _key(package, name) in self._samples

    def estimate(self, package: str, name: str) -> float:
        """Expected seconds for the test's next run (see the class docstring)."""
        samples = self._samples.get(_key(package, name))
        if samples:
            return percentile(samples)
        return self.typical()

    def typical(self) -> float:
        """The median of the known tests' estimates: the guess for an unknown test."""
        if self._median is None:
            estimates = sorted(percentile(s) for s in self._samples.values())
            if not estimates:
                self._median = UNKNOWN
            else:
                mid = len(estimates) // 2
                self._median = estimates[mid] if len(estimates) % 2 else (estimates[mid - 1] + estimates[mid]) / 2
        return self._median

    def tests(self) -> List[Tuple[str, str]]:
        """``(package, name)`` of every test with a recorded duration, sorted."""
        return sorted(tuple(k.split("::", 1)) for k in self._samples)  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self._samples)

    @classmethod
    def update(cls, path: PathLike, results: Union[Summary, Iterable[TestResult]], keep: int = KEEP) -> str:
        """Add one run's durations to the file at ``path``, under a lock, and save it.

        Two runs finishing at once (two checkouts, two users of one Mac) each load, add and
        save while holding an exclusive ``flock`` on ``<path>.lock``, so neither update is
        lost. A file that is there but is not a durations file is moved aside to
        ``<path>.corrupt`` (kept for a person to look at) and a fresh one written; the
        returned text says so ("" when all was well). Raises ``StateError`` when the file
        cannot be written."""
        target = os.fspath(path)
        with _Locked(target + ".lock"):
            history = cls.load(target, keep)
            note = ""
            if history.problem:
                kept = target + ".corrupt"
                try:
                    os.replace(target, kept)
                    note = "durations file {} was not usable ({}): moved to {} and started afresh".format(
                        target, history.problem, kept)
                except OSError as exc:
                    note = "durations file {} was not usable ({}) and could not be moved aside ({}): " \
                           "replaced".format(target, history.problem, exc.strerror or exc)
            history.record(results)
            history.save(target)
        return note

    def save(self, path: Optional[PathLike] = None) -> None:
        """Write the history atomically to ``path`` (default: where it was loaded from)."""
        target = os.fspath(path) if path is not None else self.path
        if target is None:
            raise ValueError("History.save() needs a path")
        data = {"version": VERSION, "keep": self.keep,
                "tests": {k: [round(s, 6) for s in v] for k, v in sorted(self._samples.items())}}
        write_atomic(target, json.dumps(data, indent=1, sort_keys=True) + "\n", make_dirs=True)
        self.path = target


class _Locked:
    """An exclusive ``flock`` on ``path`` (created if missing) for a ``with`` block. Where
    locking is not possible (no fcntl, a file system without locks) the block runs
    unlocked: durations only steer the schedule, they are never worth failing a run."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: Optional[int] = None

    def __enter__(self) -> "_Locked":
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            if self.fd is not None:
                os.close(self.fd)
            self.fd = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None
