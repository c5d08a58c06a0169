"""``go test -run`` regexes that select exactly the tests that failed.

Imported inside the guest (Python 3.9, standard library only).
"""

from __future__ import annotations

from typing import Iterable, List

_GO_META = frozenset("\\.+*?()|[]{}^$")


def go_quote_meta(text: str) -> str:
    """Escape ``text`` for Go's RE2 syntax like Go's ``regexp.QuoteMeta``.

    Only ``\\.+*?()|[]{}^$`` are escaped; everything else (``-``, ``#``, spaces, non-ASCII
    letters...) stays literal. The result means the same literal in Python's ``re``.
    """
    return "".join("\\" + c if c in _GO_META else c for c in text)


def rerun_regex(names: Iterable[str]) -> str:
    """A ``go test -run`` regex matching exactly these top-level test names.

    Returns ``^(TestA|TestB)$`` with each name escaped by :func:`go_quote_meta` (duplicates
    dropped, order kept). Subtests of the selected tests still run; the same names in
    other packages match too (``-run`` is per name). Give it :func:`~.model.failed_tests`,
    which holds real failures only: never interrupted or not-run tests.

    Raises ValueError for an empty list (an empty ``-run`` would run everything) and for
    names containing ``/``, which ``go test -run`` treats as a subtest level separator.
    """
    unique: List[str] = []
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError("rerun_regex: empty test name")
        if "/" in name:
            raise ValueError("rerun_regex: %r is not a top-level test name" % name)
        if name not in unique:
            unique.append(name)
    if not unique:
        raise ValueError("rerun_regex: no test names given")
    return "^(" + "|".join(go_quote_meta(n) for n in unique) + ")$"
