"""An object store (S3, GCS, Azure; obstore's local and in-memory stores too) as a
:class:`Storage`.

Keys are flat; "directories" are the ``/``-delimited prefixes a delimited LIST
returns. Differences from a folder, and why:

* ``write_atomic`` is one PUT (obstore goes multipart above its threshold): an
  object store never shows a partial object, so there are no temporaries, and
  ``remove_stale_temporaries`` has nothing to do.
* ``mtime_ns`` cannot be set on an object: the store stamps last-modified itself,
  so --preserve-mtime has no effect on the object's date. The wanted time is kept
  as user metadata (``optimizr-mtime-ns``) for whoever needs it; ``stat`` reports
  the store's last-modified.
* Every failure is an ``OSError`` the pipeline already understands:
  ``FileNotFoundError`` for a missing key, ``PermissionError`` for 401/403, a plain
  ``OSError`` otherwise. Messages name the key and the cause, never a credential
  (obstore's own message is not passed on: it carries request details).
* Every request goes through one wrapper, :meth:`ObjectStorage._request`, which
  retries transient failures with backoff, cuts stalled requests by timeout, and
  counts (``statistics()``); see ``requests.py``. obstore's own retry is off.
"""

from __future__ import annotations

import dataclasses
import mmap
import re
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    BaseError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)
from obstore.store import AzureStore, GCSStore, LocalStore, MemoryStore, S3Store

from optimizr.atomic import atomic_open
from optimizr.errors import UsageError
from optimizr.storage.aws_profiles import Profile, profile_to_use, read_profile
from optimizr.storage.base import (
    DEST_FOLDER,
    FINGERPRINT_METADATA,
    OUTPUT_METADATA,
    SOURCE_ETAG_METADATA,
    STATE_DIR,
    DirectoryListing,
    FileStat,
    SourceEntry,
    Storage,
    StoredObject,
    WalkOptions,
    WalkStatistics,
)
from optimizr.storage.requests import (
    Outcome,
    RequestCounter,
    RequestRunner,
    RetryPolicy,
    StorageStatistics,
    describe_cause,
)
from optimizr.storage.urls import Location

if TYPE_CHECKING:
    from obstore import Attributes, GetResult, ObjectMeta, PutMode, PutResult
    from obstore.store import AzureConfig, ClientConfig, ObjectStore, RetryConfig, S3Config

    from optimizr.config import RunConfig

T = TypeVar("T")

#: User metadata holding the mtime an output was meant to carry (--preserve-mtime).
MTIME_METADATA = "optimizr-mtime-ns"
#: Azure's metadata names must be C# identifiers (a '-' is refused: InvalidMetadata),
#: so there the two are stored with '_' and read back under the names above.
_AZURE_METADATA = {
    name: name.replace("-", "_")
    for name in (MTIME_METADATA, OUTPUT_METADATA, SOURCE_ETAG_METADATA, FINGERPRINT_METADATA)
}
_FROM_AZURE_METADATA = {stored: name for name, stored in _AZURE_METADATA.items()}
#: The part size of a file's multipart upload (S3's smallest part but the last).
_PART_BYTES = 5 << 20
#: obstore's attributes that are HTTP headers of the object, not user metadata.
_HTTP_ATTRIBUTES = frozenset(
    ("Content-Disposition", "Content-Encoding", "Content-Language", "Content-Type", "Cache-Control")
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class StoreOptions:
    """How to reach the store, beyond what the URL says.

    Anything left None is read by obstore from the environment (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``,
    ``AWS_ENDPOINT_URL``, ``GOOGLE_SERVICE_ACCOUNT``, ``AZURE_STORAGE_ACCOUNT_NAME``...).

    ``profile``: a shared AWS profile of static keys (see aws_profiles), for S3;
    without it AWS_PROFILE is read when the environment holds no keys.
    """

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    #: Path-style requests (http://host/bucket/key), which most S3-compatible
    #: servers (SeaweedFS, MinIO, Ceph) want, instead of bucket.host.
    s3_path_style: bool = False
    #: Retries of one request, and the seconds from its first attempt after which
    #: no retry starts (obstore's defaults). The retries are optimizr's own.
    max_retries: int = 10
    retry_timeout: float = 180.0
    #: Seconds one attempt may take from connecting to the last byte of the answer;
    #: a stalled response is cut after this and retried. It bounds a whole GET or
    #: PUT, so it must allow the largest object at the slowest link expected.
    request_timeout: float = 60.0
    #: Seconds to establish a connection.
    connect_timeout: float = 5.0
    #: The first retry waits up to this many seconds; each further one doubles it
    #: (full jitter, at most 15 s).
    retry_backoff: float = 0.1
    #: Cache-Control set on every output (--cache-control); None: none.
    cache_control: str | None = None

    @classmethod
    def for_run(cls, run: RunConfig) -> StoreOptions:
        """The options a run's settings give its stores (SRC and DEST alike)."""
        return cls(
            endpoint_url=run.endpoint_url,
            region=run.region,
            profile=run.profile,
            s3_path_style=run.s3_path_style,
            cache_control=run.cache_control,
        )

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise UsageError(f"max_retries must be 0 or more, not {self.max_retries}")
        for name in ("retry_timeout", "request_timeout", "connect_timeout", "retry_backoff"):
            if not getattr(self, name) > 0:
                raise UsageError(f"{name} must be more than 0 seconds, not {getattr(self, name)}")

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.max_retries, self.retry_timeout, self.retry_backoff)


