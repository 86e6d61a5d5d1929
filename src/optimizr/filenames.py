"""File names as text: escaped for people.

On POSIX a file name is bytes. Python hands them over as ``str`` with the bytes
that are not UTF-8 turned into lone surrogates (``b"caf\\xe9"`` becomes
``"caf\\udce9"``, PEP 383), and optimizr keeps keys in that form everywhere
inside: ``open``, ``os.scandir`` and ``os.replace`` take them back to the exact
bytes. Such a string cannot be shown as it is. A name may hold an escape
sequence (``esc\\x1b[31m.jpg`` colours the terminal), a newline (one log event
becomes two lines), a right-to-left override, or bytes that are not text at
all. :func:`printable` gives the form every terminal line, text log, status
line and HTML page uses: those characters as backslash escapes, everything
else (accents, CJK, emoji) as is.
"""

from __future__ import annotations

import re

# C0 controls, DEL and C1 controls (all of Unicode's Cc), the line and paragraph
# separators (editors and some terminals break lines on them), the bidirectional
# embeddings, overrides and isolates (they reorder what is shown: "gpj.<RLO>exe"
# reads as "exe.jpg"), and lone surrogates (bytes that are not UTF-8).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte os.fsdecode could not decode
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x80:
        return _SHORT.get(char) or f"\\x{code:02x}"
    # \u for a code point, so that U+009B (valid UTF-8) and the byte 0x9B differ.
    return f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` safe to show on a terminal or a log line: what would be obeyed, escaped.

    Idempotent (backslashes are left as they are), so a line may go through it
    more than once. Not reversible: for people, not for machines.
    """
    return _UNSAFE.sub(_escape, text) if _UNSAFE.search(text) else text
