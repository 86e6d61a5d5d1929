"""A plain Pillow process-pool converter: the baseline a user would write.

Walks SRC, and in a ``multiprocessing.Pool`` of -j processes (``imap_unordered``,
one file per task) opens each image with ``Image.open``, applies the EXIF
orientation with ``ImageOps.exif_transpose`` and saves it as WebP with the
given quality and method (libwebp's effort), keeping the ICC profile. Outputs
mirror SRC's tree in DEST (``a/b.jpg`` -> ``DEST/a/b.webp``).

It is a peer for bench/compare.py, not part of optimizr, and deliberately has
none of optimizr's care (atomic writes, crash isolation, memory budget).
Prints one line: files converted and failed, bytes in and out, seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path

from PIL import Image, ImageOps

SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp"})

Job = tuple[str, str, int, int]


def convert(job: Job) -> tuple[str, int, int, str]:
    """Convert one file; return (source, bytes in, bytes out, error or "")."""
    source, target, quality, method = job
    try:
        with Image.open(source) as opened:
            image = ImageOps.exif_transpose(opened)
            icc = opened.info.get("icc_profile")
            if image.mode not in ("RGB", "RGBA"):
                image = image.convert("RGBA" if "A" in image.mode else "RGB")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            extra = {"icc_profile": icc} if icc else {}
            image.save(target, "WEBP", quality=quality, method=method, **extra)
        return source, os.path.getsize(source), os.path.getsize(target), ""
    except Exception as exc:  # one bad file must not stop the pool
        return source, 0, 0, f"{type(exc).__name__}: {exc}"


def jobs(src: Path, dest: Path, quality: int, method: int) -> list[Job]:
    found = []
    for dirpath, _, names in os.walk(src):
        for name in sorted(names):
            path = Path(dirpath, name)
            if path.suffix.lower() in SUFFIXES:
                target = dest / path.relative_to(src).with_suffix(".webp")
                found.append((str(path), str(target), quality, method))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("-j", "--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("-q", "--quality", type=int, default=80)
    parser.add_argument("--method", type=int, default=4, help="0 (fast) to 6 (small); default 4")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    todo = jobs(args.src, args.dest, args.quality, args.method)
    converted = failed = bytes_in = bytes_out = 0
    # close() + join() (the with block's terminate() comes after) reap every worker,
    # so the caller's wait4 rusage includes their CPU time.
    with Pool(args.workers) as pool:
        for source, size_in, size_out, error in pool.imap_unordered(convert, todo, chunksize=1):
            if error:
                failed += 1
                print(f"failed: {source}: {error}", file=sys.stderr)
            else:
                converted += 1
                bytes_in += size_in
                bytes_out += size_out
        pool.close()
        pool.join()
    print(
        f"pillow_pool: {converted} converted, {failed} failed, {bytes_in:,} -> {bytes_out:,} "
        f"bytes in {time.perf_counter() - started:.2f} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
