"""JPEG decode: pyvips-binary's mozjpeg (built MinSizeRel) against Pillow's libjpeg-turbo.

Issue 12 asks whether the decoder optimizr uses is markedly slower than another
one that gives identical pixels. For every JPEG of the given folders (default:
the bench corpus, bench/.data/corpus, and the shared corpus's photos) and for
each decode mode -- full size, then shrink-on-load by 2, 4 and 8 (libvips
``shrink=N`` against Pillow's ``draft()``, which both hand the scaling to the
library's IDCT) -- this script

1. checks the pixels: both decodes as numpy arrays, compared element by element
   (the share of pixels that differ in any band and the largest difference).
   Both libraries keep libjpeg's defaults: the ISLOW integer IDCT and fancy
   upsampling (Pillow uses JDCT_FASTEST and plain upsampling only when its
   draft flag is set, which ``Image.draft`` leaves off; libvips never changes
   them). Neither applies the EXIF orientation here. At a shrink the sizes may
   differ by a row or column (libvips rounds down, libjpeg up): the common
   top-left area is compared and the table says so;
2. times the decode, one thread (``VIPS_CONCURRENCY=1`` and
   ``pyvips.concurrency_set(1)``; Pillow's decoder has no threads), alternately,
   ``--rounds`` times each in this one process, the first decoder swapped each
   round: libvips ``new_from_file(access="sequential"[, shrink=N])`` rendered
   into memory with ``copy_memory()``, Pillow ``Image.open`` (+ ``draft``) +
   ``load()``. Both read the file from the page cache (every file is read once
   beforehand) and write the pixels into their own image buffer. The figure is
   the median CPU time (``time.process_time``, all threads of the process), which
   a busy shared machine disturbs less than wall time; the median wall time is
   printed in the summary too.

Prints one table per mode -- image, MP (of the file), vips ms, Pillow ms,
ratio (vips / Pillow), identical? -- then per mode the median of the per-image
ratios, the total of each and how many images were pixel-identical.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# libvips reads VIPS_CONCURRENCY once, when it is loaded: set it before pyvips is imported.
os.environ["VIPS_CONCURRENCY"] = "1"

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import pyvips  # noqa: E402
from PIL import Image, features  # noqa: E402

from _common import (  # noqa: E402
    DATA_DIR,
    REPO_ROOT,
    libvips_version,
    list_images,
    machine_lines,
    median,
    print_table,
    pyvips_binary_component,
    warm_cache,
)

SHRINKS = (2, 4, 8)


def default_folders() -> list[Path]:
    shared = os.environ.get("OPTIMIZR_CORPUS") or str(REPO_ROOT / ".." / "shared" / "corpus")
    return [DATA_DIR / "corpus", Path(shared).resolve() / "photos"]


def jpegs(folders: list[Path]) -> list[Path]:
    found = []
    for folder in folders:
        if not folder.is_dir():
            print(f"note: {folder} does not exist (make bench-corpus builds bench/.data/corpus)")
            continue
        found.extend(p for p in list_images(folder) if p.suffix.lower() in (".jpg", ".jpeg"))
    return found


# --------------------------------------------------------------------------- decoders


def vips_image(path: Path, shrink: int) -> pyvips.Image:
    options = {"shrink": shrink} if shrink > 1 else {}
    return pyvips.Image.new_from_file(str(path), access="sequential", **options)


def pillow_image(path: Path, shrink: int) -> Image.Image:
    image = Image.open(path)
    if shrink > 1:
        # draft picks the largest IDCT scale that keeps at least this size: 1/shrink.
        image.draft(image.mode, (image.width // shrink, image.height // shrink))
    image.load()
    return image


def vips_decode(path: Path, shrink: int) -> Callable[[], object]:
    return lambda: vips_image(path, shrink).copy_memory()


def pillow_decode(path: Path, shrink: int) -> Callable[[], object]:
    return lambda: pillow_image(path, shrink)


def vips_array(path: Path, shrink: int) -> np.ndarray:
    image = vips_image(path, shrink)
    if image.format != "uchar":
        raise ValueError(f"libvips decoded {image.format}, not 8-bit")
    data = np.frombuffer(image.write_to_memory(), dtype=np.uint8)
    return data.reshape(image.height, image.width, image.bands)


def pillow_array(path: Path, shrink: int) -> np.ndarray:
    array = np.asarray(pillow_image(path, shrink))
    return array[:, :, np.newaxis] if array.ndim == 2 else array


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Comparison:
    identical: bool
    differing_share: float  # of pixels with any band different
    max_difference: int
    note: str  # "" or why the arrays were not compared whole

    def describe(self) -> str:
        if self.note.startswith("not compared"):
            return self.note
        verdict = (
            "yes"
            if self.identical
            else f"NO: {self.differing_share:.2%} px differ, max {self.max_difference}"
        )
        return f"{verdict} ({self.note})" if self.note else verdict


def compare(path: Path, shrink: int) -> Comparison:
    ours, theirs = vips_array(path, shrink), pillow_array(path, shrink)
    if ours.shape[2] != theirs.shape[2]:
        bands = f"not compared: bands {ours.shape[2]} vs {theirs.shape[2]}"
        return Comparison(False, 1.0, 255, bands)
    note = ""
    if ours.shape != theirs.shape:
        height, width = min(ours.shape[0], theirs.shape[0]), min(ours.shape[1], theirs.shape[1])
        note = f"sizes {ours.shape[1]}x{ours.shape[0]} vs {theirs.shape[1]}x{theirs.shape[0]}"
        ours, theirs = ours[:height, :width], theirs[:height, :width]
    difference = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    differing = float(difference.any(axis=2).mean())
    return Comparison(differing == 0.0, differing, int(difference.max()), note)


@dataclass
class Timing:
    cpu: list[float]
    wall: list[float]


def time_alternately(decoders: dict[str, Callable[[], object]], rounds: int) -> dict[str, Timing]:
    timings = {name: Timing([], []) for name in decoders}
    names = list(decoders)
    for number in range(rounds):
        # Swap who goes first each round: neither always decodes right after the other.
        order = names if number % 2 == 0 else names[::-1]
        for name in order:
            wall, cpu = time.perf_counter(), time.process_time()
            decoded = decoders[name]()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            del decoded
            timings[name].cpu.append(cpu)
            timings[name].wall.append(wall)
    return timings


@dataclass(frozen=True)
class Row:
    image: str
    megapixels: float  # of the file, whatever the shrink
    vips_cpu: float
    pillow_cpu: float
    vips_wall: float
    pillow_wall: float
    comparison: Comparison

    @property
    def ratio(self) -> float:
        return self.vips_cpu / self.pillow_cpu if self.pillow_cpu else float("nan")


def measure(path: Path, shrink: int, rounds: int) -> Row:
    comparison = compare(path, shrink)
    source = vips_image(path, 1)
    timings = time_alternately(
        {"vips": vips_decode(path, shrink), "pillow": pillow_decode(path, shrink)}, rounds
    )
    vips, pillow = timings["vips"], timings["pillow"]
    return Row(
        path.name,
        source.width * source.height / 1e6,
        statistics.median(vips.cpu),
        statistics.median(pillow.cpu),
        statistics.median(vips.wall),
        statistics.median(pillow.wall),
        comparison,
    )


# --------------------------------------------------------------------------- printing


def mode_name(shrink: int) -> str:
    if shrink == 1:
        return "full size"
    return f"shrink {shrink} (libvips shrink={shrink}, Pillow draft)"


def print_mode(shrink: int, rows: list[Row]) -> None:
    print(f"\n{mode_name(shrink)}: median CPU ms over the rounds, one thread")
    table = [
        [
            r.image,
            f"{r.megapixels:.1f}",
            f"{r.vips_cpu * 1e3:.1f}",
            f"{r.pillow_cpu * 1e3:.1f}",
            f"{r.ratio:.3f}",
            r.comparison.describe(),
        ]
        for r in rows
    ]
    print_table(["image", "MP", "vips ms", "Pillow ms", "ratio", "identical?"], table)


def print_summary(results: dict[int, list[Row]]) -> None:
    print("\nsummary: ratio = libvips (mozjpeg) / Pillow (libjpeg-turbo); < 1: libvips is faster")
    table = []
    for shrink, rows in results.items():
        vips, pillow = sum(r.vips_cpu for r in rows), sum(r.pillow_cpu for r in rows)
        table.append(
            [
                mode_name(shrink).split(" (")[0],
                len(rows),
                f"{median(r.ratio for r in rows):.3f}",
                f"{vips:.2f}",
                f"{pillow:.2f}",
                f"{vips / pillow:.3f}" if pillow else "-",
                f"{median(r.vips_wall / r.pillow_wall for r in rows if r.pillow_wall):.3f}",
                f"{sum(r.comparison.identical for r in rows)}/{len(rows)}",
            ]
        )
    headers = [
        "mode",
        "images",
        "median ratio",
        "vips CPU s",
        "Pillow CPU s",
        "total ratio",
        "median wall ratio",
        "identical",
    ]
    print_table(headers, table)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "folders",
        type=Path,
        nargs="*",
        help="folders of JPEGs (default: bench/.data/corpus and $OPTIMIZR_CORPUS/photos)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="decodes of each per mode (5)")
    parser.add_argument(
        "--shrinks", default=",".join(map(str, SHRINKS)), help="shrink factors (2,4,8; '' none)"
    )
    parser.add_argument("--limit", type=int, help="first N images only (a quick look)")
    return parser.parse_args(argv)


def decodes(path: Path) -> bool:
    """Damaged JPEGs (the corpus's olympus-u1020 has 100+ corrupt-data warnings)
    are left out: there is no pair of identical decodes to time."""
    try:
        pyvips.Image.new_from_file(str(path), fail_on="warning").avg()
    except pyvips.Error:
        print(f"skipped {path.name}: libvips cannot decode it whole", file=sys.stderr)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pyvips.concurrency_set(1)
    pyvips.cache_set_max(0)
    files = [path for path in jpegs(args.folders or default_folders()) if decodes(path)]
    files = files[: args.limit]
    if not files:
        print("decode_speed: no JPEG files found", file=sys.stderr)
        return 2
    for line in machine_lines():
        print(line)
    jpeg = pyvips_binary_component("mozjpeg version") or "JPEG library version not found"
    print(f"libvips {libvips_version()} (pyvips-binary): {jpeg}; VIPS_CONCURRENCY=1")
    print(
        f"Pillow {PIL.__version__}: libjpeg-turbo "
        f"{features.version('libjpeg_turbo')} (libjpeg API {features.version('jpg')})"
    )
    print(f"{len(files)} JPEG files, {args.rounds} rounds per mode")
    warm_cache(files)
    shrinks = [1, *(int(s) for s in args.shrinks.split(",") if s)]
    results: dict[int, list[Row]] = {}
    for shrink in shrinks:
        results[shrink] = [measure(path, shrink, args.rounds) for path in files]
        print_mode(shrink, results[shrink])
    print_summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
