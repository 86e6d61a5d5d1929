"""``optimizr urls DEST``: every converted output with its URL, read from the manifest.

Local DESTs are made by real conversions; remote ones on the real SeaweedFS S3
server, with the outputs and manifest of a real conversion put in the bucket by
the test (the convert side does not write to buckets yet). Pre-signed URLs are
fetched from 127.0.0.1 and must return the object's exact bytes.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes, unquote, unquote_to_bytes, urlsplit
from urllib.request import urlopen

import pytest
from click.testing import CliRunner, Result

import optimizr.manifest as manifest_module
from conftest import age, manifest_rows, photo_array, save_jpeg, save_png
from optimizr.cli import main
from optimizr.dest_state import SNAPSHOT_KEY
from optimizr.errors import UsageError
from optimizr.filenames import key_from_fields
from optimizr.manifest import Manifest
from optimizr.output_urls import (
    DONE_ROWS,
    MAX_EXPIRES,
    UrlsConfig,
    encode_key,
    parse_duration,
    write_output_urls,
)
from optimizr.storage.objectstore import ObjectStorage
from servers import SeaweedS3
from test_pages import multi_page_tiff
from test_storage import s3_env, s3_storage

ROOT = Path(__file__).resolve().parent.parent
fs = os.fsdecode
#: Names that need encoding in a URL, and one that is not UTF-8 (local DESTs only:
#: S3 keys are UTF-8 by definition).
AWKWARD = ["two words.jpg", "plus+sign.jpg", "hash#and?query.jpg", "ünï/cödé 写真.jpg"]
LATIN1 = fs(b"caf\xe9.jpg")


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def convert_library(tmp_path: Path, *, latin1: bool = True, pages: bool = True) -> Path:
    """A real conversion of a few generated images (awkward names, a multi-page
    TIFF, a file that is not an image); DEST's path."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    for seed, name in enumerate(AWKWARD):
        save_jpeg(src / name, photo_array(96, 64, seed))
    save_png(src / "deep/er/icon.png", photo_array(32, 32, 9))
    if latin1:
        save_jpeg(src / LATIN1, photo_array(64, 48, 7))
    if pages:
        multi_page_tiff(src / "scan.tif")
    (src / "notes.txt").write_text("not an image: skipped, never listed")
    age(src)
    extra = ["--pages", "all"] if pages else []
    result = run("convert", src, dest, "--no-progress", *extra)
    assert result.exit_code == 0, result.output
    return dest


def done_outputs(dest: Path) -> dict[str, tuple[str, int]]:
    """output key -> (source key, output_size) of every done row, read with sqlite3."""
    return {
        str(row["output"]): (str(row["path"]), int(row["output_size"]))  # type: ignore[call-overload]
        for row in manifest_rows(dest).values()
        if row["status"] == "done"
    }


def parse_csv(text: str) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    assert reader.fieldnames == ["source", "output", "bytes", "url"]
    return list(reader)


def parse_jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


# -- local DEST -------------------------------------------------------------------------


def test_local_dest_lists_every_done_row_once_with_its_bytes_and_file_uri(
    tmp_path: Path,
) -> None:
    dest = convert_library(tmp_path)
    result = run("urls", dest)
    assert result.exit_code == 0, result.output
    lines = parse_csv(result.stdout)
    done = done_outputs(dest)
    firsts = [line for line in lines if line["bytes"]]
    # Every done row once, as its main output, with the manifest's size...
    assert len(firsts) == len(done) == len({line["output"] for line in firsts})
    for line in firsts:
        key = line["output"] if "\\x" not in line["output"] else fs(b"caf\xe9.webp")
        source, size = done[key]
        assert int(line["bytes"]) == size == (dest / key).stat().st_size
        # ... and a file:// URI that leads, byte for byte, to the output.
        parts = urlsplit(line["url"])
        assert parts.scheme == "file" and not parts.query and not parts.fragment
        path = Path(fs(unquote_to_bytes(parts.path)))
        assert path == (dest / key).resolve()
        assert path.read_bytes() == (dest / key).read_bytes()
    # The skipped text file is no output; the multi-page scan has three.
    assert not any(line["source"] == "notes.txt" for line in lines)
    scan = [line for line in lines if line["source"] == "scan.tif"]
    assert [line["output"] for line in scan] == ["scan.webp", "scan.p2.webp", "scan.p3.webp"]
    assert scan[0]["bytes"] and not scan[1]["bytes"]  # pages 2+: no size in the manifest
    assert all((dest / line["output"]).is_file() for line in scan)
    assert "file" in result.stderr and f"{len(lines)} outputs" in result.stderr


