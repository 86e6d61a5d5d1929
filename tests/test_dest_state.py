"""The manifest's snapshot in a remote DEST (optimizr.dest_state): uploaded gzip'd,
restored from either form, the newer of two winning, a damaged one refused. The same
bodies over a local folder, the in-memory fake and SeaweedFS (S3)."""

from __future__ import annotations

import gzip
import os
import sqlite3
import tracemalloc
import zlib
from pathlib import Path

import pytest

from optimizr.dest_state import (
    CHUNK_BYTES,
    SNAPSHOT_ETAG_NAME,
    SNAPSHOT_KEY,
    Checkpointer,
    _inflate,
    download_snapshot,
    find_snapshot,
    restore,
    snapshot_forms,
)
from optimizr.manifest import MANIFEST_NAME, Manifest, manifest_path, state_dir
from optimizr.storage import LocalStorage, MemoryStorage, Storage
from servers import SeaweedS3
from test_storage import s3_env, s3_storage

PLAIN_KEY = f".optimizr/{MANIFEST_NAME}"


@pytest.fixture(params=["local", "memory", "s3"])
def dest(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "dest")
    if request.param == "memory":
        return MemoryStorage()
    server: SeaweedS3 = request.getfixturevalue("s3_server")
    s3_env(request.getfixturevalue("monkeypatch"), server)
    return s3_storage(server)


def make_manifest(root: Path, rows: int) -> Manifest:
    """A manifest of ``rows`` done rows, as a run records them (random ETags, as S3's
    are: the part of a row that does not compress)."""
    manifest = Manifest.open(root)
    for n in range(rows):
        manifest.record(
            f"photos/{n // 100:04d}/IMG_{n:06d}.jpg",
            size=3_000_000 + n,
            mtime_ns=1_700_000_000_000_000_000 + n * 7919,
            checked_ns=1_700_000_100_000_000_000,
            fingerprint="0123456789abcdef",
            status="done",
            output=f"photos/{n // 100:04d}/IMG_{n:06d}.webp",
            output_size=400_000 + n,
            attempts=1,
            etag=f'"{os.urandom(16).hex()}"',
        )
    assert manifest.flush()
    return manifest


