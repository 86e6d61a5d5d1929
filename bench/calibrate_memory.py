"""The measurement behind the memory constants of src/optimizr/budget.py.

Generates synthetic photos of --sizes megapixels (default 2, 8, 16, 32; 4:3,
Perlin noise at two scales plus Gaussian grain, saved as JPEG Q90 and PNG,
and a JPEG with EXIF orientation 6), cached in bench/.data/calibrate/. Then
converts each image in each mode -- lossy, lossless, smart_subsample, resize
(max_width=1024) and rotated (the orientation-6 JPEG, lossy) -- in a fresh
Python process that sets libvips up exactly as a worker does
(``optimizr.executors.worker.configure_libvips(1)``), then calls
``optimizr.encode_webp`` once. The growth of that process's peak RSS is what
the image cost. "growth" is the peak resident size during the conversion
(VmHWM of /proc/self/status, reset through /proc/self/clear_refs just before)
minus the resident size just before: the figure held against the estimate.
"maxrss+" is ``ru_maxrss`` after minus before, shown for reference only: on
Linux a process started by fork+exec inherits its parent's high-water mark in
``ru_maxrss`` (the exec'd mm's peak is folded in), so "before" is at least the
parent's peak RSS and a conversion that stays under it shows +0.

Prints one row per conversion: both growths in MB, bytes per output pixel, the
estimate of ``optimizr.budget.estimate_peak_bytes`` for the header the
pipeline probes (``optimizr.probe.probe``), and measured / estimate. The
estimate must cover the measurement: a warning line is printed for every row
where it does not. Then, per mode and format, a straight line fitted to growth
against output pixels (input pixels for resize, whose output size is fixed):
its slope is the bytes-per-pixel factor and its intercept the fixed cost, to
compare with the constants in budget.py.
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

from _common import DATA_DIR, linear_slope, machine_lines, print_table, venv_python

MODES = ("lossy", "lossless", "smart_subsample", "resize", "rotated")
FORMATS = ("jpeg", "png")
MB = 1_000_000


def encode_options(mode: str) -> Any:
    from optimizr import EncodeOptions

    if mode == "lossless":
        return EncodeOptions(lossless=True)
    if mode == "smart_subsample":
        return EncodeOptions(smart_subsample=True)
    if mode == "resize":
        return EncodeOptions(max_width=1024)
    return EncodeOptions()  # lossy and rotated: quality 80, effort 4


# --------------------------------------------------------------------------- images


def synthetic(megapixels: float) -> Any:
    """A 4:3 photo-like image: coarse and fine Perlin noise per band, plus grain."""
    import pyvips

    width = round(math.sqrt(megapixels * 1e6 * 4 / 3))
    height = round(width * 3 / 4)
    bands = []
    for band in range(3):
        coarse = pyvips.Image.perlin(width, height, cell_size=512, seed=10 + band)
        fine = pyvips.Image.perlin(width, height, cell_size=24, seed=20 + band)
        bands.append(coarse * 90 + fine * 30 + 128)
    grain = pyvips.Image.gaussnoise(width, height, sigma=6, mean=0, seed=7)
    image = bands[0].bandjoin(bands[1:]) + grain
    return image.cast("uchar").copy(interpretation="srgb")


def make_images(folder: Path, megapixels: int) -> dict[tuple[str, str], Path]:
    """{(format, variant): path} for one size, generated once and kept."""
    import pyvips

    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        ("jpeg", "plain"): folder / f"synthetic-{megapixels}mp.jpg",
        ("png", "plain"): folder / f"synthetic-{megapixels}mp.png",
        ("jpeg", "o6"): folder / f"synthetic-{megapixels}mp-orientation6.jpg",
    }
    if all(p.exists() for p in paths.values()):
        return paths
    print(f"generating {megapixels} MP images in {folder}", flush=True)
    image = synthetic(megapixels)
    # Render once: three saves of a lazy Perlin pipeline would compute it three times.
    image = image.copy_memory()
    image.jpegsave(str(paths[("jpeg", "plain")]), Q=90)
    image.pngsave(str(paths[("png", "plain")]), compression=1)
    rotated = image.copy()
    rotated.set_type(pyvips.GValue.gint_type, "orientation", 6)
    rotated.jpegsave(str(paths[("jpeg", "o6")]), Q=90)
    return paths


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
        "in_pixels": facts.width_in * facts.height_in,
        "width_out": facts.width_out,
        "height_out": facts.height_out,
        "seconds": facts.seconds,
    }


# --------------------------------------------------------------------------- parent


@dataclass(frozen=True)
class Row:
    megapixels: int
    format: str
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


def calibrate(sizes: list[int], modes: list[str], formats: list[str], folder: Path) -> list[Row]:
    rows = []
    for megapixels in sizes:
        images = make_images(folder, megapixels)
        for fmt in formats:
            for mode in modes:
                variant = "o6" if mode == "rotated" else "plain"
                path = images.get((fmt, variant))
                if path is None:
                    continue  # rotated is measured on JPEG only
                got = convert_fresh(path, mode)
                row = Row(
                    megapixels,
                    fmt,
                    mode,
                    got["in_pixels"],
                    got["width_out"] * got["height_out"],
                    got["after"] - got["before"],
                    got["high_water"] - got["resident_before"],
                    estimate(path, mode),
                    got["seconds"],
                )
                print(
                    f"  {megapixels:3d} MP {fmt:<4} {mode:<15} +{row.growth / MB:7.1f} MB  "
                    f"estimate {row.estimate / MB:7.1f} MB  {row.seconds:6.1f} s",
                    flush=True,
                )
                rows.append(row)
    return rows


def print_rows(rows: list[Row]) -> None:
    headers = [
        "MP",
        "format",
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
            f"{r.megapixels} MP",
            r.format,
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
                f"WARNING: {r.megapixels} MP {r.format} {r.mode}: measured {r.growth / MB:.1f} MB "
                f"exceeds the estimate {r.estimate / MB:.1f} MB ({r.ratio:.2f}x)"
            )


def print_fits(rows: list[Row]) -> None:
    """Per mode and format: growth = fixed + factor x pixels, least squares.

    Against output pixels, except for resize, whose output size is fixed: there the
    question is how the cost grows with the input.
    """
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.mode, r.format), []).append(r)
    table = []
    for (mode, fmt), members in groups.items():
        per_input = mode == "resize"
        points = [
            (float(r.in_pixels if per_input else r.out_pixels), float(r.growth)) for r in members
        ]
        slope = linear_slope(points)
        if math.isnan(slope):
            continue
        mean_x = sum(x for x, _ in points) / len(points)
        mean_y = sum(y for _, y in points) / len(points)
        unit = "input px" if per_input else "output px"
        table.append([mode, fmt, len(points), slope, unit, (mean_y - slope * mean_x) / MB])
    if table:
        print("\nfit over sizes (growth = fixed + factor x pixels):")
        print_table(["mode", "format", "sizes", "bytes", "per", "fixed MB"], table)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="2,8,16,32", help="megapixels (default 2,8,16,32)")
    parser.add_argument("--modes", default=",".join(MODES), help="default: all")
    parser.add_argument("--formats", default=",".join(FORMATS), help="jpeg,png")
    parser.add_argument("--images", type=Path, default=DATA_DIR / "calibrate", help="image cache")
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

    from optimizr import budget

    print(
        f"libvips {pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}; budget.py: "
        f"lossy {budget.BYTES_PER_PIXEL_LOSSY} B/px, smart_subsample "
        f"{budget.BYTES_PER_PIXEL_SHARP_YUV}, lossless {budget.BYTES_PER_PIXEL_LOSSLESS}, "
        f"random access +{budget.BYTES_PER_PIXEL_RANDOM_ACCESS}/input px, fixed "
        f"{budget.FIXED_PER_IMAGE / MB:.1f} MB, x{budget.SAFETY} safety"
    )
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = [m for m in args.modes.split(",") if m in MODES]
    formats = [f for f in args.formats.split(",") if f in FORMATS]
    rows = calibrate(sizes, modes, formats, args.images)
    print()
    print_rows(rows)
    print_fits(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
