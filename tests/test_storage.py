"""The storage backends, one set of test bodies over four of them: a local folder,
the in-memory fake, and an object store (obstore) on two real servers, SeaweedFS (S3)
and Azurite (Azure Blob; skipped where node is missing). Plus the URL parser, the
store factory and the access probe against those servers."""

from __future__ import annotations

import base64
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import obstore
import pytest

from optimizr.errors import UsageError
from optimizr.storage import LocalStorage, MemoryStorage, Storage, WalkOptions
from optimizr.storage.base import DEST_FOLDER
from optimizr.storage.objectstore import (
    MTIME_METADATA,
    OUTPUT_METADATA,
    ObjectStorage,
    StoreOptions,
    probe,
    storage_for,
)
from optimizr.storage.urls import Location, parse_location
from servers import AzuriteBlob, SeaweedS3, free_ports

BACKENDS = ["local", "memory", "s3", "azure"]
#: The backends that are object stores: ETags, user metadata, a store-stamped mtime.
OBJECT_STORES = ("s3", "azure")


def s3_env(monkeypatch: pytest.MonkeyPatch, server: SeaweedS3, secret: str | None = None) -> None:
    # The credentials reach obstore the way a user's do: AWS_* variables. Anything
    # else that could send it elsewhere (a profile, a token, instance metadata) goes.
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret or server.secret_key)


def s3_options(server: SeaweedS3, **kwargs: object) -> StoreOptions:
    fields: dict[str, object] = {"endpoint_url": server.endpoint, "region": "us-east-1"}
    return StoreOptions(s3_path_style=True, **{**fields, **kwargs})


def s3_storage(server: SeaweedS3, bucket: str | None = None, **kwargs: object) -> ObjectStorage:
    # A fresh prefix per test: the server and its bucket are shared by the session.
    url = f"s3://{bucket or server.bucket}/t-{uuid.uuid4().hex}"
    return storage_for(parse_location(url), s3_options(server, **kwargs))


def azure_env(monkeypatch: pytest.MonkeyPatch, server: AzuriteBlob, key: str | None = None) -> None:
    # The account reaches obstore the way a user's does: the AZURE_STORAGE_* variables.
    # Any other Azure setting in the environment (a SAS, a client secret, the emulator
    # switch) could send requests elsewhere: it goes.
    for name in list(os.environ):
        if name.startswith(("AZURE_", "AZURITE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", server.account)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", key or server.key)


def azure_storage(
    server: AzuriteBlob, container: str | None = None, **kwargs: object
) -> ObjectStorage:
    url = f"az://{container or server.container}/t-{uuid.uuid4().hex}"
    fields: dict[str, object] = {"endpoint_url": server.endpoint, **kwargs}
    return storage_for(parse_location(url), StoreOptions(**fields))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def storage(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Storage:
    if backend == "local":
        return LocalStorage(tmp_path / "tree")
    if backend == "memory":
        return MemoryStorage()
    monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
    if backend == "azure":
        azurite: AzuriteBlob = request.getfixturevalue("azure_server")
        azure_env(monkeypatch, azurite)
        return azure_storage(azurite)
    server: SeaweedS3 = request.getfixturevalue("s3_server")
    s3_env(monkeypatch, server)
    return s3_storage(server)


TREE = {
    "top.jpg": b"top",
    "a/1.jpg": b"one",
    "a/2.png": b"two!",
    "a/b/3.jpg": b"three",
    "d/4.jpg": b"four",
    "c/5.jpg": b"five",
    "c/.optimizr/manifest.sqlite": b"another run's DEST",
    ".optimizr/manifest.sqlite": b"this tree's own state",
}


def fill(storage: Storage, files: dict[str, bytes] = TREE) -> None:
    for key, data in files.items():
        storage.write_atomic(key, data)


def walked(storage: Storage, options: WalkOptions | None = None) -> list[tuple[str, list[str]]]:
    return [
        (listing.directory, [e.key for e in listing.entries])
        for listing in storage.walk(options or WalkOptions())
        if listing.skipped is None
    ]


def test_walk_groups_files_by_directory_in_order(storage: Storage) -> None:
    fill(storage)
    assert walked(storage) == [
        ("", ["top.jpg"]),
        ("a", ["a/1.jpg", "a/2.png"]),
        ("a/b", ["a/b/3.jpg"]),
        ("d", ["d/4.jpg"]),
    ]


def test_walk_passes_over_other_dests_and_never_enters_state_dirs(storage: Storage) -> None:
    fill(storage)
    listings = list(storage.walk(WalkOptions()))
    skipped = [(x.directory, x.skipped) for x in listings if x.skipped is not None]
    assert skipped == [("c", DEST_FOLDER)]
    keys = [e.key for x in listings for e in x.entries]
    assert not [k for k in keys if ".optimizr" in k or k.startswith("c/")]


def test_walk_entries_carry_size(storage: Storage) -> None:
    fill(storage)
    sizes = {e.key: e.size for x in storage.walk(WalkOptions()) for e in x.entries}
    assert sizes == {k: len(v) for k, v in TREE.items() if "optimizr" not in k and "c/" not in k}


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (WalkOptions(include=("*.jpg",)), ["top.jpg", "a/1.jpg", "a/b/3.jpg", "d/4.jpg"]),
        (WalkOptions(exclude=("a/b/**",)), ["top.jpg", "a/1.jpg", "a/2.png", "d/4.jpg"]),
        (WalkOptions(exclude=("*.png", "d")), ["top.jpg", "a/1.jpg", "a/b/3.jpg"]),
        (WalkOptions(prune=("a",)), ["top.jpg", "d/4.jpg"]),
    ],
)
def test_walk_honours_include_exclude_prune(
    storage: Storage, options: WalkOptions, expected: list[str]
) -> None:
    fill(storage)
    assert [k for _, keys in walked(storage, options) for k in keys] == expected


