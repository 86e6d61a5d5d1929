"""The manifest: ``DEST/.optimizr/manifest.sqlite``, what became of every source.

It is the evidence a re-run skips on (STYLE rule 5, after borg's files cache):
a source whose size, mtime_ns and options fingerprint are unchanged, and whose
output is still on disk at the recorded size, is not opened again.

Ordering is what makes it safe. A row says ``done`` only after its output was
renamed into place and fsynced; rows are committed in batches, so a crash
loses at most the last batch of rows, never an output, and those files are
simply converted again. A ``done`` row without its file cannot happen, and if
someone deletes the file later the size check sends it back to work.

One table row per source, keyed by (directory, name) so that a whole
directory's rows, the unit the pipeline plans in, come back in one query with
memory bounded by the largest directory, not by the tree.

A name is bytes on POSIX, and not always UTF-8 (``caf\\xe9.jpg`` from a Latin-1
archive), which SQLite TEXT cannot hold. ``dir``, ``name`` and ``output`` are
TEXT when they are UTF-8, as nearly all are, and otherwise a BLOB of the exact
bytes (SQLite columns take either; ``WHERE dir = ?`` with a blob finds the
blob); they come back as the same ``str`` the walk gives (:func:`os.fsdecode`).
Paths are joined in Python, never with ``||`` in SQL, which would mangle a blob.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimizr.atomic import atomic_open, atomic_path
from optimizr.config import RunConfig
from optimizr.errors import ManifestDamaged
from optimizr.filenames import is_exact_text, key_from_fields, name_fields, valid_unicode
from optimizr.results import options_dict
from optimizr.storage.base import STATE_DIR

MANIFEST_NAME = "manifest.sqlite"
FAILED_LIST_NAME = "failed.jsonl"
SCHEMA_VERSION = 1

#: Bumped when a change to the encoder makes earlier outputs worth redoing.
ENCODER_GENERATION = 1

#: Rows are committed every BATCH_ROWS rows or BATCH_SECONDS, whichever comes
#: first: one fsync per batch instead of per file, and a crash costs at most
#: one batch of reconversions.
BATCH_ROWS = 64
BATCH_SECONDS = 0.5

#: A source modified this close to the moment it was listed may change again
#: within the same timestamp tick, unseen; such a row is not trusted as
#: evidence next time (STYLE rule 5). 10 ms covers the kernel's coarse clock;
#: whole-second mtimes come from a filesystem with 1-2 s granularity (FAT, HFS+).
SETTLE_NS = 10_000_000
SETTLE_COARSE_NS = 2_000_000_000

#: The ``meta`` key under which the run in progress publishes how far it is
#: (JSON: run_id, processed, total, updated_at), for ``optimizr status``.
PROGRESS_KEY = "progress"

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    started_at REAL NOT NULL,
    finished_at REAL,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    version TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    options TEXT NOT NULL,
    found INTEGER,
    converted INTEGER,
    skipped INTEGER,
    failed INTEGER,
    exit_code INTEGER
);
CREATE TABLE files (
    dir TEXT NOT NULL,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    checked_ns INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('done', 'failed', 'skipped')),
    reason TEXT,
    output TEXT,
    output_size INTEGER,
    error_class TEXT,
    message TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    first_seen REAL NOT NULL,
    updated_at REAL NOT NULL,
    run_id INTEGER,
    -- An object store's ETag of the source (NULL on a filesystem): see Row.describes.
    etag TEXT,
    PRIMARY KEY (dir, name)
) WITHOUT ROWID;
CREATE INDEX files_by_status ON files (status, reason);
-- For people reading the manifest with sqlite3; optimizr joins paths itself
-- (a name stored as a BLOB, not being UTF-8, shows here as raw bytes).
CREATE VIEW sources AS
    SELECT CASE WHEN dir = '' THEN name ELSE dir || '/' || name END AS path, *
    FROM files;
"""

