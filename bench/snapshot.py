"""The manifest's snapshot in a remote DEST: what gzip saves and what it costs.

For manifests of ``--rows`` rows each (recorded as a run records them, by the tests'
``make_manifest``: paths in folders of 100, S3-style random ETags, the part of a row
that does not compress), prints the
SQLite file's size, deflate at ``--levels`` (compressed size, ratio, CPU in ms and ms
per MiB, streamed in dest_state's own steps), and one ``Checkpointer.upload`` (backup,
compress, write) into a local DEST: its wall and CPU, and what went up.

Usage: ``.venv/bin/python bench/snapshot.py [--rows 1000,20000,100000] [--levels 1,6]``.
About 30 s for the defaults.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

from _common import MIB, REPO_ROOT, machine_lines, print_table
from optimizr.dest_state import CHUNK_BYTES, GZIP_LEVEL, SNAPSHOT_KEY, Checkpointer
from optimizr.manifest import manifest_path
from optimizr.storage import LocalStorage

sys.path.insert(0, str(REPO_ROOT / "tests"))
from test_dest_state import make_manifest  # noqa: E402  (the tests' rows: one definition)


def build(root: Path, rows: int) -> Path:
    make_manifest(root, rows).close()
    return manifest_path(root)


def deflate(source: Path, target: Path, level: int) -> float:
    """CPU seconds to gzip ``source`` into ``target`` in CHUNK_BYTES steps."""
    started = time.process_time()
    packer = zlib.compressobj(level, zlib.DEFLATED, 31)
    with source.open("rb") as fin, target.open("wb") as fout:
        while chunk := fin.read(CHUNK_BYTES):
            fout.write(packer.compress(chunk))
        fout.write(packer.flush())
    return time.process_time() - started


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1000,20000,100000")
    parser.add_argument("--levels", default="1,6")
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.rows.split(",")]
    levels = [int(x) for x in args.levels.split(",")]
    for line in machine_lines():
        print(line)
    print(f"snapshot key {SNAPSHOT_KEY}, level {GZIP_LEVEL}, steps of {CHUNK_BYTES // 1024} KiB\n")
    table: list[list[object]] = []
    uploads: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="optimizr-snapshot-bench-") as tmp:
        work = Path(tmp)
        for rows in counts:
            db = build(work / f"m{rows}", rows)
            raw = db.stat().st_size
            for level in levels:
                packed = work / f"m{rows}-{level}.gz"
                cpu = deflate(db, packed, level)
                size = packed.stat().st_size
                table.append([f"{rows:,}", f"{raw / MIB:.2f}", level, f"{size / MIB:.2f}",
                              f"{raw / size:.2f}", f"{cpu * 1000:.1f}",
                              f"{cpu * 1000 / (raw / MIB):.1f}"])  # fmt: skip
            dest = work / f"dest-{rows}"
            checkpointer = Checkpointer(LocalStorage(dest), work / f"m{rows}", 60.0)
            started, cpu0 = time.perf_counter(), time.process_time()
            assert checkpointer.upload(), checkpointer.stats.last_error
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu0
            stats = checkpointer.stats
            uploads.append([f"{rows:,}", f"{stats.manifest_bytes / MIB:.2f}",
                            f"{stats.upload_bytes / MIB:.2f}", f"{wall * 1000:.0f}",
                            f"{cpu * 1000:.0f}"])  # fmt: skip
    print_table(["rows", "manifest MiB", "level", "gzip MiB", "ratio", "cpu ms", "ms/MiB"], table)
    print("\none Checkpointer.upload (backup, gzip, write) into a local DEST:")
    print_table(["rows", "manifest MiB", "sent MiB", "wall ms", "cpu ms"], uploads)


if __name__ == "__main__":
    main()
