"""``optimizr urls DEST``: every converted output with a URL to fetch it, from the manifest.

One line per output of a ``done`` row (a multi-page source has one per page):
source key, output key, bytes, and a URL, as CSV (``source,output,bytes,url``) or
JSONL. The rows stream from one cursor in the manifest's key order (directory,
then name: the table's primary key, so SQLite sorts nothing) and URLs are made
a batch at a time, so memory stays flat however many rows there are.

The URL is, in this order of preference:

* ``--base-url``: the base plus the output key *relative to DEST*, each segment
  percent-encoded. Relative, not the full object key, because the base names
  DEST: a CDN whose origin is the bucket root is given
  ``--base-url https://cdn.example.com/webp/`` for ``s3://bucket/webp``, and one
  whose origin path is already ``/webp`` just ``https://cdn.example.com/``. Full
  keys would leave the second kind no way to drop the prefix.
* a remote DEST: a pre-signed GET URL (obstore's ``sign``, made locally from the
  credentials, no request per object), valid for ``--expires``.
* a local DEST: a ``file://`` URI of the output (nothing expires).

A remote DEST's manifest is the local one in its state root (``--state-dir``, see
:mod:`optimizr.dest_state`) when there is one, else the snapshot in
``DEST/.optimizr/manifest.sqlite.gz`` (or the plain ``manifest.sqlite`` of older
versions), downloaded to a temporary folder (complete before it is opened) and
removed afterwards.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO, Literal, Protocol
from urllib.parse import urlsplit

from optimizr.atomic import atomic_open
from optimizr.dest_state import remote_manifest_root
from optimizr.errors import UsageError
from optimizr.filenames import name_fields, printable, valid_unicode
from optimizr.manifest import Manifest, Row, manifest_path
from optimizr.pipeline import PAGES_PREFIX, row_outputs
from optimizr.storage.objectstore import ObjectStorage, StoreOptions, storage_for
from optimizr.storage.urls import Location, parse_location

Format = Literal["csv", "jsonl"]
FORMATS: tuple[Format, ...] = ("csv", "jsonl")

#: S3 refuses a pre-signed URL valid for longer than 7 days (SigV4's limit, and
#: GCS's V4 signatures'); the default is that longest validity.
MAX_EXPIRES = 7 * 24 * 3600
DEFAULT_EXPIRES = MAX_EXPIRES

#: Outputs signed (and written) per batch: one obstore call per batch, and all
#: the memory the listing holds.
BATCH = 1000

_DURATION = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

# `+status`: the unary plus keeps SQLite off the status index, so it walks the
# table in primary-key order and needs no sort (a sort would first read every row
# into a temporary b-tree). Tested by its query plan.
DONE_ROWS = (
    "SELECT dir, name, output, output_size, message FROM files "
    "WHERE +status = 'done' AND output IS NOT NULL ORDER BY dir, name"
)


def parse_duration(text: str) -> int:
    """``90s``, ``15m``, ``12h``, ``7d`` -> seconds; UsageError for anything else."""
    match = _DURATION.match(text)
    if match is None:
        raise UsageError(
            f"--expires {text!r}: not a duration (a whole number and a unit: 90s, 15m, 12h, 7d)"
        )
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


@dataclass(frozen=True)
class UrlsConfig:
    """What ``optimizr urls`` is asked for; checked when made."""

    #: DEST as given: a folder, file:// URL, or s3:// gs:// az:// URL.
    dest: str
    format: Format = "csv"
    #: Validity of pre-signed URLs in seconds; None: DEFAULT_EXPIRES.
    expires: int | None = None
    #: Public URLs under this base instead of signed ones.
    base_url: str | None = None
    #: Write here (atomically) instead of to the stream given.
    output: Path | None = None
    #: The local state root of a remote DEST (--state-dir); None: the default.
    state_dir: Path | None = None
    store: StoreOptions = field(default_factory=StoreOptions)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UsageError(f"--format {self.format!r}: choose csv or jsonl")
        location = self.location  # raises UsageError for a malformed DEST
        if location.scheme == "memory":
            raise UsageError("memory:// keeps no manifest to list URLs from")
        if self.expires is not None:
            if self.base_url is not None:
                raise UsageError("--expires is for pre-signed URLs; --base-url URLs do not expire")
            if not location.is_remote:
                raise UsageError(
                    "--expires is for pre-signed URLs of a remote DEST; file:// URLs do not expire"
                )
            if self.expires <= 0:
                raise UsageError("--expires must be at least 1s: a URL that has already expired")
            if self.expires > MAX_EXPIRES:
                raise UsageError(
                    f"--expires {self.expires}s is longer than 7d, the longest S3 accepts "
                    "for a pre-signed URL"
                )
        if self.base_url is not None:
            _check_base_url(self.base_url)

    @property
    def location(self) -> Location:
        return parse_location(self.dest)

    @property
    def expires_in(self) -> timedelta:
        return timedelta(seconds=self.expires if self.expires is not None else DEFAULT_EXPIRES)


def _check_base_url(base: str) -> None:
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--base-url {base!r}: not an http:// or https:// URL with a host")
    if parts.query or parts.fragment or "?" in base or "#" in base:
        raise UsageError("--base-url takes no query or fragment: keys are appended to its path")
    if "@" in parts.netloc:
        # Not echoed: what precedes the @ may be a secret.
        raise UsageError("--base-url must not carry credentials (user@)")


@dataclass(frozen=True)
class UrlsStatistics:
    """What one listing did: rows read, lines written, and how URLs were made."""

    manifest: str
    #: The manifest was a snapshot downloaded from DEST (no local state root).
    downloaded: bool
    rows: int
    outputs: int
    #: Sum of the known output sizes (pages beyond the first have none recorded).
    bytes: int
    signed: int
    url_kind: Literal["signed", "base-url", "file"]


@dataclass(frozen=True)
class OutputEntry:
    source: str
    output: str
    #: None for pages 2, 3, ... of a multi-page source: the manifest records the
    #: size of the main output only.
    size: int | None


class _Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...


def iter_outputs(manifest: Manifest) -> Iterator[OutputEntry]:
    """Every output of the manifest's done rows, in key order, streamed."""
    for directory, name, output, size, message in manifest.conn.execute(DONE_ROWS):
        directory, name, output = _text(directory), _text(name), _text(output)
        source = f"{directory}/{name}" if directory else name
        if not message.startswith(PAGES_PREFIX):
            yield OutputEntry(source, output, size)
            continue
        # Page outputs are named by the pipeline's own rule, not guessed here.
        row = Row(source, 0, 0, 0, "", "done", None, output, size, None, message, 0)
        for index, key in enumerate(row_outputs(row)):
            yield OutputEntry(source, key, size if index == 0 else None)


