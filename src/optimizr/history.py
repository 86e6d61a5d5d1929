"""Every run's summary, kept in ``DEST/.optimizr/runs/``: the history ``optimizr report`` draws.

``DEST/optimizr-summary.json`` is the latest run, whatever it did: scripts read it.
A re-run that finds everything up to date would then replace a real conversion's
figures with "converted 0" (issue 10, item 6), so each run's document is also kept
here under a name of its own, written atomically:

    20240501T120000.123456Z-run42-work.json

the run's start (UTC, so names sort in time order), the manifest's run id, and
whether the run did work (converted something, or failed something not already
known bad) or found nothing to do (``idle``): the name alone lets the pruning and
``optimizr report DEST`` find the runs that matter without parsing every document.
The history is bounded: at most :data:`MAX_RUNS` documents and :data:`MAX_BYTES`
bytes, the oldest pruned first, but never the newest run and never the newest run
that did work.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimizr.atomic import atomic_write
from optimizr.config import SUMMARY_NAME
from optimizr.errors import UsageError
from optimizr.manifest import state_dir

RUNS_DIR = "runs"
#: Runs kept at most, and bytes of their documents at most (a summary lists every
#: file not converted, so a library of many unsupported files makes large ones).
MAX_RUNS = 100
MAX_BYTES = 64 << 20

_NAME_RE = re.compile(r"^(\d{8}T\d{6}\.\d{6}Z)-run(\d+)-(work|idle)\.json$")


@dataclass(frozen=True)
class KeptRun:
    """One document in the history, as its name describes it."""

    path: Path
    started: str  # the UTC stamp of the name, sortable
    run_id: int
    did_work: bool
    size: int


def runs_dir(dest: Path) -> Path:
    return state_dir(dest) / RUNS_DIR


def did_work(doc: Mapping[str, Any]) -> bool:
    """The run converted something, or failed something an earlier run did not."""
    files = doc.get("files")
    if not isinstance(files, Mapping):
        return False
    converted = _count(files.get("converted"))
    new_failures = _count(files.get("failed")) - _count(files.get("known_failed"))
    return converted > 0 or new_failures > 0


def run_file_name(started_at: float, run_id: int, work: bool) -> str:
    micro = int(round((started_at % 1) * 1e6)) % 1_000_000
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started_at)) + f".{micro:06d}Z"
    return f"{stamp}-run{run_id}-{'work' if work else 'idle'}.json"


def keep_run(
    dest: Path, doc: Mapping[str, Any], data: bytes, started_at: float, run_id: int
) -> Path:
    """Write one run's summary (``data``, the bytes of ``doc``) into the history, then
    prune it; return the document's path. Raises OSError."""
    folder = runs_dir(dest)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / run_file_name(started_at, run_id, did_work(doc))
    atomic_write(path, data)
    for old in prunable(kept_runs(dest), MAX_RUNS, MAX_BYTES):
        old.path.unlink(missing_ok=True)
    return path


def kept_runs(dest: Path) -> list[KeptRun]:
    """The documents in DEST's history, oldest first; other files there are ignored."""
    try:
        entries = list(runs_dir(dest).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    runs = []
    for path in entries:
        match = _NAME_RE.match(path.name)
        if match is None:
            continue
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            continue  # pruned by a run meanwhile
        stamp, run_id, kind = match.groups()
        runs.append(KeptRun(path, stamp, int(run_id), kind == "work", size))
    return sorted(runs, key=lambda r: (r.started, r.run_id))


def prunable(runs: list[KeptRun], max_runs: int, max_bytes: int) -> list[KeptRun]:
    """Of ``runs`` (oldest first), those beyond ``max_runs`` documents or ``max_bytes``
    bytes, counting from the newest; the newest run and the newest that did work stay
    whatever they weigh, and count against the limits first."""
    if not runs:
        return []
    protected = {runs[-1].path}
    work = [r for r in runs if r.did_work]
    if work:
        protected.add(work[-1].path)
    count = len(protected)
    size = sum(r.size for r in runs if r.path in protected)
    drop = []
    for run in reversed(runs):
        if run.path in protected:
            continue
        if count < max_runs and size + run.size <= max_bytes:
            count += 1
            size += run.size
        else:
            drop.append(run)
    return drop


def latest_summary(dest: Path) -> tuple[Path, str]:
    """The summary ``optimizr report DEST`` draws, and why that one: the newest kept
    run that did work; else the newest kept run; else DEST's optimizr-summary.json
    (written before runs were kept). Raises UsageError when DEST has none."""
    runs = kept_runs(dest)
    work = [r for r in runs if r.did_work]
    if work:
        return work[-1].path, "the latest run that converted or failed something"
    if runs:
        return runs[-1].path, "the latest run (none kept converted or failed anything)"
    latest = dest / SUMMARY_NAME
    if latest.is_file():
        return latest, f"{SUMMARY_NAME} (DEST keeps no run history)"
    raise _no_summary(dest)


def load_history(dest: Path) -> list[tuple[KeptRun | None, dict[str, Any]]]:
    """Every kept run's document, oldest first (a document that cannot be read or
    parsed is left out). A DEST without history gives its optimizr-summary.json alone.
    Raises UsageError when there is nothing at all."""
    docs: list[tuple[KeptRun | None, dict[str, Any]]] = []
    for run in kept_runs(dest):
        doc = _read_json(run.path)
        if doc is not None:
            docs.append((run, doc))
    if not docs:
        latest = _read_json(dest / SUMMARY_NAME)
        if latest is not None:
            docs.append((None, latest))
    if not docs:
        raise _no_summary(dest)
    return docs


def _no_summary(dest: Path) -> UsageError:
    return UsageError(
        f"{dest}: no run summary here (no {RUNS_DIR} in {state_dir(dest)}, no {SUMMARY_NAME})"
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