def test_jsonl_carries_exact_keys_that_are_not_utf8(tmp_path: Path) -> None:
    dest = convert_library(tmp_path)
    result = run("urls", dest, "--format", "jsonl")
    assert result.exit_code == 0, result.output
    items = parse_jsonl(result.stdout)
    done = done_outputs(dest)
    by_output = {key_from_fields(item, "output"): item for item in items}
    assert set(done) <= set(by_output)
    for output, (source, size) in done.items():
        item = by_output[output]
        assert key_from_fields(item, "source") == source
        assert item["bytes"] == size
    cafe = by_output[fs(b"caf\xe9.webp")]
    assert cafe["source"] == "caf\\xe9.jpg" and "source_bytes" in cafe  # shown; exact
    assert unquote_to_bytes(urlsplit(cafe["url"]).path).endswith(b"/caf\xe9.webp")
    # The CSV of the same DEST shows the name escaped, its url exact.
    lines = parse_csv(run("urls", dest).stdout)
    [row] = [line for line in lines if line["source"] == "caf\\xe9.jpg"]
    assert row["url"] == cafe["url"]


def test_base_url_is_the_base_plus_each_segment_percent_encoded(tmp_path: Path) -> None:
    dest = convert_library(tmp_path, latin1=False)
    result = run("urls", dest, "--base-url", "https://cdn.example.com/img", "--format", "jsonl")
    assert result.exit_code == 0, result.output
    items = parse_jsonl(result.stdout)
    assert {item["output"] for item in items} >= set(done_outputs(dest))
    for item in items:
        parts = urlsplit(item["url"])
        # Nothing of a key is read as a query, a fragment or another host...
        assert (parts.scheme, parts.netloc, parts.query, parts.fragment) == (
            "https",
            "cdn.example.com",
            "",
            "",
        )
        # ... the path is the base's, then the key relative to DEST, exactly.
        assert unquote(parts.path, errors="strict") == "/img/" + item["output"]
        assert not set(parts.path) & set(" +#?")
    urls = {item["output"]: item["url"] for item in items}
    assert urls["hash#and?query.webp"] == "https://cdn.example.com/img/hash%23and%3Fquery.webp"
    assert urls["plus+sign.webp"].endswith("/plus%2Bsign.webp")
    assert urls["ünï/cödé 写真.webp"].startswith("https://cdn.example.com/img/%C3%BCn%C3%AF/")


def test_key_encoding_agrees_with_urllib_on_every_kind_of_character() -> None:
    # urllib's quote_from_bytes over the exact bytes is the reference; encode_key
    # takes a faster way and must never differ from it.
    pool = "aZ09-._~/ +#?%&=;:@!$'()*,[]\"\\\t\n" + "éü写真😀\u202e" + fs(b"\xe9\xff")
    rng = random.Random(11)
    keys = ["".join(rng.choice(pool) for _ in range(rng.randrange(1, 24))) for _ in range(2000)]
    for key in keys:
        assert encode_key(key) == quote_from_bytes(os.fsencode(key), safe="/"), repr(key)


def test_a_reader_that_stops_early_ends_the_listing_quietly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "dest"
    synthetic_manifest(dest, 5000, monkeypatch)  # far more than a pipe holds
    with subprocess.Popen(
        [str(Path(sys.executable).parent / "optimizr"), "urls", str(dest)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        assert process.stdout.readline() == b"source,output,bytes,url\n"
        process.stdout.close()  # as `| head -1` does
        stderr = process.stderr.read()
        assert process.wait(timeout=120) == 141
    assert stderr == b""


def test_output_file_is_written_whole_and_stdout_stays_empty(tmp_path: Path) -> None:
    dest = convert_library(tmp_path, latin1=False, pages=False)
    target = tmp_path / "out" / "urls.csv"
    target.parent.mkdir()
    result = run("urls", dest, "-o", target)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert len(parse_csv(target.read_text())) == len(done_outputs(dest))
    assert os.listdir(target.parent) == ["urls.csv"]  # no temporary left beside it


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--expires", "1d"], "file:// URLs do not expire"),
        (["--base-url", "ftp://cdn.example.com/"], "not an http:// or https:// URL"),
        (["--base-url", "https://cdn.example.com/?sig=1"], "no query or fragment"),
        (["--base-url", "https://user:pw@cdn.example.com/"], "must not carry credentials"),
    ],
)
def test_local_usage_errors_are_one_line_exit_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    dest = convert_library(tmp_path, latin1=False, pages=False)
    result = run("urls", dest, *args)
    assert result.exit_code == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("optimizr: error: ") and message in line
    assert "pw@" not in line


def test_dest_without_manifest_is_a_usage_error(tmp_path: Path) -> None:
    result = run("urls", tmp_path)
    assert result.exit_code == 2
    assert "no optimizr manifest" in result.stderr and str(tmp_path) in result.stderr


