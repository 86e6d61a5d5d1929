"""How fast does a no-op re-run decide that a converted tree is up to date?

1. Trees. For each of --sizes (default 20,000 and 200,000) builds once, under
   DATA_DIR/resume/N/src, a tree of N tiny images (a few distinct PNG and JPEG
   byte strings drawn once with Pillow and written again and again), 500 files
   per folder, three folder levels deep (a00/b0/c0/img000000.png). Every mtime
   is set 5 s in the past: the manifest does not trust a source modified within
   10 ms of being listed.
2. First run. Converts each tree once for real (``optimizr convert SRC DEST
   --no-progress --if-larger write -j W``, the command line of every benchmark)
   into DATA_DIR/resume/N/dest, checks that all N were converted and prints how
   long it took. Cached: a DEST whose optimizr-summary.json shows all N
   converted (or whose conversion N/first.json recorded) is kept, and the time
   the conversion took when it was made is printed.
3. No-op re-runs. --warmup times uncounted (warms the caches; a stale DEST
   shows up here), then --rounds times (sizes alternate within a round), the
   same command again, summary written next to DEST so DEST's own summary stays
   the first run's. Wall time is time.perf_counter around the process; peak
   RSS is the summed RSS of the whole process tree sampled from /proc every
   20 ms (bench/_common.py, independent of optimizr's own figures). Checks from
   the summary: exit 0, found == N, converted == 0, failed == 0 and
   skipped_by_reason == {"up to date": N}; a run that fails them is printed
   and left out of the figures.

Prints per run and per size: files/s as N / wall (process start to exit,
interpreter start-up included) and as N / the summary's ``seconds``, peak tree
RSS, CPU seconds and the most processes seen; then the medians, the ratio of
the peak RSS at the largest size to the peak at the smallest (about 1.0 when
memory does not grow with the number of files), the marginal rate (start-up
cancelled out) and PASS/FAIL against the target of 20,000 files/s (issue 4).
Exits 1 only when a check fails (the run did not do what is measured), never
on a slow figure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    DATA_DIR,
    MIB,
    Run,
    fresh_dir,
    machine_lines,
    median,
    optimizr_command,
    optimizr_convert,
    print_table,
    read_json,
    run_measured,
)

TARGET_FILES_PER_SECOND = 20_000
#: The largest peak / the smallest peak this close to 1 counts as "does not grow".
FLAT_MEMORY_RATIO = 1.10
FILES_PER_FOLDER = 500
#: Bumped whenever the shape of the generated tree changes, so cached trees are rebuilt.
LAYOUT = 1
#: How far in the past every source's mtime is set (the manifest's settle window is 10 ms).
MTIME_AGE_NS = 5_000_000_000


# --------------------------------------------------------------------------- trees


def tiny_images() -> list[tuple[str, bytes]]:
    """A few distinct tiny images as (suffix, encoded bytes), drawn once."""
    from PIL import Image

    variants = [("PNG", 8), ("PNG", 12), ("JPEG", 16), ("JPEG", 8), ("PNG", 16), ("JPEG", 12)]
    blobs = []
    for index, (fmt, side) in enumerate(variants):
        colour = (40 * index, 255 - 30 * index, (90 * index) % 256)
        image = Image.new("RGB", (side, side), colour)
        for x in range(side):
            image.putpixel((x, x), (255, 255, 255))
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        blobs.append((".png" if fmt == "PNG" else ".jpg", buffer.getvalue()))
    return blobs


def folder_of(index: int) -> str:
    """a00/b0/c0 for the first 500 files, a00/b0/c1 for the next 500, ..."""
    k = index // FILES_PER_FOLDER
    return f"a{k // 100:02d}/b{k // 10 % 10}/c{k % 10}"


def build_tree(src: Path, count: int) -> float:
    """Write ``count`` tiny images under ``src`` (emptied first); returns the seconds taken."""
    started = time.perf_counter()
    fresh_dir(src)
    blobs = tiny_images()
    mtime = time.time_ns() - MTIME_AGE_NS
    if mtime % 1_000_000_000 == 0:
        mtime += 1  # a whole-second mtime would make the manifest assume a coarse filesystem
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    folder = ""
    for index in range(count):
        if index % FILES_PER_FOLDER == 0:
            folder = str(src / folder_of(index))
            os.makedirs(folder, exist_ok=True)
        suffix, data = blobs[index % len(blobs)]
        fd = os.open(f"{folder}/img{index:06d}{suffix}", flags, 0o644)
        try:
            os.write(fd, data)
            os.utime(fd, ns=(mtime, mtime))
        finally:
            os.close(fd)
    return time.perf_counter() - started


def ensure_tree(root: Path, count: int) -> Path:
    """ROOT/src with ``count`` images, built unless a stamp says it is complete."""
    src = root / "src"
    stamp = root / "src.done"
    wanted = {"files": count, "layout": LAYOUT}
    if read_json(stamp) == wanted and src.is_dir():
        print(f"  {count:>9,} files: tree cached in {src}")
        return src
    # The sources change: whatever was converted from the old ones is stale.
    stamp.unlink(missing_ok=True)
    shutil.rmtree(root / "dest", ignore_errors=True)
    (root / "first.json").unlink(missing_ok=True)
    seconds = build_tree(src, count)
    stamp.write_text(f'{{"files": {count}, "layout": {LAYOUT}}}\n')
    print(f"  {count:>9,} files: tree built in {seconds:.1f} s ({src})", flush=True)
    return src


# --------------------------------------------------------------------------- runs


def convert_command(src: Path, dest: Path, summary: Path, workers: int) -> list[str]:
    return optimizr_convert(src, dest, summary, "-j", str(workers))


def all_converted(summary: dict[str, Any] | None, count: int) -> bool:
    files = (summary or {}).get("files", {})
    return (
        (summary or {}).get("exit_code") == 0
        and files.get("found") == count
        and files.get("converted") == count
        and files.get("failed") == 0
    )


@dataclass
class First:
    """The real conversion of one tree."""

    count: int
    wall_seconds: float
    summary_seconds: float
    peak_bytes: int
    cached: bool

    @property
    def files_per_second(self) -> float:
        return self.count / self.wall_seconds if self.wall_seconds else float("nan")


def ensure_converted(root: Path, src: Path, count: int, workers: int) -> First:
    """Convert ROOT/src into ROOT/dest for real, unless it was done already.

    Done already: DEST's summary shows all ``count`` converted, or ROOT/first.json
    (written only after a checked full conversion) says so; and the manifest exists.
    The no-op runs write their summary elsewhere, so DEST's stays the first run's.
    """
    dest = root / "dest"
    summary_path = dest / "optimizr-summary.json"
    record = root / "first.json"
    summary = read_json(summary_path)
    known = read_json(record) or {}
    done = all_converted(summary, count) or known.get("files") == count
    if done and (dest / ".optimizr" / "manifest.sqlite").exists():
        first = First(
            count,
            float(known.get("wall_seconds", float("nan"))),
            float(known.get("summary_seconds", float("nan"))),
            int(known.get("peak_bytes", 0)),
            cached=True,
        )
        print(
            f"  {count:>9,} files: converted earlier in {first.wall_seconds:,.1f} s "
            f"({first.files_per_second:,.0f} files/s), DEST cached",
            flush=True,
        )
        return first
    fresh_dir(dest)
    record.unlink(missing_ok=True)
    run = run_measured(convert_command(src, dest, summary_path, workers))
    summary = read_json(summary_path)
    if run.returncode != 0 or not all_converted(summary, count):
        files = (summary or {}).get("files")
        raise SystemExit(
            f"resume: the first conversion of {count:,} files did not convert them all "
            f"(exit {run.returncode}, files {files}): {run.stderr_tail[-500:]}"
        )
    first = First(
        count,
        run.wall_seconds,
        float((summary or {}).get("seconds", float("nan"))),
        run.peak_bytes,
        cached=False,
    )
    facts = {
        "files": count,
        "wall_seconds": round(run.wall_seconds, 3),
        "summary_seconds": first.summary_seconds,
        "peak_bytes": run.peak_bytes,
    }
    record.write_text(json.dumps(facts) + "\n")
    print(
        f"  {count:>9,} files: converted in {run.wall_seconds:,.1f} s "
        f"({first.files_per_second:,.0f} files/s), peak {run.peak_bytes / MIB:,.0f} MiB",
        flush=True,
    )
    return first


@dataclass
class Rerun:
    """One measured no-op re-run."""

    count: int
    run: Run
    summary: dict[str, Any]
    problems: list[str]

    @property
    def summary_seconds(self) -> float:
        return float(self.summary.get("seconds", float("nan")))

    @property
    def wall_rate(self) -> float:
        return self.count / self.run.wall_seconds

    @property
    def summary_rate(self) -> float:
        seconds = self.summary_seconds
        return self.count / seconds if seconds > 0 else float("nan")


def check_noop(count: int, run: Run, summary: dict[str, Any] | None) -> list[str]:
    """What is wrong with a run that should have skipped all ``count`` files as up to date."""
    if summary is None:
        return [f"no summary (exit {run.returncode}): {run.stderr_tail[-300:]!r}"]
    files = summary.get("files", {})
    problems = []
    if run.returncode != 0 or summary.get("exit_code") != 0:
        problems.append(f"exit {run.returncode} (summary {summary.get('exit_code')})")
    for key, wanted in (("found", count), ("converted", 0), ("failed", 0)):
        if files.get(key) != wanted:
            problems.append(f"files.{key} = {files.get(key)}, not {wanted}")
    if files.get("skipped_by_reason") != {"up to date": count}:
        problems.append(f"skipped_by_reason = {files.get('skipped_by_reason')}")
    return problems


def noop_run(root: Path, src: Path, count: int, workers: int) -> Rerun:
    summary_path = root / "noop-summary.json"
    summary_path.unlink(missing_ok=True)
    run = run_measured(convert_command(src, root / "dest", summary_path, workers))
    summary = read_json(summary_path)
    rerun = Rerun(count, run, summary or {}, check_noop(count, run, summary))
    status = "ok" if not rerun.problems else "CHECK FAILED: " + "; ".join(rerun.problems)
    print(
        f"  {count:>9,} files: wall {run.wall_seconds:6.2f} s ({rerun.wall_rate:>7,.0f} files/s)  "
        f"summary {rerun.summary_seconds:6.2f} s ({rerun.summary_rate:>7,.0f} files/s)  "
        f"peak {run.peak_bytes / MIB:5.1f} MiB  CPU {run.cpu_seconds:5.2f} s  "
        f"processes {run.tree.max_processes}  {status}",
        flush=True,
    )
    return rerun


# --------------------------------------------------------------------------- figures


def rate(value: float) -> str:
    return "-" if value != value else f"{value:,.0f}"  # nan: no valid run


def print_results(firsts: dict[int, First], reruns: dict[int, list[Rerun]]) -> None:
    """Medians over the rounds whose checks passed (a failed run measures something else)."""
    print("\nno-op re-runs: medians over the rounds whose checks passed")
    headers = [
        "files",
        "first run s",
        "first files/s",
        "valid runs",
        "wall s",
        "files/s (wall)",
        "summary s",
        "files/s (summary)",
        "peak MiB",
        "max peak MiB",
        "CPU s",
        "processes",
    ]
    valid = {count: [r for r in runs if not r.problems] for count, runs in reruns.items()}
    rows = []
    for count, runs in valid.items():
        first = firsts[count]
        rows.append(
            [
                f"{count:,}",
                first.wall_seconds,
                rate(first.files_per_second),
                f"{len(runs)} of {len(reruns[count])}",
                median(r.run.wall_seconds for r in runs),
                rate(median(r.wall_rate for r in runs)),
                median(r.summary_seconds for r in runs),
                rate(median(r.summary_rate for r in runs)),
                median(r.run.peak_bytes / MIB for r in runs),
                max((r.run.peak_bytes / MIB for r in runs), default=None),
                median(r.run.cpu_seconds for r in runs),
                max((r.run.tree.max_processes for r in runs), default=None),
            ]
        )
    print_table(headers, rows)

    counts = sorted(c for c, runs in valid.items() if runs)
    if len(counts) >= 2:
        small, large = counts[0], counts[-1]
        ratio = median(r.run.peak_bytes for r in valid[large]) / median(
            r.run.peak_bytes for r in valid[small]
        )
        flat = "flat" if ratio <= FLAT_MEMORY_RATIO else "GROWS"
        print(
            f"\npeak RSS with {large:,} files / peak with {small:,}: {ratio:.3f} "
            f"({flat}; target about 1.0, at most {FLAT_MEMORY_RATIO:.2f})"
        )
        # The fixed cost (interpreter start-up, imports, opening the manifest) cancels out.
        extra = median(r.run.wall_seconds for r in valid[large]) - median(
            r.run.wall_seconds for r in valid[small]
        )
        marginal = (large - small) / extra if extra > 0 else float("nan")
        print(
            f"marginal rate, ({large:,} - {small:,}) files / difference of the median walls: "
            f"{rate(marginal)} files/s"
        )
    print(f"\ntarget: {TARGET_FILES_PER_SECOND:,} files/s or more (median of the valid rounds)")
    for count, runs in valid.items():
        failed = len(reruns[count]) - len(runs)
        if not runs:
            print(f"  {count:>9,} files: NO VERDICT, every run failed its checks")
            continue
        by_wall = median(r.wall_rate for r in runs)
        by_summary = median(r.summary_rate for r in runs)
        note = f" ({failed} run(s) failed their checks and are left out)" if failed else ""
        print(
            f"  {count:>9,} files: {verdict(by_wall)} by wall ({rate(by_wall)} files/s), "
            f"{verdict(by_summary)} by summary seconds ({rate(by_summary)} files/s){note}"
        )


def verdict(value: float) -> str:
    return "PASS" if value >= TARGET_FILES_PER_SECOND else "FAIL"


# --------------------------------------------------------------------------- main


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of file counts: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"not a list of file counts: {text!r}")
    return sorted(set(sizes))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=parse_sizes("20000,200000"),
        help="files per tree, comma-separated (20000,200000)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="no-op re-runs per size (3)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="uncounted no-op re-runs per size first (1)"
    )
    parser.add_argument("--workers", type=int, default=2, help="-j of every run (2)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DATA_DIR / "resume",
        help="where trees and outputs are cached (bench/.data/resume)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    for line in machine_lines():
        print(line)
    print(f"optimizr: {' '.join(optimizr_command())}, -j {args.workers}")
    data = args.data_dir.resolve()

    print(f"\nsource trees ({FILES_PER_FOLDER} files per folder) in {data}")
    sources = {count: ensure_tree(data / str(count), count) for count in args.sizes}

    print("\nfirst run: a real conversion of every file")
    firsts = {
        count: ensure_converted(data / str(count), src, count, args.workers)
        for count, src in sources.items()
    }

    if args.warmup:
        # Not counted: warms the dentry and page caches after a cached session, and
        # shows at once a stale cache (options or encoder changed since DEST was made).
        print(f"\nwarm-up: {args.warmup} no-op re-run(s) per size, not counted")
        for _ in range(args.warmup):
            for count in args.sizes:
                noop_run(data / str(count), sources[count], count, args.workers)

    print(f"\nno-op re-runs: {args.rounds} round(s)")
    reruns: dict[int, list[Rerun]] = {count: [] for count in args.sizes}
    for round_index in range(args.rounds):
        print(f" round {round_index + 1}")
        # Sizes alternate within a round, so a noisy moment of a shared machine
        # does not land on one size only.
        order = args.sizes if round_index % 2 == 0 else list(reversed(args.sizes))
        for count in order:
            reruns[count].append(noop_run(data / str(count), sources[count], count, args.workers))

    print_results(firsts, reruns)
    print(f"\nbenchmark time: {time.perf_counter() - started:,.1f} s")
    return 1 if any(r.problems for runs in reruns.values() for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
