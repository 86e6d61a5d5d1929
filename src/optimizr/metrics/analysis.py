"""Findings about a run, each computed from the summary's own figures by a stated rule.

Nothing here is a canned sentence: a finding appears only when its rule holds,
and it carries the rule and the figures that made it hold, so a reader can
check it. ``analyse`` is pure: the summary document in, a list of findings out.

What set the run's pace is ONE verdict, never two that contradict each other
(issue 10, item 12): either the codec used most of the CPU offered (encoder- or
CPU-bound), or the CPU it did not use is split into where it went, and the
largest part names the verdict:

- ``idle``: no worker held an image (outside the final tail): memory-bound when
  images waited for the memory budget, else starved;
- ``tail``: the cores idled at the end behind the last, largest images;
- ``hand-off``: workers held an image outside the codec: the parent writing
  outputs (write-bound), or starting workers and passing jobs and results;
- ``waiting``: workers were converting but got less than a core: another process
  held the CPU (contended), or they waited for a disk (I/O-bound). The CPUs'
  own counters (``cpu.machine``) tell which (or that it was neither: a CPU quota
  throttling the run, or paging); where they are missing, a shortfall larger than
  all the time spent reading and decoding cannot be storage (the encode phase
  reads nothing) and is contention;
- ``one core``: the codec used about one core per worker with more cores each.

The figures are in core-seconds of the CPU the run could use (cores x wall), so
the parts add up to what the codec did not use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Finding = dict[str, Any]

#: Below this many seconds or images, ratios are noise: no finding is drawn.
MIN_SECONDS = 5.0
MIN_IMAGES = 10
#: The codec using this share of the CPU offered is CPU-bound.
CPU_BOUND = 0.70
#: Images under this much codec CPU each are small enough for per-image costs to tell.
SMALL_IMAGE_CPU_SECONDS = 0.05


def analyse(doc: dict[str, Any]) -> list[Finding]:
    findings: list[Finding] = []
    for rule in _RULES:
        finding = rule(doc)
        if finding is not None:
            findings.append(finding)
    return findings


def _enough(doc: dict[str, Any]) -> bool:
    return bool(doc.get("seconds", 0) >= MIN_SECONDS and doc["files"]["converted"] >= MIN_IMAGES)


def _num(section: Any, key: str) -> float:
    value = section.get(key) if isinstance(section, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _r(value: float) -> float:
    return round(value, 4)


# -- what set the pace: one verdict ------------------------------------------------------------


def pace(doc: dict[str, Any]) -> tuple[str, Finding] | None:
    """The run's one pace verdict, as (kind, finding); None when the run was too
    short or the summary lacks the figures."""
    cpu, executor = doc.get("cpu") or {}, doc.get("executor") or {}
    cores, workers = _num(cpu, "cores"), _num(executor, "workers")
    wall = _num(cpu, "wall_seconds") or _num(doc, "seconds")
    codec_cpu, codec_wall = _num(cpu, "codec_cpu_seconds"), _num(cpu, "codec_wall_seconds")
    if not _enough(doc) or not cores or not workers or not wall or not codec_wall:
        return None
    capacity = cores * wall
    efficiency = codec_cpu / capacity
    phases = doc.get("phases_seconds") or {}
    read, decode, encode = (_num(phases, k) for k in ("read", "decode", "encode"))
    # The libwebp binding times the import into its picture and the mux apart;
    # for this finding they are libwebp's share, as inside webpsave.
    encode += _num(phases, "import") + _num(phases, "mux")
    if efficiency >= CPU_BOUND:
        return _cpu_bound(efficiency, read, decode, encode)

    # Cores one worker could use (its libvips threads, or its share when workers
    # outnumber cores), and the least it uses while converting if nothing stops it.
    per_worker = cores / workers
    floor = min(1.0, per_worker)
    timeout = _num(doc.get("options") or {}, "timeout")
    # A worker held until --timeout killed it is counted by the crash finding.
    held = max(codec_wall, _num(executor, "busy_seconds") - _num(executor, "timed_out") * timeout)
    idle = max(0.0, workers * wall - held)
    tail_idle = min(idle, max(0.0, workers - 1) * _num(executor, "tail_seconds"))
    parts = {
        "idle": (idle - tail_idle) * per_worker,
        "tail": tail_idle * per_worker,
        "hand-off": (held - codec_wall) * per_worker,
        "waiting": max(0.0, codec_wall * floor - codec_cpu),
        "one core": max(0.0, codec_wall * per_worker - max(codec_cpu, codec_wall * floor)),
    }
    kind = max(parts, key=lambda k: parts[k])
    figures: dict[str, Any] = {
        "cpu_efficiency": _r(efficiency),
        "unused_core_seconds": _r(capacity - codec_cpu),
        f"{kind.replace(' ', '_').replace('-', '_')}_core_seconds": _r(parts[kind]),
    }
    rule = (
        f"codec CPU under {CPU_BOUND:.0%} of the cores x wall; of the rest, the largest part "
        f"went to {kind!r}"
    )
    if kind == "idle":
        return kind, _idle(doc, rule, figures)
    if kind == "tail":
        return kind, _tail_finding(doc, rule, figures)
    if kind == "hand-off":
        return kind, _hand_off(doc, rule, figures, held - codec_wall, workers)
    if kind == "waiting":
        return kind, _waiting(doc, rule, figures, parts["waiting"], (read + decode) * floor)
    figures.update(cores=cores, workers=workers)
    return kind, {
        "rule": rule,
        "finding": f"the codec used about one core per worker: {workers:.0f} worker(s) on "
        f"{cores:.0f} cores; more workers (-j {cores:.0f}) would use the idle ones",
        "figures": figures,
    }


def _cpu_bound(efficiency: float, read: float, decode: float, encode: float) -> tuple[str, Finding]:
    total = read + decode + encode
    figures = {"cpu_efficiency": _r(efficiency), "encode_seconds": encode,
               "image_seconds": round(total, 3)}  # fmt: skip
    if total > 0 and encode >= 0.7 * total:
        return "encoder-bound", {
            "rule": f"codec CPU {CPU_BOUND:.0%} of the cores x wall or more, and libwebp "
            "encoding over 70% of the time spent on images",
            "finding": "encoder-bound: the encoder dominates; --effort is the main lever on speed",
            "figures": figures,
        }
    return "cpu-bound", {
        "rule": f"codec CPU {CPU_BOUND:.0%} of the cores x wall or more",
        "finding": "CPU-bound: the codec kept the cores busy; reading, decoding and resizing "
        "took a large share (--max-width/--max-height shrink on load)",
        "figures": figures,
    }


def _idle(doc: dict[str, Any], rule: str, figures: dict[str, Any]) -> Finding:
    waited = _num(doc.get("memory") or {}, "admissions_waited")
    figures["admissions_waited"] = waited
    if waited > 0.1 * doc["files"]["converted"]:
        return {
            "rule": rule + ", and over 10% of the images waited for memory",
            "finding": "memory-bound: the memory budget held images back while workers "
            "idled; raise --max-memory or use --max-width/--max-height",
            "figures": figures,
        }
    return {
        "rule": rule + ", with memory to spare",
        "finding": "starved: workers idled, waiting for images; the walk or the parent "
        "was slower than the workers",
        "figures": figures,
    }


def _tail_finding(doc: dict[str, Any], rule: str, figures: dict[str, Any]) -> Finding:
    figures["tail_seconds"] = _num(doc.get("executor") or {}, "tail_seconds")
    return {
        "rule": rule,
        "finding": "the run ended with cores idle behind a few large images; "
        "a larger --lookahead starts them earlier",
        "figures": figures,
    }


def _hand_off(
    doc: dict[str, Any], rule: str, figures: dict[str, Any], outside: float, workers: float
) -> Finding:
    write = _num(doc.get("phases_seconds") or {}, "write")
    figures.update(held_outside_codec_seconds=_r(outside), write_seconds=write)
    # While the parent writes one output, every worker with a result waits for it.
    if workers * write >= 0.5 * outside:
        return {
            "rule": rule + "; the parent's writes account for half of it or more",
            "finding": "write-bound: workers waited while the parent wrote the outputs "
            "into DEST; faster storage for DEST sets the pace",
            "figures": figures,
        }
    return {
        "rule": rule,
        "finding": "workers held images outside the codec (starting up, receiving jobs, "
        "handing results back): the hand-off set the pace",
        "figures": figures,
    }


def _waiting(
    doc: dict[str, Any], rule: str, figures: dict[str, Any], lost: float, io_room: float
) -> Finding:
    cpu = doc.get("cpu") or {}
    figures["codec_cpu_per_wall"] = _num(cpu, "codec_cpu_per_wall")
    got = f"the workers got {_num(cpu, 'codec_cpu_per_wall'):.0%} of a core while converting"
    machine = cpu.get("machine")
    if isinstance(machine, dict):
        others = _num(machine, "others_cpu_seconds") + _num(machine, "steal_seconds")
        iowait = _num(machine, "iowait_seconds")
        figures.update(others_cpu_seconds=_r(others), iowait_seconds=_r(iowait))
        if others >= 0.5 * lost:
            return _contended(rule + "; other processes (or the hypervisor) took at least half "
                              "as much CPU", got, figures)  # fmt: skip
        if iowait >= 0.5 * lost:
            return {
                "rule": rule + "; the CPUs sat in I/O wait for at least half of it",
                "finding": f"I/O-bound: {got}; they waited on reads of the sources",
                "figures": figures,
            }
        # The CPUs were neither busy with others nor waiting on storage.
        return {
            "rule": rule + "; neither other processes nor I/O wait account for half of it",
            "finding": f"{got}, with the CPUs neither busy elsewhere nor waiting on storage: "
            "a CPU quota throttling the run, or memory paging",
            "figures": figures,
        }
    figures["read_decode_core_seconds"] = _r(io_room)
    if lost > io_room:
        return _contended(rule + ", more than all the time spent reading and decoding "
                          "(encoding reads nothing)", got, figures)  # fmt: skip
    return {
        "rule": rule,
        "finding": f"{got}: slow reads of the sources or other processes on the machine "
        "(this system does not say which)",
        "figures": figures,
    }


def _contended(rule: str, got: str, figures: dict[str, Any]) -> Finding:
    return {
        "rule": rule,
        "finding": f"contended: {got}; other processes held the CPU, so these times "
        "say more about the machine's load than about optimizr",
        "figures": figures,
    }


def _pace_rule(doc: dict[str, Any]) -> Finding | None:
    verdict = pace(doc)
    return verdict[1] if verdict is not None else None


# -- the other findings: each independent of the verdict ---------------------------------------


def _orchestration(doc: dict[str, Any]) -> Finding | None:
    cpu, executor = doc.get("cpu") or {}, doc.get("executor") or {}
    if not _enough(doc) or "parent_run_cpu_seconds" not in cpu:
        return None
    parent, workers_cpu = _num(cpu, "parent_run_cpu_seconds"), _num(cpu, "workers_cpu_seconds")
    codec = _num(cpu, "codec_cpu_seconds")
    run_cpu = parent + workers_cpu
    # With an in-process executor the codec runs in the parent: its CPU is there.
    outside = max(0.0, run_cpu - codec)
    if run_cpu <= 0 or outside <= 0.10 * run_cpu:
        return None
    images = doc["files"]["converted"]
    in_workers = max(0.0, outside - parent) if workers_cpu else 0.0
    in_parent = outside - in_workers
    figures = {
        "orchestration_share": _r(outside / run_cpu),
        "parent_run_cpu_seconds": parent,
        "workers_cpu_outside_codec_seconds": _r(in_workers),
        "images": images,
        "codec_cpu_ms_per_image": round(1000 * codec / images, 1),
        "outside_codec_ms_per_image": round(1000 * outside / images, 1),
    }
    rule = "CPU the run used outside the codec over 10% of all it used (CPU time, not wall)"
    if in_workers > in_parent:
        restarts = int(_num(executor, "restarts"))
        spawned = int(_num(executor, "workers")) + restarts
        figures["worker_processes_started"] = spawned
        lever = (
            "a higher --max-tasks-per-worker restarts them less often"
            if restarts
            else "a longer run spreads that fixed cost"
        )
        return {
            "rule": rule + "; most of it in the worker processes",
            "finding": "the worker processes' own CPU (starting up, taking jobs, returning "
            f"results) was a large share: {spawned} processes for {images} images; {lever}",
            "figures": figures,
        }
    small = codec / images < SMALL_IMAGE_CPU_SECONDS
    return {
        "rule": rule + "; most of it in the parent process",
        "finding": "orchestration overhead is significant: the parent's walking, planning "
        "and writing cost a large share of the CPU"
        + (" (small images: per-image costs outweigh the codec's)" if small else ""),
        "figures": figures,
    }


def _tail(doc: dict[str, Any]) -> Finding | None:
    executor = doc.get("executor") or {}
    tail, seconds = executor.get("tail_seconds", 0), doc.get("seconds", 0)
    if not _enough(doc) or executor.get("workers", 1) < 2 or tail <= 0.1 * seconds:
        return None
    verdict = pace(doc)
    if verdict is not None and verdict[0] == "tail":
        return None  # the verdict says it already
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


def _ceiling(doc: dict[str, Any]) -> Finding | None:
    memory = doc.get("memory") or {}
    keys = ("jobs_over_estimate", "held_admissions", "stopped_and_retried_alone", "too_large_alone")
    over, held, retried, failed = (int(_num(memory, key)) for key in keys)
    if not over and not retried and not failed:
        return None
    parts = [f"{over} image(s) used more memory than estimated"] if over else []
    if held:
        parts.append(f"{held} image(s) waited for them to finish")
    if retried:
        parts.append(f"{retried} image(s) were stopped near --max-memory and converted again alone")
    if failed:
        parts.append(f"{failed} image(s) neared --max-memory even alone: failed as too large")
    return {
        "rule": "any image measured growing past its memory estimate, or stopped near --max-memory",
        "finding": "; ".join(parts),
        "figures": {
            **{key: int(_num(memory, key)) for key in keys},
            "peak_measured_bytes": int(_num(memory, "peak_measured_bytes")),
            "budget_bytes": int(_num(memory, "budget_bytes")),
        },
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


def _written_larger(doc: dict[str, Any]) -> Finding | None:
    written = int(_num(doc["files"], "written_larger"))
    if not written:
        return None
    return {
        "rule": "any output written at least as large as its source",
        "finding": f"{written} output(s) written although not smaller than their source "
        "(--if-larger write); --if-larger skip keeps the sources instead",
        "figures": {"written_larger": written, "listed": len(doc.get("grew") or [])},
    }


def _skipped_larger(doc: dict[str, Any]) -> Finding | None:
    skipped = doc["files"]["skipped_by_reason"].get("larger than source", 0)
    if not skipped:
        return None
    return {
        "rule": "any file skipped because its WebP would have been larger",
        "finding": f"{skipped} file(s) would have grown as WebP: no output was written for "
        "them (--if-larger skip); --if-larger write writes them anyway",
        "figures": {
            "larger_than_source_skipped": skipped,
            "listed": len(doc.get("skipped_larger") or []),
        },
    }


_RULES: tuple[Callable[[dict[str, Any]], Finding | None], ...] = (
    _pace_rule,
    _orchestration,
    _tail,
    _memory,
    _ceiling,
    _crashes,
    _saving,
    _written_larger,
    _skipped_larger,
)