# -- --expires ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("12h", 43200), ("7d", 604800)]
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("expires", "message"),
    [
        ("0s", "at least 1s"),
        ("8d", "longer than 7d"),
        (f"{MAX_EXPIRES + 1}s", "longer than 7d"),
        ("1w", "not a duration"),
        ("-5m", "not a duration"),
        ("soon", "not a duration"),
    ],
)
def test_expires_that_is_zero_too_long_or_not_a_duration_is_refused(
    tmp_path: Path, expires: str, message: str
) -> None:
    # Refused before any request: no server, no credentials needed.
    result = run("urls", "s3://some-bucket/webp", "--expires", expires, "--state-dir", tmp_path)
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert message in line and "--expires" in line


def test_expires_with_base_url_is_refused() -> None:
    with pytest.raises(UsageError, match="do not expire"):
        UrlsConfig("s3://some-bucket/webp", expires=60, base_url="https://cdn.example.com/")


# -- remote DEST, on the real S3 server -----------------------------------------------


@pytest.fixture
def s3(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SeaweedS3:
    s3_env(monkeypatch, s3_server)
    # Nothing of a test reaches the user's cache: the default state root is under it.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return s3_server


def upload_dest(server: SeaweedS3, dest: Path) -> ObjectStorage:
    """Put a local DEST's outputs into a fresh prefix of the bucket."""
    storage = s3_storage(server)
    for path in dest.rglob("*.webp"):
        storage.write_atomic(path.relative_to(dest).as_posix(), path.read_bytes())
    return storage


def copy_manifest(dest: Path, target: Path) -> None:
    """A consistent copy of DEST's manifest (SQLite's backup, as a snapshot is made)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    source = sqlite3.connect(dest / ".optimizr" / "manifest.sqlite")
    copy = sqlite3.connect(target)
    try:
        source.backup(copy)
    finally:
        copy.close()
        source.close()


def s3_args(server: SeaweedS3) -> list[str]:
    return ["--endpoint-url", server.endpoint, "--region", "us-east-1", "--s3-path-style"]


def test_presigned_urls_from_a_local_state_root_fetch_the_exact_objects(
    s3: SeaweedS3, tmp_path: Path
) -> None:
    dest = convert_library(tmp_path, latin1=False)
    url = upload_dest(s3, dest).describe()
    state = tmp_path / "state"
    copy_manifest(dest, state / ".optimizr" / "manifest.sqlite")
    result = run("urls", url, "--state-dir", state, "--expires", "15m", *s3_args(s3))
    assert result.exit_code == 0, result.output
    lines = parse_csv(result.stdout)
    done = done_outputs(dest)
    assert {line["output"] for line in lines if line["bytes"]} == set(done)
    assert len(lines) == len({line["output"] for line in lines}) == len(done) + 2  # 2 pages
    for line in lines:
        parts = urlsplit(line["url"])
        assert parts.hostname == "127.0.0.1" and "X-Amz-Signature=" in parts.query
        assert "X-Amz-Expires=900" in parts.query
        assert s3.secret_key not in line["url"]
        with urlopen(line["url"], timeout=30) as response:
            body = response.read()
        assert body == (dest / line["output"]).read_bytes()
        if line["bytes"]:
            assert int(line["bytes"]) == len(body) == done[line["output"]][1]
    assert str(state) in result.stderr


@pytest.mark.parametrize("form", ["gzip", "plain"])
def test_without_a_state_root_the_snapshot_is_downloaded_and_removed(
    s3: SeaweedS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    # gzip: what a run uploads; plain: what versions before the compressed snapshot did.
    dest = convert_library(tmp_path, latin1=False, pages=False)
    storage = upload_dest(s3, dest)
    url = storage.describe()
    snapshot = tmp_path / "snapshot.sqlite"
    copy_manifest(dest, snapshot)
    key = SNAPSHOT_KEY if form == "gzip" else SNAPSHOT_KEY.removesuffix(".gz")
    data = snapshot.read_bytes()
    storage.write_atomic(key, gzip.compress(data) if form == "gzip" else data)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    empty_state = tmp_path / "no-state-here"
    result = run("urls", url, "--state-dir", empty_state, "--format", "jsonl", *s3_args(s3))
    assert result.exit_code == 0, result.output
    items = parse_jsonl(result.stdout)
    assert {item["output"]: item["bytes"] for item in items} == {
        output: size for output, (_, size) in done_outputs(dest).items()
    }
    for item in items[:2]:
        with urlopen(item["url"], timeout=30) as response:
            assert response.read() == (dest / item["output"]).read_bytes()
        assert "X-Amz-Expires=604800" in item["url"]  # the default: 7 days
    assert f"{url}/{key}" in result.stderr
    assert list(scratch.iterdir()) == []  # the downloaded copy is gone
    assert not empty_state.exists()  # and nothing was made in the state folder


def half_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An access key without its secret: obstore cannot set up an S3 store from it."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDONLY")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_remote_base_url_needs_no_store_and_is_relative_to_dest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = convert_library(tmp_path, latin1=False, pages=False)
    state = tmp_path / "state"
    copy_manifest(dest, state / ".optimizr" / "manifest.sqlite")
    # Credentials no store could be made from, a bucket behind no server: a local
    # manifest and a base URL need neither.
    half_credentials(monkeypatch, tmp_path)
    result = run(
        "urls",
        "s3://nowhere-bucket/site/webp",
        "--state-dir",
        state,
        "--base-url",
        "https://cdn.example.com/",
        "--endpoint-url",
        "http://127.0.0.1:9",
    )
    assert result.exit_code == 0, result.output
    urls = {line["output"]: line["url"] for line in parse_csv(result.stdout)}
    assert set(urls) == set(done_outputs(dest))
    assert urls["two words.webp"] == "https://cdn.example.com/two%20words.webp"
    assert urls["ünï/cödé 写真.webp"] == (
        "https://cdn.example.com/%C3%BCn%C3%AF/c%C3%B6d%C3%A9%20%E5%86%99%E7%9C%9F.webp"
    )


def test_credentials_that_cannot_sign_are_one_line_and_nothing_on_stdout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = convert_library(tmp_path, latin1=False, pages=False)
    state = tmp_path / "state"
    copy_manifest(dest, state / ".optimizr" / "manifest.sqlite")
    half_credentials(monkeypatch, tmp_path)
    args = ["--state-dir", state, "--endpoint-url", "http://127.0.0.1:9", "--region", "x"]
    result = run("urls", "s3://nowhere-bucket/webp", *args)
    assert result.exit_code == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert "s3://nowhere-bucket/webp" in line and "missing SecretAccessKey" in line


def test_remote_dest_without_any_manifest_names_both_places(s3: SeaweedS3, tmp_path: Path) -> None:
    url = s3_storage(s3).describe()
    result = run("urls", url, "--state-dir", tmp_path / "state", *s3_args(s3))
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert "no optimizr manifest" in line
    assert f"{url}/{SNAPSHOT_KEY}" in line and str(tmp_path / "state") in line


# -- a million rows ---------------------------------------------------------------------


ROWS = 200_000


def synthetic_manifest(dest: Path, rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest of ``rows`` done rows, written through Manifest.record (in big batches)."""
    monkeypatch.setattr(manifest_module, "BATCH_ROWS", 20_000)
    monkeypatch.setattr(manifest_module, "BATCH_SECONDS", 1e9)
    manifest = Manifest.open(dest)
    for i in range(rows):
        manifest.record(
            f"albums/{i // 500:04d}/photo-{i:07d} taken.jpg",
            size=100_000 + i,
            mtime_ns=1,
            checked_ns=2,
            fingerprint="f",
            status="done",
            output=f"albums/{i // 500:04d}/photo-{i:07d} taken.webp",
            output_size=40_000 + i,
        )
    manifest.close()


def test_rows_come_in_key_order_from_a_scan_sqlite_does_not_sort(tmp_path: Path) -> None:
    manifest = Manifest.open(tmp_path)
    try:
        plan = " ".join(row[-1] for row in manifest.conn.execute(f"EXPLAIN QUERY PLAN {DONE_ROWS}"))
    finally:
        manifest.close()
    assert "TEMP B-TREE" not in plan and "SCAN files" in plan


def test_200k_rows_are_streamed_in_bounded_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "dest"
    synthetic_manifest(dest, ROWS, monkeypatch)
    target = tmp_path / "urls.jsonl"
    config = UrlsConfig(
        str(dest), format="jsonl", base_url="https://cdn.example.com/", output=target
    )
    tracemalloc.start()
    try:
        stats = write_output_urls(config)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats.rows == stats.outputs == ROWS
    assert stats.bytes == sum(40_000 + i for i in range(ROWS))
    # Holding the rows (or the lines) would take well over 50 MB here; a batch
    # at a time stays at a few MB whatever the count. Generous on purpose.
    assert peak < 16 << 20, f"peak {peak / 2**20:.1f} MiB"
    count = 0
    previous = ""
    with target.open(encoding="utf-8") as fh:
        for line in fh:
            item = json.loads(line)
            assert item["output"] > previous  # in key order
            previous = item["output"]
            count += 1
    assert count == ROWS


# -- documentation ------------------------------------------------------------------


def test_every_urls_option_is_documented_in_the_readme() -> None:
    from optimizr.cli import urls

    readme = (ROOT / "README.md").read_text()
    options = [opt for param in urls.params for opt in param.opts if opt.startswith("--")]
    assert len(options) >= 8
    assert [opt for opt in options if opt not in readme] == []
    assert "optimizr urls" in readme