def _text(value: str | bytes) -> str:
    # A name that is not UTF-8 is stored as a BLOB of its bytes (see manifest.py).
    return os.fsdecode(value) if isinstance(value, bytes) else value


def encode_key(key: str) -> str:
    """``key`` as a URL path: each segment percent-encoded from its exact bytes
    (UTF-8, or whatever bytes a non-UTF-8 file name has), ``/`` kept between them.

    Everything but the unreserved characters is encoded (``+`` too, which some
    servers read as a space), so a key never changes meaning on its way."""
    # Only the runs that need it are encoded: most keys are mostly plain, and
    # this runs once per output of a listing that may be a million lines long.
    return _NOT_UNRESERVED.sub(_percent, key)


# RFC 3986 unreserved characters, and "/" between segments, stay as they are.
_NOT_UNRESERVED = re.compile(r"[^A-Za-z0-9_.~/-]+")


def _percent(match: re.Match[str]) -> str:
    # surrogateescape: a lone surrogate is a byte of a name that is not UTF-8.
    return "".join([f"%{byte:02X}" for byte in match.group().encode("utf-8", "surrogateescape")])


class _Addresser(Protocol):
    kind: Literal["signed", "base-url", "file"]

    def urls(self, keys: Sequence[str]) -> list[str]: ...


@dataclass
class _PrefixUrls:
    """Public URLs: a fixed prefix (a base URL, or DEST's file:// URI) plus the key."""

    prefix: str
    kind: Literal["signed", "base-url", "file"]

    def urls(self, keys: Sequence[str]) -> list[str]:
        return [self.prefix + encode_key(key) for key in keys]


class _Store:
    """DEST's object store, set up on first use: a listing under --base-url from a
    local state root needs neither credentials nor the network."""

    def __init__(self, config: UrlsConfig) -> None:
        self.config = config
        self._storage: ObjectStorage | None = None

    def get(self) -> ObjectStorage:
        if self._storage is None:
            self._storage = storage_for(self.config.location, self.config.store)
        return self._storage

    def describe(self) -> str:
        return self.config.location.url()


@dataclass
class _SignedUrls:
    store: _Store
    expires_in: timedelta
    kind: Literal["signed", "base-url", "file"] = "signed"

    def urls(self, keys: Sequence[str]) -> list[str]:
        try:
            return self.store.get().signed_urls(keys, self.expires_in)
        except OSError as exc:
            raise UsageError(
                f"cannot sign URLs for {self.store.describe()}: {exc.strerror or exc}"
            ) from None


