"""Make text from the guest safe to show on the host's terminal.

A guest test can print anything, and a terminal acts on some of it: ESC sequences clear
the screen, move the cursor, set the window title, or write the clipboard (OSC 52); C1
bytes (0x80-0x9f) are single-byte forms of the same; bidi overrides reorder what a reader
sees (a "Trojan source" line). :func:`visible` shows every such character as text instead:
``ESC`` as ``^[`` (so ``\\x1b[2J`` reads ``^[[2J``), other controls as ``\\xNN``, bidi
controls and lone surrogates (which cannot even be encoded to the terminal) as
``\\uNNNN``. Newline and tab pass. Apply it to everything that came from the guest:
live output, test names, failure text, the summary. Files (the run record, JUnit) keep
the original bytes.

Imported inside the guest (Python 3.9, standard library only).
"""

from __future__ import annotations

import re

# C0 except \t and \n, DEL, C1, bidi embeddings/overrides/isolates, lone surrogates.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _shown(match: "re.Match[str]") -> str:
    c = match.group()
    if c == "\x1b":
        return "^["
    code = ord(c)
    return "\\x%02x" % code if code < 0x100 else "\\u%04x" % code


def visible(text: str) -> str:
    """``text`` with every control character a terminal would act on made visible."""
    return _UNSAFE.sub(_shown, text)


def visible_line(text: str) -> str:
    """:func:`visible` for one line of a table or list (a VM name, a test name): newline and
    tab are made visible too (``\\n``, ``\\t``), so a name cannot break the layout."""
    return visible(text).replace("\n", "\\n").replace("\t", "\\t")
