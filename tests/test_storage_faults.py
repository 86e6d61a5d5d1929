"""Object-store requests under faults: the real SeaweedFS behind tests/faultproxy.py,
which answers 503 SlowDown, resets connections, stalls or loses answers on demand.

Each test asserts what the store was asked (the proxy's count) and what the storage
says it did (``ObjectStorage.statistics()``). Faults are made by the proxy, never by
a timer racing the code: a stall lasts until the client gives up (or the test ends).
"""

from __future__ import annotations

import errno
import json
import os
import threading
import uuid
from collections.abc import Iterator

import pytest

from faultproxy import FaultProxy, matching
from optimizr.metrics.exporter import MetricsExporter
from optimizr.storage.objectstore import ObjectStorage, StoreOptions, storage_for
from optimizr.storage.requests import CAUSES, LATENCY_BUCKETS, StorageStatistics
from optimizr.storage.urls import parse_location
from servers import SeaweedS3
from test_cli import wait_for
from test_metrics import parse, value
from test_storage import s3_env

PAYLOAD = b"\xff\xd8\xff" + os.urandom(40_000)  # not compressible, not tiny
GET, PUT, HEAD = matching("GET"), matching("PUT"), matching("HEAD")


@pytest.fixture
def proxy(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    s3_env(monkeypatch, s3_server)
    with FaultProxy(s3_server.endpoint) as running:
        yield running


def through(proxy: FaultProxy, server: SeaweedS3, **options: object) -> ObjectStorage:
    """An S3 storage whose endpoint is the proxy, on a fresh prefix of the test bucket."""
    location = parse_location(f"s3://{server.bucket}/faults-{uuid.uuid4().hex}")
    settings = StoreOptions(
        endpoint_url=proxy.endpoint,
        region="us-east-1",
        s3_path_style=True,
        **options,  # type: ignore[arg-type]
    )
    return storage_for(location, settings)


def retries(stats: StorageStatistics, op: str) -> dict[str, int]:
    return stats.retries.get(op, {})


def test_slow_down_three_times_then_the_write_and_the_read_succeed(
    proxy: FaultProxy, s3_server: SeaweedS3
) -> None:
    storage = through(proxy, s3_server)
    proxy.slow_down(3, PUT)
    storage.write_atomic("a/photo.jpg", PAYLOAD)
    proxy.slow_down(3, GET)
    assert storage.read_bytes("a/photo.jpg") == PAYLOAD
    stats = storage.statistics()
    assert retries(stats, "put") == {"throttled": 3}
    assert retries(stats, "get") == {"throttled": 3}
    assert stats.requests["put"] == 4 and stats.requests["get"] == 4
    assert stats.failures == {}
    seen = proxy.statistics()
    assert seen.faults == {"status": 6}
    assert seen.by_method == {"PUT": 4, "GET": 4}
    assert seen.forwarded == 2  # one real PUT, one real GET: SigV4 verified through the proxy


def test_retries_reach_prometheus(proxy: FaultProxy, s3_server: SeaweedS3) -> None:
    storage = through(proxy, s3_server)
    exporter = MetricsExporter(storage_statistics=lambda: [storage.statistics()])
    proxy.slow_down(3, PUT)
    storage.write_atomic("p.webp", PAYLOAD)
    samples = parse(exporter.render().decode())
    put = {"store": storage.describe(), "op": "put"}
    assert value(samples, "optimizr_storage_retries_total", **put, cause="throttled") == 3
    assert value(samples, "optimizr_storage_requests_total", **put) == 4
    assert value(samples, "optimizr_storage_request_seconds_count", **put) == 4


def test_a_reset_connection_is_retried(proxy: FaultProxy, s3_server: SeaweedS3) -> None:
    storage = through(proxy, s3_server)
    storage.write_atomic("r.jpg", PAYLOAD)
    proxy.reset(1, GET)
    proxy.reset(1, HEAD)
    assert storage.read_bytes("r.jpg") == PAYLOAD
    stat = storage.stat("r.jpg")
    assert stat is not None and stat.size == len(PAYLOAD)
    stats = storage.statistics()
    assert retries(stats, "get") == {"connection": 1}
    assert retries(stats, "head") == {"connection": 1}
    assert proxy.statistics().faults == {"reset": 2}


def test_a_stalled_response_is_cut_by_the_timeout_and_retried(
    proxy: FaultProxy, s3_server: SeaweedS3
) -> None:
    # A short timeout for the test; the stall itself lasts until the client hangs up.
    storage = through(proxy, s3_server, request_timeout=1.0)
    storage.write_atomic("s.jpg", PAYLOAD)
    proxy.stall(1, predicate=GET)
    assert storage.read_bytes("s.jpg") == PAYLOAD
    stats = storage.statistics()
    # At least the stall; a busy machine may add one of its own, retried just the same.
    assert retries(stats, "get").get("timeout", 0) >= 1
    assert proxy.statistics().faults == {"stall": 1}
    # The cut request is dropped by the proxy once it sees the client hang up.
    wait_for(lambda: proxy.statistics().stalled_now == 0, timeout=30)


@pytest.mark.parametrize("fault", ["slow_down", "reset", "server_error"])
def test_retries_exhausted_is_eio_naming_the_key_and_no_secret(
    proxy: FaultProxy, s3_server: SeaweedS3, fault: str
) -> None:
    storage = through(proxy, s3_server, max_retries=2)
    if fault == "slow_down":
        proxy.slow_down(50)
    elif fault == "reset":
        proxy.reset(50)
    else:
        proxy.fail(50, 500, "InternalError")
    with pytest.raises(OSError) as info:
        storage.write_atomic("deep/key/out.webp", PAYLOAD)
    error = info.value
    assert error.errno == errno.EIO
    assert type(error) is OSError  # not "not found", not "permission denied"
    message = str(error)
    assert f"{storage.root}/deep/key/out.webp" in message
    cause = {"slow_down": "throttled", "reset": "reset", "server_error": "server error"}
    assert cause[fault] in message and "after 2 retries" in message
    stats = storage.statistics()
    assert stats.requests["put"] == 3 and stats.failures == {"put": 1}
    assert proxy.statistics().requests == 3
    published = json.dumps(stats.to_dict())
    for text in (message, published):
        assert s3_server.secret_key not in text
        assert s3_server.access_key not in text
        assert "Debug source" not in text and "RetryError" not in text


def test_answers_are_not_retried(proxy: FaultProxy, s3_server: SeaweedS3) -> None:
    storage = through(proxy, s3_server)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("missing.jpg")
    assert proxy.statistics().requests == 1
    assert storage.stat("missing.jpg") is None
    assert proxy.statistics().requests == 2
    storage.create("lock", b"first")
    with pytest.raises(FileExistsError):
        storage.create("lock", b"second")  # 412: a lost precondition is an answer
    assert proxy.statistics().requests == 4
    stats = storage.statistics()
    assert stats.total_retries == 0
    assert stats.failures == {}  # answers, not failures


def test_a_refusal_is_not_retried(
    proxy: FaultProxy, s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3_env(monkeypatch, s3_server, secret="n0t-the-secret-at-all")
    storage = through(proxy, s3_server)
    with pytest.raises(PermissionError) as info:
        storage.write_atomic("denied.webp", PAYLOAD)
    assert "n0t-the-secret-at-all" not in str(info.value)
    assert proxy.statistics().requests == 1
    assert storage.statistics().failures == {"put": 1}


def test_the_latency_histogram_counts_every_request(
    proxy: FaultProxy, s3_server: SeaweedS3
) -> None:
    storage = through(proxy, s3_server)
    proxy.latency = 0.05  # every request takes at least 50 ms
    proxy.slow_down(2, PUT)
    proxy.reset(1, GET)
    storage.write_atomic("h/a.jpg", PAYLOAD)
    storage.write_atomic("h/b.jpg", PAYLOAD)
    assert storage.read_bytes("h/a.jpg") == PAYLOAD
    assert set(storage.list_files("h")) == {"a.jpg", "b.jpg"}
    assert storage.delete("h/b.jpg")  # a HEAD, then the DELETE
    stats = storage.statistics()
    seen = proxy.statistics()
    assert sum(h.count for h in stats.latency.values()) == seen.requests == 9
    for op, histogram in stats.latency.items():
        assert histogram.count == stats.requests[op]
        assert histogram.bounds == LATENCY_BUCKETS
        cumulative = dict(histogram.cumulative())
        assert cumulative[float("inf")] == histogram.count
        assert cumulative[0.025] == 0  # none under the added latency
        assert histogram.sum >= 0.05 * histogram.count
    assert stats.requests == {"put": 4, "get": 2, "list": 1, "head": 1, "delete": 1}
    document = stats.to_dict()
    assert document["latency_seconds"]["put"]["buckets"]["+Inf"] == 4
    assert document["retries"] == {"put": {"throttled": 2}, "get": {"connection": 1}}
    assert set(stats.retries_by_cause()) == set(CAUSES)


def test_counts_are_exact_with_many_threads_at_once(
    proxy: FaultProxy, s3_server: SeaweedS3
) -> None:
    storage = through(proxy, s3_server)
    storage.write_atomic("t.jpg", PAYLOAD)
    proxy.slow_down(12, GET)
    barrier = threading.Barrier(8)
    read: list[bytes] = []

    def reader() -> None:
        barrier.wait()
        read.extend(storage.read_bytes("t.jpg") for _ in range(3))

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert read == [PAYLOAD] * 24
    stats = storage.statistics()
    assert retries(stats, "get") == {"throttled": 12}
    assert stats.requests["get"] == 24 + 12 == stats.latency["get"].count
    assert proxy.statistics().by_method["GET"] == 36


def test_a_conditional_write_whose_answer_was_lost_is_not_taken_for_a_rival(
    proxy: FaultProxy, s3_server: SeaweedS3
) -> None:
    storage = through(proxy, s3_server)
    # The create lands but its answer is lost; the retry then meets that very object.
    proxy.lose_response(1, PUT)
    etag = storage.create("lock", b"owner=this-run")
    assert etag is not None
    assert storage.read_object("lock").etag == etag
    assert retries(storage.statistics(), "create") == {"connection": 1}
    # The same after a compare-and-swap.
    proxy.lose_response(1, PUT)
    newer = storage.replace_if("lock", b"owner=this-run renewed", etag)
    assert newer not in (None, etag)
    # An object that is not this write's stays a conflict, however uncertain the first try.
    proxy.lose_response(1, PUT)
    with pytest.raises(FileExistsError):
        storage.create("lock", b"owner=another-run")
    assert storage.read_bytes("lock") == b"owner=this-run renewed"


def test_the_proxy_relays_big_and_paged_exchanges_unchanged(
    proxy: FaultProxy, s3_server: SeaweedS3
) -> None:
    storage = through(proxy, s3_server)
    big = os.urandom(12 << 20)  # above obstore's multipart threshold
    storage.write_atomic("big/scan.tif", big)
    assert storage.read_bytes("big/scan.tif") == big
    names = {f"n{i:04d}.jpg" for i in range(30)}
    for name in names:
        storage.write_atomic(f"many/{name}", b"x")
    assert set(storage.list_files("many")) == names
    seen = proxy.statistics()
    assert seen.forwarded == seen.requests and seen.faults == {}
