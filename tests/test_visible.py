"""Tests for vmtasks.guest.visible: nothing a guest prints reaches the host terminal as a control."""

from __future__ import annotations

import re
import time

import pytest

from vmtasks.guest.visible import visible

ATTACKS = {
    "clear screen": ("before\x1b[2J\x1b[Hafter", "before^[[2J^[[Hafter"),
    "cursor up and erase line": ("ok\x1b[1A\x1b[2Kfake PASS", "ok^[[1A^[[2Kfake PASS"),
    "window title (OSC 0, BEL)": ("\x1b]0;pwned\x07x", "^[]0;pwned\\x07x"),
    "OSC 52 clipboard write (ST)": ("\x1b]52;c;Y3VybCBldmlsIHwgc2g=\x1b\\", "^[]52;c;Y3VybCBldmlsIHwgc2g=^[\\"),
    "colour": ("\x1b[31mred\x1b[0m", "^[[31mred^[[0m"),
    "C1 CSI and OSC": ("a\x9b2Jb\x9d0;t\x9c", "a\\x9b2Jb\\x9d0;t\\x9c"),
    "carriage return overwrite": ("FAIL\rPASS", "FAIL\\x0dPASS"),
    "backspace, NUL, bell, DEL": ("a\x08\x00\x07\x7fz", "a\\x08\\x00\\x07\\x7fz"),
    "bidi override": ("access = \u202euser\u202c", "access = \\u202euser\\u202c"),
    "bidi isolates": ("\u2066x\u2067y\u2068z\u2069", "\\u2066x\\u2067y\\u2068z\\u2069"),
    "lone surrogate": ("a\ud800b", "a\\ud800b"),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_escapes_are_shown_not_obeyed(name):
    raw, shown = ATTACKS[name]
    assert visible(raw) == shown


def test_nothing_raw_survives_any_control():
    every = "".join(chr(c) for c in range(0x00, 0xa0)) + "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
    out = visible(every)
    assert re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]", out) is None
    assert "\n" in out and "\t" in out and "^[" in out
    out.encode("utf-8")  # printable to any UTF-8 terminal


def test_ordinary_text_is_unchanged():
    text = "=== RUN   TestÜber/ñ_日本\n    vm_test.go:12: ok \U0001F600 <&> \\x1b literal\ttab\n"
    assert visible(text) == text
    assert visible("") == ""


def test_fast_on_large_output():
    text = ("    log line with a \x1b[31mcolour\x1b[0m and plain text " * 20 + "\n") * 2000  # ~2 MB
    started = time.perf_counter()
    out = visible(text)
    assert time.perf_counter() - started < 2.0
    assert "\x1b" not in out and out.count("^[") == text.count("\x1b")