def test_write_read_stat_list_delete(storage: Storage, backend: str) -> None:
    before = time.time_ns()
    storage.write_atomic("x/photo.webp", b"RIFF....WEBP")
    storage.write_atomic("x/y/deeper.jpg", b"jpeg")
    assert storage.read_bytes("x/photo.webp") == b"RIFF....WEBP"
    st = storage.stat("x/photo.webp")
    assert st is not None and st.size == 12
    # Object stores stamp last-modified themselves (to the second, on S3 and Azure).
    assert before - 2_000_000_000 <= st.mtime_ns <= time.time_ns() + 2_000_000_000
    assert (st.etag is not None) == (backend in OBJECT_STORES)
    assert set(storage.list_files("x")) == {"photo.webp"}
    listed = storage.list_files("x")["photo.webp"]
    assert listed.size == 12
    # The listing carries the same evidence as a HEAD: no HEAD per object on a re-run.
    assert listed.etag == st.etag
    walked_etags = [e.etag for x in storage.walk(WalkOptions()) for e in x.entries]
    assert walked_etags[0] == st.etag and len(walked_etags) == 2
    assert all((etag is not None) == (backend in OBJECT_STORES) for etag in walked_etags)
    storage.write_atomic("x/photo.webp", b"replaced")
    assert storage.read_bytes("x/photo.webp") == b"replaced"
    assert storage.delete("x/photo.webp") is True
    assert storage.stat("x/photo.webp") is None
    assert storage.list_files("x") == {}
    assert storage.read_bytes("x/y/deeper.jpg") == b"jpeg"


def test_missing_keys(storage: Storage) -> None:
    storage.write_atomic("here.jpg", b"x")
    assert storage.stat("nope.jpg") is None
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("nope.jpg")
    assert storage.delete("nope.jpg") is False
    assert storage.list_files("no/such/dir") == {}
    assert storage.remove_stale_temporaries() == 0


def test_copy_in_from_another_storage(storage: Storage) -> None:
    source = MemoryStorage({"src/raw.cr2": b"raw bytes" * 100})
    assert storage.copy_in("out/raw.cr2", source, "src/raw.cr2") == 900
    assert storage.read_bytes("out/raw.cr2") == b"raw bytes" * 100


