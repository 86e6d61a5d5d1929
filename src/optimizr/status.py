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
    finally:
        manifest.close()
    return StatusReport(
        dest=str(dest_path),
        manifest=str(manifest.path),
        by_status=by_status,
        skipped_by_reason=skipped,
        failures=tuple(groups),
        bytes_in=int(bytes_in),
        bytes_out=int(bytes_out),
        lock_holder=lock_holder(state_dir(dest_path)),
        last_run=last_run,
    )
