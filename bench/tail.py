"""The tail of a run: how long the last images keep only some cores busy.

Runs optimizr over the same images twice per round, alternately: once in strict
walk order (``--lookahead 0``) and once with the default lookahead, where the
largest image of the window starts first. Two orders of the same images:

* ``natural``: the corpus as make_corpus.py names it;
* ``big-last``: hard links renamed so the largest images sort last, the worst
  case for a walk-order scheduler (a folder of panoramas after the snapshots).

Prints, per order and scheduler, the median wall time, optimizr's own
``executor.tail_seconds`` (last image handed out -> last image finished) and
``cpu.efficiency`` (codec CPU / (cores x wall)).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from _common import (
    fresh_dir,
    image_megapixels,
    list_images,
    machine_lines,
    measure_optimizr,
    median,
    print_table,
    warm_cache,
)


def big_last_copy(files: list[Path], folder: Path) -> Path:
    """Hard links named so that walk order is smallest first, largest last."""
    fresh_dir(folder)
    by_size = sorted(files, key=image_megapixels)
    for index, path in enumerate(by_size):
        os.link(path, folder / f"{index:04}_{path.name}")
    return folder


def run_once(src: Path, work: Path, lookahead: int, workers: int) -> tuple[float, float, float]:
    run, _, data = measure_optimizr(src, work, "-j", str(workers), "--lookahead", str(lookahead))
    if run.returncode != 0:
        print(f"  EXIT {run.returncode}: {run.stderr_tail[-300:]!r}", file=sys.stderr)
    tail = float(data.get("executor", {}).get("tail_seconds", float("nan")))
    efficiency = float(data.get("cpu", {}).get("efficiency", float("nan")))
    print(f"  lookahead {lookahead}: wall {run.wall_seconds:7.2f} s  tail {tail:6.2f} s  "
          f"cpu.efficiency {efficiency:.3f}", flush=True)  # fmt: skip
    return run.wall_seconds, tail, efficiency


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("corpus", type=Path, help="folder of images (bench/make_corpus.py)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    files = list_images(args.corpus)
    if not files:
        print(f"tail: no images in {args.corpus}", file=sys.stderr)
        return 2
    for line in machine_lines():
        print(line)
    warm_cache(files)
    work = Path(tempfile.mkdtemp(prefix="optimizr-tail-"))
    try:
        orders = {
            "natural": args.corpus.resolve(),
            "big-last": big_last_copy(files, work / "big-last"),
        }
        results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
        for number in range(args.rounds):
            for order, src in orders.items():
                print(f"round {number + 1}/{args.rounds}, order {order}")
                for lookahead in (0, 4):
                    key = (order, lookahead)
                    results.setdefault(key, []).append(run_once(src, work, lookahead, args.workers))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for (order, lookahead), runs in results.items():
        rows.append([
            order,
            "walk order (--lookahead 0)" if lookahead == 0 else "largest first (--lookahead 4)",
            f"{median(r[0] for r in runs):.2f}",
            f"{median(r[1] for r in runs):.2f}",
            f"{median(r[2] for r in runs):.3f}",
        ])  # fmt: skip
    print()
    print_table(["order", "scheduler", "wall s", "tail s", "cpu.efficiency"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
