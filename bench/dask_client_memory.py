"""Does a bare Dask client's memory grow with the tasks it has run? (issue 15)

The cluster coordinator's RSS rises a little from 1,000 to 20,000 images; this probe
asks whether the distributed Client alone does, with optimizr's task shape and none of
optimizr: a window of 4 tasks in flight (``as_completed``), each future released once
its result is taken, unique keys, ``resources={"MEMORY": ...}``, an argument of 0.8-4 KB
and a result of 0.5-6 KB (a Job and a TaskResult are about that). It starts
``dask scheduler`` and two one-thread ``dask worker`` processes on free 127.0.0.1 ports
(stopped by their PIDs at the end) and prints this process's VmRSS, RssAnon, RssFile and
VmHWM (MiB) every tenth of the run, with the size of the scheduler's identity reply
that the executor asks for every REFRESH_SECONDS.

    .venv/bin/python bench/dask_client_memory.py [--tasks 20000]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import pickle
import random
import subprocess
import sys
import time
from typing import Any

import dask
import distributed

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from servers import free_ports, stop_process  # noqa: E402

WINDOW = 4


def status() -> dict[str, int]:
    """This process's memory from /proc/self/status, in MiB."""
    wanted = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
    out: dict[str, int] = {}
    with open("/proc/self/status") as lines:
        for line in lines:
            name, _, value = line.partition(":")
            if name in wanted:
                out[name] = int(value.split()[0]) // 1024
    return out


def work(argument: tuple[int, bytes]) -> dict[str, Any]:
    number, payload = argument
    return {"n": number, "facts": "x" * random.randint(500, 6000), "echo": payload[:100]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--trim", action="store_true", help="malloc_trim(0) before each sample")
    args = parser.parse_args()
    (port,) = free_ports(1)
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1"]
        + ["--port", str(port), "--no-dashboard"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", f"tcp://127.0.0.1:{port}"]
            + ["--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard"]
            + ["--resources", "MEMORY=1000000000"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    try:
        # As the coordinator sets it (executors/dask.py LOW_LEVEL_LOG_LENGTH).
        dask.config.set({"distributed.admin.low-level-log-length": 32})
        client = distributed.Client(f"tcp://127.0.0.1:{port}", timeout=60)
        client.wait_for_workers(2)
        libc = ctypes.CDLL("libc.so.6")
        completed = distributed.as_completed()
        in_flight: dict[str, distributed.Future] = {}
        done = submitted = 0
        started = time.perf_counter()
        print("tasks  seconds  VmRSS  RssAnon  RssFile  VmHWM  identity bytes")
        while done < args.tasks:
            while len(in_flight) < WINDOW and submitted < args.tasks:
                key = f"optimizr-probe-{submitted}"
                payload = os.urandom(random.randint(800, 4000))
                future = client.submit(
                    work,
                    (submitted, payload),
                    key=key,
                    pure=False,
                    resources={"MEMORY": 1000},
                    retries=0,
                )
                in_flight[key] = future
                completed.add(future)
                submitted += 1
            future = next(completed)
            future.result()
            del in_flight[str(future.key)]
            future.release()
            done += 1
            if done % max(1, args.tasks // 10) == 0:
                if args.trim:
                    libc.malloc_trim(0)
                got = status()
                identity = client.sync(client.scheduler.identity, n_workers=-1)
                print(
                    f"{done:>5}  {time.perf_counter() - started:7.1f}  {got['VmRSS']:5}  "
                    f"{got['RssAnon']:7}  {got['RssFile']:7}  {got['VmHWM']:5}  "
                    f"{len(pickle.dumps(identity)):14}",
                    flush=True,
                )
        client.close()
    finally:
        for process in [*workers, scheduler]:
            stop_process(process)
    return 0


if __name__ == "__main__":
    sys.exit(main())
