"""The durable local event queue: ``DEST/.optimizr/events.sqlite``, beside the manifest.

The HTTP webhook answers 2xx only after the message is committed here (one
transaction, ``synchronous = FULL``: the commit is on disk before the answer), so a
store that got its 2xx may forget the event. The service then takes messages from
it as from any broker (:class:`~optimizr.event_sources.QueueSource`).

One table, one row per message: ``ready`` (waiting, or leased until
``visible_at``), or ``dead`` (a dead letter, with its reason; kept for ``optimizr
status`` and for a person to read). An acknowledged message is deleted. Its own file,
not a table of the manifest: the webhook's threads write it while the pipeline's
thread owns the manifest's connection and commits rows in batches of its own.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from optimizr.atomic import atomic_path
from optimizr.errors import ManifestDamaged
from optimizr.storage.base import STATE_DIR

QUEUE_NAME = "events.sqlite"

_SCHEMA = """
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    body BLOB NOT NULL,
    received_at REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('ready', 'dead')),
    visible_at REAL NOT NULL,
    deliveries INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    settled_at REAL
);
CREATE INDEX messages_ready ON messages (state, visible_at, id);
"""


def queue_path(dest: Path) -> Path:
    return dest / STATE_DIR / QUEUE_NAME


@dataclass(frozen=True)
class QueueStatistics:
    put: int
    refused: int
    acked: int
    naked: int
    termed: int
    #: Messages waiting (visible now or later), and dead letters kept.
    ready: int
    dead: int


@dataclass(frozen=True)
class DeadLetter:
    id: int
    received_at: float
    reason: str
    body: bytes


class EventQueue:
    """The queue of one DEST. Thread-safe: the webhook's threads put, the service receives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:  # never a half-made queue under the real name
                conn = sqlite3.connect(tmp, isolation_level=None)
                try:
                    conn.executescript(_SCHEMA)
                finally:
                    conn.close()
        try:
            self.conn = sqlite3.connect(
                path, isolation_level=None, timeout=10, check_same_thread=False
            )
            self.conn.execute("PRAGMA journal_mode = WAL")
            # FULL: a commit is fsynced before it returns, so a 2xx means on disk.
            self.conn.execute("PRAGMA synchronous = FULL")
            self.conn.execute("SELECT COUNT(*) FROM messages").fetchone()
        except sqlite3.Error as exc:
            raise ManifestDamaged(f"the event queue {path} cannot be opened: {exc}") from None
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._counts = dict.fromkeys(("put", "refused", "acked", "naked", "termed"), 0)

    @classmethod
    def open(cls, dest: Path) -> EventQueue:
        return cls(queue_path(dest))

    def release_leases(self) -> int:
        """Make every leased message visible again: after a restart, the messages the
        killed process had received were never settled (the DEST lock says it is
        the only consumer)."""
        with self._lock:
            cursor = self.conn.execute(
                "UPDATE messages SET visible_at = ? WHERE state = 'ready' AND visible_at > ?",
                (time.time(), time.time()),
            )
            return cursor.rowcount

    # -- in --------------------------------------------------------------------------

    def put(self, body: bytes) -> int:
        """Store one message, committed (durable) when this returns. Raises sqlite3.Error."""
        now = time.time()
        with self._lock:
            cursor = self.conn.execute(
                "INSERT INTO messages (body, received_at, state, visible_at) "
                "VALUES (?, ?, 'ready', ?)",
                (body, now, now),
            )
            self._counts["put"] += 1
            self._arrived.notify_all()
            return int(cursor.lastrowid or 0)

    def refuse(self, body: bytes, reason: str) -> int:
        """Keep a message refused at the door (garbage) as a dead letter, with why."""
        now = time.time()
        with self._lock:
            cursor = self.conn.execute(
                "INSERT INTO messages (body, received_at, state, visible_at, reason, settled_at) "
                "VALUES (?, ?, 'dead', ?, ?, ?)",
                (body, now, now, reason, now),
            )
            self._counts["refused"] += 1
            return int(cursor.lastrowid or 0)

    # -- out -------------------------------------------------------------------------

    def receive(self, limit: int, visibility: float) -> list[tuple[int, bytes, int]]:
        """Lease up to ``limit`` visible messages for ``visibility`` seconds:
        (id, body, delivery count) each, oldest first."""
        now = time.time()
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                rows = self.conn.execute(
                    "SELECT id, body, deliveries FROM messages WHERE state = 'ready' "
                    "AND visible_at <= ? ORDER BY id LIMIT ?",
                    (now, max(1, limit)),
                ).fetchall()
                self.conn.executemany(
                    "UPDATE messages SET deliveries = deliveries + 1, visible_at = ? WHERE id = ?",
                    [(now + visibility, row[0]) for row in rows],
                )
                self.conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
                raise
        return [(int(i), bytes(body), int(n) + 1) for i, body, n in rows]

    def wait(self, timeout: float) -> None:
        """Until a message is put, or ``timeout`` seconds."""
        with self._arrived:
            self._arrived.wait(max(0.0, timeout))

    def next_visible_in(self) -> float | None:
        """Seconds until the next waiting message becomes visible (None: none waits)."""
        with self._lock:
            row = self.conn.execute(
                "SELECT MIN(visible_at) FROM messages WHERE state = 'ready'"
            ).fetchone()
        return None if row[0] is None else max(0.0, float(row[0]) - time.time())

    def ack(self, row_id: int) -> None:
        self.ack_many([row_id])

    def ack_many(self, row_ids: list[int]) -> None:
        """Delete ``row_ids`` in one transaction: one sync to disk, not one each."""
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                self.conn.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in row_ids])
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self._counts["acked"] += len(row_ids)

    def nak(self, row_id: int, delay: float) -> None:
        with self._lock:
            self.conn.execute(
                "UPDATE messages SET visible_at = ? WHERE id = ?",
                (time.time() + max(0.0, delay), row_id),
            )
            self._counts["naked"] += 1
            self._arrived.notify_all()

    def extend(self, row_id: int, seconds: float) -> None:
        with self._lock:
            self.conn.execute(
                "UPDATE messages SET visible_at = ? WHERE id = ?", (time.time() + seconds, row_id)
            )

    def term(self, row_id: int, reason: str) -> None:
        with self._lock:
            self.conn.execute(
                "UPDATE messages SET state = 'dead', reason = ?, settled_at = ? WHERE id = ?",
                (reason, time.time(), row_id),
            )
            self._counts["termed"] += 1

    # -- reading -----------------------------------------------------------------------

    def depth(self) -> int:
        with self._lock:
            row = self.conn.execute(
                "SELECT COUNT(*) FROM messages WHERE state = 'ready'"
            ).fetchone()
        return int(row[0])

    def dead_letters(self) -> list[DeadLetter]:
        with self._lock:
            rows = self.conn.execute(
                "SELECT id, received_at, reason, body FROM messages WHERE state = 'dead' "
                "ORDER BY id"
            ).fetchall()
        return [DeadLetter(int(i), float(t), str(r or ""), bytes(b)) for i, t, r, b in rows]

    def statistics(self) -> QueueStatistics:
        with self._lock:
            counts = dict(self._counts)
            by_state = dict(
                self.conn.execute("SELECT state, COUNT(*) FROM messages GROUP BY state").fetchall()
            )
        return QueueStatistics(
            counts["put"],
            counts["refused"],
            counts["acked"],
            counts["naked"],
            counts["termed"],
            int(by_state.get("ready", 0)),
            int(by_state.get("dead", 0)),
        )

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self.conn.close()


def read_queue_counts(dest: Path) -> tuple[int, int] | None:
    """(waiting, dead letters) of DEST's queue, read-only; None if it has none."""
    path = queue_path(dest)
    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            by_state = dict(
                conn.execute("SELECT state, COUNT(*) FROM messages GROUP BY state").fetchall()
            )
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    return int(by_state.get("ready", 0)), int(by_state.get("dead", 0))


def last_dead_letter(dest: Path) -> str | None:
    """The reason of the latest dead letter in DEST's queue, read-only (None: none)."""
    path = queue_path(dest)
    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            row = conn.execute(
                "SELECT reason FROM messages WHERE state = 'dead' ORDER BY id DESC LIMIT 1"
            ).fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    return None if row is None else str(row[0] or "")
