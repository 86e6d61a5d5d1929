"""Findings about a run, each computed from the summary's own figures by a stated rule.

Nothing here is a canned sentence: a finding appears only when its rule holds,
and it carries the rule and the figures that made it hold, so a reader can
check it. ``analyse`` is pure: the summary document in, a list of findings out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Finding = dict[str, Any]

#: Below this many seconds or images, ratios are noise: no finding is drawn.
MIN_SECONDS = 5.0
MIN_IMAGES = 10


def analyse(doc: dict[str, Any]) -> list[Finding]:
    findings: list[Finding] = []
    for rule in _RULES:
        finding = rule(doc)
        if finding is not None:
            findings.append(finding)
    return findings


def _enough(doc: dict[str, Any]) -> bool:
    return bool(doc.get("seconds", 0) >= MIN_SECONDS and doc["files"]["converted"] >= MIN_IMAGES)


def _cpu_bound_or_not(doc: dict[str, Any]) -> Finding | None:
    cpu, executor = doc.get("cpu") or {}, doc.get("executor") or {}
    if not _enough(doc) or "efficiency" not in cpu or "utilisation" not in executor:
        return None
    efficiency, busy = cpu["efficiency"], executor["utilisation"]
    figures = {"cpu_efficiency": efficiency, "worker_utilisation": busy}
    if efficiency >= 0.70:
        return None
    if busy >= 0.90:
        return {
            "rule": "codec CPU under 70% of the cores while workers held images >= 90% "
            "of the time: workers waited on reads or writes",
            "finding": "I/O-bound: storage, not the codec, set the pace",
            "figures": figures,
        }
    memory = doc.get("memory") or {}
    waited = memory.get("admissions_waited", 0)
    figures["admissions_waited"] = waited
    if waited > 0.1 * doc["files"]["converted"]:
        return {
            "rule": "codec CPU under 70% of the cores, workers idle > 10% of the time, and "
            "over 10% of images waited for memory: the budget held work back",
            "finding": "memory-bound: raise --max-memory or use --max-width/--max-height",
            "figures": figures,
        }
    return {
        "rule": "codec CPU under 70% of the cores and workers idle > 10% of the time "
        "with memory to spare: images did not arrive fast enough",
        "finding": "starved: the walk or source reads were slower than the workers",
        "figures": figures,
    }


def _orchestration(doc: dict[str, Any]) -> Finding | None:
    cpu = doc.get("cpu") or {}
    share = cpu.get("orchestration_share")
    if not _enough(doc) or share is None or share <= 0.03:
        return None
    return {
        "rule": "CPU spent outside the codec over 3% of all CPU",
        "finding": "orchestration overhead is significant (many tiny images?)",
        "figures": {
            "orchestration_share": share,
            "parent_cpu_seconds": cpu.get("parent_cpu_seconds"),
            "images": doc["files"]["converted"],
        },
    }


def _tail(doc: dict[str, Any]) -> Finding | None:
    executor = doc.get("executor") or {}
    tail, seconds = executor.get("tail_seconds", 0), doc.get("seconds", 0)
    if not _enough(doc) or executor.get("workers", 1) < 2 or tail <= 0.1 * seconds:
        return None
    return {
        "rule": "the time from the last image started to the end is over 10% of the run",
        "finding": "the run ended with cores idle behind a few large images; "
        "a larger --lookahead starts them earlier",
        "figures": {"tail_seconds": tail, "seconds": seconds},
    }


def _memory(doc: dict[str, Any]) -> Finding | None:
    memory = doc.get("memory") or {}
    peak, budget = memory.get("peak_rss_bytes", 0), memory.get("budget_bytes", 0)
    if not budget or not peak or peak < 0.9 * budget:
        return None
    return {
        "rule": "peak resident memory of the process tree at 90% of --max-memory or more",
        "finding": "memory ran close to its budget",
        "figures": {"peak_rss_bytes": peak, "budget_bytes": budget},
    }


def _crashes(doc: dict[str, Any]) -> Finding | None:
    executor = doc.get("executor") or {}
    crashed, timed_out = executor.get("crashed", 0), executor.get("timed_out", 0)
    if not crashed and not timed_out:
        return None
    return {
        "rule": "any worker crashed or was killed after --timeout",
        "finding": f"{crashed + timed_out} image(s) crashed or hung the codec; "
        "they are listed under failures",
        "figures": {"crashed": crashed, "timed_out": timed_out},
    }


def _saving(doc: dict[str, Any]) -> Finding | None:
    ratio, converted = doc["bytes"]["saving_ratio"], doc["files"]["converted"]
    if converted < MIN_IMAGES or ratio >= 0.10:
        return None
    return {
        "rule": "bytes saved under 10% of the bytes converted",
        "finding": "the sources were already well compressed; lower --quality saves more",
        "figures": {"saving_ratio": ratio, "bytes_in": doc["bytes"]["in"]},
    }


def _grew(doc: dict[str, Any]) -> Finding | None:
    grew = doc.get("grew") or []
    skipped = doc["files"]["skipped_by_reason"].get("larger than source", 0)
    if not grew and not skipped:
        return None
    return {
        "rule": "any WebP at least as large as its source",
        "finding": f"{max(len(grew), skipped)} file(s) did not get smaller "
        "(kept as they were under --if-larger skip)",
        "figures": {"larger_than_source_skipped": skipped, "listed": len(grew)},
    }


def _encode_share(doc: dict[str, Any]) -> Finding | None:
    phases = doc.get("phases_seconds") or {}
    total = sum(phases.values())
    if not _enough(doc) or total <= 0 or phases.get("encode", 0) < 0.7 * total:
        return None
    return {
        "rule": "libwebp encoding over 70% of the time spent on images",
        "finding": "the encoder dominates: --effort is the main lever on speed",
        "figures": {"encode_seconds": phases["encode"], "image_seconds": round(total, 3)},
    }


_RULES: tuple[Callable[[dict[str, Any]], Finding | None], ...] = (
    _cpu_bound_or_not,
    _orchestration,
    _tail,
    _memory,
    _crashes,
    _saving,
    _grew,
    _encode_share,
)
