"""Shared helpers of the benchmarks: an independent process-tree RSS sampler,
run-and-measure, corpus statistics, peer discovery and plain-text tables.

The sampler reads /proc itself and does not use optimizr's own
``optimizr.metrics.memory``: the benchmark must measure independently of the
code it measures.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
PEERS_DIR = BENCH_DIR / ".peers"
DATA_DIR = BENCH_DIR / ".data"
VENV_BIN = REPO_ROOT / ".venv" / "bin"

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp", ".avif"}
)
MB = 1_000_000
MIB = 1 << 20

_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- /proc


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid``. The kernel lists them per thread, so every task is read."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except OSError:
            continue
        found.extend(int(child) for child in text.split())
    return found


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants, alive right now."""
    pids = [root]
    index = 0
    while index < len(pids):
        pids.extend(children_of(pids[index]))
        index += 1
    return pids


def rss_bytes(pid: int) -> int:
    """Resident bytes of one process, from /proc/PID/statm (0 once it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def cpu_ticks(pid: int) -> tuple[int, int] | None:
    """(start time, utime + stime) of one process in clock ticks, own threads only."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ")".
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return int(fields[19]), int(fields[11]) + int(fields[12])
    except (IndexError, ValueError):
        return None


@dataclass
class TreeSample:
    """What the sampler saw of one process tree."""

    peak_bytes: int = 0
    samples: int = 0
    max_processes: int = 0
    #: (seconds since start, summed RSS bytes), one per sample.
    timeline: list[tuple[float, int]] = field(default_factory=list)
    #: (seconds since start, value of the progress callback), every progress interval.
    progress: list[tuple[float, float]] = field(default_factory=list)
    #: Sum over every process seen of its last observed own CPU time: a lower bound
    #: of the tree's CPU (a process's last interval and very short ones are missed).
    cpu_seen_seconds: float = 0.0


class TreeSampler:
    """Samples the summed RSS of a process and all its descendants on a thread."""

    def __init__(
        self,
        pid: int,
        interval: float = 0.02,
        *,
        progress: Callable[[], float] | None = None,
        progress_interval: float = 0.5,
    ) -> None:
        self.pid = pid
        self.interval = interval
        self._progress = progress
        self._progress_interval = progress_interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)
        self._cpu: dict[tuple[int, int], int] = {}
        self.result = TreeSample()

    def start(self) -> TreeSampler:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def stop(self) -> TreeSample:
        self._stop.set()
        self._thread.join()
        self.result.cpu_seen_seconds = sum(self._cpu.values()) / _TICKS
        return self.result

    def _run(self) -> None:
        next_progress = 0.0
        while not self._stop.is_set():
            now = time.perf_counter() - self._started
            self._sample(now)
            if self._progress is not None and now >= next_progress:
                self.result.progress.append((now, self._progress()))
                next_progress = now + self._progress_interval
            self._stop.wait(self.interval)

    def _sample(self, now: float) -> None:
        pids = tree_pids(self.pid)
        total = 0
        for pid in pids:
            total += rss_bytes(pid)
            ticks = cpu_ticks(pid)
            if ticks is not None:
                # Keyed by start time too, so a recycled pid is a new process.
                self._cpu[(pid, ticks[0])] = ticks[1]
        result = self.result
        result.samples += 1
        result.peak_bytes = max(result.peak_bytes, total)
        result.max_processes = max(result.max_processes, len(pids))
        result.timeline.append((now, total))


# --------------------------------------------------------------------------- running


@dataclass
class Run:
    """One measured run of a command."""

    command: list[str]
    returncode: int
    wall_seconds: float
    user_seconds: float
    sys_seconds: float
    tree: TreeSample
    stderr_tail: str = ""

    @property
    def cpu_seconds(self) -> float:
        return self.user_seconds + self.sys_seconds

    @property
    def peak_bytes(self) -> int:
        return self.tree.peak_bytes


