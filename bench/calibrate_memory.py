"""The measurement behind the memory constants of src/optimizr/budget.py, on real photos.

Takes --photos (default 3) upright real photos of 6 MP or more (the shared
corpus's, as the bench corpus does: ``$OPTIMIZR_CORPUS/photos``) and scales each
with libvips ``resize`` to --sizes megapixels (default 8, 24, 40 and 60: 2-3x
upscales reach the big corpus's 24-60 MP), saved as the kinds ``make_corpus.py``
makes (JPEG Q90; the JPEG with EXIF orientation 6; an RGBA PNG; a 16-bit RGB
PNG), plus animated GIFs of --gif-frames frames cut from the first photo (a
window moving over it) at --gif-sizes total megapixels. Cached in
bench/.data/calibrate-real/.

Then converts each image in each mode --

  lossy            JPEG, the defaults (quality 80, effort 4)
  smart_subsample  JPEG, --smart-subsample
  lossless         JPEG, --lossless
  near_lossless    JPEG, --near-lossless 60
  rotated          JPEG with EXIF orientation 6, lossy
  resize           JPEG, --max-width 1024 (shrink-on-load)
  rgba_png         RGBA PNG, lossy (alpha kept)
  png16            16-bit RGB PNG, lossy
  gif              animated GIF, lossy
  target_score     JPEG, --target-score 80 (the search of issue 14)
  target_score_rgba  RGBA PNG, --target-score 80

-- in a fresh Python process set up exactly as a worker is (glibc malloc tuned by
``optimizr.heap.keep_heap_compact``, one libvips thread and no
caches by ``configure_libvips(1)``), which calls ``optimizr.encode_webp`` once:
whatever that function does at the time is what is measured. The growth of that
process's peak RSS is what the image cost: "growth" is the peak resident size
during the conversion (VmHWM of /proc/self/status, reset through
/proc/self/clear_refs just before) minus the resident size just before: the
figure held against the estimate. "maxrss+" is ``ru_maxrss`` after minus before,
for reference only: on Linux a process started by fork+exec inherits its parent's
high-water mark in ``ru_maxrss``, so a conversion that stays under it shows +0.

Prints one row per conversion: growth in MB, bytes per output pixel, the estimate
of ``optimizr.budget.estimate_peak_bytes`` for the header the pipeline probes
(``optimizr.probe.probe``) and measured / estimate, with a WARNING for every row
the estimate does not cover. Then per mode a straight line fitted to growth
against output pixels (input pixels for resize, whose output size is fixed): its
slope is the bytes-per-pixel factor and its intercept the fixed cost; next to it
the largest measured / estimate of the mode and its image.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import make_corpus
from _common import DATA_DIR, linear_slope, machine_lines, print_table, venv_python

MODES = (
    "lossy",
    "smart_subsample",
    "lossless",
    "near_lossless",
    "rotated",
    "resize",
    "rgba_png",
    "png16",
    "gif",
    "target_score",
    "target_score_rgba",
)
#: The image each mode converts: a kind of make_corpus.save_variant, or "gif".
MODE_KIND = {
    "lossy": "jpeg",
    "smart_subsample": "jpeg",
    "lossless": "jpeg",
    "near_lossless": "jpeg",
    "resize": "jpeg",
    "rotated": "o6",
    "rgba_png": "rgba",
    "png16": "png16",
    "gif": "gif",
    "target_score": "jpeg",
    "target_score_rgba": "rgba",
}
MB = 1_000_000


def encode_options(mode: str) -> Any:
    from optimizr import EncodeOptions

    if mode == "lossless":
        return EncodeOptions(lossless=True)
    if mode == "near_lossless":
        return EncodeOptions(near_lossless=60)
    if mode == "smart_subsample":
        return EncodeOptions(smart_subsample=True)
    if mode == "resize":
        return EncodeOptions(max_width=1024)
    if mode.startswith("target_score"):  # the search of issue 14 (--quality high)
        return EncodeOptions(target_score=80.0)
    return EncodeOptions()  # quality 80, effort 4


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class Image:
    """One calibration image: a real photo at a size, as one kind."""

    photo: str
    megapixels: float  # of the image (all frames for a GIF)
    kind: str
    path: Path


def pick_photos(count: int) -> list[make_corpus.Source]:
    """``count`` upright photos of 6 MP or more (60 MP is then at most a 3.2x upscale, as
    in the bench corpus), spread from the smallest to the largest."""
    upright = [
        s for s in make_corpus.load_sources(make_corpus.default_photos()) if s.orientation == 1
    ]
    large = [s for s in upright if s.megapixels >= 6] or upright
    sources = sorted(large, key=lambda s: s.megapixels)
    if count >= len(sources):
        return sources
    if count < 2:
        return sources[-count:] if count else []
    step = (len(sources) - 1) / (count - 1)
    return [sources[round(i * step)] for i in range(count)]


def make_images(
    folder: Path, photos: list[make_corpus.Source], sizes: list[float], kinds: set[str]
) -> list[Image]:
    """Every photo at every size as every kind wanted, generated once and kept."""
    import pyvips

    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for source in photos:
        for megapixels in sizes:
            scale = math.sqrt(megapixels / source.megapixels)
            for kind in sorted(kinds - {"gif"}):
                suffix = "jpg" if kind in ("jpeg", "o6") else "png"
                path = folder / f"{source.path.stem}_{megapixels:g}mp_{kind}.{suffix}"
                if not path.exists():
                    print(f"  making {path.name}", flush=True)
                    photo = pyvips.Image.new_from_file(str(source.path))
                    partial = path.with_name(f".{path.name}.part")
                    make_corpus.save_variant(photo.resize(scale), kind, partial)
                    partial.rename(path)
                images.append(Image(source.path.stem, megapixels, kind, path))
    return images


def make_gifs(
    folder: Path, source: make_corpus.Source, sizes: list[float], frames: int
) -> list[Image]:
    """Animated GIFs of ``frames`` frames at ``sizes`` total MP: a 4:3 window moving
    across the photo, so that every frame differs as in a real animation."""
    import pyvips

    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for megapixels in sizes:
        path = folder / f"{source.path.stem}_{megapixels:g}mp_{frames}frames.gif"
        if not path.exists():
            print(f"  making {path.name}", flush=True)
            width = round(math.sqrt(megapixels * 1e6 / frames * 4 / 3))
            height = round(width * 3 / 4)
            # The photo scaled to 1.5x the frame's width: room for the window to move.
            photo = pyvips.Image.new_from_file(str(source.path))
            photo = photo.resize(1.5 * width / photo.width).copy_memory()
            height = min(height, photo.height)
            spare_x, spare_y = photo.width - width, photo.height - height
            strip = [
                photo.crop(spare_x * i // frames, spare_y * i // frames, width, height)
                for i in range(frames)
            ]
            animation = pyvips.Image.arrayjoin(strip, across=1).copy()
            animation.set_type(pyvips.GValue.gint_type, "page-height", height)
            animation.set_type(pyvips.GValue.array_int_type, "delay", [80] * frames)
            partial = path.with_name(f".{path.name}.part")
            animation.gifsave(str(partial))
            partial.rename(path)
        images.append(Image(source.path.stem, megapixels, "gif", path))
    return images


# --------------------------------------------------------------------------- worker


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def status_bytes(field: str) -> int:
    """A kB field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_high_water_mark() -> bool:
    """Make VmHWM start again from the current RSS (Linux 4.0+)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def measure(path: str, mode: str) -> dict[str, Any]:
    """Runs in the fresh process: set up as a worker, convert once, report the growth."""
    from optimizr.executors.worker import configure_libvips
    from optimizr.heap import keep_heap_compact

    # In the order worker.main does it: malloc tuned before libvips allocates anything.
    keep_heap_compact()
    configure_libvips(1)
    from optimizr import encode_webp

    options = encode_options(mode)
    before = max_rss_bytes()
    reset = reset_high_water_mark()
    resident = status_bytes("VmRSS")
    encoded = encode_webp(path, options)
    after = max_rss_bytes()
    high_water = status_bytes("VmHWM")
    facts = encoded.facts
    return {
        "before": before,
        "resident_before": resident,
        "after": after,
        "high_water": high_water,
        "reset": reset,
        "in_pixels": facts.width_in * facts.height_in * facts.frames,
        "frames": facts.frames,
        "width_out": facts.width_out,
        "height_out": facts.height_out,
        "seconds": facts.seconds,
    }


# --------------------------------------------------------------------------- parent


@dataclass(frozen=True)
class Row:
    photo: str
    megapixels: float
    mode: str
    in_pixels: int
    out_pixels: int
    #: ru_maxrss after - ru_maxrss before the conversion.
    peak_growth: int
    #: VmHWM after (reset just before) - VmRSS just before: what the image added to
    #: an idle worker; the figure held against the estimate.
    growth: int
    estimate: int
    seconds: float

    @property
    def ratio(self) -> float:
        return self.growth / self.estimate if self.estimate else float("nan")

    @property
    def label(self) -> str:
        return f"{self.photo} {self.megapixels:g} MP {self.mode}"


def estimate(path: Path, mode: str) -> int:
    from optimizr.budget import estimate_peak_bytes
    from optimizr.probe import probe

    header = probe(str(path))
    return 0 if header is None else estimate_peak_bytes(header, encode_options(mode))


def convert_fresh(path: Path, mode: str) -> dict[str, Any]:
    command = [str(venv_python()), __file__, "--measure", str(path), mode]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{path.name} {mode}: exit {done.returncode}: {done.stderr[-500:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def calibrate(images: list[Image], modes: list[str]) -> list[Row]:
    rows = []
    for mode in modes:
        for image in (i for i in images if i.kind == MODE_KIND[mode]):
            got = convert_fresh(image.path, mode)
            row = Row(
                image.photo,
                image.megapixels,
                mode,
                got["in_pixels"],
                got["width_out"] * got["height_out"] * got.get("frames", 1),
                got["after"] - got["before"],
                got["high_water"] - got["resident_before"],
                estimate(image.path, mode),
                got["seconds"],
            )
            print(
                f"  {row.label:<48} +{row.growth / MB:7.1f} MB  "
                f"{row.growth / row.out_pixels:6.2f} B/px  "
                f"estimate {row.estimate / MB:7.1f} MB  {row.seconds:6.1f} s",
                flush=True,
            )
            rows.append(row)
    return rows


def print_rows(rows: list[Row]) -> None:
    headers = [
        "photo",
        "MP",
        "mode",
        "out MP",
        "maxrss+ MB",
        "growth MB",
        "B/out px",
        "estimate MB",
        "measured/est",
        "seconds",
    ]
    table = [
        [
            r.photo,
            f"{r.megapixels:g}",
            r.mode,
            r.out_pixels / 1e6,
            r.peak_growth / MB,
            r.growth / MB,
            r.growth / r.out_pixels,
            r.estimate / MB,
            f"{r.ratio:.3f}",
            r.seconds,
        ]
        for r in rows
    ]
    print_table(headers, table)
    for r in rows:
        if r.growth > r.estimate:
            print(
                f"WARNING: {r.label}: measured {r.growth / MB:.1f} MB exceeds the estimate "
                f"{r.estimate / MB:.1f} MB ({r.ratio:.2f}x)"
            )


def print_fits(rows: list[Row]) -> None:
    """Per mode: growth = fixed + factor x pixels, least squares; and the worst ratio.

    Against output pixels, except for resize, whose output size is fixed: there the
    question is how the cost grows with the input.
    """
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.mode, []).append(r)
    table = []
    for mode, members in groups.items():
        per_input = mode == "resize"
        points = [
            (float(r.in_pixels if per_input else r.out_pixels), float(r.growth)) for r in members
        ]
        slope = linear_slope(points)
        mean_x = sum(x for x, _ in points) / len(points)
        mean_y = sum(y for _, y in points) / len(points)
        fixed = float("nan") if math.isnan(slope) else (mean_y - slope * mean_x) / MB
        per_pixel = [y / x for x, y in points]
        worst = max(members, key=lambda r: r.ratio)
        table.append(
            [
                mode,
                len(points),
                slope,
                "input px" if per_input else "output px",
                fixed,
                f"{min(per_pixel):.2f}-{max(per_pixel):.2f}",
                f"{worst.ratio:.3f}",
                f"{worst.photo} {worst.megapixels:g} MP",
                "EXCEEDS" if worst.ratio > 1 else "covered",
            ]
        )
    if table:
        print("\nfit per mode (growth = fixed + factor x pixels) and the worst measured/estimate:")
        headers = ["mode", "images", "bytes", "per", "fixed MB", "B/px range", "worst", "at",
                   "estimate"]  # fmt: skip
        print_table(headers, table)


def budget_constants() -> str:
    """budget.py's numeric constants, whatever they are named (the lead re-fits them)."""
    from optimizr import budget

    found = [
        f"{name} {value / MB:.1f} MB" if isinstance(value, int) and value >= 1 << 20 else
        f"{name} {value}"
        for name, value in vars(budget).items()
        if name.isupper() and isinstance(value, int | float) and not isinstance(value, bool)
    ]  # fmt: skip
    return ", ".join(found)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photos", type=int, default=3, help="real photos used (default 3)")
    parser.add_argument("--sizes", default="8,24,40,60", help="megapixels (default 8,24,40,60)")
    parser.add_argument("--modes", default=",".join(MODES), help="default: all")
    parser.add_argument("--gif-sizes", default="2,6,12", help="GIF total megapixels (2,6,12)")
    parser.add_argument("--gif-frames", type=int, default=24, help="frames per GIF (24)")
    parser.add_argument(
        "--images", type=Path, default=DATA_DIR / "calibrate-real", help="image cache"
    )
    parser.add_argument("--measure", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return 0
    for line in machine_lines():
        print(line)
    import pyvips

    version = f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}"
    print(f"libvips {version}; budget.py: {budget_constants()}")
    modes = [m for m in args.modes.split(",") if m in MODES]
    photos = pick_photos(args.photos)
    if not photos:
        print("calibrate_memory: no upright photos found ($OPTIMIZR_CORPUS)", file=sys.stderr)
        return 2
    print("photos: " + ", ".join(f"{p.path.name} ({p.megapixels:.1f} MP)" for p in photos))
    sizes = [float(s) for s in args.sizes.split(",") if s]
    kinds = {MODE_KIND[m] for m in modes}
    images = make_images(args.images, photos, sizes, kinds)
    if "gif" in kinds:
        gif_sizes = [float(s) for s in args.gif_sizes.split(",") if s]
        images += make_gifs(args.images, photos[-1], gif_sizes, args.gif_frames)
    rows = calibrate(images, modes)
    print()
    print_rows(rows)
    print_fits(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
