"""The memory budget: how much an image will need, and whether it may start now.

Every image's peak need is estimated from its header alone, before any pixel
is decoded, and an image is admitted only while the estimates of those in
flight fit the budget. The budget is a ceiling on the resident memory of the
whole process tree, so the fixed cost of the parent and of every worker
(busy or idle) is taken off the top before any image is admitted; while an
image converts, what its worker really grows to is watched (MemoryBudget.observe).

The figures below were measured on this project's machine (x86-64, libvips
8.18.7 from pyvips-binary, libwebp 1.6.0 from Pillow 13 through optimizr's
binding, one libvips thread per worker, the worker's malloc settings) by
``bench/calibrate_memory.py``: three real photos (iPhone 6, Galaxy S7, Olympus
E-P3) scaled to 8, 24, 40 and 60 MP, each converted in a fresh process whose
peak resident growth (VmHWM) is read. Each constant is an envelope over every
measurement of its mode (the fit's slope is lower), so no calibration image
exceeds its estimate:

=====================================  =========================  =============
mode (bytes per output pixel + fixed)  measured (fit; range)      estimate
=====================================  =========================  =============
lossy (JPEG, 16-bit PNG, GIF frames)   2.25/px + 9 MB; 2.1-4.7    2.7/px + 24 MB
lossy, image with alpha                26.2/px + 16 MB; 26.3-28.2 26.5/px + 16 MB
``--smart-subsample``                  12.8/px + 6 MB; 12.8-13.4  13.0/px + 8 MB
lossless, near-lossless                16.4/px + 56 MB; 7.1-29.6  23.5/px + 60 MB
rotated by EXIF (rotated in planes)    as lossy                   + 16 MB (numpy)
shrunk on load (``--max-width``)       14-30 MB, any input size   + 8 MB + 0.3/in px
=====================================  =========================  =============

The binding never holds the decoded image whole: libwebp's picture (YUV 4:2:0,
1.5 bytes per pixel; ARGB, 4, for lossless and sharp YUV) is the main cost, with
libwebp's own analysis and token buffers. An alpha plane is compressed by
libwebp's lossless coder (hash chains, backward references: ~24 bytes per
pixel), which is why images with alpha cost ten times as much. With libvips'
webpsave (the fallback) the earlier figures stand (it copies each frame whole
first): 9.8 bytes per pixel lossy, 17.2 sharp YUV, 43 lossless, plus the whole
decoded image for a rotation. The estimate adds 5% on top (the ceiling catches
what it still misses).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from optimizr.config import EncodeOptions
from optimizr.errors import OverMemoryBudget, TooLarge
from optimizr.metrics.memory import rss_of

if TYPE_CHECKING:
    from optimizr.executors.base import Job

# The libwebp binding, fed in strips (see the table above).
BYTES_PER_PIXEL_LOSSY = 2.7
BYTES_PER_PIXEL_ALPHA_LOSSY = 26.5
BYTES_PER_PIXEL_SHARP_YUV = 13.0
BYTES_PER_PIXEL_LOSSLESS = 23.5
FIXED_PER_IMAGE = 24 << 20
FIXED_LOSSLESS = 60 << 20
FIXED_ROTATED = 16 << 20
FIXED_SHRINK = 8 << 20
BYTES_PER_INPUT_PIXEL_SHRINK = 0.3
# libvips' webpsave, the fallback (measured before the binding existed).
WEBPSAVE_BYTES_PER_PIXEL_LOSSY = 9.8
WEBPSAVE_BYTES_PER_PIXEL_SHARP_YUV = 17.2
WEBPSAVE_BYTES_PER_PIXEL_LOSSLESS = 43.0
WEBPSAVE_BYTES_PER_INPUT_PIXEL_SHRINK = 2.0
WEBPSAVE_FIXED_PER_IMAGE = 8 << 20
WEBPSAVE_FIXED_LOSSLESS = 22 << 20
#: A whole decoded image, per input pixel of 3 bands (BMP and APNG are decoded
#: in memory; webpsave decodes a photo to rotate whole).
BYTES_PER_PIXEL_RANDOM_ACCESS = 3.0
SAFETY = 1.05
#: --target-size renders the image whole once, so that each probe encodes the same
#: pixels without decoding again: a byte per band and output pixel, and the
#: probes' outputs. Measured (a worker's VmHWM growth, 12 MP JPEGs, one encode or
#: four): +34 MiB on 12.2 MP RGB, 2.9 bytes per pixel; rotated the same.
TARGET_SIZE_BYTES_PER_BAND_PIXEL = 1.0
TARGET_SIZE_FIXED = 2 << 20
#: --target-score (issue 14): the search holds the image rendered whole, the
#: metric's reference side (XYB planes, means and variances at six scales, float32)
#: and one probe's decoded pixels and blurred planes, on top of the candidate's
#: encode. Measured by bench/calibrate_memory.py --measure target_score with the C
#: loops of optimizr._ssimulacra2 (which sum the error maps as they make them and
#: blur without whole-image transposes): 111-124 bytes per output pixel of growth
#: at 2-12 MP on opaque JPEGs (the numpy loops before them held 187-195; re-measure
#: when the metric changes). An animation's metric planes are held for the frames
#: scored only (at most 8).
BYTES_PER_PIXEL_SEARCH = 120.0
#: ... and with alpha, whose original is prepared over two backgrounds (two
#: pyramids): 164-176 bytes per pixel measured at 2 and 6 MP (RGBA PNGs).
BYTES_PER_PIXEL_SEARCH_ALPHA = 175.0
#: ... and per pixel of every frame: the rendered strip and one decoded probe.
BYTES_PER_FRAME_PIXEL_SEARCH = 8.0
#: The least share of its estimate an image was measured to need (bench-memory's
#: big corpus, 34 images alone: 0.77-1.11 of the estimate; calibration: 0.58-0.99):
#: an image is refused from its header only when even this much of its estimate
#: cannot fit beside its own worker alone. Between that and the estimate it runs
#: alone, and the ceiling (MemoryBudget.observe) stops it if it really needs more.
LEAST_SHARE = 0.75

#: Resident size of an idle worker once it says ready (Python, pyvips and libvips,
#: the encoder and Pillow's libwebp; not the run's machinery nor numpy, imported on
#: first use), measured 29-32 MiB (x86-64, pyvips-binary 8.18.7, libwebp 1.6.0; it
#: was 62-67 MiB when a worker imported all of optimizr), and a little to spare. Only
#: the figure until a worker is measured: the pool measures each one when it says
#: ready and whenever it takes a job (see MemoryBudget.worker_measured). A worker
#: that has converted a rotated photo holds numpy too (+14 MiB), measured then.
WORKER_BASELINE = 36 << 20
#: How much an idle worker may have grown past a fresh one's size (numpy, heap
#: left by earlier images) before a job to run alone gets a fresh worker instead:
#: the room alone is counted beside a fresh worker. Over a whole run of the big
#: corpus idle workers grew from 29-32 MiB to 45-50 MiB, and the room alone
#: shrank with them from 160 to 132 MiB, refusing 59 MP photos that fit a fresh
#: worker (issue 12). A worker starts in 0.3-0.5 s; an image run alone takes
#: seconds.
WORKER_GROWTH_SLACK = 4 << 20
#: The least the parent is counted as at a run's start: a command-line parent
#: (Python, optimizr, the pool, progress) measures 65-70 MiB there, and the
#: budget measures its own process when it is made; this floor only keeps a
#: parent measured early or small from being counted as less than it will be.
PARENT_BASELINE = 64 << 20
#: What the parent may grow by during a run (the manifest's pages, results, the
#: WebP bytes it holds until they are written), on top of its size at the start:
#: measured +1.7 MiB over 300 small files (70.2 MiB at the start, 71.9 MiB at
#: most) and +5.7 MiB over four 36-56 MP photos (65.2 MiB, 70.9 MiB at most).
#: The ceiling measures the parent as it is anyway; this is what admissions
#: leave free for it.
PARENT_GROWTH = 8 << 20
#: A process that holds more than this when the run starts is a library caller's
#: (a notebook's data, a test runner: 80-200 MiB under pytest): what it holds
#: beyond is the caller's, not the run's.
PARENT_OWN_MAX = 96 << 20


@dataclass(frozen=True)
class Header:
    """What the parent learns about an image without decoding it."""

    format: str
    width: int
    height: int  # of one frame
    bands: int
    frames: int = 1
    orientation: int = 1

    @property
    def pixels(self) -> int:
        return self.width * self.height * self.frames


def output_size(header: Header, options: EncodeOptions) -> tuple[int, int]:
    width, height = header.width, header.height
    if header.orientation >= 5:
        width, height = height, width
    box = options.shrink_box(width, height)
    if box is None:
        return width, height
    scale = min(box[0] / width, box[1] / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def estimate_peak_bytes(header: Header, options: EncodeOptions) -> int:
    """Peak resident memory one conversion adds to its worker, from the header alone."""
    from optimizr.encode import encoder_for, rotates_in_encoder

    if encoder_for(options) is None:
        return _webpsave_estimate(header, options)
    out_w, out_h = output_size(header, options)
    out_pixels = out_w * out_h * header.frames
    fixed = FIXED_PER_IMAGE
    if options.lossless or options.near_lossless is not None:
        per_pixel, fixed = BYTES_PER_PIXEL_LOSSLESS, FIXED_LOSSLESS
    elif options.smart_subsample:
        per_pixel = BYTES_PER_PIXEL_SHARP_YUV
    elif header.bands in (2, 4):
        per_pixel = BYTES_PER_PIXEL_ALPHA_LOSSY
    else:
        per_pixel = BYTES_PER_PIXEL_LOSSY
    need = fixed + per_pixel * out_pixels
    if out_pixels < header.pixels:
        # Shrunk on load: the decoder and resampler stream; the small result is
        # rendered whole before it is encoded.
        need += FIXED_SHRINK + BYTES_PER_INPUT_PIXEL_SHRINK * header.pixels
    elif header.orientation != 1:
        if rotates_in_encoder(header.width, header.height, header.orientation, options):
            need += FIXED_ROTATED
        else:
            need += BYTES_PER_PIXEL_RANDOM_ACCESS * header.bands / 3 * header.pixels
    need += _held_by_decoder(header) + _rendered_for_size(header, options, out_pixels)
    if options.target_score is not None:
        need += _held_by_search(out_w * out_h, header.frames, header.bands in (2, 4))
    return int(need * SAFETY)


def _rendered_for_size(header: Header, options: EncodeOptions, out_pixels: int) -> float:
    """--target-size: the image rendered whole (encode._save_to_size)."""
    if options.target_size is None:
        return 0.0
    return TARGET_SIZE_FIXED + TARGET_SIZE_BYTES_PER_BAND_PIXEL * header.bands * out_pixels


def _held_by_search(frame_pixels: int, frames: int, alpha: bool) -> float:
    from optimizr.quality_search import ANIMATION_FRAMES_SCORED

    scored = min(frames, ANIMATION_FRAMES_SCORED)
    per_pixel = BYTES_PER_PIXEL_SEARCH_ALPHA if alpha else BYTES_PER_PIXEL_SEARCH
    return per_pixel * frame_pixels * scored + (
        BYTES_PER_FRAME_PIXEL_SEARCH * frame_pixels * frames
    )


def _held_by_decoder(header: Header) -> float:
    """What a decoder that holds the whole image holds beside the pipeline."""
    from optimizr.decoders import decoder_for

    decoder = decoder_for(header.format)
    if decoder is None:
        return 0.0
    return decoder.held_per_band_pixel * header.bands * header.pixels


def _webpsave_estimate(header: Header, options: EncodeOptions) -> int:
    """The estimate for libvips' webpsave, which copies each frame whole first."""
    out_w, out_h = output_size(header, options)
    out_pixels = out_w * out_h * header.frames
    fixed = WEBPSAVE_FIXED_PER_IMAGE
    if options.lossless or options.near_lossless is not None:
        per_pixel, fixed = WEBPSAVE_BYTES_PER_PIXEL_LOSSLESS, WEBPSAVE_FIXED_LOSSLESS
    elif options.smart_subsample:
        per_pixel = WEBPSAVE_BYTES_PER_PIXEL_SHARP_YUV
    elif header.bands in (2, 4):
        per_pixel = BYTES_PER_PIXEL_ALPHA_LOSSY + 3.0  # and the frame copy
    else:
        per_pixel = WEBPSAVE_BYTES_PER_PIXEL_LOSSY
    need = fixed + per_pixel * out_pixels
    if out_pixels < header.pixels:
        need += WEBPSAVE_BYTES_PER_INPUT_PIXEL_SHRINK * header.pixels
    if header.orientation != 1:
        need += BYTES_PER_PIXEL_RANDOM_ACCESS * header.bands / 3 * header.pixels
    need += _held_by_decoder(header) + _rendered_for_size(header, options, out_pixels)
    return int(need * SAFETY)


