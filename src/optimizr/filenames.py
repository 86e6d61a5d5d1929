"""File names as text: escaped for people, exact for machines.

On POSIX a file name is bytes. Python hands them over as ``str`` with the bytes
that are not UTF-8 turned into lone surrogates (``b"caf\\xe9"`` becomes
``"caf\\udce9"``, PEP 383), and optimizr keeps keys in that form everywhere
inside: ``open``, ``os.scandir`` and ``os.replace`` take them back to the exact
bytes. Two things such a string cannot do, and this module does them:

* **be shown.** A name may hold an escape sequence (``esc\\x1b[31m.jpg`` colours
  the terminal), a newline (one log event becomes two lines), a right-to-left
  override, or bytes that are not text at all. :func:`printable` gives the form
  every terminal line, text log, status line and HTML page uses: those
  characters as backslash escapes, everything else (accents, CJK, emoji) as is.
* **be text.** JSON and SQLite TEXT must be valid Unicode. :func:`valid_unicode`
  escapes only the undecodable bytes (for free text: messages, warnings);
  :func:`name_fields` gives a name's JSON form: ``{"path": ...}`` alone when the
  name is UTF-8 (then it is exact), else ``{"path": <valid_unicode form>,
  "path_bytes": <base64 of the exact bytes>}``; :func:`key_from_fields` reads
  either back. JSON escapes control characters itself, so JSON text is left
  exact but for the bytes that are not UTF-8: the same rule as for messages.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping
from typing import Any

# C0 controls, DEL and C1 controls (all of Unicode's Cc), the line and paragraph
# separators (editors and some terminals break lines on them), the bidirectional
# embeddings, overrides and isolates (they reorder what is shown: "gpj.<RLO>exe"
# reads as "exe.jpg"), and lone surrogates (bytes that are not UTF-8).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
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
    more than once. Not reversible: the exact form is :func:`name_fields`'.
    """
    return _UNSAFE.sub(_escape, text) if _UNSAFE.search(text) else text


def valid_unicode(text: str) -> str:
    """``text`` with its undecodable bytes escaped (``\\xe9``), nothing else changed:
    for JSON strings and SQLite TEXT, which must be valid Unicode."""
    return _SURROGATE.sub(_escape, text) if _SURROGATE.search(text) else text


def is_exact_text(name: str) -> bool:
    """Is ``name`` valid Unicode (no undecodable bytes), so that text can hold it exactly?"""
    return name.isascii() or not _SURROGATE.search(name)


def name_fields(name: str, field: str = "path") -> dict[str, str]:
    """The JSON form of a name: ``{field: name}``, or, when the name is not UTF-8,
    ``{field: valid_unicode(name), field + "_bytes": base64 of its exact bytes}``."""
    if is_exact_text(name):
        return {field: name}
    return {
        field: valid_unicode(name),
        f"{field}_bytes": base64.b64encode(os.fsencode(name)).decode("ascii"),
    }


def key_from_fields(item: Mapping[str, Any], field: str = "path") -> str:
    """The name :func:`name_fields` wrote, exactly. Raises ValueError or KeyError
    when the item holds neither form, TypeError when a form is not a string."""
    encoded = item.get(f"{field}_bytes")
    if encoded is None:
        value = item[field]
        if not isinstance(value, str):
            raise TypeError(f"{field} is not a string")
        return value
    try:
        return os.fsdecode(base64.b64decode(encoded, validate=True))
    except binascii.Error as exc:
        raise ValueError(f"{field}_bytes is not base64: {exc}") from None


def json_safe(value: Any) -> Any:
    """``value`` (dicts, lists, strings, numbers) with every string valid Unicode."""
    if isinstance(value, str):
        return valid_unicode(value)
    if isinstance(value, dict):
        return {json_safe(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
