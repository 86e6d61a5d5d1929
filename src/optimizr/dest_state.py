"""Where the state of a DEST lives when DEST is a bucket.

A local DEST keeps its state (manifest, lock, run history) in ``DEST/.optimizr/``.
An object store cannot hold a live SQLite database, so for a remote DEST the
manifest lives in a local *state root* (``--state-dir``, by default under the
user's cache directory, one folder per DEST URL) laid out as a local DEST's is
(``ROOT/.optimizr/manifest.sqlite``), so every part of optimizr that reads a
DEST's state reads it the same way. Snapshots of it go up to
``DEST/.optimizr/manifest.sqlite`` (see ``checkpoint``), from which another
machine can resume.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

#: The key, under DEST, of the manifest's snapshot.
SNAPSHOT_KEY = ".optimizr/manifest.sqlite"


def cache_home() -> Path:
    base = os.environ.get("XDG_CACHE_HOME")
    return Path(base) if base else Path.home() / ".cache"


def local_state_root(dest_url: str, state_dir: Path | None = None) -> Path:
    """The local folder that stands in for a remote DEST's ``.optimizr/`` parent.

    ``state_dir`` (--state-dir) is used as it is; the default is keyed by the URL
    (readable slug + hash: two DESTs never share one, and a user can tell which is which)."""
    if state_dir is not None:
        return state_dir
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", dest_url)[:60].strip("-")
    digest = hashlib.sha256(dest_url.encode()).hexdigest()[:12]
    return cache_home() / "optimizr" / "dests" / f"{slug}-{digest}"