def write_output_urls(config: UrlsConfig, stream: BinaryIO | None = None) -> UrlsStatistics:
    """List every converted output of ``config.dest`` with its URL.

    Written to ``config.output`` (atomically: the file appears whole or not at
    all) or else to ``stream``. Raises UsageError when DEST has no manifest,
    the manifest is damaged (ManifestDamaged) or URLs cannot be signed."""
    if config.output is None and stream is None:
        raise UsageError("nowhere to write the URLs: give an output file or a stream")
    location = config.location
    with ExitStack() as stack:
        store = _Store(config) if location.is_remote else None
        manifest_root, snapshot = stack.enter_context(_manifest_root(config, store))
        manifest = Manifest.open_readonly(manifest_root)
        if manifest is None:  # removed between the check and the open
            raise UsageError(f"no optimizr manifest for {printable(location.url())}")
        stack.callback(manifest.close)
        addresser = _addresser(config, location, store)
        sink: _Sink
        if config.output is not None:
            sink = stack.enter_context(atomic_open(config.output))
        else:
            assert stream is not None
            sink = stream
        rows, outputs, total, signed = _write(manifest, addresser, config.format, sink)
        if stream is not None and config.output is None:
            stream.flush()
    return UrlsStatistics(
        manifest=snapshot or str(manifest.path),
        downloaded=snapshot is not None,
        rows=rows,
        outputs=outputs,
        bytes=total,
        signed=signed,
        url_kind=addresser.kind,
    )


def _write(
    manifest: Manifest, addresser: _Addresser, fmt: Format, sink: _Sink
) -> tuple[int, int, int, int]:
    """(rows, outputs, bytes, signed): the lines written, a batch at a time."""
    rows = outputs = total = signed = 0
    last_source: str | None = None
    header = b"source,output,bytes,url\n" if fmt == "csv" else b""
    batch: list[OutputEntry] = []

    def flush() -> None:
        nonlocal signed, header
        urls = addresser.urls([entry.output for entry in batch])
        if addresser.kind == "signed":
            signed += len(urls)
        # The header goes with the first batch, once its URLs are made: credentials
        # that cannot sign leave an empty stdout, not a header and an error.
        sink.write(header + _format(batch, urls, fmt))
        header = b""
        batch.clear()

    for entry in iter_outputs(manifest):
        if entry.source != last_source:
            rows += 1
            last_source = entry.source
        outputs += 1
        total += entry.size or 0
        batch.append(entry)
        if len(batch) >= BATCH:
            flush()
    if batch or header:
        flush()
    return rows, outputs, total, signed


def _format(batch: Sequence[OutputEntry], urls: Sequence[str], fmt: Format) -> bytes:
    if fmt == "jsonl":
        lines = []
        for entry, url in zip(batch, urls, strict=True):
            # name_fields: a key that is not UTF-8 also gets source_bytes/output_bytes
            # (base64 of its exact bytes), as every JSON document of optimizr does.
            item = {
                **name_fields(entry.source, "source"),
                **name_fields(entry.output, "output"),
                "bytes": entry.size,
                "url": url,
            }
            lines.append(json.dumps(item, ensure_ascii=False))
        lines.append("")
        return "\n".join(lines).encode()
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    # CSV has no room for exact bytes: a key that is not UTF-8 is shown escaped
    # (\xe9), and the url column, percent-encoded from the bytes, is exact.
    writer.writerows(
        (
            valid_unicode(entry.source),
            valid_unicode(entry.output),
            "" if entry.size is None else entry.size,
            url,
        )
        for entry, url in zip(batch, urls, strict=True)
    )
    return text.getvalue().encode()


def _addresser(config: UrlsConfig, location: Location, store: _Store | None) -> _Addresser:
    if config.base_url is not None:
        base = config.base_url if config.base_url.endswith("/") else config.base_url + "/"
        return _PrefixUrls(base, "base-url")
    if store is not None:
        return _SignedUrls(store, config.expires_in)
    assert location.path is not None
    return _PrefixUrls(location.path.resolve().as_uri().rstrip("/") + "/", "file")


@contextmanager
def _manifest_root(config: UrlsConfig, store: _Store | None) -> Iterator[tuple[Path, str | None]]:
    """The folder whose ``.optimizr/manifest.sqlite`` is DEST's manifest, and the URL of
    the snapshot it was downloaded from (then removed when the block ends), if it was."""
    location = config.location
    if store is None:
        assert location.path is not None
        if not manifest_path(location.path).exists():
            raise UsageError(
                f"no optimizr manifest in {location.path} "
                f"({manifest_path(location.path)} does not exist)"
            )
        yield location.path, None
        return
    with remote_manifest_root(location, config.state_dir, store.get) as found:
        yield found