#: Sampling interval of the running jobs' resident sizes near the ceiling (the
#: executor's poll loop), and the longest one, far below it.
SAMPLE_INTERVAL = 0.005
SAMPLE_INTERVAL_MAX = 0.25
#: Twice the fastest a conversion was measured to grow (see ceiling_margin): the
#: time the tree needs at this pace to reach the ceiling is how long the next
#: sample may wait.
GROWTH_RATE = 4 << 30


def ceiling_margin(total: int) -> int:
    """Room kept below --max-memory for what may grow between two samples.

    Sampled every 5 ms, a worker converting a 5120x2880 RGBA PNG grew by up to
    11 MiB in 5 ms, 22 MiB in 10 ms and 35 MiB in 20 ms (~2 GiB/s while libwebp
    fills its picture); a 6 MP JPEG by 11 MiB in 20 ms. Near the ceiling the
    tree is sampled every 5 ms: 32 MiB is three such intervals at that pace,
    with room for the parent to be scheduled late. A large budget keeps 1/32 of
    itself (a bigger machine converts bigger images, two workers may grow at once).
    """
    return max(32 << 20, total // 32)


@dataclass(frozen=True)
class Stop:
    """A job the budget stops: run it again alone as ``retry``, or fail it with ``error``."""

    job: Job
    #: Measured peak growth of its worker above its idle size.
    peak: int
    retry: Job | None = None
    error: TooLarge | None = None


@dataclass(frozen=True)
class BudgetStatistics:
    capacity: int
    total: int
    in_use: int
    peak_in_use: int
    admitted: int
    waited: int
    ran_alone: int
    #: Jobs whose measured growth went past their estimate.
    over_estimate: int = 0
    #: Jobs whose admission a measured overrun held back (they fit on estimates alone).
    held: int = 0
    #: Jobs stopped because the tree neared the ceiling, to run again alone.
    retried_alone: int = 0
    #: Jobs that neared the ceiling while running alone: failed as too large.
    too_large_alone: int = 0
    #: Peak resident size of the process tree, as measured for the ceiling.
    peak_measured: int = 0
    margin: int = 0
    #: What one image may use when its worker is the only one alive.
    alone_capacity: int = 0
    #: The parent's resident size at the run's start as counted (see PARENT_OWN_MAX).
    parent_baseline: int = 0
    #: The largest idle worker measured (WORKER_BASELINE until one is).
    worker_baseline: int = 0
    #: The largest fresh worker measured when it said ready: what a job run alone
    #: is counted beside (WORKER_BASELINE until one is).
    fresh_worker: int = 0


@dataclass
class _Charge:
    job: Job
    #: What the job counts for in the budget: max(estimate, peak measured growth).
    amount: int
    peak: int = 0
    over: bool = False


class MemoryBudget:
    """Admission control, and a ceiling on what admitted jobs really use.

    ``total`` is the user's --max-memory; ``capacity`` what is left for images
    once the parent's and the workers' own baselines and the ceiling's margin
    are paid for. Those baselines are measured: the parent's resident size when
    the budget is made (the run's start), plus an allowance for its growth, and
    each worker's once it is ready (:meth:`worker_measured`).

    A job whose estimate does not fit ``capacity`` but fits ``alone_capacity``,
    what is left when its own worker is the only one alive, runs **alone**: it
    waits until nothing runs, and is handed to the executor with ``alone`` set,
    which retires the idle workers while it runs (their baselines are then free)
    and starts them again after (see ``executors/base.py``). Only an image that
    cannot fit even so is refused from its header (:meth:`fits_alone`).

    A job is admitted on its estimate; once it runs, its executor measures its worker
    and reports (:meth:`observe`), and the job is charged the larger of its
    estimate and what it was measured to use, so a job that outgrows its
    estimate holds back further admissions at once. When the measured process
    tree comes within :func:`ceiling_margin` of ``total``, :meth:`observe` names
    the job to stop: the one most over its estimate, to run again alone with
    what it was seen to need as its estimate, or, when it already runs alone,
    to fail as too large. The policy is all here; an executor only measures and
    stops (see ``executors/base.py``).

    The parent is counted as its size at the start and what it grows by during
    the run: what a library caller's process held before (a notebook's data, a
    test runner) beyond :data:`PARENT_OWN_MAX` is the caller's, not the run's.
    ``worker_baseline`` is the figure of a worker not measured yet, and
    ``parent_resident`` the parent's size at the start when the caller measured
    it (tests: a figure of their own; default: measured now).
    """

    def __init__(
        self,
        total: int,
        workers: int,
        *,
        worker_baseline: int = WORKER_BASELINE,
        parent_resident: int | None = None,
    ) -> None:
        self.total = total
        self.workers = max(1, workers)
        self.margin = ceiling_margin(total)
        resident = rss_of(os.getpid())
        own = min(resident if parent_resident is None else parent_resident, PARENT_OWN_MAX)
        #: The parent's resident size at the run's start, as counted.
        self.parent_baseline = own
        #: What the capacity leaves for the parent: no less than PARENT_BASELINE
        #: (it grows as the run goes), and its allowance for growth.
        self.parent_charge = max(PARENT_BASELINE, own) + PARENT_GROWTH
        #: What this process held before the run that is not the run's.
        self.caller_bytes = max(0, resident - own)
        #: Idle resident size of each live worker measured (name -> bytes); one
        #: not measured yet counts as the largest measured so far in the run.
        self._worker_sizes: dict[str, int] = {}
        self._largest_worker = 0
        #: The largest size of a worker measured when it said ready, before any job.
        self._fresh_worker = 0
        self._worker_baseline = worker_baseline
        #: Charges of the jobs running and bytes held for transfers.
        self.in_use = 0
        self.peak_in_use = 0
        self.admitted = 0
        self.waited = 0
        self.ran_alone = 0
        self.over_estimate = 0
        self.held = 0
        self.retried_alone = 0
        self.too_large_alone = 0
        self.peak_measured = 0
        self._last_measured = 0
        #: Bytes of transfer buffers held now (see hold), and at most.
        self.io_bytes = 0
        self.peak_io_bytes = 0
        #: The estimates alone of what ``in_use`` charges (to tell a hold by an overrun).
        self._estimated = 0
        self._charges: dict[int, _Charge] = {}
        # Jobs refused at least once and not admitted since: each counts once.
        self._waiting: set[int] = set()
        self._holding: set[int] = set()
        self._alone: int | None = None  # the id of a job that must run by itself
        self._lock = threading.Lock()

    def _capacity_with(self, workers: int) -> int:
        """What is left for images beside ``workers`` live workers (the largest measured)."""
        sizes = sorted(self._worker_sizes.values(), reverse=True)[:workers]
        fixed = self.parent_charge + sum(sizes) + (workers - len(sizes)) * self._worker_assumed
        return max(0, self.total - self.margin - fixed)

    @property
    def capacity(self) -> int:
        """What images may use: beside every worker, or beside its own alone while
        a job runs alone (the others are retired meanwhile)."""
        return self._capacity_with(1 if self._alone is not None else self.workers)

    @property
    def alone_capacity(self) -> int:
        """What one image may use when its worker is the only one alive: a fresh
        worker, since one grown past it is replaced first (:meth:`worker_outgrown`)."""
        return max(0, self.total - self.margin - self.parent_charge - self.fresh_worker)

    @property
    def fresh_worker(self) -> int:
        """A fresh worker's size: the largest measured when ready, the figure before."""
        return self._fresh_worker or self._worker_baseline

    def worker_outgrown(self, resident: int) -> bool:
        """Has an idle worker of ``resident`` bytes grown so far past a fresh one that
        a job to run alone must get a fresh worker, as :attr:`alone_capacity` counts?"""
        return resident > self.fresh_worker + WORKER_GROWTH_SLACK

    def fits_alone(self, need: int) -> bool:
        """Could an image estimated at ``need`` run at all: alone, the other workers
        retired, if it needs as little of its estimate as any image was measured to
        (LEAST_SHARE)? Refusing on the whole estimate would refuse images that fit."""
        return need * LEAST_SHARE <= self.alone_capacity

    def worker_measured(self, worker: str, resident: int, *, fresh: bool = False) -> None:
        """An idle worker's resident size, measured by the executor when it became
        ready (``fresh``) and when it takes a job: the capacity counts it from now on."""
        with self._lock:
            self._worker_sizes[worker] = resident
            self._largest_worker = max(self._largest_worker, resident)
            if fresh:
                self._fresh_worker = max(self._fresh_worker, resident)

    @property
    def _worker_assumed(self) -> int:
        # The figure given until a worker is measured; then the largest measured.
        return self._largest_worker or self._worker_baseline

    def worker_gone(self, worker: str) -> None:
        """A worker exited (retired, replaced): its baseline is no longer paid."""
        with self._lock:
            self._worker_sizes.pop(worker, None)

    def admit(self, window: list[Job]) -> Job | None:
        """Take from ``window`` (head first: the job that waits longest for memory)
        the job to start now, charged to the budget; None: none may start yet.

        The head goes if it fits, or alone when nothing runs; smaller ones may go
        only if they leave room for it, or it could wait behind them for ever. A
        job to run alone (stopped once beside others, or too big to fit beside
        the other workers' baselines) waits, and holds back everything behind
        it, until nothing runs; it is handed out with ``alone`` set, for the
        executor to retire the other workers while it runs."""
        head = window[0]
        running = bool(self._charges)
        if head.alone or head.cost > self._capacity_with(self.workers):
            with self._lock:
                if running:
                    self._refused(head, held=False)
                    return None
                window.pop(0)
                if not head.alone:
                    self.ran_alone += 1
                    head = dataclasses.replace(head, alone=True)
                self._take(head)
            return head
        if self.try_acquire(head):
            return window.pop(0)
        if not running:
            self.force_acquire(head)  # bigger than what is free: it runs alone
            return window.pop(0)
        for index, job in enumerate(window[1:], start=1):
            if self.try_acquire(job, reserve=head.cost):
                return window.pop(index)
        return None

    def try_acquire(self, job: Job, *, reserve: int = 0) -> bool:
        """Charge ``job`` if it fits, leaving ``reserve`` free for a job waiting ahead."""
        with self._lock:
            need = job.cost + reserve
            if self._alone is not None or job.alone or self.in_use + need > self.capacity:
                # On estimates alone it would fit: a job outgrowing its own holds it back.
                held = self._alone is None and self._estimated + need <= self.capacity
                self._refused(job, held=held and not job.alone)
                return False
            self._take(job)
            return True

    def force_acquire(self, job: Job) -> None:
        """Admit a job bigger than what is free, when nothing else runs: it runs alone."""
        with self._lock:
            self.ran_alone += 1
            self._take(job)

    def _refused(self, job: Job, *, held: bool) -> None:
        if job.id not in self._waiting:
            self._waiting.add(job.id)
            self.waited += 1
        if held and job.id not in self._holding:
            self._holding.add(job.id)
            self.held += 1

    def _take(self, job: Job) -> None:
        self._waiting.discard(job.id)
        self._holding.discard(job.id)
        self._charges[job.id] = _Charge(job, job.cost)
        if job.alone:
            self._alone = job.id
        self.in_use += job.cost
        self._estimated += job.cost
        self.admitted += 1
        self.peak_in_use = max(self.peak_in_use, self.in_use)

    def release(self, job: Job) -> None:
        with self._lock:
            charge = self._charges.pop(job.id, None)
            if charge is None:
                return
            self.in_use -= charge.amount
            self._estimated -= charge.job.cost
            if self._alone == job.id:
                self._alone = None

    def observe(self, growth: Mapping[int, int], tree: int) -> Stop | None:
        """What the executor measured just now: each running job's growth above its
        worker's idle size (job id -> bytes), and the resident size of the whole
        process tree. Charges follow the growth; the answer is the job to stop now,
        if the tree is within the margin of the ceiling."""
        tree = max(0, tree - self.caller_bytes)
        with self._lock:
            self.peak_measured = max(self.peak_measured, tree)
            self._last_measured = tree
            for job_id, grown in growth.items():
                charge = self._charges.get(job_id)
                if charge is None:
                    continue
                charge.peak = max(charge.peak, grown)
                # A job run again alone was counted when it was stopped: one image, once.
                if charge.peak > charge.job.cost and not charge.over and not charge.job.alone:
                    charge.over = True
                    self.over_estimate += 1
                amount = max(charge.job.cost, charge.peak)
                self.in_use += amount - charge.amount
                charge.amount = amount
            self.peak_in_use = max(self.peak_in_use, self.in_use)
            running = [self._charges[i] for i in growth if i in self._charges]
            if tree + self.margin <= self.total or not running:
                return None
            # The one most over its estimate goes (the largest, when none is over).
            worst = max(running, key=lambda c: (c.peak - c.job.cost, c.peak))
            if len(running) == 1:
                self.too_large_alone += 1
                return Stop(worst.job, worst.peak, error=self._too_large(worst, tree))
            self.retried_alone += 1
            retry = dataclasses.replace(worst.job, cost=worst.peak + self.margin, alone=True)
            return Stop(worst.job, worst.peak, retry=retry)

    def sample_interval(self) -> float:
        """How soon the running jobs must be measured again: every 5 ms near the
        ceiling, less often far below it (a sample costs the parent ~0.1 ms)."""
        headroom = self.total - self.margin - self._last_measured
        return min(SAMPLE_INTERVAL_MAX, max(SAMPLE_INTERVAL, headroom / GROWTH_RATE))

    def _too_large(self, charge: _Charge, tree: int) -> TooLarge:
        mib = 2**20
        return OverMemoryBudget(
            f"grew to {charge.peak / mib:,.0f} MiB while converting alone (estimated "
            f"{charge.job.cost / mib:,.0f} MiB), the process tree to {tree / mib:,.0f} MiB, "
            f"within {self.margin / mib:,.0f} MiB of --max-memory {self.total / mib:,.0f} MiB; "
            "raise --max-memory or use --max-width/--max-height"
        )

    def hold(self, size: int) -> None:
        """Count ``size`` bytes of buffers (fetched sources, outputs to upload) as in
        use: they delay the admission of images like an image's own memory does."""
        with self._lock:
            self.in_use += size
            self._estimated += size
            self.io_bytes += size
            self.peak_in_use = max(self.peak_in_use, self.in_use)
            self.peak_io_bytes = max(self.peak_io_bytes, self.io_bytes)

    def free(self, size: int) -> None:
        with self._lock:
            self.in_use -= size
            self._estimated -= size
            self.io_bytes -= size

    def statistics(self) -> BudgetStatistics:
        return BudgetStatistics(
            self.capacity,
            self.total,
            self.in_use,
            self.peak_in_use,
            self.admitted,
            self.waited,
            self.ran_alone,
            self.over_estimate,
            self.held,
            self.retried_alone,
            self.too_large_alone,
            self.peak_measured,
            self.margin,
            self.alone_capacity,
            self.parent_baseline,
            self._worker_assumed,
            self.fresh_worker,
        )


def default_memory_budget() -> int:
    """Half of the memory available to this process, cgroup limit included."""
    available = _meminfo_available()
    limit = _cgroup_memory_limit()
    if limit is not None:
        usage = _cgroup_memory_usage() or 0
        available = min(available, max(0, limit - usage)) if available else limit - usage
    return max(256 << 20, available // 2)


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        return 2 << 30


def _cgroup_memory_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        value = int(text)
        return None if value >= 1 << 60 else value
    return None


def _cgroup_memory_usage() -> int | None:
    for path in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
        try:
            return int(Path(path).read_text().strip())
        except (OSError, ValueError):
            continue
    return None