def run_measured(
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    interval: float = 0.02,
    progress: Callable[[], float] | None = None,
) -> Run:
    """Run ``command``; measure wall time, CPU of the whole tree and peak tree RSS.

    CPU comes from ``os.wait4`` on the launched process: the kernel adds to a
    process's rusage the rusage of every child it has waited for, recursively,
    so xargs (waits for each cwebp), node (threads, no children) and
    multiprocessing pools (join their workers) are counted whole. A descendant
    that is never waited for would be missing; ``tree.cpu_seen_seconds`` (from
    /proc, a lower bound) is there to catch that.
    """
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    with tempfile.TemporaryFile() as errors:
        started = time.perf_counter()
        process = subprocess.Popen(
            list(command), stdout=subprocess.DEVNULL, stderr=errors, env=full_env, cwd=cwd
        )
        sampler = TreeSampler(process.pid, interval, progress=progress).start()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        tree = sampler.stop()
        # Tell Popen the child is reaped, so it never waits for it again.
        process.returncode = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        tail = errors.read()[-2000:].decode(errors="replace")
    return Run(list(command), process.returncode, wall, usage.ru_utime, usage.ru_stime, tree, tail)


def fresh_dir(path: Path) -> Path:
    """An empty directory at ``path`` (whatever was there is removed)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def tree_bytes(root: Path) -> tuple[int, int]:
    """(files, bytes) of the WebP files under ``root`` (not summaries or manifests)."""
    count = size = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            if not name.endswith(".webp"):
                continue
            count += 1
            size += os.stat(os.path.join(dirpath, name)).st_size
    return count, size


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------- corpus


def list_images(root: Path) -> list[Path]:
    """Image files under ``root`` by suffix, sorted (hidden files left out)."""
    found = [
        Path(dirpath, name)
        for dirpath, _, names in os.walk(root)
        for name in names
        if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES
    ]
    return sorted(found)


@dataclass(frozen=True)
class CorpusStats:
    files: int
    bytes: int
    megapixels: float
    min_mp: float
    median_mp: float
    max_mp: float


def image_megapixels(path: Path) -> float:
    """Megapixels from the header alone (libvips opens lazily)."""
    import pyvips

    image = pyvips.Image.new_from_file(str(path))
    return float(image.width * image.height) / 1e6


def corpus_stats(files: Sequence[Path]) -> CorpusStats:
    mps = [image_megapixels(path) for path in files]
    size = sum(path.stat().st_size for path in files)
    if not mps:
        return CorpusStats(0, 0, 0.0, 0.0, 0.0, 0.0)
    return CorpusStats(len(files), size, sum(mps), min(mps), statistics.median(mps), max(mps))


def describe_corpus(name: str, stats: CorpusStats) -> str:
    return (
        f"{name}: {stats.files} images, {stats.bytes / MB:,.1f} MB, "
        f"{stats.megapixels:,.1f} MP (min {stats.min_mp:.1f}, "
        f"median {stats.median_mp:.1f}, max {stats.max_mp:.1f} MP)"
    )


def warm_cache(files: Iterable[Path]) -> None:
    """Read every file once so no tool pays for the first cold read."""
    for path in files:
        with open(path, "rb") as fh:
            while fh.read(1 << 22):
                pass


# --------------------------------------------------------------------------- tools


def optimizr_command() -> list[str]:
    local = VENV_BIN / "optimizr"
    if local.exists():
        return [str(local)]
    found = shutil.which("optimizr")
    return [found] if found else [str(venv_python()), "-m", "optimizr"]


def optimizr_convert(src: Path, dest: Path, summary: Path, *options: str) -> list[str]:
    """``optimizr convert`` as every benchmark runs it: no progress bar, every
    output written (the peers write them all, so equal work), summary to ``summary``."""
    return [*optimizr_command(), "convert", str(src), str(dest), "--no-progress",
            "--if-larger", "write", "--summary", str(summary), *options]  # fmt: skip


def measure_optimizr(
    src: Path,
    work: Path,
    *options: str,
    progress: Callable[[Path], Callable[[], float]] | None = None,
) -> tuple[Run, Path, dict[str, Any]]:
    """One measured run into a fresh ``work/out``; returns the run, DEST and summary.json."""
    dest = fresh_dir(work / "out")
    summary = work / "summary.json"
    summary.unlink(missing_ok=True)
    command = optimizr_convert(src, dest, summary, *options)
    run = run_measured(command, progress=progress(dest) if progress else None)
    return run, dest, read_json(summary) or {}


def venv_python() -> Path:
    local = VENV_BIN / "python"
    return local if local.exists() else Path(sys.executable)


@dataclass(frozen=True)
class Peer:
    """An installed peer: its executable and the environment it needs."""

    executable: str
    env: dict[str, str]
    version: str


def find_cwebp() -> Peer | None:
    """cwebp unpacked into bench/.peers (needs its libraries) or on PATH."""
    local = PEERS_DIR / "usr" / "bin" / "cwebp"
    env: dict[str, str] = {}
    if local.exists():
        libs = [str(p) for p in sorted((PEERS_DIR / "usr" / "lib").glob("*-linux-gnu"))]
        if os.environ.get("LD_LIBRARY_PATH"):
            libs.append(os.environ["LD_LIBRARY_PATH"])
        env = {"LD_LIBRARY_PATH": ":".join(libs)}
        executable = str(local)
    else:
        found = shutil.which("cwebp")
        if found is None:
            return None
        executable = found
    version = _output([executable, "-version"], env)
    return Peer(executable, env, version.strip()) if version else None


def find_sharp() -> Peer | None:
    """node plus sharp (bench/.peers/node_modules or wherever node finds it)."""
    node = shutil.which("node")
    if node is None:
        return None
    text = _output([node, str(BENCH_DIR / "sharp_convert.mjs"), "--version"], {})
    try:
        info = json.loads(text)
    except ValueError:
        return None
    version = (
        f"sharp {info['sharp']} (libvips {info['libvips']}, libwebp {info['libwebp']}), "
        f"node {info['node']}, sharp.concurrency() = {info['concurrency']}"
    )
    return Peer(node, {}, version)


@dataclass(frozen=True)
class EncoderInfo:
    """Which WebP encoder a tool ran: its name, the libwebp version and where that came from."""

    name: str
    libwebp: str
    origin: str

    def label(self) -> str:
        return f"{self.name}, libwebp {self.libwebp or '?'}"

    def describe(self) -> str:
        return f"{self.label()}, from {self.origin or '?'}"


def optimizr_encoder(summary: Mapping[str, Any] | None) -> EncoderInfo:
    """optimizr's encoder as its run reported it: the summary's ``encoder`` block
    (name, libwebp_version, origin) when it has one, else ``tool.encoder`` (with
    ``tool.libwebp`` and ``tool.libwebp_origin``), else ``tool.libwebp``, else
    the lines of ``optimizr --version`` that name the encoder or libwebp."""
    block = (summary or {}).get("encoder")
    if isinstance(block, Mapping) and block.get("name"):
        return EncoderInfo(
            str(block["name"]),
            str(block.get("libwebp_version") or ""),
            str(block.get("origin") or ""),
        )
    tool = (summary or {}).get("tool")
    if isinstance(tool, Mapping) and tool.get("encoder"):
        # The summary's tool: encoder, libwebp (its version), libwebp_origin.
        return EncoderInfo(
            str(tool["encoder"]),
            str(tool.get("libwebp") or ""),
            str(tool.get("libwebp_origin") or ""),
        )
    if isinstance(tool, Mapping) and tool.get("libwebp"):
        return EncoderInfo(
            "libvips webpsave (summary has no encoder block)", "", str(tool["libwebp"])
        )
    lines = _output([*optimizr_command(), "--version"], {}).splitlines()
    said = [line.strip() for line in lines if "libwebp" in line or "encoder" in line]
    return EncoderInfo("as `optimizr --version` says", "", "; ".join(said) or "unknown")


def cwebp_encoder(peer: Peer) -> EncoderInfo:
    """cwebp prints its libwebp's version; the package it came from is asked of dpkg
    (installed with apt-get) or read from the .deb that install_peers.sh unpacked."""
    version = peer.version.splitlines()[0] if peer.version else ""
    path = Path(peer.executable)
    if path.is_relative_to(PEERS_DIR):
        debs = sorted((PEERS_DIR / "debs").glob("webp_*.deb"))
        package = debs[0].name.split("_")[1] if debs else "?"
        return EncoderInfo("cwebp", version, f"Debian package webp {package}, unpacked in {path}")
    owner = _output(["dpkg", "-S", str(path.resolve())], {}).split(":")[0].strip()
    if not owner:
        return EncoderInfo("cwebp", version, f"{path} (no Debian package owns it)")
    package = _output(["dpkg-query", "-W", "-f", "${Version}", owner], {}).strip()
    libwebp = _output(["dpkg-query", "-W", "-f", "${Version}", "libwebp7"], {}).strip()
    shared = f", shared libwebp7 {libwebp}" if libwebp else ""
    return EncoderInfo("cwebp", version, f"Debian package {owner} {package} ({path}{shared})")


def sharp_encoder() -> EncoderInfo | None:
    node = shutil.which("node")
    if node is None:
        return None
    try:
        info = json.loads(_output([node, str(BENCH_DIR / "sharp_convert.mjs"), "--version"], {}))
    except ValueError:
        return None
    origin = f"sharp {info['sharp']} prebuilt binaries (sharp-libvips {info['libvips']})"
    return EncoderInfo("sharp (libvips webpsave)", str(info["libwebp"]), origin)


def pillow_encoder() -> EncoderInfo | None:
    code = (
        "import glob, os, PIL; from PIL import features; "
        "libs = glob.glob(os.path.join(os.path.dirname(PIL.__file__), '..', 'pillow.libs', "
        "'libwebp-*.so*')); "
        "print(PIL.__version__, features.version('webp'), "
        "os.path.realpath(libs[0]) if libs else 'Pillow build')"
    )
    parts = _output([str(venv_python()), "-c", code], {}).split(maxsplit=2)
    if len(parts) != 3:
        return None
    return EncoderInfo(f"Pillow {parts[0]} WebP plugin", parts[1], parts[2])


def pillow_version() -> str | None:
    text = _output([str(venv_python()), "-c", "import PIL; print(PIL.__version__)"], {})
    return text.strip() or None


def _output(command: Sequence[str], env: Mapping[str, str]) -> str:
    try:
        done = subprocess.run(
            list(command),
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout if done.returncode == 0 else ""


def machine_lines() -> list[str]:
    """nproc, CPU model, memory, load: a shared machine's load explains noisy figures."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"machine: {platform.machine()}, nproc {usable} (of {os.cpu_count()}), {model}, "
        f"{memory / 2**30:.1f} GiB RAM, load average {load}",
    ]