_COLUMNS = (
    "dir, name, size, mtime_ns, checked_ns, fingerprint, status, reason, output, output_size, "
    "error_class, message, attempts, first_seen, updated_at, run_id, etag"
)
_UPSERT = f"""
INSERT INTO files ({_COLUMNS}) VALUES ({", ".join("?" * 17)})
ON CONFLICT (dir, name) DO UPDATE SET
    size = excluded.size, mtime_ns = excluded.mtime_ns, checked_ns = excluded.checked_ns,
    fingerprint = excluded.fingerprint, status = excluded.status, reason = excluded.reason,
    output = excluded.output, output_size = excluded.output_size,
    error_class = excluded.error_class, message = excluded.message,
    attempts = excluded.attempts, updated_at = excluded.updated_at, run_id = excluded.run_id,
    etag = excluded.etag
"""


def state_dir(dest: Path) -> Path:
    return dest / STATE_DIR


def manifest_path(dest: Path) -> Path:
    return state_dir(dest) / MANIFEST_NAME


#: EncodeOptions fields added since the first manifests, with their defaults.
_ADDED_LATER: dict[str, object] = {
    "pages": "first",
    "strict_decode": False,
    "target_size": None,
    "target_score": None,
    "min_quality": 50,
    "max_quality": 95,
}


