"""--target-score against fixed qualities (issue 14, "Targets"): bytes, worst score, CPU.

For the photos (bench/.data/corpus/photos if it is there, else
$OPTIMIZR_CORPUS/photos) and, separately, the graphics ($OPTIMIZR_CORPUS/png's
screenshots, diagrams, icons and transparent images), each image is converted by
``optimizr.encode_webp`` exactly as ``optimizr convert`` would:

* with ``--target-score S`` for each S of --targets: its bytes, its score (the
  search's verified one) and its CPU seconds;
* at every fixed quality of --grid: the bytes and the SSIMULACRA 2 score of the
  output (scored here, against the image as displayed: a lossless encode decoded).

Per target it prints the bytes of the search against those of the lowest fixed
quality that reaches S on every image and against fixed q80, the worst score of
each, the mean encodes per image and the search's CPU against one fixed-quality
run (q80). ``--calibrate`` also prints, per target, the mean lowest quality
reaching it on the photos: quality_search.START_QUALITY comes from there.

With the reference tool (cloudinary/ssimulacra2, built in /tmp from its fetched
source, found through $SSIMULACRA2 or as ``ssimulacra2`` on PATH; nothing of it
belongs in this repository), each search output is also scored by the tool on
the same two images written as PNG: the worst tool score per target and the
largest |optimizr - tool| are printed (the goal: within 0.5).

Images are shrunk to --max-side (default 1024) first, to keep the run modest on a
shared machine: the search is per image, so the comparison holds at any size.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pyvips
from PIL import Image

from _common import find_ssimulacra2_tool as find_tool
from optimizr import ssimulacra2
from optimizr.config import EncodeOptions
from optimizr.encode import encode_webp
from optimizr.quality_search import _displayed, _foreign_profile, _matched, _to_numpy

BENCH = Path(__file__).resolve().parent
PHOTO_EXT = (".jpg", ".jpeg", ".png")


TOOL = find_tool()


def tool_score(reference: np.ndarray, distorted: np.ndarray) -> float:
    """The reference tool's score of two decoded images (it reads PNG, not WebP)."""
    assert TOOL is not None
    with tempfile.TemporaryDirectory(prefix="quality-bench-") as tmp:
        ref_png, dist_png = Path(tmp) / "ref.png", Path(tmp) / "dist.png"
        Image.fromarray(reference).save(ref_png)
        Image.fromarray(distorted).save(dist_png)
        said = subprocess.run(
            [TOOL, str(ref_png), str(dist_png)], capture_output=True, text=True, check=True
        )
    return float(said.stdout.split()[-1])


def displayed(webp: bytes) -> np.ndarray:
    image = pyvips.Image.webpload_buffer(webp)
    pixels = _to_numpy(_displayed(image, _foreign_profile(image)))
    if pixels.shape[2] == 4 and bool(np.all(pixels[:, :, 3] == 255)):
        pixels = np.ascontiguousarray(pixels[:, :, :3])
    return pixels


def find_sets() -> dict[str, list[Path]]:
    corpus = Path(os.environ.get("OPTIMIZR_CORPUS", "/work/shared/corpus"))
    photos_dir = BENCH / ".data" / "corpus" / "photos"
    if not photos_dir.is_dir():
        photos_dir = corpus / "photos"
    photos = sorted(p for p in photos_dir.iterdir() if p.suffix.lower() in PHOTO_EXT)
    graphics_names = (
        "screenshot_lorem-ipsum_rgba.png",
        "screenshot_lorem-ipsum_oxipng-palette.png",
        "diagram_3840x2160_iccp.png",
        "blackbug_rgba_2048x1536.png",
        "embedgravitybird_rgba.png",
        "tango-icon_128.png",
        "transparency_wikimedia.png",
        "256-colour-palette_iccp.png",
    )
    graphics = [
        corpus / "png" / name for name in graphics_names if (corpus / "png" / name).is_file()
    ]
    return {"photos": photos, "graphics": graphics}


@dataclasses.dataclass
class Row:
    path: Path
    bytes_in: int
    fixed: dict[int, tuple[int, float, float]]  # quality -> (bytes, score, cpu seconds)
    searched: dict[
        float, tuple[int, float, int, float, str]
    ]  # S -> (bytes, score, probes, cpu, chosen)
    #: S -> the reference tool's score of the search's output (nan without the tool)
    by_tool: dict[float, float] = dataclasses.field(default_factory=dict)


def measure(path: Path, base: EncodeOptions, grid: list[int], targets: list[float]) -> Row:
    exact = encode_webp(str(path), dataclasses.replace(base, lossless=True))
    reference_pixels = displayed(exact.webp)
    reference = ssimulacra2.Reference(reference_pixels)
    fixed: dict[int, tuple[int, float, float]] = {}
    for q in grid:
        out = encode_webp(str(path), dataclasses.replace(base, quality=q))
        score = reference.score(_matched(reference_pixels, displayed(out.webp)))
        fixed[q] = (len(out.webp), score, out.facts.cpu_seconds)
    searched: dict[float, tuple[int, float, int, float, str]] = {}
    by_tool: dict[float, float] = {}
    for target in targets:
        out = encode_webp(str(path), dataclasses.replace(base, target_score=target))
        facts = out.facts
        score = facts.score if facts.score is not None else float("nan")
        searched[target] = (
            len(out.webp),
            score,
            facts.probes,
            facts.cpu_seconds,
            facts.chosen or "",
        )
        by_tool[target] = (
            tool_score(reference_pixels, _matched(reference_pixels, displayed(out.webp)))
            if TOOL
            else float("nan")
        )
    return Row(path, exact.facts.bytes_in, fixed, searched, by_tool)


