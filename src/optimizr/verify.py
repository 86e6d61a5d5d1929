"""``--verify``: decode each output before it is committed, and the cheap
completeness check used when a manifest is rebuilt from what is on disk."""

from __future__ import annotations

import os
from typing import Any

from optimizr.encode import Encoded
from optimizr.errors import VerifyFailed


def verify_webp(encoded: Encoded) -> None:
    """Decode every pixel of ``encoded.webp`` and check it against what the
    encoder meant to write: width, frame height, frame count and alpha.

    Raises :class:`VerifyFailed`, so a bad output is a failure, never ``done``.
    """
    import pyvips

    webp, facts = encoded.webp, encoded.facts
    if not riff_is_complete(webp[:12], len(webp)):
        raise VerifyFailed("the output is not a complete WebP file (RIFF size does not match)")
    try:
        image: Any = pyvips.Image.new_from_buffer(webp, "", n=-1, access="sequential")
        # avg() pulls every pixel of every frame through the decoder.
        image.avg()
    except pyvips.Error as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else "decoder error"
        raise VerifyFailed(f"the output does not decode: {detail}") from None
    pages = int(image.get("n-pages")) if image.get_typeof("n-pages") else 1
    page_height = int(image.height) // max(1, pages)
    got = (int(image.width), page_height, pages, bool(image.hasalpha()))
    want = (facts.width_out, facts.height_out, facts.frames, facts.has_alpha)
    if got != want:
        raise VerifyFailed(f"the output decodes as {_describe(*got)}, expected {_describe(*want)}")


def _describe(width: int, height: int, frames: int, alpha: bool) -> str:
    text = f"{width}x{height}"
    if frames > 1:
        text += f"x{frames} frames"
    return text + (" with alpha" if alpha else " without alpha")


def riff_is_complete(head: bytes, size: int) -> bool:
    """A WebP file starts ``RIFF <size-8, little endian> WEBP``; a torn write does not."""
    return (
        len(head) >= 12
        and head[:4] == b"RIFF"
        and head[8:12] == b"WEBP"
        and int.from_bytes(head[4:8], "little") + 8 == size
    )


def file_is_complete_webp(path: str | os.PathLike[str]) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
            size = os.fstat(fh.fileno()).st_size
    except OSError:
        return False
    return riff_is_complete(head, size)