def sources(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {f"{d}/{n}" for d, n in conn.execute("SELECT dir, name FROM files")}


def test_a_snapshot_goes_up_gzipd_and_inflates_to_the_whole_manifest(
    dest: Storage, tmp_path: Path
) -> None:
    manifest = make_manifest(tmp_path / "a", 3000)
    checkpointer = Checkpointer(dest, tmp_path / "a", 60.0)
    assert checkpointer.upload(), checkpointer.stats.last_error
    manifest.close()
    packed = dest.read_bytes(SNAPSHOT_KEY)
    assert packed[:2] == b"\x1f\x8b"  # gzip: a user can gunzip it and open it in sqlite3
    inflated = tmp_path / "inflated.sqlite"
    inflated.write_bytes(gzip.decompress(packed))
    assert sources(inflated) == sources(manifest_path(tmp_path / "a"))
    stats = checkpointer.stats.to_dict()
    assert stats["upload_bytes"] == len(packed)
    assert stats["manifest_bytes"] == len(inflated.read_bytes())
    # Mostly paths and hex: what goes up is well under half the manifest.
    assert len(packed) < 0.5 * len(inflated.read_bytes())
    assert PLAIN_KEY not in {f".optimizr/{name}" for name in dest.list_files(".optimizr")}
    # The temporaries beside the manifest are gone.
    assert not list(state_dir(tmp_path / "a").glob(".snapshot-*"))


def test_another_machine_restores_the_gzipd_snapshot_and_knows_it_after(
    dest: Storage, tmp_path: Path
) -> None:
    make_manifest(tmp_path / "a", 500).close()
    assert Checkpointer(dest, tmp_path / "a", 60.0).upload()
    assert restore(dest, tmp_path / "b")
    assert sources(manifest_path(tmp_path / "b")) == sources(manifest_path(tmp_path / "a"))
    # Its ETag remembered: the next run on that machine downloads nothing.
    assert (state_dir(tmp_path / "b") / SNAPSHOT_ETAG_NAME).exists() == (
        dest.list_files(".optimizr")[f"{MANIFEST_NAME}.gz"].etag is not None
    )
    if dest.list_files(".optimizr")[f"{MANIFEST_NAME}.gz"].etag is not None:
        assert not restore(dest, tmp_path / "b")
    assert not list(state_dir(tmp_path / "b").glob("*.download*"))


def test_a_plain_snapshot_an_older_version_uploaded_is_still_restored(
    dest: Storage, tmp_path: Path
) -> None:
    make_manifest(tmp_path / "old", 200).close()
    dest.write_atomic(PLAIN_KEY, manifest_path(tmp_path / "old").read_bytes())
    assert find_snapshot(dest) is not None and find_snapshot(dest)[0] == PLAIN_KEY  # type: ignore[index]
    assert restore(dest, tmp_path / "new")
    assert sources(manifest_path(tmp_path / "new")) == sources(manifest_path(tmp_path / "old"))


def test_of_two_forms_the_newer_is_the_snapshot(tmp_path: Path) -> None:
    # A local DEST: its mtimes can be set (an object store stamps its own).
    dest = LocalStorage(tmp_path / "dest")
    make_manifest(tmp_path / "gz", 30).close()
    make_manifest(tmp_path / "plain", 40).close()
    assert Checkpointer(dest, tmp_path / "gz", 60.0).upload()
    dest.write_atomic(PLAIN_KEY, manifest_path(tmp_path / "plain").read_bytes())
    gz, plain = (tmp_path / "dest" / key for key in snapshot_forms(SNAPSHOT_KEY))
    for newer, older, expected in ((plain, gz, "plain"), (gz, plain, "gz")):
        os.utime(older, ns=(1_700_000_000_000_000_000,) * 2)
        os.utime(newer, ns=(1_700_000_001_000_000_000,) * 2)
        root = tmp_path / f"restored-{expected}"
        assert restore(dest, root)
        assert sources(manifest_path(root)) == sources(manifest_path(tmp_path / expected))
    # The same mtime: the compressed one (what this version writes).
    os.utime(plain, ns=(1_700_000_001_000_000_000,) * 2)
    assert find_snapshot(dest)[0] == SNAPSHOT_KEY  # type: ignore[index]


def test_a_damaged_snapshot_is_refused_and_the_local_manifest_kept(
    dest: Storage, tmp_path: Path
) -> None:
    make_manifest(tmp_path / "a", 300).close()
    assert Checkpointer(dest, tmp_path / "a", 60.0).upload()
    packed = dest.read_bytes(SNAPSHOT_KEY)
    local = make_manifest(tmp_path / "b", 5)
    local.close()
    before = manifest_path(tmp_path / "b").read_bytes()
    for damaged in (packed[: len(packed) // 2], packed + b"junk", b"\x1f\x8b" + b"\0" * 64):
        dest.write_atomic(SNAPSHOT_KEY, damaged)
        with pytest.raises(OSError, match=r"manifest\.sqlite\.gz is damaged"):
            restore(dest, tmp_path / "b")
        assert manifest_path(tmp_path / "b").read_bytes() == before
        assert sorted(p.name for p in state_dir(tmp_path / "b").iterdir()) == [MANIFEST_NAME]


def test_a_snapshot_deleted_under_the_reader_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        download_snapshot(MemoryStorage(), SNAPSHOT_KEY, tmp_path / "m.sqlite")
    assert list(tmp_path.iterdir()) == []


def test_inflating_takes_bounded_steps_whatever_the_ratio(tmp_path: Path) -> None:
    # 64 MiB of one byte deflate to 64 KiB: inflated in one call, it would be 64 MiB of
    # memory at once. In steps of CHUNK_BYTES the peak is a few of them.
    big = 64 * 1024 * 1024
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    packed = tmp_path / "zeros.gz"
    with packed.open("wb") as fh:
        for _ in range(big // CHUNK_BYTES):
            fh.write(packer.compress(b"\0" * CHUNK_BYTES))
        fh.write(packer.flush())
    assert packed.stat().st_size < big // 500
    tracemalloc.start()
    try:
        _inflate(packed, tmp_path / "zeros")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (tmp_path / "zeros").stat().st_size == big
    assert peak < 4 * CHUNK_BYTES