def storage_for(location: Location, options: StoreOptions | None = None) -> ObjectStorage:
    """An :class:`ObjectStorage` over ``location``, built from obstore's store for its scheme."""
    options = options or StoreOptions()
    profile: Profile | None = None
    if location.scheme == "s3":
        name = profile_to_use(options.profile)
        profile = read_profile(name) if name is not None else None
    elif options.profile is not None:
        raise UsageError(f"--profile names an AWS profile: {location.url()} is not on S3")
    if profile is not None:
        # The profile's region and endpoint are defaults; the options still win.
        options = dataclasses.replace(
            options,
            region=options.region or profile.region,
            endpoint_url=options.endpoint_url or profile.endpoint_url,
        )
    # Every retry is ours (RequestRunner), so that each one is counted and the same
    # policy covers every kind of failure; obstore would retry some of them unseen.
    retry: RetryConfig = {"max_retries": 0}
    client: ClientConfig = {
        "timeout": timedelta(seconds=options.request_timeout),
        "connect_timeout": timedelta(seconds=options.connect_timeout),
    }
    if options.endpoint_url and options.endpoint_url.startswith("http://"):
        client["allow_http"] = True  # S3-compatible servers on a LAN often speak plain HTTP
    try:
        store = _make_store(location, options, client, retry, profile)
    except BaseError as exc:
        # Raised before any request: the environment's credentials or settings are
        # incomplete (an access key without its secret). Said, never echoed.
        missing = _MISSING.search(str(exc))
        cause = f"missing {missing.group(1)}" if missing else type(exc).__name__
        raise UsageError(
            f"{location.url()}: the store cannot be set up from the credentials and "
            f"options given ({cause})"
        ) from None
    return ObjectStorage(
        store, location, cache_control=options.cache_control, retry=options.retry_policy()
    )


def _make_store(
    location: Location,
    options: StoreOptions,
    client: ClientConfig,
    retry: RetryConfig,
    profile: Profile | None = None,
) -> ObjectStore:
    store: ObjectStore
    if location.scheme == "s3":
        s3: S3Config = {
            "virtual_hosted_style_request": not options.s3_path_style,
            # Compare-and-swap by ETag (If-Match), which the lease on DEST's lock needs.
            "conditional_put": "etag",
        }
        if profile is not None:
            s3["access_key_id"] = profile.access_key_id
            s3["secret_access_key"] = profile.secret_access_key
            if profile.session_token:
                s3["session_token"] = profile.session_token
        if options.endpoint_url:
            s3["endpoint"] = options.endpoint_url
        if options.region:
            s3["region"] = options.region
        store = S3Store(location.bucket, config=s3, client_options=client, retry_config=retry)
    elif location.scheme == "gs":
        store = GCSStore(location.bucket, client_options=client, retry_config=retry)
    elif location.scheme == "az":
        azure: AzureConfig = {}
        if options.endpoint_url:
            # Azurite and other emulators: http://127.0.0.1:10000/ACCOUNT, the account
            # in the path. The account and its key come from AZURE_STORAGE_* variables.
            azure["endpoint"] = options.endpoint_url
        try:
            store = AzureStore(
                location.bucket, config=azure, client_options=client, retry_config=retry
            )
        except BaseError as exc:
            raise UsageError(f"{location.url()}: {_azure_setup_error(exc)}") from None
    elif location.scheme == "memory":
        store = MemoryStore()
    else:
        assert location.path is not None
        location.path.mkdir(parents=True, exist_ok=True)
        store = LocalStore(location.path)
    return store


