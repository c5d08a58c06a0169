"""Which test runs where: the order of the VM queue, and static shards for CI matrices.

Plain functions over :class:`vmtasks.guest.gotest.TestId`, from the suite's own listing
(``gotest.parse_listing``), so no hand-written list decides what runs. ``estimate`` is how
long a test will take in seconds: a callable taking a :class:`TestId`, a mapping from :class:`TestId` to seconds,
or a :class:`vmtasks.guest.results.History` (its ``estimate(package, name)``).

Every function is deterministic for the same tests and estimates, whatever order the
tests come in: ties are broken by package, then name, then bin number. That is what lets
N CI matrix jobs, each computing only its own shard, agree on the split.

Imported inside the guest (shards are computed there): Python 3.9, standard library only.
"""

from __future__ import annotations

import heapq
import math
import re
from typing import Any, Callable, Iterable, List, Mapping, Tuple, Union

from .errors import ConfigError
from .gotest import TestId

Estimate = Union[Callable[[TestId], float], Mapping[TestId, float], Any]


def _estimator(estimate: Estimate) -> Callable[[TestId], float]:
    if hasattr(estimate, "estimate") and callable(estimate.estimate):
        history = estimate
        return lambda t: history.estimate(t.package, t.name)
    if isinstance(estimate, Mapping):
        table = estimate
        return lambda t: table[t]
    if callable(estimate):
        return estimate
    raise TypeError("estimate must be a callable, a mapping or a History, not %r" % type(estimate).__name__)


def _seconds(value: Any) -> float:
    """A usable weight: NaN and negatives count as 0 (a broken estimate must not reorder others)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return 0.0
    return f if f > 0 and not math.isnan(f) else 0.0


def _weighted(tests: Iterable[TestId], estimate: Estimate) -> List[Tuple[float, TestId]]:
    """Unique tests with their weights, longest first, ties by package and name."""
    get = _estimator(estimate)
    unique = sorted(set(tests))
    weighted = [(_seconds(get(t)), t) for t in unique]
    weighted.sort(key=lambda wt: (-wt[0], wt[1]))
    return weighted


# What `go test` runs as a test: Test*, Example* (with output) and Fuzz* (its seed corpus).
# Benchmark* only runs with -bench.
def longest_first(tests: Iterable[TestId], estimate: Estimate) -> List[TestId]:
    """The dynamic queue's order: longest estimate first, ties by package and name.

    Handing the long tests out first means the run does not end waiting on one long test
    that a free VM picked up last. A test listed twice appears once.
    """
    return [t for _, t in _weighted(tests, estimate)]


def partition(tests: Iterable[TestId], n: int, estimate: Estimate) -> List[List[TestId]]:
    """Split the tests into ``n`` lists of about equal estimated time.

    Longest-processing-time-first: take the tests longest first and put each onto the
    bin with the least estimated load so far (the lowest-numbered one on a tie). Its
    makespan is at most 4/3 of the optimal split's, and at most
    ``total / n + longest`` always. Each list is in the order its tests were assigned
    (longest first). Every test lands in exactly one list; a test listed twice, once.
    """
    _check_count(n)
    bins: List[List[TestId]] = [[] for _ in range(n)]
    loads = [(0.0, i) for i in range(n)]  # a heap of (load, bin index)
    for weight, test in _weighted(tests, estimate):
        load, i = heapq.heappop(loads)
        bins[i].append(test)
        heapq.heappush(loads, (load + weight, i))
    return bins


def shard(tests: Iterable[TestId], k: int, n: int, estimate: Estimate) -> List[TestId]:
    """The ``k``-th (1-based) of ``n`` shards from :func:`partition`: what one CI job runs.

    Only as many bins as there are tests are built, whatever ``n`` is: with more shards
    than tests, :func:`partition` puts the j-th longest test alone in bin j (a bin past
    the tests is never the least loaded while a test is left), so the shards past the
    tests are empty and the others are the same as with all ``n`` bins."""
    _check_count(n)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ConfigError("shard {!r} of {} does not exist: K must be between 1 and {}".format(k, n, n),
                          "give --shard K/N with 1 <= K <= N, for example 1/{}".format(n))
    unique = sorted(set(tests))
    bins = min(n, len(unique))
    if k > bins:
        return []
    return partition(unique, bins, estimate)[k - 1]


MAX_SHARDS = 100000  # a CI matrix of more jobs than this is a typo, not a plan
_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str) -> Tuple[int, int]:
    """``"2/3"`` -> ``(2, 3)``: shard K of N, checked (1 <= K <= N)."""
    m = _SHARD.match(text) if isinstance(text, str) else None
    if m is None:
        if isinstance(text, str) and not text.strip():
            raise ConfigError("--shard is empty: it would run the whole suite in every CI job",
                              "give --shard K/N (is the CI matrix variable set?), or leave --shard out")
        raise ConfigError("--shard {!r} is not K/N".format(_clip(text)),
                          "write it as K/N, for example --shard 1/2 (the first of two shards)")
    # Compare lengths first: int() of thousands of digits is refused (or slow).
    k, n = (int(g) if len(g.lstrip("0")) <= 9 else MAX_SHARDS + 1 for g in m.groups())
    if n > MAX_SHARDS:
        raise ConfigError("--shard {!r}: N (or K) is more than {} (a CI matrix that large is a typo)".format(
            _clip(text), MAX_SHARDS), "give N as the number of CI jobs, for example --shard 1/4")
    if n < 1 or not 1 <= k <= n:
        raise ConfigError("--shard {!r}: K must be between 1 and N, and N at least 1".format(_clip(text)),
                          "write K/N with 1 <= K <= N: N CI jobs get --shard 1/N ... --shard N/N")
    return k, n


def _clip(text: Any) -> Any:
    return text[:40] + "..." if isinstance(text, str) and len(text) > 40 else text


def lower_bound(estimates: Iterable[float], n: int) -> float:
    """No split onto ``n`` runners can finish sooner: max(longest test, total / n)."""
    _check_count(n)
    weights = [_seconds(e) for e in estimates]
    if not weights:
        return 0.0
    return max(max(weights), sum(weights) / n)


def makespan(bins: List[List[TestId]], estimate: Estimate) -> float:
    """The estimated time of the longest bin."""
    get = _estimator(estimate)
    return max((sum(_seconds(get(t)) for t in b) for b in bins), default=0.0)


def _check_count(n: Any) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError("cannot split tests into {!r} parts".format(n),
                          "give a whole number of runners or shards, at least 1")