def pyvips_binary_component(marker: str) -> str | None:
    """The first text in pyvips-binary's libvips that starts with ``marker`` (the
    libraries it links statically print their versions so, e.g. "mozjpeg version")."""
    import importlib.util

    spec = importlib.util.find_spec("pyvips")
    if spec is None or spec.origin is None:
        return None
    site = Path(spec.origin).parent.parent
    encoded = marker.encode()
    for library in sorted(site.glob("pyvips_binary.libs/libvips*.so*")):
        data = library.read_bytes()
        start = data.find(encoded)
        if start >= 0:
            end = data.find(b"\0", start)
            return data[start:end].decode(errors="replace")
    return None


def libvips_version() -> str:
    import pyvips

    return f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}"


# --------------------------------------------------------------------------- figures


def median(values: Iterable[float]) -> float:
    items = list(values)
    return statistics.median(items) if items else float("nan")


def linear_slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (nan with fewer than two distinct x)."""
    if len(points) < 2:
        return float("nan")
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    var = sum((x - mean_x) ** 2 for x, _ in points)
    if var == 0:
        return float("nan")
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain monospace table; the first column left-aligned, the others right."""
    cells = [[str(h) for h in headers], *([_cell(v) for v in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [
            row[i].ljust(widths[i]) if i == 0 else row[i].rjust(widths[i]) for i in range(len(row))
        ]
        return "  ".join(parts).rstrip()

    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def find_ssimulacra2_tool() -> str | None:
    """The reference SSIMULACRA 2 tool (cloudinary/ssimulacra2, built in /tmp from its
    fetched source): $SSIMULACRA2, else ``ssimulacra2`` on PATH; None without it."""
    path = os.environ.get("SSIMULACRA2")
    if path:
        return path if os.access(path, os.X_OK) else None
    return shutil.which("ssimulacra2")
