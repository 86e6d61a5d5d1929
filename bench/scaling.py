"""optimizr's throughput as the number of workers grows.

Runs ``optimizr convert CORPUS DEST -j W`` for each W of --workers (default
1,2,3,4), --rounds times each (worker counts alternate within a round), into a
fresh empty folder each time, every output written (``--if-larger write``).
Wall time is time.perf_counter around the process; peak RSS is the summed RSS
of the process tree sampled from /proc every 20 ms.

Prints one row per worker count: median wall seconds, files/s, MB/s (input
bytes / wall), megapixels/s, speed-up over 1 worker (over the first count given),
parallel efficiency (speed-up / workers), optimizr's own cpu.efficiency
(codec CPU / (cores x wall), from its summary.json) and the peak tree RSS.
On a machine with C cores, speed-up cannot pass C: counts above C show what
oversubscription costs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from _common import (
    MB,
    MIB,
    Run,
    corpus_stats,
    describe_corpus,
    libvips_version,
    list_images,
    machine_lines,
    measure_optimizr,
    median,
    optimizr_command,
    print_table,
    warm_cache,
)


def run_with_workers(
    src: Path, work: Path, workers: int, args: argparse.Namespace
) -> tuple[Run, float]:
    """One run; returns it and optimizr's cpu.efficiency (nan without a summary)."""
    run, _, data = measure_optimizr(
        src, work, "-j", str(workers), "-q", str(args.quality), "--effort", str(args.effort)
    )
    efficiency = float(data.get("cpu", {}).get("efficiency", float("nan")))
    failed = "" if run.returncode == 0 else f"  EXIT {run.returncode}: {run.stderr_tail[-300:]!r}"
    print(
        f"  -j {workers}: wall {run.wall_seconds:7.2f} s  CPU {run.cpu_seconds:7.2f} s  "
        f"peak {run.peak_bytes / MIB:6.0f} MiB  cpu.efficiency {efficiency:.3f}{failed}",
        flush=True,
    )
    return run, efficiency


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("corpus", type=Path, help="folder of images (bench/make_corpus.py)")
    parser.add_argument("--workers", default="1,2,3,4", help="worker counts (default 1,2,3,4)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per worker count (1)")
    parser.add_argument("--quality", type=int, default=80)
    parser.add_argument("--effort", type=int, default=4)
    parser.add_argument("--workdir", type=Path, help="where outputs go (default: a temp folder)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    files = list_images(args.corpus)
    if not files:
        print(f"scaling: no images in {args.corpus}", file=sys.stderr)
        return 2
    for line in machine_lines():
        print(line)
    print(f"optimizr: {' '.join(optimizr_command())}, libvips {libvips_version()}")
    stats = corpus_stats(files)
    print(describe_corpus("corpus", stats))
    warm_cache(files)
    runs: dict[int, list[tuple[Run, float]]] = {w: [] for w in counts}
    work = Path(tempfile.mkdtemp(prefix="optimizr-scaling-", dir=args.workdir))
    try:
        for number in range(args.rounds):
            print(f"round {number + 1}/{args.rounds}")
            for workers in counts:
                runs[workers].append(run_with_workers(args.corpus.resolve(), work, workers, args))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # Speed-up is relative to the first count given (1 by default).
    base_workers = counts[0]
    base = median(r.wall_seconds for r, _ in runs[base_workers])
    rows: list[list[object]] = []
    for workers in counts:
        wall = median(r.wall_seconds for r, _ in runs[workers])
        speedup = base / wall
        rows.append(
            [
                workers,
                wall,
                stats.files / wall,
                stats.bytes / MB / wall,
                stats.megapixels / wall,
                speedup,
                speedup * base_workers / workers,
                median(e for _, e in runs[workers]),
                round(median(r.peak_bytes for r, _ in runs[workers]) / MIB),
            ]
        )
    print(
        f"\nmedians over {args.rounds} round(s); speed-up relative to {base_workers} worker(s); "
        "par. eff. = speed-up x base workers / workers"
    )
    headers = [
        "workers",
        "wall s",
        "files/s",
        "MB/s",
        "MP/s",
        "speed-up",
        "par. eff.",
        "cpu.efficiency",
        "peak MiB",
    ]
    print_table(headers, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
