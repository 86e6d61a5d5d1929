"""SSIMULACRA 2.1 speed: optimizr.ssimulacra2 against the reference C++ tool, one core.

Issue 14 asks the metric inside the product to run at least as fast per
megapixel as the reference tool (cloudinary/ssimulacra2). For each pair
(default: the q75 WebP of every original of ../shared/quality of 0.3 MP or
more; ``--all`` for every pair), pinned to one CPU with BLAS held to one thread:

- ``tool``: the reference binary, ``ssimulacra2 ref.png dist.png`` (the
  distorted image written as PNG first, as the tool reads no WebP), CPU time
  from ``os.wait4`` (it includes the tool's PNG decoding of both files);
- ``one-shot``: ``optimizr.ssimulacra2.score(ref, dist)`` on decoded arrays
  (the original's pyramid and the distorted image's), CPU time of this process;
- ``per probe``: ``Reference.score(dist)`` alone, the original prepared once
  beforehand: what a quality search pays per probe.

Each figure is the median of ``--rounds``; MP/s is megapixels of the image
over CPU seconds. The tool is found through $SSIMULACRA2 (a path) or as
``ssimulacra2`` on PATH; without it that column says so. Build it in /tmp from
the fetched source (CMake; Debian's libhwy-dev, liblcms2-dev, libpng-dev,
libjpeg-dev): nothing of it belongs in this repository.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# One core, one thread: set before numpy loads its BLAS.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from _common import (  # noqa: E402
    REPO_ROOT,
    machine_lines,
    median,
    print_table,
    run_measured,
)
from _common import find_ssimulacra2_tool as find_tool  # noqa: E402
from optimizr import ssimulacra2  # noqa: E402


def load(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        image.load()
        if image.mode not in ("RGB", "RGBA"):
            image = image.convert("RGBA" if "A" in image.mode else "RGB")
        return np.asarray(image)


def cpu_median(work: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.process_time()
        work()
        times.append(time.process_time() - started)
    return median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_quality = os.environ.get("OPTIMIZR_METRIC_PAIRS") or str(
        REPO_ROOT.parent / "shared" / "quality"
    )
    parser.add_argument(
        "--quality", type=Path, default=Path(default_quality), help="the pairs folder"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--all", action="store_true", help="every pair, not one per original")
    parser.add_argument(
        "--cpu", type=int, default=None, help="CPU to pin to (default: the last usable)"
    )
    args = parser.parse_args()

    for line in machine_lines():
        print(line)
    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})  # the tool, a child, inherits it
    print(f"pinned to CPU {cpu}; BLAS threads {os.environ['OPENBLAS_NUM_THREADS']}")
    tool = find_tool()
    print(f"reference tool: {tool or 'not found (set $SSIMULACRA2 or put ssimulacra2 on PATH)'}")

    with (args.quality / "scores.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not args.all:
        rows = [
            r
            for r in rows
            if r["distorted"].endswith("q75.webp") and int(r["width"]) * int(r["height"]) >= 300_000
        ]

    table = []
    totals = {"mp": 0.0, "tool": 0.0, "oneshot": 0.0, "probe": 0.0}
    with tempfile.TemporaryDirectory(prefix="ssim2-bench-") as tmp:
        for row in rows:
            ref_path = args.quality / row["reference"]
            original, distorted = load(ref_path), load(args.quality / row["distorted"])
            mp = original.shape[0] * original.shape[1] / 1e6
            tool_s = float("nan")
            if tool:
                dist_png = Path(tmp) / "distorted.png"
                Image.fromarray(distorted).save(dist_png)
                runs = [
                    run_measured([tool, str(ref_path), str(dist_png)]) for _ in range(args.rounds)
                ]
                tool_s = median(r.cpu_seconds for r in runs)
            oneshot_s = cpu_median(
                lambda o=original, d=distorted: ssimulacra2.score(o, d), args.rounds
            )
            prepared = ssimulacra2.Reference(original)
            probe_s = cpu_median(lambda p=prepared, d=distorted: p.score(d), args.rounds)
            ours = prepared.score(distorted)
            table.append(
                [
                    row["distorted"].removeprefix("dist/"),
                    mp,
                    mp / tool_s if tool else None,
                    mp / oneshot_s,
                    mp / probe_s,
                    float(row["ssimulacra2"]),
                    ours,
                ]
            )
            totals["mp"] += mp
            totals["tool"] += tool_s
            totals["oneshot"] += oneshot_s
            totals["probe"] += probe_s
    print()
    print_table(
        ["pair", "MP", "tool MP/s", "one-shot MP/s", "per probe MP/s", "tool score", "our score"],
        table,
    )
    mp = totals["mp"]
    print()
    print(
        f"overall: tool {mp / totals['tool']:.2f} MP/s" if tool else "overall: tool not measured",
        f"| ours one-shot {mp / totals['oneshot']:.2f} MP/s"
        f" | ours per probe {mp / totals['probe']:.2f} MP/s"
        f" ({1000 * totals['probe'] / mp:.0f} ms CPU per MP)",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