def test_large_object_round_trip(storage: Storage) -> None:
    # 12 MB: above obstore's multipart chunk size, so S3 sees a multipart upload.
    data = os.urandom(12 * 1024 * 1024)
    storage.write_atomic("big/blob.bin", data)
    assert storage.read_bytes("big/blob.bin") == data
    st = storage.stat("big/blob.bin")
    assert st is not None and st.size == len(data)


def test_a_reader_sees_the_old_or_the_whole_new_object(storage: Storage) -> None:
    old, new = b"o" * (3 << 20), b"n" * (4 << 20)
    storage.write_atomic("k.bin", old)
    seen: list[bytes] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append(storage.read_bytes("k.bin"))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(6):
            storage.write_atomic("k.bin", new if i % 2 == 0 else old)
    finally:
        stop.set()
        reader.join(60)
    assert seen
    assert all(data in (old, new) for data in seen)


def test_preserve_mtime_sets_mtime_only_where_a_store_can(storage: Storage, backend: str) -> None:
    then = 1_600_000_000_000_000_000
    storage.write_atomic("old.webp", b"w", mtime_ns=then)
    st = storage.stat("old.webp")
    assert st is not None
    if backend in OBJECT_STORES:
        assert isinstance(storage, ObjectStorage)
        assert st.mtime_ns != then  # documented: the store stamps last-modified itself
        attributes = obstore.get(storage.store, storage._full("old.webp")).attributes
        assert attributes.get("Content-Type") == "image/webp"
        assert storage.read_object("old.webp").metadata.get(MTIME_METADATA) == str(then)
    else:
        assert st.mtime_ns == then


# ---- URLs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("s3://bucket/photos/2024/", Location("s3", "bucket", "photos/2024")),
        ("s3://my.bucket", Location("s3", "my.bucket", "")),
        ("gs://gbucket/a", Location("gs", "gbucket", "a")),
        ("az://container/p/q", Location("az", "container", "p/q")),
        ("memory://pre", Location("memory", prefix="pre")),
        ("file:///srv/photos", Location("local", path=Path("/srv/photos"))),
        ("file://localhost/srv/a%20b", Location("local", path=Path("/srv/a b"))),
        ("photos/raw", Location("local", path=Path("photos/raw"))),
        ("/abs/dir", Location("local", path=Path("/abs/dir"))),
    ],
)
def test_parse_location(argument: str, expected: Location) -> None:
    assert parse_location(argument) == expected


@pytest.mark.parametrize(
    ("argument", "says"),
    [
        ("s3://", "without a bucket"),
        ("s3:///prefix", "without a bucket"),
        ("s3://Bad_Bucket/x", "not a valid bucket"),
        ("az://a--b/x", "not a valid bucket"),
        ("s3://bucket/a//b", "empty, '.' or '..'"),
        ("gs://bucket/a/../b", "empty, '.' or '..'"),
        ("s3://bucket/x?versionId=1", "no query"),
        ("http://example.com/x", "unknown URL scheme"),
        ("abfs://c@acct.dfs.core.windows.net/x", "az://container/prefix"),
        ("file://otherhost/x", "only local files"),
        ("", "empty path"),
    ],
)
def test_parse_location_refuses_malformed_urls(argument: str, says: str) -> None:
    with pytest.raises(UsageError, match=None) as info:
        parse_location(argument)
    assert says in str(info.value)


def test_credentials_in_a_url_are_refused_without_echoing_them() -> None:
    with pytest.raises(UsageError) as info:
        parse_location("s3://AKIAEXAMPLE:sup3rs3cret@bucket/x")
    assert "sup3rs3cret" not in str(info.value)
    assert "AKIAEXAMPLE" not in str(info.value)


def test_location_url_is_canonical() -> None:
    assert parse_location("s3://bucket/a/b/").url() == "s3://bucket/a/b"
    assert parse_location("gs://bucket").url() == "gs://bucket"


def test_a_profile_that_is_nowhere_or_not_for_s3_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    with pytest.raises(UsageError, match="'prod' is in neither"):
        storage_for(parse_location("s3://bucket/x"), StoreOptions(profile="prod"))
    with pytest.raises(UsageError, match="is not on S3"):
        storage_for(parse_location("gs://bucket/x"), StoreOptions(profile="prod"))