def _azure_setup_error(exc: BaseError) -> str:
    # obstore checks the account when the store is made: its first line says what is
    # wrong (it names no key, only what is missing or malformed).
    text = str(exc).partition("\n")[0].removeprefix("Generic MicrosoftAzure error: ")
    if "Account must be specified" in text:
        return (
            "no Azure storage account: set AZURE_STORAGE_ACCOUNT_NAME and "
            "AZURE_STORAGE_ACCOUNT_KEY (or a SAS token, or Azure AD credentials), or "
            "AZURE_STORAGE_USE_EMULATOR=true for a local Azurite"
        )
    return f"the Azure settings are not usable: {text}"


class ObjectStorage(Storage):
    """The keys under ``location.prefix`` of one bucket; this storage's keys are
    relative to that prefix, as a LocalStorage's are to its folder."""

    listing_is_remote = True

    def __init__(
        self,
        store: ObjectStore,
        location: Location,
        *,
        cache_control: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.store = store
        self.location = location
        self.cache_control = cache_control
        self._runner = RequestRunner(retry or RetryPolicy(), RequestCounter())
        self.root = location.prefix if location.is_remote or location.scheme == "memory" else ""
        self.walk_stats = WalkStatistics()
        # obstore's LocalStore refuses attributes (a file has no Content-Type to keep).
        self._attributes = not isinstance(store, LocalStore)
        self._azure = isinstance(store, AzureStore)
        # If-Match on a listed ETag: S3 and Azure compare it. GCS needs the object's
        # generation, which a listing's ETag is not, and the local filesystem has no
        # conditional update: a replacement there stays unconditional, as it was.
        self._replaces_if_match = isinstance(store, S3Store | AzureStore | MemoryStore)

    def __repr__(self) -> str:
        # The store's own repr is not used: it is not ours to promise it hides secrets.
        return f"ObjectStorage({self.describe()!r})"

    def describe(self) -> str:
        return self.location.url()

    def _full(self, key: str) -> str:
        if not self.root:
            return key
        return f"{self.root}/{key}" if key else self.root

    def _relative(self, full: str) -> str:
        return full[len(self.root) + 1 :] if self.root else full

    def _request(
        self, op: str, full: str, fn: Callable[[], T], outcome: Outcome | None = None
    ) -> T:
        """``fn()``, the one store call of ``op`` on ``full``: retried while it fails
        transiently, counted, OSError(EIO) once given up (requests.RequestRunner)."""
        return self._runner.call(op, full, fn, outcome)

    def statistics(self) -> StorageStatistics:
        """Requests, retries, failures and latencies so far, by operation."""
        return self._runner.counter.snapshot(self.describe())

    def stat(self, key: str) -> FileStat | None:
        full = self._full(key)
        try:
            meta = self._request("head", full, lambda: obstore.head(self.store, full))
        except FileNotFoundError:
            return None
        except BaseError as exc:
            raise os_error(exc, full, "stat") from None
        return _file_stat(meta)

    def list_files(self, directory: str) -> dict[str, FileStat]:
        return {
            meta["path"].rpartition("/")[2]: _file_stat(meta)
            for meta in self._listing(directory)[1]
        }

    def _listing(self, directory: str) -> tuple[list[str], list[ObjectMeta]]:
        """One delimited listing of ``directory``: its subdirectories (full keys) and objects.

        obstore follows the continuation tokens itself, so one directory's entries
        are held at a time (as LocalStorage holds one scandir), never the bucket."""
        full = self._full(directory)
        prefix = f"{full}/" if full else None
        try:
            result = self._request(
                "list", full or "/", lambda: obstore.list_with_delimiter(self.store, prefix)
            )
        except FileNotFoundError:
            return [], []  # LocalStore: the folder does not exist yet
        except BaseError as exc:
            raise os_error(exc, full or "/", "list") from None
        # Some servers (SeaweedFS, and consoles that "create folders") list a zero-byte
        # marker for the directory itself: it is no file of the tree.
        objects = [
            meta
            for meta in result["objects"]
            if not meta["path"].endswith("/") and meta["path"] != full
        ]
        return list(result["common_prefixes"]), objects

    def read_bytes(self, key: str) -> bytes:
        return self.read_object(key).data

    def read_head(self, key: str, size: int) -> bytes:
        # One ranged GET: the coordinator of a --cluster run estimates an image's
        # memory from its header and never fetches the image itself.
        full = self._full(key)
        try:
            return self._request(
                "get",
                full,
                lambda: bytes(obstore.get_range(self.store, full, start=0, length=size)),
            )
        except FileNotFoundError:
            raise FileNotFoundError(2, "no such object", full) from None
        except BaseError as exc:
            raise os_error(exc, full, "read") from None

    def read_object(self, key: str) -> StoredObject:
        full = self._full(key)

        def get() -> tuple[GetResult, bytes]:
            # The body is read inside the attempt: a response that stalls or breaks
            # half-way is retried like one that never came.
            result = obstore.get(self.store, full)
            return result, bytes(result.bytes())

        try:
            result, data = self._request("get", full, get)
        except FileNotFoundError:
            raise FileNotFoundError(2, "no such object", full) from None
        except BaseError as exc:
            raise os_error(exc, full, "read") from None
        # The ETag of the very bytes read: the commit compares it with the listing's.
        return StoredObject(data, _etag(result.meta), self._user_metadata(result))

    def _user_metadata(self, result: GetResult) -> dict[str, str]:
        return {
            _FROM_AZURE_METADATA.get(k, k) if self._azure else k: v
            for k, v in result.attributes.items()
            if isinstance(v, str)
        }

    def read_metadata(self, key: str) -> dict[str, str] | None:
        full = self._full(key)

        def head() -> GetResult:
            # A GET with head=True: a HEAD that, unlike obstore.head, keeps the attributes.
            return obstore.get(self.store, full, options={"head": True})

        try:
            result = self._request("head", full, head)
        except FileNotFoundError:
            return None
        except BaseError as exc:
            raise os_error(exc, full, "stat") from None
        return self._user_metadata(result)

    def read_to_file(self, key: str, path: Path) -> StoredObject:
        # Streamed: a source above --spool-above, or a snapshot, never sits in memory
        # whole. Each attempt writes a temporary of its own, renamed once complete,
        # so a retried GET leaves no mix and a failed one leaves nothing.
        full = self._full(key)

        def get() -> StoredObject:
            result = obstore.get(self.store, full)
            with atomic_open(path) as out:
                for chunk in result.stream(min_chunk_size=1 << 20):
                    out.write(bytes(chunk))
            return StoredObject(b"", _etag(result.meta), self._user_metadata(result))

        try:
            return self._request("get", full, get)
        except FileNotFoundError:
            raise FileNotFoundError(2, "no such object", full) from None
        except BaseError as exc:
            raise os_error(exc, full, "read") from None

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """``key``'s bytes as a stream of chunks: for objects too large to hold at once
        (a manifest snapshot of a million rows)."""
        full = self._full(key)
        try:
            for chunk in obstore.get(self.store, full).stream(min_chunk_size=chunk_size):
                yield bytes(chunk)
        except FileNotFoundError:
            raise FileNotFoundError(2, "no such object", full) from None
        except BaseError as exc:
            raise os_error(exc, full, "read") from None

    def _attributes_for(
        self, full: str, mtime_ns: int | None, metadata: Mapping[str, str] | None = None
    ) -> Attributes | None:
        if not self._attributes:
            return None
        attributes: Attributes = {}
        for name, value in (metadata or {}).items():
            # A source's own user metadata (--metadata all): never its HTTP attributes
            # (its type is not the output's) nor optimizr's marks, set below.
            if name not in _HTTP_ATTRIBUTES and name not in _AZURE_METADATA:
                attributes[self._metadata_name(name) if self._azure else name] = value
        if full.endswith(".webp") and f"{STATE_DIR}/" not in full:
            from optimizr import __version__

            attributes["Content-Type"] = "image/webp"
            attributes[self._metadata_name(OUTPUT_METADATA)] = __version__
            # What it was made from, when the writer says (Pipeline._upload).
            for name in (SOURCE_ETAG_METADATA, FINGERPRINT_METADATA):
                if metadata and metadata.get(name):
                    attributes[self._metadata_name(name)] = metadata[name]
            if self.cache_control:
                attributes["Cache-Control"] = self.cache_control
        if mtime_ns is not None:
            attributes[self._metadata_name(MTIME_METADATA)] = str(mtime_ns)
        return attributes or None

    def _metadata_name(self, name: str) -> str:
        if not self._azure:
            return name
        return _AZURE_METADATA.get(name, name.replace("-", "_"))

    def write_atomic(
        self,
        key: str,
        data: bytes,
        *,
        mtime_ns: int | None = None,
        if_absent: bool = False,
        metadata: Mapping[str, str] | None = None,
        if_match: str | None = None,
    ) -> str | None:
        full = self._full(key)
        mode: PutMode | None = None
        if if_absent:
            mode = "create"
        elif if_match is not None and self._replaces_if_match:
            mode = {"e_tag": if_match}
        try:
            return self._put(
                "put", full, data, mode, self._attributes_for(full, mtime_ns, metadata)
            )
        except (AlreadyExistsError, PreconditionError):
            # Some stores answer a lost If-None-Match race with 412 rather than 409.
            raise FileExistsError(17, f"{full} exists", full) from None
        except FileNotFoundError:  # If-Match on an object deleted meanwhile
            raise FileNotFoundError(2, "no such object", full) from None
        except BaseError as exc:
            raise os_error(exc, full, "write") from None

    def write_from_file(self, key: str, path: Path) -> str | None:
        # Streamed from the file's pages, never copied: the manifest's snapshot goes up
        # every --checkpoint-interval, and its size grows with every file of the run
        # (~250 B a row). Read into a buffer, it was held whole below one part and two
        # 5 MiB parts at a time above: the coordinator's peak RSS grew with the run
        # (issue 15, 1.18x from 1,000 to 20,000 images). A mapping of the file is the
        # page cache's memory, shared, not the process's own (obstore sends from it
        # without a copy); above one part, one part of it is mapped at a time.
        full = self._full(key)
        try:
            return self._request("put", full, lambda: _put_file(self.store, full, path))["e_tag"]
        except BaseError as exc:
            raise os_error(exc, full, "write") from None

    def create(self, key: str, data: bytes) -> str | None:
        """Put ``key`` only if it does not exist (FileExistsError otherwise); its new ETag."""
        full = self._full(key)
        try:
            return self._put("create", full, data, "create")
        except (AlreadyExistsError, PreconditionError):
            raise FileExistsError(17, f"{full} exists", full) from None
        except BaseError as exc:
            raise os_error(exc, full, "write") from None

    def replace_if(self, key: str, data: bytes, etag: str) -> str | None:
        """Put ``key`` only if its ETag is still ``etag`` (FileExistsError if it changed,
        FileNotFoundError if it is gone): compare-and-swap; the new ETag."""
        full = self._full(key)
        try:
            return self._put("replace_if", full, data, {"e_tag": etag})
        except PreconditionError:
            raise FileExistsError(17, f"{full} was changed by another writer", full) from None
        except FileNotFoundError:
            raise FileNotFoundError(2, "no such object", full) from None
        except BaseError as exc:
            raise os_error(exc, full, "write") from None

    def _put(
        self,
        op: str,
        full: str,
        data: bytes,
        mode: PutMode | None,
        attributes: Attributes | None = None,
    ) -> str | None:
        """One PUT through :meth:`_request`; its ETag.

        A conditional PUT (``mode``) retried after an attempt that may have landed
        (a timeout, a reset after sending) can find that attempt's object in its
        way and lose its own condition. The object is then read: holding exactly
        these bytes, it is this write's, and the write succeeded. Without this, a
        lock taken on a flaky link would be reported as another run's."""
        payload = bytes(data)
        outcome = Outcome()

        def put() -> PutResult:
            return obstore.put(self.store, full, payload, attributes=attributes, mode=mode)

        try:
            return self._request(op, full, put, outcome)["e_tag"]
        except (AlreadyExistsError, PreconditionError):
            if mode is None or not outcome.uncertain:
                raise
            try:
                found = self.read_object(self._relative(full))
            except FileNotFoundError:
                found = None
            if found is None or found.data != payload:
                raise
            return found.etag

    def signed_urls(self, keys: Sequence[str], expires_in: timedelta) -> list[str]:
        """Pre-signed GET URLs of ``keys``, valid for ``expires_in``: made locally with
        the store's credentials (no request), in one call for the whole batch.

        Only S3, GCS and Azure stores can sign; the others raise UsageError. A store
        that cannot sign (no credentials) raises OSError naming the cause."""
        if not isinstance(self.store, S3Store | GCSStore | AzureStore):
            raise UsageError(f"{self.describe()}: only s3://, gs:// and az:// stores sign URLs")
        if not keys:
            return []
        full = [self._full(key) for key in keys]
        try:
            return list(obstore.sign(self.store, "GET", full, expires_in))
        except BaseError as exc:
            raise os_error(exc, full[0], "sign a URL for") from None

    def delete(self, key: str) -> bool:
        # A DELETE of a missing key succeeds on S3: only a HEAD says whether it existed.
        if self.stat(key) is None:
            return False
        full = self._full(key)
        try:
            self._request("delete", full, lambda: obstore.delete(self.store, full))
        except FileNotFoundError:
            return False
        except BaseError as exc:
            raise os_error(exc, full, "delete") from None
        return True

    def remove_stale_temporaries(self) -> int:
        return 0  # single PUTs leave none

    def walk(self, options: WalkOptions) -> Iterator[DirectoryListing]:
        """Depth-first in name order, one delimited listing in memory at a time,
        like LocalStorage.walk (whose order and grouping the tests hold it to)."""
        stats = self.walk_stats
        stack = [""]
        while stack:
            key = stack.pop()
            stats.directories += 1
            try:
                prefixes, objects = self._listing(key)
            except OSError as exc:
                stats.errors += 1
                yield DirectoryListing(
                    key, (SourceEntry(key or ".", error=exc.strerror or str(exc)),)
                )
                continue
            names = sorted(self._relative(p.rstrip("/")).rpartition("/")[2] for p in prefixes)
            if key and STATE_DIR in names:
                # Another run's DEST (this run's own is pruned): outputs, not sources.
                stats.dest_folders += 1
                yield DirectoryListing(key, skipped=DEST_FOLDER)
                continue
            files: list[SourceEntry] = []
            for meta in sorted(objects, key=lambda m: m["path"]):
                child = self._relative(meta["path"])
                if options.wants_file(child):
                    stats.files += 1
                    st = _file_stat(meta)
                    files.append(SourceEntry(child, st.size, st.mtime_ns, etag=st.etag))
                else:
                    stats.excluded += 1
            subdirs: list[str] = []
            for name in names:
                if name == STATE_DIR:
                    continue  # SRC's own state folder
                child = f"{key}/{name}" if key else name
                if options.wants_dir(child):
                    subdirs.append(child)
                else:
                    stats.excluded += 1
            if files:
                yield DirectoryListing(key, tuple(files))
            stack.extend(reversed(subdirs))


def probe(storage: ObjectStorage, *, write: bool) -> None:
    """Check, before any work, that ``storage`` can be listed (SRC) or written (DEST).

    Lists one directory of the prefix; with ``write``, puts and deletes a tiny
    object under ``.optimizr/``. Raises UsageError naming the bucket and the cause."""
    where = storage.describe()
    try:
        storage.list_files("")
        if write:
            key = f"{STATE_DIR}/probe-{secrets.token_hex(8)}"
            storage.write_atomic(key, b"optimizr write probe")
            storage.delete(key)
    except OSError as exc:
        action = "written" if write else "listed"
        raise UsageError(f"{where} cannot be {action}: {exc.strerror or exc}") from None


def _put_file(store: ObjectStore, full: str, path: Path) -> PutResult:
    """PUT the file at ``path``: one request up to a part, else a multipart upload
    of parts mapped one by one (only the files optimizr wrote and no longer changes:
    a file cut short while mapped would fault the reader)."""
    size = path.stat().st_size
    if size == 0:
        return obstore.put(store, full, b"")
    if size <= _PART_BYTES:
        with path.open("rb") as fh:
            whole = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        # Not closed here: unmapped when obstore lets its view go (closing it while a
        # view is exported, after a failed request too, would raise BufferError).
        return obstore.put(store, full, memoryview(whole))
    return obstore.put(
        store,
        full,
        _mapped_parts(path, size),
        use_multipart=True,
        chunk_size=_PART_BYTES,
        max_concurrency=1,
    )


def _mapped_parts(path: Path, size: int) -> Iterator[memoryview]:
    """``path`` as views of _PART_BYTES each (the last shorter), each mapped only
    when obstore asks for it and unmapped once it lets the part go (obstore keeps a
    view while the part is in flight: closing the mapping here would fail)."""
    with path.open("rb") as fh:
        for offset in range(0, size, _PART_BYTES):
            length = min(_PART_BYTES, size - offset)
            yield memoryview(mmap.mmap(fh.fileno(), length, offset=offset, access=mmap.ACCESS_READ))


def _file_stat(meta: ObjectMeta) -> FileStat:
    modified = meta["last_modified"]
    mtime_ns = (modified - _EPOCH) // timedelta(microseconds=1) * 1000
    return FileStat(meta["size"], mtime_ns, etag=_etag(meta))


def _etag(meta: ObjectMeta) -> str | None:
    """The ETag in its quoted form (RFC 9110 entity-tag), whichever request gave it.

    Azure quotes it in the headers of GET and HEAD but not in the XML of a LIST, so
    that, unnormalised, the listing's evidence would never match the read's."""
    etag = meta.get("e_tag")
    if etag is None or etag.startswith(('"', 'W/"')):
        return etag
    return f'"{etag}"'


_MISSING = re.compile(r"\bMissing ?([A-Z][A-Za-z]+)")
# S3's and Azure's XML error bodies alike carry <Code>.
_S3_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")
_STATUS = re.compile(r"\b([45]\d\d) ([A-Z][A-Za-z ]+?)(?::|$)", re.MULTILINE)
_CAUSES = {
    "NoSuchBucket": "the bucket does not exist",
    "SignatureDoesNotMatch": "wrong credentials (the secret key does not match)",
    "InvalidAccessKeyId": "wrong credentials (unknown access key)",
    "AccessDenied": "access denied",
    "SlowDown": "throttled by the server",
    # Azure Blob (https://learn.microsoft.com/rest/api/storageservices/blob-service-error-codes)
    "ContainerNotFound": "the container does not exist",
    "ContainerBeingDeleted": "the container is being deleted",
    "AuthenticationFailed": "wrong credentials (the account key or SAS does not match)",
    "InvalidAuthenticationInfo": "wrong credentials (the token is not valid)",
    "AuthorizationFailure": "not authorized (the account's rules refuse this request)",
    "AuthorizationPermissionMismatch": "access denied (the identity lacks the permission)",
    "InsufficientAccountPermissions": "access denied",
    "AccountIsDisabled": "the storage account is disabled",
    "ServerBusy": "throttled by the server",
}


def os_error(exc: BaseError, key: str, action: str) -> OSError:
    """An OSError for ``exc`` raised while trying to ``action`` ``key``: the cause in
    words, picked out of obstore's message (which is not passed on whole: it holds
    request URLs and headers)."""
    text = str(exc)
    code = _S3_CODE.search(text)
    status = _STATUS.search(text)
    if code and code.group(1) == "AuthorizationFailure" and "failed to authenticate" in text:
        # Azurite says AuthorizationFailure where Azure says AuthenticationFailed: a
        # signature that does not match (its message says so, as Azure's does).
        cause = _CAUSES["AuthenticationFailed"]
    elif code and code.group(1) in _CAUSES:
        cause = _CAUSES[code.group(1)]
    elif code:
        cause = code.group(1)
    elif status:
        cause = f"HTTP {status.group(1)} {status.group(2).strip()}"
    elif transient := describe_cause(exc):
        cause = transient
    elif "connect" in text.lower() or "dns" in text.lower():
        cause = "the endpoint is unreachable"
    else:
        cause = type(exc).__name__
    message = f"cannot {action} {key}: {cause}"
    http = int(status.group(1)) if status else 0
    if isinstance(exc, NotFoundError) or (code and code.group(1) in ("NoSuchKey", "BlobNotFound")):
        return FileNotFoundError(2, message, key)
    denied = isinstance(exc, PermissionDeniedError | UnauthenticatedError) or http in (401, 403)
    if denied:
        return PermissionError(13, message, key)
    return OSError(5, message, key)