def options_fingerprint(config: RunConfig) -> str:
    """A digest of every option that shapes what is written for a source."""
    encode = options_dict(config.encode)
    # Both encoders write the same bytes (tests/test_webp_writer.py).
    encode.pop("encoder", None)
    if encode.get("target_score") is None:
        # The range of --target-score's search shapes nothing without it.
        encode.pop("min_quality", None)
        encode.pop("max_quality", None)
    for name, default in _ADDED_LATER.items():
        # An option added after manifests existed counts only when it is set:
        # otherwise upgrading optimizr would make every done file look stale.
        if name in encode and encode[name] == default:  # (None is a default too)
            del encode[name]
    shaping = {
        "generation": ENCODER_GENERATION,
        "encode": encode,
        # auto names a file as replace does unless a sibling collides, and the
        # output name is checked against the row anyway: switching to auto
        # redoes only the files whose names change.
        "name": "replace" if config.name == "auto" else config.name,
        "if_larger": config.if_larger,
    }
    # Added only when not at their defaults, so that the fingerprints of
    # manifests written before these options existed stay valid.
    if config.min_saving:
        shaping["min_saving"] = config.min_saving
    if config.reencode_webp:
        shaping["reencode_webp"] = True
    text = json.dumps(shaping, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _to_sql(name: str) -> str | bytes:
    """A name or path as the manifest stores it: TEXT if it is UTF-8, else its bytes."""
    return name if is_exact_text(name) else os.fsencode(name)


def _from_sql(value: str | bytes) -> str:
    return os.fsdecode(value) if isinstance(value, bytes) else value


def _join(directory: str, name: str) -> str:
    return f"{directory}/{name}" if directory else name


def split_key(key: str) -> tuple[str, str]:
    """``a/b/c.jpg`` -> (``a/b``, ``c.jpg``); a top-level key has directory ``""``.

    Plain string work on the walk's normalised POSIX keys: it runs for every
    file of every run, where path objects would cost more than the lookup."""
    directory, _, name = key.rpartition("/")
    return directory, name


@dataclass(frozen=True)
class Row:
    """What the manifest knows about one source."""

    key: str
    size: int
    mtime_ns: int
    checked_ns: int
    fingerprint: str
    status: str  # done | failed | skipped
    reason: str | None
    output: str | None
    output_size: int | None
    error_class: str | None
    message: str
    attempts: int
    etag: str | None = None

    def describes(
        self, size: int, mtime_ns: int, fingerprint: str, etag: str | None = None
    ) -> bool:
        """Is this row evidence about the source as it is now, under these options?

        On an object store the ETag says it: a replaced object has a new one even
        when its size and (one-second) last-modified look the same, and no
        settle window is needed since an ETag is of the content, not of a clock."""
        if self.etag is not None and etag is not None:
            return (self.size, self.etag, self.fingerprint) == (size, etag, fingerprint)
        if (self.size, self.mtime_ns, self.fingerprint) != (size, mtime_ns, fingerprint):
            return False
        coarse = self.mtime_ns % 1_000_000_000 == 0
        settle = SETTLE_COARSE_NS if coarse else SETTLE_NS
        return self.checked_ns - self.mtime_ns >= settle


@dataclass
class ManifestStatistics:
    rows_written: int = 0
    commits: int = 0
    commit_seconds: float = 0.0
    commit_failures: int = 0
    unsaved_rows: int = 0
    lookups: int = 0
    adopted: int = 0
    last_error: str = ""


@dataclass
class Manifest:
    """An open manifest. Single writer: the pipeline's thread of one run."""

    path: Path
    conn: sqlite3.Connection
    run_id: int = 0
    #: Set after --rebuild-manifest: outputs already on disk may be adopted.
    rebuilt: bool = False
    #: Set when this manifest was restored from DEST's snapshot (a remote DEST run
    #: on a machine without its state): outputs the snapshot has no row for, newer
    #: than the unfinished run it records, are that run's and may be adopted.
    restored: bool = False
    stats: ManifestStatistics = field(default_factory=ManifestStatistics)
    _pending: list[tuple[Any, ...]] = field(default_factory=list)
    #: What rows_in selects for the ETag: a read-only old manifest has no column.
    _etag: str = "etag"
    _last_commit: float = field(default_factory=time.monotonic)
    #: (processed, total) as last told by note_progress, and as last written.
    _progress: tuple[int, int | None] | None = None
    _progress_written: tuple[int, int | None] | None = None

    # -- opening -------------------------------------------------------------------

    @classmethod
    def open(cls, dest: Path) -> Manifest:
        """Open DEST's manifest, creating it when there is none.

        A damaged one raises :class:`ManifestDamaged`: never a silent restart
        from zero, which would redo (and pay for) every file already done.
        """
        path = manifest_path(dest)
        if not path.exists():
            _create(path)
        conn = _connect(path)
        _check(conn, path)
        if not _has_etag(conn):
            # Manifests from before object stores: the column is added, NULL for all.
            conn.execute("ALTER TABLE files ADD COLUMN etag TEXT")
        return cls(path, conn)

    @classmethod
    def open_readonly(cls, dest: Path) -> Manifest | None:
        path = manifest_path(dest)
        if not path.exists():
            return None
        try:
            conn = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise _damaged(path, exc) from None
        _check(conn, path)
        return cls(path, conn, _etag="etag" if _has_etag(conn) else "NULL")

    @classmethod
    def in_memory(cls) -> Manifest:
        """A manifest that lives as long as the object: for storages with no DEST folder."""
        conn = sqlite3.connect(":memory:", isolation_level=None)
        conn.executescript(_SCHEMA)
        return cls(Path(":memory:"), conn)

    @classmethod
    def rebuild(cls, dest: Path) -> Manifest:
        """Set a damaged manifest aside and start a new one that adopts what is on disk.

        The pipeline fills it: an output that exists, is a complete WebP and is
        newer than its source is recorded as done under the current options;
        the dead-letter list brings back the known failures.
        """
        path = manifest_path(dest)
        if path.exists():
            stamp = time.strftime("%Y%m%dT%H%M%S")
            for suffix in ("", "-wal", "-shm"):
                old = path.with_name(path.name + suffix)
                if old.exists():
                    os.replace(old, path.with_name(f"{MANIFEST_NAME}.damaged-{stamp}{suffix}"))
        _create(path)
        manifest = cls(path, _connect(path), rebuilt=True)
        manifest._restore_failures(state_dir(dest) / FAILED_LIST_NAME)
        return manifest

    def _restore_failures(self, failed_list: Path) -> None:
        try:
            lines = failed_list.read_text(encoding="utf-8").splitlines()
        except OSError:
            return
        for line in lines:
            try:
                item = json.loads(line)
                restored = {
                    "size": int(item["size"]),
                    "mtime_ns": int(item["mtime_ns"]),
                    "checked_ns": int(item["checked_ns"]),
                    "fingerprint": str(item["fingerprint"]),
                    "reason": item.get("reason"),
                    "error_class": item.get("error_class"),
                    "message": item.get("message", ""),
                    "attempts": int(item.get("attempts", 1)),
                }
                key = key_from_fields(item)
            except (ValueError, KeyError, TypeError):
                continue  # a line from an older format, or torn: that file is simply retried
            self.record(key, status="failed", **restored)
        self.flush()

    # -- runs ----------------------------------------------------------------------

    def begin_run(self, config: RunConfig, fingerprint: str) -> int:
        from optimizr import __version__

        options = json.dumps({"encode": options_dict(config.encode), "name": config.name})
        cursor = self.conn.execute(
            "INSERT INTO runs (started_at, pid, host, version, fingerprint, options) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), os.getpid(), socket.gethostname(), __version__, fingerprint, options),
        )
        self.run_id = int(cursor.lastrowid or 0)
        # At once, so that status never shows the previous run's figures as this one's.
        self.note_progress(0, None)
        self.flush()
        return self.run_id

    def finish_run(
        self,
        found: int,
        converted: int,
        skipped: int,
        failed: int,
        code: int,
        *,
        outputs_confirmed: bool = True,
    ) -> None:
        """Record the run's figures. ``outputs_confirmed`` False: outputs may have
        been written whose rows never came (a cluster's workers write their own):
        the run keeps no finish time, so the next one treats it as a killed run's."""
        if not self.flush():
            # Rows are missing (a full disk): the run counts as unfinished, so
            # the next one knows the outputs without rows may be its own.
            return
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute(
                "UPDATE runs SET finished_at = ?, found = ?, converted = ?, skipped = ?, "
                "failed = ?, exit_code = ? WHERE id = ?",
                (
                    time.time() if outputs_confirmed else None,
                    found,
                    converted,
                    skipped,
                    failed,
                    code,
                    self.run_id,
                ),
            )

    # -- rows ----------------------------------------------------------------------

    def rows_in(self, directory: str) -> dict[str, Row]:
        """Every row of one directory, by file name."""
        self.stats.lookups += 1
        prefix = f"{directory}/" if directory else ""
        rows = self.conn.execute(
            "SELECT name, size, mtime_ns, checked_ns, fingerprint, status, reason, output, "
            f"output_size, error_class, message, attempts, {self._etag} FROM files WHERE dir = ?",
            (_to_sql(directory),),
        )
        found: dict[str, Row] = {}
        for raw_name, *facts in rows:
            name = _from_sql(raw_name)
            row = Row(prefix + name, *facts)
            if row.output is not None and not isinstance(row.output, str):
                row = dataclasses.replace(row, output=_from_sql(row.output))  # a BLOB
            found[name] = row
        return found

    def record(
        self,
        key: str,
        *,
        size: int,
        mtime_ns: int,
        checked_ns: int,
        fingerprint: str,
        status: str,
        reason: str | None = None,
        output: str | None = None,
        output_size: int | None = None,
        error_class: str | None = None,
        message: str = "",
        attempts: int = 0,
        etag: str | None = None,
    ) -> None:
        now = time.time()
        directory, name = split_key(key)
        self._pending.append(
            (
                _to_sql(directory),
                _to_sql(name),
                size,
                mtime_ns,
                checked_ns,
                fingerprint,
                status,
                reason,
                None if output is None else _to_sql(output),
                output_size,
                error_class,
                # Free text, often naming a file: kept readable, made valid TEXT.
                valid_unicode(message),
                attempts,
                now,
                now,
                self.run_id or None,
                etag,
            )
        )
        if (
            len(self._pending) >= BATCH_ROWS
            or time.monotonic() - self._last_commit >= BATCH_SECONDS
        ):
            self.flush()

    def note_progress(self, processed: int, total: int | None) -> None:
        """How far the run is: files finished, of ``total`` (None while unknown).

        Written in the same transaction as the next batch of rows; when no rows
        come (a re-run skipping up-to-date files), at most every BATCH_SECONDS on
        its own, so that a reader of the manifest always sees a recent figure."""
        self._progress = (processed, total)
        if time.monotonic() - self._last_commit >= BATCH_SECONDS:
            self.flush()

    def run_progress(self) -> dict[str, Any] | None:
        """What the last run published with note_progress, or None."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (PROGRESS_KEY,)).fetchone()
        try:
            value = json.loads(row[0]) if row else None
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def previous_run_finished(self) -> bool:
        """Did the run before this one end (normally, or stopped by a signal)?"""
        row = self.conn.execute(
            "SELECT finished_at FROM runs WHERE id < ? ORDER BY id DESC LIMIT 1",
            (self.run_id or 1 << 62,),
        ).fetchone()
        return row is not None and row[0] is not None

    def unfinished_since(self) -> float | None:
        """When the earliest of the runs since the last finished one started; None
        if the run before this one finished.

        A run killed between an output's rename and its row's commit leaves
        outputs with no row: files written since then may be optimizr's own."""
        row = self.conn.execute(
            "SELECT MIN(started_at) FROM runs WHERE id < ? AND id > COALESCE("
            "(SELECT MAX(id) FROM runs WHERE finished_at IS NOT NULL AND id < ?), 0)",
            (self.run_id or 1 << 62, self.run_id or 1 << 62),
        ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def owner_of(self, output: str) -> str | None:
        """The source whose row names ``output`` as its output, if any. Rows not yet
        committed count too: an output written earlier in this run is optimizr's."""
        self.flush()
        directory = split_key(output)[0]  # an output lives in its source's folder
        row = self.conn.execute(
            "SELECT name FROM files WHERE dir = ? AND output = ? LIMIT 1",
            (_to_sql(directory), _to_sql(output)),
        ).fetchone()
        return None if row is None else _join(directory, _from_sql(row[0]))

    def directories(self) -> list[str]:
        """Every directory that has rows (far fewer than files)."""
        return [_from_sql(r[0]) for r in self.conn.execute("SELECT DISTINCT dir FROM files")]

    def forget(self, key: str) -> None:
        """Drop the row of a source that no longer exists."""
        self.flush()
        with contextlib.suppress(sqlite3.OperationalError):
            directory, name = split_key(key)
            self.conn.execute(
                "DELETE FROM files WHERE dir = ? AND name = ?", (_to_sql(directory), _to_sql(name))
            )

    def flush(self) -> bool:
        """Commit the pending rows; False (rows kept for the next try) if the disk refused."""
        self._last_commit = time.monotonic()
        progress = self._progress if self._progress != self._progress_written else None
        if not self._pending and progress is None:
            return True
        start = time.perf_counter()
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                self.conn.executemany(_UPSERT, self._pending)
                if progress is not None:
                    self.conn.execute(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                        (PROGRESS_KEY, _progress_json(self.run_id, *progress)),
                    )
                self.conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            # A full disk must not lose the run: outputs are already safe, and
            # rows that never reach the manifest only mean those files are
            # converted again next time. Keep them and try again later.
            self.stats.commit_failures += 1
            self.stats.last_error = str(exc)
            self.stats.unsaved_rows = len(self._pending)
            return False
        self.stats.commits += 1
        self.stats.rows_written += len(self._pending)
        self._progress_written = progress or self._progress_written
        self.stats.commit_seconds += time.perf_counter() - start
        self.stats.unsaved_rows = 0
        self._pending.clear()
        return True

    def close(self) -> None:
        self.flush()
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()

    def statistics(self) -> ManifestStatistics:
        return ManifestStatistics(**vars(self.stats))

    # -- reading, for status and the dead-letter list --------------------------------

    def write_failed_list(self, target: Path) -> int:
        """DEST/.optimizr/failed.jsonl: every failed source, one JSON object a line."""
        count = 0
        with atomic_open(target) as fh:
            rows = self.conn.execute(
                "SELECT dir, name, error_class, reason, message, attempts, updated_at, size, "
                "mtime_ns, checked_ns, fingerprint FROM files WHERE status = 'failed' "
                "ORDER BY dir, name"
            )
            for directory, name, cls, reason, message, attempts, updated, *facts in rows:
                size, mtime, checked, fp = facts
                item = {
                    # "path_bytes" too when the name is not UTF-8: restored exactly.
                    **name_fields(_join(_from_sql(directory), _from_sql(name))),
                    "error_class": cls,
                    "reason": reason,
                    "message": message,
                    "attempts": attempts,
                    "last_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(updated)),
                    "size": size,
                    "mtime_ns": mtime,
                    "checked_ns": checked,
                    "fingerprint": fp,
                }
                fh.write(json.dumps(item).encode() + b"\n")
                count += 1
        return count

    def failure_examples(self) -> list[tuple[str | None, int, str, str]]:
        """(reason, count, first path, its message) per failure reason, most common first."""
        groups = self.conn.execute(
            "SELECT reason, COUNT(*) FROM files WHERE status = 'failed' "
            "GROUP BY reason ORDER BY COUNT(*) DESC, reason"
        ).fetchall()
        examples = []
        for reason, count in groups:
            directory, name, message = self.conn.execute(
                "SELECT dir, name, message FROM files WHERE status = 'failed' AND reason IS ? "
                "ORDER BY dir, name LIMIT 1",
                (reason,),
            ).fetchone()
            path = _join(_from_sql(directory), _from_sql(name))
            examples.append((reason, int(count), path, message or ""))
        return examples

    def last_run(self) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT id, started_at, finished_at, pid, host, version, found, converted, skipped, "
            "failed, exit_code FROM runs ORDER BY id DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        names = (
            "id started_at finished_at pid host version found converted skipped failed exit_code"
        )
        return dict(zip(names.split(), row, strict=True))


def _progress_json(run_id: int, processed: int, total: int | None) -> str:
    doc = {"run_id": run_id, "processed": processed, "total": total, "updated_at": time.time()}
    return json.dumps(doc)


def _create(path: Path) -> None:
    # Built under a temporary name and renamed: a crash while creating leaves
    # no manifest rather than an empty one that would read as "nothing done".
    from optimizr import __version__

    with atomic_path(path) as tmp:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.executescript(_SCHEMA)
            conn.execute(
                "INSERT INTO meta VALUES ('schema', ?), ('created_by', ?), ('created_at', ?)",
                (str(SCHEMA_VERSION), f"optimizr {__version__}", str(time.time())),
            )
        finally:
            conn.close()


#: SQLite's page cache per manifest connection, in KiB. Its default (2 MB) fills only
#: once the manifest passes 2 MB (about 9,000 rows), so a run's memory rose with its
#: size until then (issue 15: the coordinator flat from 1,000 to 20,000 images). The run
#: reads its rows a directory at a time and appends; the pages it reads again are in
#: the kernel's page cache anyway, a pread away.
CACHE_KIB = 256


def _connect(path: Path) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=5)
        # WAL: readers (optimizr status) never block the run, and a commit is
        # one sequential append. NORMAL: a power cut may lose the last commits
        # (those files are redone) but never corrupts the database.
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
    except sqlite3.Error as exc:
        raise _damaged(path, exc) from None
    return conn


def _has_etag(conn: sqlite3.Connection) -> bool:
    return any(row[1] == "etag" for row in conn.execute("PRAGMA table_info(files)"))


def _check(conn: sqlite3.Connection, path: Path) -> None:
    try:
        problems = [r[0] for r in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise _damaged(path, "; ".join(problems[:3]))
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        if not {"meta", "runs", "files"} <= tables:
            raise _damaged(path, "it has no optimizr tables")
        schema = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if schema is None or schema[0] != str(SCHEMA_VERSION):
            found = "none" if schema is None else schema[0]
            raise _damaged(path, f"schema version {found}, expected {SCHEMA_VERSION}")
    except sqlite3.Error as exc:
        conn.close()
        raise _damaged(path, exc) from None
    except ManifestDamaged:
        conn.close()
        raise


def _damaged(path: Path, detail: object) -> ManifestDamaged:
    return ManifestDamaged(
        f"the manifest {path} is damaged ({detail}). Nothing was converted. "
        "Run again with --rebuild-manifest to rebuild it from the files in DEST "
        "(the damaged copy is kept beside it)"
    )
