"""optimizr against its peers on one corpus: wall time, CPU, memory, output size.

Runs optimizr and every installed peer -- cwebp under ``xargs -P N``, sharp with
N files in flight (bench/sharp_convert.mjs), and a plain Pillow process pool
(bench/pillow_pool.py) -- alternately, round-robin (the order rotates each
round), --rounds times each, at the same quality and effort, each time into a
fresh empty folder. The corpus is read once beforehand so every run sees a
warm page cache. A missing peer is reported as "not installed" and skipped.

Measured for each run, from outside the tool:
  wall      time.perf_counter around the launched process
  CPU       user+sys of the whole process tree, from os.wait4's rusage (which
            includes every descendant the tree waited for); cross-checked
            against the per-process CPU times sampled from /proc
  peak RSS  summed VmRSS of the launched process and all its descendants,
            sampled from /proc every 20 ms
  output    bytes written under the destination folder

Prints per tool the medians over the rounds (wall, CPU, peak RSS), output
bytes, MB/s (input bytes / wall) and megapixels/s, and which encoder it ran:
its name, libwebp version and origin (optimizr: each run's summary.json
``encoder`` block, else its ``tool.libwebp``, else ``optimizr --version``;
cwebp: ``cwebp -version`` and the Debian package that owns it; sharp: its
``sharp.versions``; Pillow: ``features.version("webp")`` and the library file).
Then optimizr's median wall over each peer's, with issue 12's targets (<= 1.00x
cwebp, ambition 0.95x; <= 0.88x sharp); optimizr's own figures from its
summary.json (cpu.efficiency, target >= 0.95, cpu.orchestration_share,
executor.tail_seconds) next to the external measurements of the same runs; and
where optimizr's time goes: every phase of the summary's ``phases_seconds``
(summed over images), and orchestration = the workers' wall (workers x run
wall) minus the phases that run in the workers.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    BENCH_DIR,
    MB,
    MIB,
    CorpusStats,
    EncoderInfo,
    Peer,
    Run,
    corpus_stats,
    cwebp_encoder,
    describe_corpus,
    find_cwebp,
    find_sharp,
    fresh_dir,
    libvips_version,
    list_images,
    machine_lines,
    median,
    optimizr_command,
    optimizr_convert,
    optimizr_encoder,
    pillow_encoder,
    pillow_version,
    print_table,
    read_json,
    run_measured,
    sharp_encoder,
    tree_bytes,
    venv_python,
    warm_cache,
)

# cwebp converts one file per process; xargs keeps N of them running. The sh
# wrapper is measured as the root of the tree (it waits for xargs, which waits
# for every cwebp). Outputs are DEST/<relative path>.webp, subfolders made first.
CWEBP_SCRIPT = (
    'cd "$1" && find . -type f \\( -iname "*.jpg" -o -iname "*.jpeg" -o -iname "*.png" \\) '
    '-print0 | xargs -0 -P "$3" -I{} "$6" -quiet -q "$4" -m "$5" -metadata icc {} '
    '-o "$2/{}.webp"'
)


@dataclass(frozen=True)
class Settings:
    src: Path
    workers: int
    quality: int
    effort: int
    optimizr_args: tuple[str, ...]


@dataclass
class Tool:
    """A converter under test: how to build its command line for one run."""

    name: str
    command: Callable[[Path, Path], list[str]]
    env: dict[str, str] = field(default_factory=dict)
    prepare: Callable[[Path], None] | None = None
    runs: list[Run] = field(default_factory=list)
    outputs: list[tuple[int, int]] = field(default_factory=list)  # (files, bytes) per run
    summaries: list[dict[str, Any]] = field(default_factory=list)
    #: The encoder a peer always runs; optimizr's is read from each run's summary.
    encoder: EncoderInfo | None = None
    encoders: list[EncoderInfo] = field(default_factory=list)  # per run

    def encoders_used(self) -> list[EncoderInfo]:
        """The distinct encoders of the runs (more than one: a fallback in some run)."""
        seen = list(dict.fromkeys(self.encoders))
        return seen or ([self.encoder] if self.encoder else [])


def optimizr_tool(s: Settings) -> Tool:
    def command(dest: Path, summary: Path) -> list[str]:
        return optimizr_convert(
            s.src, dest, summary, "-j", str(s.workers), "-q", str(s.quality),
            "--effort", str(s.effort), *s.optimizr_args,
        )  # fmt: skip

    return Tool("optimizr", command)


def cwebp_tool(s: Settings, peer: Peer) -> Tool:
    def command(dest: Path, _summary: Path) -> list[str]:
        args = [str(s.src), str(dest), str(s.workers), str(s.quality), str(s.effort)]
        return ["sh", "-c", CWEBP_SCRIPT, "sh", *args, peer.executable]

    def prepare(dest: Path) -> None:
        # xargs gives cwebp the output path; cwebp does not create folders.
        for folder in sorted({p.parent for p in list_images(s.src)}):
            (dest / folder.relative_to(s.src)).mkdir(parents=True, exist_ok=True)

    return Tool("cwebp", command, dict(peer.env), prepare, encoder=cwebp_encoder(peer))


def sharp_tool(s: Settings, peer: Peer) -> Tool:
    script = str(BENCH_DIR / "sharp_convert.mjs")

    def command(dest: Path, _summary: Path) -> list[str]:
        args = [str(s.src), str(dest), str(s.workers), str(s.quality), str(s.effort)]
        return [peer.executable, script, *args]

    return Tool("sharp", command, dict(peer.env), encoder=sharp_encoder())


def pillow_tool(s: Settings) -> Tool:
    script = str(BENCH_DIR / "pillow_pool.py")

    def command(dest: Path, _summary: Path) -> list[str]:
        args = ["-j", str(s.workers), "-q", str(s.quality), "--method", str(s.effort)]
        return [str(venv_python()), script, str(s.src), str(dest), *args]

    return Tool("pillow_pool", command, encoder=pillow_encoder())


def discover_tools(s: Settings) -> list[Tool]:
    """optimizr plus every peer that is installed; prints the versions and what is missing."""
    print(f"optimizr: {' '.join(optimizr_command())}, libvips {libvips_version()} (pyvips)")
    tools = [optimizr_tool(s)]
    cwebp = find_cwebp()
    if cwebp is None:
        print("cwebp: not installed")
    else:
        print(f"cwebp: {cwebp.executable}, version {cwebp.version} (applies no EXIF orientation)")
        tools.append(cwebp_tool(s, cwebp))
    sharp = find_sharp()
    if sharp is None:
        print("sharp: not installed")
    else:
        print(f"sharp: {sharp.version}")
        tools.append(sharp_tool(s, sharp))
    pillow = pillow_version()
    if pillow is None:
        print("pillow_pool: not installed (Pillow missing from the venv)")
    else:
        print(f"pillow_pool: Pillow {pillow}")
        tools.append(pillow_tool(s))
    return tools


def run_once(tool: Tool, work: Path, label: str) -> Run:
    dest = fresh_dir(work / f"out-{tool.name}")
    summary = work / f"summary-{tool.name}.json"
    summary.unlink(missing_ok=True)
    if tool.prepare is not None:
        tool.prepare(dest)
    run = run_measured(tool.command(dest, summary), env=tool.env)
    tool.runs.append(run)
    tool.outputs.append(tree_bytes(dest))
    data = read_json(summary)
    if data is not None:
        tool.summaries.append(data)
    if tool.name == "optimizr":
        tool.encoders.append(optimizr_encoder(data))
    elif tool.encoder is not None:
        tool.encoders.append(tool.encoder)
    encoder = tool.encoders[-1].label() if tool.encoders else "encoder unknown"
    status = "" if run.returncode == 0 else f"  EXIT {run.returncode}: {run.stderr_tail[-300:]!r}"
    print(
        f"  {label} {tool.name:<12} wall {run.wall_seconds:7.2f} s  CPU {run.cpu_seconds:7.2f} s"
        f"  peak {run.peak_bytes / MIB:7.0f} MiB  files {tool.outputs[-1][0]}  [{encoder}]{status}",
        flush=True,
    )
    return run


def run_rounds(tools: list[Tool], rounds: int, work: Path) -> None:
    for number in range(rounds):
        # Rotate the order so no tool always runs first (or right after the same one).
        shift = number % len(tools)
        for tool in tools[shift:] + tools[:shift]:
            run_once(tool, work, f"round {number + 1}/{rounds}")


def result_rows(tools: list[Tool], stats: CorpusStats) -> list[list[object]]:
    rows: list[list[object]] = []
    for tool in tools:
        wall = median(r.wall_seconds for r in tool.runs)
        rows.append(
            [
                tool.name,
                " + ".join(e.label() for e in tool.encoders_used()) or "?",
                len(tool.runs),
                wall,
                median(r.cpu_seconds for r in tool.runs),
                round(median(r.peak_bytes for r in tool.runs) / MIB),
                round(max(r.peak_bytes for r in tool.runs) / MIB),
                f"{median(o[0] for o in tool.outputs):.0f}/{stats.files}",
                f"{median(o[1] for o in tool.outputs) / MB:,.1f}",
                stats.bytes / MB / wall,
                stats.megapixels / wall,
            ]
        )
    return rows


def print_results(tools: list[Tool], stats: CorpusStats, settings: Settings) -> None:
    print()
    print(
        f"results: medians over rounds; {settings.workers} workers, "
        f"quality {settings.quality}, effort {settings.effort}"
    )
    headers = [
        "tool",
        "encoder",
        "runs",
        "wall s",
        "CPU s",
        "peak MiB",
        "max peak",
        "outputs",
        "out MB",
        "MB/s",
        "MP/s",
    ]
    print_table(headers, result_rows(tools, stats))
    print("encoders (libwebp version and where it came from):")
    for tool in tools:
        for encoder in tool.encoders_used() or [None]:
            print(f"  {tool.name:<12} {encoder.describe() if encoder else 'unknown'}")
    print_ratios(tools)
    print_cpu_check(tools)
    print_optimizr_summary(tools[0])
    print_phases(tools[0], stats)


#: Issue 12's targets for optimizr's median wall over each peer's: (target, ambition).
TARGETS = {"cwebp": (1.00, 0.95), "sharp": (0.88, None)}


def print_ratios(tools: list[Tool]) -> None:
    optimizr, peers = tools[0], tools[1:]
    if not peers:
        print("\nno peer installed: no ratio")
        return
    ours = median(r.wall_seconds for r in optimizr.runs)
    print("\noptimizr median wall / peer median wall:")
    for peer in peers:
        theirs = median(r.wall_seconds for r in peer.runs)
        ratio = ours / theirs
        line = f"  / {peer.name:<12} {ours:7.2f} / {theirs:7.2f} s = {ratio:.3f}"
        target, ambition = TARGETS.get(peer.name, (None, None))
        if target is not None:
            line += f"  target <= {target:.2f}x: {'met' if ratio <= target else 'NOT MET'}"
        if ambition is not None:
            line += f"; ambition <= {ambition:.2f}x: {'met' if ratio <= ambition else 'not yet'}"
        print(line)
    for name in TARGETS:
        if name not in {p.name for p in peers}:
            print(f"  / {name:<12} not installed: its target cannot be checked")


def print_cpu_check(tools: list[Tool]) -> None:
    """wait4 counts only reaped descendants; /proc sampling (a lower bound) catches the rest."""
    print("\nCPU accounting check (wait4 rusage vs per-process CPU sampled from /proc):")
    for tool in tools:
        waited = median(r.cpu_seconds for r in tool.runs)
        seen = median(r.tree.cpu_seen_seconds for r in tool.runs)
        verdict = "ok" if waited >= 0.95 * seen else "WAIT4 MISSES CPU OF UNREAPED PROCESSES"
        processes = max(r.tree.max_processes for r in tool.runs)
        print(
            f"  {tool.name:<12} wait4 {waited:7.2f} s   /proc {seen:7.2f} s   "
            f"max processes at once {processes:3d}   {verdict}"
        )


def print_optimizr_summary(tool: Tool) -> None:
    """optimizr's own account of the same runs, next to the external measurements."""
    if not tool.summaries:
        print("\noptimizr wrote no summary.json")
        return

    def figure(section: str, key: str) -> float:
        return median(float(s.get(section, {}).get(key) or 0.0) for s in tool.summaries)

    print("\noptimizr's own figures (summary.json, median over rounds):")
    cores = figure("cpu", "cores")
    wall = figure("cpu", "wall_seconds")
    print(
        f"  cpu.efficiency {figure('cpu', 'efficiency'):.3f} (target >= 0.95)   "
        f"cpu.orchestration_share {figure('cpu', 'orchestration_share'):.3f}   "
        f"executor.tail_seconds {figure('executor', 'tail_seconds'):.2f}   "
        f"executor.busy_seconds {figure('executor', 'busy_seconds'):.2f}"
    )
    codec = figure("cpu", "codec_cpu_seconds")
    own_cpu = figure("cpu", "parent_cpu_seconds") + figure("cpu", "workers_cpu_seconds")
    runs = tool.runs
    print(
        f"  cpu: cores {cores:.0f}, wall {wall:.2f} s, codec {codec:.2f} s, "
        f"parent+workers {own_cpu:.2f} s; measured outside: "
        f"wall {median(r.wall_seconds for r in runs):.2f} s, "
        f"tree CPU {median(r.cpu_seconds for r in runs):.2f} s"
    )
    peak = figure("memory", "peak_rss_bytes")
    outside = median(r.peak_bytes for r in runs)
    print(
        f"  memory.peak_rss_bytes {peak / MIB:.0f} MiB vs measured outside "
        f"{outside / MIB:.0f} MiB ({(peak - outside) / outside:+.1%}); "
        f"budget {figure('memory', 'budget_bytes') / MIB:.0f} MiB"
    )


