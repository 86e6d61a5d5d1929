"""Reading a source (a path, or the file's bytes) whole, for decoders that need all of it."""

from __future__ import annotations


def read_source(source: str | bytes, limit: int | None = None) -> bytes:
    """The source's bytes, or its first ``limit`` bytes."""
    if isinstance(source, bytes):
        return source if limit is None else source[:limit]
    with open(source, "rb") as fh:
        return fh.read() if limit is None else fh.read(limit)