def test_object_storage_over_obstore_local_store(tmp_path: Path) -> None:
    # file:// goes through obstore's LocalStore: the same code path as the buckets.
    storage = storage_for(parse_location(f"file://{tmp_path}/out"))
    storage.write_atomic("a/b.webp", b"webp")
    assert (tmp_path / "out" / "a" / "b.webp").read_bytes() == b"webp"
    assert walked(storage) == [("a", ["a/b.webp"])]


# ---- the probe, against the real servers ------------------------------------------------


@dataclass(frozen=True)
class Remote:
    """One of the session's real object stores, reached the way a user reaches it."""

    scheme: str
    #: The bucket (S3) or container (Azure) the server holds.
    bucket: str
    endpoint: str
    #: Credentials in force: none may appear in a message.
    secrets: tuple[str, ...]
    #: make(bucket=None, **StoreOptions fields): a storage under a fresh prefix.
    make: Callable[..., ObjectStorage]
    #: Put this secret in the environment in place of the right one.
    use_secret: Callable[[str], None]

    def endpoint_on_port(self, port: int) -> str:
        return urlsplit(self.endpoint)._replace(netloc=f"127.0.0.1:{port}").geturl()


@pytest.fixture(params=OBJECT_STORES)
def remote(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Remote:
    if request.param == "azure":
        azurite: AzuriteBlob = request.getfixturevalue("azure_server")
        azure_env(monkeypatch, azurite)
        return Remote(
            "az",
            azurite.container,
            azurite.endpoint,
            (azurite.key,),
            lambda container=None, **kw: azure_storage(azurite, container, **kw),
            lambda secret: azure_env(monkeypatch, azurite, key=secret),
        )
    server: SeaweedS3 = request.getfixturevalue("s3_server")
    s3_env(monkeypatch, server)
    return Remote(
        "s3",
        server.bucket,
        server.endpoint,
        (server.access_key, server.secret_key),
        lambda bucket=None, **kw: s3_storage(server, bucket, **kw),
        lambda secret: s3_env(monkeypatch, server, secret=secret),
    )


#: A wrong secret, in a form both services accept as one (Azure's key is base64).
WRONG_SECRET = base64.b64encode(b"wr0ng-s3cret-value-that-must-not-leak").decode()


def test_probe_lists_and_writes_leaving_nothing(remote: Remote) -> None:
    storage = remote.make()
    probe(storage, write=False)
    probe(storage, write=True)
    assert storage.list_files(".optimizr") == {}


@pytest.mark.parametrize("write", [False, True])
def test_probe_names_a_missing_bucket(remote: Remote, write: bool) -> None:
    storage = remote.make("no-such-bucket-here")
    with pytest.raises(UsageError) as info:
        probe(storage, write=write)
    assert f"{remote.scheme}://no-such-bucket-here/" in str(info.value)
    assert "does not exist" in str(info.value)


def test_probe_names_an_unreachable_endpoint(remote: Remote) -> None:
    (port,) = free_ports(1)  # nothing listens there
    storage = remote.make(
        endpoint_url=remote.endpoint_on_port(port), max_retries=0, retry_timeout=5
    )
    with pytest.raises(UsageError) as info:
        probe(storage, write=True)
    assert f"{remote.scheme}://{remote.bucket}/t-" in str(info.value)
    assert "unreachable" in str(info.value)


def test_wrong_secret_is_one_clear_error_and_no_secret_leaks(remote: Remote) -> None:
    remote.use_secret(WRONG_SECRET)
    storage = remote.make()
    with pytest.raises(UsageError) as info:
        probe(storage, write=True)
    message = str(info.value)
    assert "wrong credentials" in message and f"{remote.scheme}://{remote.bucket}/" in message
    for text in (message, storage.describe(), repr(storage)):
        for secret in (WRONG_SECRET, *remote.secrets):
            assert secret not in text


def test_denied_write_is_a_permission_error(remote: Remote) -> None:
    remote.use_secret(WRONG_SECRET)
    storage = remote.make()
    with pytest.raises(PermissionError) as info:
        storage.write_atomic("a.webp", b"x")
    assert "a.webp" in str(info.value)
    assert WRONG_SECRET not in str(info.value)


def test_azure_without_an_account_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Refused when the store is made, before any request (none could be signed).
    for name in list(os.environ):
        if name.startswith(("AZURE_", "AZURITE_")):
            monkeypatch.delenv(name)
    with pytest.raises(UsageError) as info:
        storage_for(parse_location("az://photos/2024"))
    assert "az://photos/2024" in str(info.value)
    assert "AZURE_STORAGE_ACCOUNT_NAME" in str(info.value)


def test_azure_emulator_switch_reaches_azurite(
    azure_server: AzuriteBlob, monkeypatch: pytest.MonkeyPatch
) -> None:
    # AZURE_STORAGE_USE_EMULATOR, as obstore reads it: Azurite's URL from
    # AZURITE_BLOB_STORAGE_URL (default http://127.0.0.1:10000), no --endpoint-url.
    azure_env(monkeypatch, azure_server)
    monkeypatch.setenv("AZURE_STORAGE_USE_EMULATOR", "true")
    service = urlsplit(azure_server.endpoint)
    monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", f"{service.scheme}://{service.netloc}")
    location = parse_location(f"az://{azure_server.container}/t-{uuid.uuid4().hex}")
    storage = storage_for(location, StoreOptions())
    probe(storage, write=True)
    storage.write_atomic("e.jpg", b"emulated")
    assert storage.read_bytes("e.jpg") == b"emulated"


def test_write_if_absent_refuses_a_key_that_exists(storage: Storage) -> None:
    storage.write_atomic("k/one.webp", b"first", if_absent=True)
    with pytest.raises(FileExistsError):
        storage.write_atomic("k/one.webp", b"second", if_absent=True)
    assert storage.read_bytes("k/one.webp") == b"first"
    storage.write_atomic("k/one.webp", b"third")  # a plain write still replaces
    assert storage.read_bytes("k/one.webp") == b"third"


def test_of_writers_racing_on_one_key_if_absent_exactly_one_wins(storage: Storage) -> None:
    barrier = threading.Barrier(6)
    won: list[bytes] = []
    lost: list[bytes] = []

    def write(data: bytes) -> None:
        barrier.wait()
        try:
            storage.write_atomic("race.webp", data, if_absent=True)
            won.append(data)
        except FileExistsError:
            lost.append(data)

    threads = [threading.Thread(target=write, args=(b"w%d" % n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(lost) == 5
    assert storage.read_bytes("race.webp") == won[0]


def test_read_object_gives_the_etag_of_the_bytes_read(storage: Storage, backend: str) -> None:
    storage.write_atomic("e/x.jpg", b"version one")
    first = storage.read_object("e/x.jpg")
    assert first.data == b"version one"
    if backend not in OBJECT_STORES:
        return  # a filesystem has no ETag
    listed = storage.list_files("e")["x.jpg"]
    assert first.etag is not None and first.etag == listed.etag
    storage.write_atomic("e/x.jpg", b"version two")
    assert storage.read_object("e/x.jpg").etag not in (None, first.etag)


def test_outputs_carry_type_marker_and_cache_control(remote: Remote) -> None:
    storage = remote.make(cache_control="public, max-age=31536000")
    storage.write_atomic("p/a.webp", b"RIFF")
    storage.write_atomic("p/a.jpg", b"jpeg")  # a copied original: no marker, no type forced
    out = obstore.get(storage.store, storage._full("p/a.webp")).attributes
    assert out["Content-Type"] == "image/webp"
    assert out["Cache-Control"] == "public, max-age=31536000"
    assert storage.read_object("p/a.webp").metadata.get(OUTPUT_METADATA)
    assert OUTPUT_METADATA not in storage.read_object("p/a.jpg").metadata


def test_replace_if_is_a_compare_and_swap(remote: Remote) -> None:
    storage = remote.make()
    etag = storage.create("lock", b"a")
    assert etag
    with pytest.raises(FileExistsError):
        storage.create("lock", b"b")
    newer = storage.replace_if("lock", b"c", etag)
    assert newer and newer != etag
    with pytest.raises(FileExistsError):
        storage.replace_if("lock", b"d", etag)  # stale: another writer got there first
    assert storage.read_bytes("lock") == b"c"


def test_s3_signed_urls_fetch_the_objects_and_chunks_stream_them(
    s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    import urllib.request
    from datetime import timedelta

    s3_env(monkeypatch, s3_server)
    storage = s3_storage(s3_server)
    objects = {"a/one two.webp": b"first", "a/plus+hash#.webp": b"second" * 1000}
    for key, data in objects.items():
        storage.write_atomic(key, data)
    urls = storage.signed_urls(list(objects), timedelta(minutes=5))
    for url, data in zip(urls, objects.values(), strict=True):
        assert url.startswith(f"{s3_server.endpoint}/") and "X-Amz-Expires=300" in url
        with urllib.request.urlopen(url, timeout=30) as response:  # no credentials of its own
            assert response.read() == data
    big = bytes(range(256)) * 9000
    storage.write_atomic("big.bin", big)
    chunks = list(storage.iter_chunks("big.bin", chunk_size=1 << 20))
    assert b"".join(chunks) == big and len(chunks) >= 2
    with pytest.raises(FileNotFoundError):
        list(storage.iter_chunks("missing.bin"))


def test_only_cloud_stores_sign(tmp_path: Path) -> None:
    from datetime import timedelta

    local = storage_for(parse_location(str(tmp_path)))
    with pytest.raises(UsageError, match="only s3://, gs:// and az://"):
        local.signed_urls(["a.webp"], timedelta(minutes=1))


def test_incomplete_credentials_are_a_usage_error_before_any_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDONLY")  # and no secret
    options = StoreOptions(endpoint_url="http://127.0.0.1:9", region="us-east-1")
    with pytest.raises(UsageError) as info:
        storage_for(parse_location("s3://half-configured/x"), options)
    message = str(info.value)
    assert "s3://half-configured/x" in message and "missing SecretAccessKey" in message
    assert "AKIDONLY" not in message


def _private_bytes() -> int:
    """This process's anonymous resident memory (RssAnon): what it allocated itself,
    not the page cache of files it maps."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def _private_growth_during(action: Callable[[], object]) -> int:
    """How far this process's private memory rose above its level before ``action``,
    sampled every millisecond while it runs (obstore releases the GIL while it sends)."""
    before = peak = _private_bytes()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _private_bytes())
            done.wait(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        action()
    finally:
        done.set()
        sampler.join()
    return max(peak, _private_bytes()) - before


def test_write_from_file_holds_no_copy_of_the_file(remote: Remote, tmp_path: Path) -> None:
    # The coordinator uploads the manifest's snapshot with write_from_file every
    # --checkpoint-interval; the manifest grows with every file of the run (issue 15:
    # the coordinator's peak RSS grew 1.18x from 1,000 to 20,000 images). Reading it
    # into memory made the coordinator's memory grow with the run: a snapshot of one
    # part was held whole, a larger one two 5 MiB parts at a time.
    storage = remote.make()
    small, large = tmp_path / "small.bin", tmp_path / "large.bin"
    small.write_bytes(os.urandom(3 << 20))  # one PUT
    large.write_bytes(os.urandom((16 << 20) + 12345))  # a multipart upload, a short last part
    # The client's own first-request setup (connection, TLS-free here, signing) apart.
    warm = tmp_path / "warm-up.bin"
    warm.write_bytes(b"x")
    storage.write_from_file(warm.name, warm)
    grown = {
        path.name: _private_growth_during(lambda p=path: storage.write_from_file(p.name, p))
        for path in (small, large)
    }
    # Both as sent, whatever the upload's shape.
    for path in (small, large):
        assert storage.read_bytes(path.name) == path.read_bytes()
    # Before, 3 and 10 MiB; the margin is for the interpreter's own allocations meanwhile.
    assert grown["small.bin"] < 1 << 20, grown
    assert grown["large.bin"] < 1 << 20, grown