def print_phases(tool: Tool, stats: CorpusStats) -> None:
    """Where optimizr's time goes: the summary's per-image phase totals (``phases_seconds``,
    whatever phases it has), and orchestration = the workers' wall (workers x run wall)
    minus the phases that run in the workers, split into time inside jobs but outside
    the phases (executor.busy_seconds - phases: IPC, set-up) and idle workers."""
    summaries = [s for s in tool.summaries if isinstance(s.get("phases_seconds"), dict)]
    if not summaries:
        print("\noptimizr's summary has no phases_seconds: no phase table")
        return
    names = list(dict.fromkeys(name for s in summaries for name in s["phases_seconds"]))
    #: Written by the parent (pipeline), overlapping the workers: not a worker phase.
    parent = {"write"}

    def per_round(value: Callable[[dict[str, Any]], float]) -> float:
        return median(value(s) for s in summaries)

    def phase(s: dict[str, Any], name: str) -> float:
        return float(s["phases_seconds"].get(name) or 0.0)

    def in_workers(s: dict[str, Any]) -> float:
        return sum(phase(s, n) for n in names if n not in parent)

    def workers_wall(s: dict[str, Any]) -> float:
        workers = s.get("executor", {}).get("workers") or s.get("workers") or 0
        return float(workers) * float(s.get("cpu", {}).get("wall_seconds") or 0.0)

    def busy(s: dict[str, Any]) -> float:
        return float(s.get("executor", {}).get("busy_seconds") or 0.0)

    total = per_round(workers_wall)
    rows: list[list[object]] = []

    def row(label: str, seconds: float) -> None:
        share = f"{seconds / total:.1%}" if total else "-"
        rows.append([label, seconds, share, 1000 * seconds / stats.megapixels])

    for name in names:
        if name not in parent:
            row(name, per_round(lambda s, n=name: phase(s, n)))
    row("= per-image phases", per_round(in_workers))
    row(
        "orchestration = workers' wall - phases",
        per_round(lambda s: workers_wall(s) - in_workers(s)),
    )
    row("  in jobs, outside the phases", per_round(lambda s: busy(s) - in_workers(s)))
    row("  workers idle (start, tail, waits)", per_round(lambda s: workers_wall(s) - busy(s)))
    row("workers' wall (workers x wall)", total)
    for name in names:
        if name in parent:
            row(f"{name} (parent, overlaps the workers)", per_round(lambda s, n=name: phase(s, n)))
    print("\nwhere optimizr's time goes (summary.json, median over rounds):")
    print_table(["phase", "seconds", "of workers' wall", "ms per MP"], rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("corpus", type=Path, help="folder of images (bench/make_corpus.py)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tool (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="processes/files in flight (2)")
    parser.add_argument("--quality", type=int, default=80, help="lossy quality (default 80)")
    parser.add_argument("--effort", type=int, default=4, help="libwebp effort/method (4)")
    parser.add_argument("--only", help="comma-separated subset of optimizr,cwebp,sharp,pillow_pool")
    parser.add_argument("--optimizr-args", default="", help="extra optimizr options, quoted")
    parser.add_argument("--workdir", type=Path, help="where outputs go (default: a temp folder)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    files = list_images(args.corpus)
    if not files:
        print(f"compare: no images in {args.corpus}", file=sys.stderr)
        return 2
    src = args.corpus.resolve()
    settings = Settings(
        src, args.workers, args.quality, args.effort, tuple(shlex.split(args.optimizr_args))
    )
    for line in machine_lines():
        print(line)
    stats = corpus_stats(files)
    print(describe_corpus("corpus", stats))
    tools = discover_tools(settings)
    if args.only:
        wanted = set(args.only.split(","))
        tools = [t for t in tools if t.name in wanted or t.name == "optimizr"]
    warm_cache(files)
    work = Path(tempfile.mkdtemp(prefix="optimizr-compare-", dir=args.workdir))
    try:
        run_rounds(tools, args.rounds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_results(tools, stats, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