def lowest_meeting(rows: list[Row], grid: list[int], target: float) -> int | None:
    for q in sorted(grid):
        if all(row.fixed[q][1] >= target for row in rows):
            return q
    return None


def report(name: str, rows: list[Row], grid: list[int], targets: list[float]) -> None:
    print(f"\n{name}: {len(rows)} images")
    head = (
        f"{'S':>4} {'search KB':>10} {'q*':>4} {'q* KB':>9} {'vs q*':>7} {'q80 KB':>9} "
        f"{'vs q80':>7} {'worst':>6} {'worst q*':>8} {'worst q80':>9} {'probes':>6} {'CPU x':>6} "
        f"{'tool worst':>10} {'max |diff|':>10}"
    )
    print(head)
    fixed_cpu = sum(row.fixed[80][2] for row in rows)
    for target in targets:
        search_bytes = sum(row.searched[target][0] for row in rows)
        worst = min(row.searched[target][1] for row in rows)
        probes = sum(row.searched[target][2] for row in rows) / len(rows)
        cpu = sum(row.searched[target][3] for row in rows)
        q80_bytes = sum(row.fixed[80][0] for row in rows)
        worst80 = min(row.fixed[80][1] for row in rows)
        star = lowest_meeting(rows, grid, target)
        if TOOL:
            tool_worst = f"{min(row.by_tool[target] for row in rows):.2f}"
            tool_diff = (
                f"{max(abs(row.searched[target][1] - row.by_tool[target]) for row in rows):.4f}"
            )
        else:
            tool_worst = tool_diff = "no tool"
        if star is None:
            star_text, star_kb, vs_star, worst_star = "-", "-", "-", "-"
        else:
            star_bytes = sum(row.fixed[star][0] for row in rows)
            star_text, star_kb = str(star), f"{star_bytes / 1e3:.1f}"
            vs_star = f"{100 * (search_bytes / star_bytes - 1):+.1f}%"
            worst_star = f"{min(row.fixed[star][1] for row in rows):.2f}"
        print(
            f"{target:>4.0f} {search_bytes / 1e3:>10.1f} {star_text:>4} {star_kb:>9} {vs_star:>7} "
            f"{q80_bytes / 1e3:>9.1f} {100 * (search_bytes / q80_bytes - 1):>+6.1f}% "
            f"{worst:>6.2f} {worst_star:>8} {worst80:>9.2f} {probes:>6.2f} {cpu / fixed_cpu:>6.2f} "
            f"{tool_worst:>10} {tool_diff:>10}"
        )
    for row in rows:
        chosen = ", ".join(
            f"{t:.0f}: {row.searched[t][4]} ({row.searched[t][1]:.2f}"
            + (f", tool {row.by_tool[t]:.2f})" if TOOL else ")")
            for t in targets
        )
        print(f"  {row.path.name}: {chosen}")


def calibrate(rows: list[Row], grid: list[int], targets: list[float]) -> None:
    print("\ncalibration (photos): mean lowest grid quality reaching S")
    for target in targets:
        reached = [
            min((q for q in grid if row.fixed[q][1] >= target), default=None) for row in rows
        ]
        got = [q for q in reached if q is not None]
        mean = sum(got) / len(got) if got else float("nan")
        print(
            f"  S {target:.0f}: mean q {mean:.1f} over {len(got)} of {len(rows)} (unreached: "
            f"{len(rows) - len(got)})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[70, 75, 80, 85])
    parser.add_argument("--grid", type=int, nargs="+", default=list(range(50, 101)))
    parser.add_argument("--limit", type=int, default=0, help="images per set (0: all)")
    parser.add_argument("--max-side", type=int, default=1024)
    parser.add_argument("--effort", type=int, default=4)
    parser.add_argument("--only", choices=["photos", "graphics"])
    parser.add_argument("--calibrate", action="store_true")
    args = parser.parse_args()
    grid = sorted(set(args.grid) | {80})
    base = EncodeOptions(effort=args.effort, max_width=args.max_side, max_height=args.max_side)
    started = time.perf_counter()
    print(f"reference tool: {TOOL or 'not found (set $SSIMULACRA2 or put ssimulacra2 on PATH)'}")
    for name, paths in find_sets().items():
        if args.only and name != args.only:
            continue
        if args.limit:
            paths = paths[: args.limit]
        rows = [measure(p, base, grid, args.targets) for p in paths]
        report(name, rows, grid, args.targets)
        if args.calibrate and name == "photos":
            calibrate(rows, grid, [60, 65, *args.targets, 90])
    print(
        f"\n{time.perf_counter() - started:.0f} s; effort {args.effort}, max side {args.max_side}"
    )


if __name__ == "__main__":
    main()
