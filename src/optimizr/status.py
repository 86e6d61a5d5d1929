"""``optimizr status DEST``: what the manifest says about a destination, read-only.

It never takes the run lock, so it can watch a run in progress (WAL readers do
not block the writer); it only asks the kernel whether someone holds it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from optimizr.errors import UsageError
from optimizr.filenames import json_safe, name_fields
from optimizr.lock import lock_holder
from optimizr.manifest import Manifest, manifest_path, state_dir


@dataclass(frozen=True)
class FailureGroup:
    reason: str
    count: int
    example: str  # one path with this reason (a key: not always UTF-8, see filenames.py)
    message: str  # and its message


@dataclass(frozen=True)
class RunProgress:
    """How far the run in progress is, as it last published in the manifest
    (with each batch of rows, so at most a second or so old)."""

    run_id: int
    #: Files this run has finished so far, whatever became of them.
    processed: int
    #: Files this run will have seen; None while the count pass is still going.
    total: int | None
    updated_at: float

    @property
    def remaining(self) -> int | None:
        return None if self.total is None else max(0, self.total - self.processed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "processed": self.processed,
            "total": self.total,
            "remaining": self.remaining,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class StatusReport:
    dest: str
    manifest: str
    by_status: dict[str, int]
    skipped_by_reason: dict[str, int]
    failures: tuple[FailureGroup, ...]
    #: Over the sources marked done: their sizes, their outputs' sizes.
    bytes_in: int
    bytes_out: int
    lock_holder: dict[str, Any] | None
    last_run: dict[str, Any] | None
    #: Only while a run holds the lock: how far it is.
    progress: RunProgress | None = None
    #: The ``optimizr watch`` service of this DEST, if one ever ran: its state file
    #: (state, events URL, counters) and its queue (waiting, dead_letters).
    watch: dict[str, Any] | None = None

    @property
    def total(self) -> int:
        return sum(self.by_status.values())

    @property
    def saved(self) -> int:
        return self.bytes_in - self.bytes_out

    def to_dict(self) -> dict[str, Any]:
        """The JSON document; an example that is not UTF-8 also has "example_bytes"."""
        data = asdict(self)
        data["failures"] = [
            {**vars(group), **name_fields(group.example, "example")} for group in self.failures
        ]
        data["total"] = self.total
        data["saved"] = self.saved
        data["running"] = self.lock_holder is not None
        data["progress"] = self.progress.to_dict() if self.progress is not None else None
        return dict(json_safe(data))


def read_status(dest: str | Path) -> StatusReport:
    """Counts by status, failures grouped by reason, bytes saved, and the lock."""
    dest_path = Path(dest)
    manifest = Manifest.open_readonly(dest_path)
    if manifest is None:
        raise UsageError(
            f"no optimizr manifest in {dest_path} ({manifest_path(dest_path)} does not exist)"
        )
    try:
        conn = manifest.conn
        by_status = {"done": 0, "failed": 0, "skipped": 0}
        by_status.update(
            {s: n for s, n in conn.execute("SELECT status, COUNT(*) FROM files GROUP BY status")}
        )
        skipped = dict(
            conn.execute(
                "SELECT reason, COUNT(*) FROM files WHERE status = 'skipped' "
                "GROUP BY reason ORDER BY COUNT(*) DESC, reason"
            ).fetchall()
        )
        groups = [
            FailureGroup(reason or "failed", count, path, message)
            for reason, count, path, message in manifest.failure_examples()
        ]
        bytes_in, bytes_out = conn.execute(
            "SELECT COALESCE(SUM(size), 0), COALESCE(SUM(output_size), 0) "
            "FROM files WHERE status = 'done'"
        ).fetchone()
        last_run = manifest.last_run()
        published = manifest.run_progress()
    finally:
        manifest.close()
    holder = lock_holder(state_dir(dest_path))
    return StatusReport(
        dest=str(dest_path),
        manifest=str(manifest.path),
        by_status=by_status,
        skipped_by_reason=skipped,
        failures=tuple(groups),
        bytes_in=int(bytes_in),
        bytes_out=int(bytes_out),
        lock_holder=holder,
        last_run=last_run,
        progress=_live_progress(published, last_run) if holder is not None else None,
        watch=_watch_status(dest_path, holder is not None),
    )


def _watch_status(dest: Path, locked: bool) -> dict[str, Any] | None:
    """What the watch service's state file and queue say; a state file that still
    says running while nobody holds the lock was left by a killed service."""
    from optimizr.event_queue import last_dead_letter, read_queue_counts
    from optimizr.watch import read_watch_state

    state = read_watch_state(dest)
    counts = read_queue_counts(dest)
    if state is None and counts is None:
        return None
    doc = dict(state or {})
    if doc.get("state") in ("running", "draining", "starting") and not locked:
        doc["state"] = "killed"
    source = doc.get("source_statistics")
    if not str(doc.get("events", "http://")).lower().startswith("http://") and isinstance(
        source, dict
    ):
        # A broker keeps its own queue: what the service last saw of it (the consumer
        # lag; what it termed, and what the broker dead-lettered after max_deliver).
        lag = source.get("lag")
        doc["waiting"] = lag if isinstance(lag, int) else None
        doc["dead_letters"] = int(source.get("termed", 0)) + int(source.get("dead_lettered", 0))
        doc["last_dead_letter"] = None
        return doc
    waiting, dead = counts if counts is not None else (0, 0)
    doc["waiting"], doc["dead_letters"] = waiting, dead
    doc["last_dead_letter"] = last_dead_letter(dest) if dead else None
    return doc


def _live_progress(
    published: dict[str, Any] | None, last_run: dict[str, Any] | None
) -> RunProgress | None:
    """The published progress, if it is the running run's: the figures a finished
    or killed run left behind describe no run in progress."""
    if published is None or last_run is None or last_run["finished_at"] is not None:
        return None
    if published.get("run_id") != last_run["id"]:
        return None
    try:
        total = published.get("total")
        return RunProgress(
            run_id=int(published["run_id"]),
            processed=int(published["processed"]),
            total=None if total is None else int(total),
            updated_at=float(published["updated_at"]),
        )
    except (KeyError, TypeError, ValueError):
        return None
