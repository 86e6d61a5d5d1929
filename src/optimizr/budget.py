"""The memory budget: how much an image will need, and whether it may start now.

Every image's peak need is estimated from its header alone, before any pixel
is decoded, and an image is admitted only while the estimates of those in
flight fit the budget. The budget is a ceiling on the resident memory of the
whole process tree, so the fixed cost of the parent and of every worker
(busy or idle) is taken off the top before any image is admitted.

The figures below were measured on this project's machine (x86-64, libvips
8.18.7 from pyvips-binary, one libvips thread per worker) by
``bench/calibrate_memory.py``, which converts synthetic photos of 2-32 MP in a
fresh process each and reads the growth of its peak resident size (VmHWM):

=====================================  ===========================================
what                                   measured
=====================================  ===========================================
lossy, sequential decode               9.0-9.8 bytes per output pixel + ~5 MB
lossy with ``--smart-subsample``       16.7-17.2 bytes per output pixel
lossless / near-lossless               32-43 bytes per output pixel + ~22 MB
rotated by EXIF (random-access decode) 12.1 bytes per output pixel (3 more per input pixel)
shrunk on load (``--max-width``)       1.6-2.0 bytes per *input* pixel + ~12 MB
=====================================  ===========================================

libvips holds the decoded RGB image and libwebp its own YUV picture and
analysis buffers, which is why lossy needs three times the RGB size. The
estimate adds 10% on top and a fixed 8 MB per image.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from optimizr.config import EncodeOptions

BYTES_PER_PIXEL_LOSSY = 9.8
BYTES_PER_PIXEL_SHARP_YUV = 17.2
BYTES_PER_PIXEL_LOSSLESS = 43.0
BYTES_PER_PIXEL_RANDOM_ACCESS = 3.0
BYTES_PER_INPUT_PIXEL_SHRINK = 2.0
FIXED_PER_IMAGE = 8 << 20
FIXED_LOSSLESS = 22 << 20
SAFETY = 1.10

#: Resident size of an idle worker (Python + pyvips + optimizr), measured: 31 MB.
WORKER_BASELINE = 35 << 20
#: Resident size of the parent (walk, pool, progress, RSS sampler: 37-45 MB,
#: measured), and 12 MB to spare: the figure once included multiprocessing's
#: resource-tracker process, which workers started with subprocess no longer need.
PARENT_BASELINE = 60 << 20


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
    out_w, out_h = output_size(header, options)
    out_pixels = out_w * out_h * header.frames
    fixed = FIXED_PER_IMAGE
    if options.lossless or options.near_lossless is not None:
        per_pixel, fixed = BYTES_PER_PIXEL_LOSSLESS, FIXED_LOSSLESS
    elif options.smart_subsample:
        per_pixel = BYTES_PER_PIXEL_SHARP_YUV
    else:
        per_pixel = BYTES_PER_PIXEL_LOSSY
    need = fixed + per_pixel * out_pixels
    if out_pixels < header.pixels:
        # Shrinking still streams every input row through the decoder and resampler.
        need += BYTES_PER_INPUT_PIXEL_SHRINK * header.pixels
    if header.orientation != 1 or header.format in ("bmp", "apng"):
        # Rotations need the whole decoded image; BMP and APNG are decoded in memory.
        need += BYTES_PER_PIXEL_RANDOM_ACCESS * header.bands / 3 * header.pixels
    return int(need * SAFETY)


@dataclass(frozen=True)
class BudgetStatistics:
    capacity: int
    total: int
    in_use: int
    peak_in_use: int
    admitted: int
    waited: int
    ran_alone: int


class MemoryBudget:
    """Admission control: images start only while their estimates fit.

    ``total`` is the user's --max-memory; ``capacity`` what is left for images
    once the parent and the workers' own baselines are paid for.
    """

    def __init__(self, total: int, workers: int) -> None:
        self.total = total
        self.capacity = max(0, total - PARENT_BASELINE - workers * WORKER_BASELINE)
        self.in_use = 0
        self.peak_in_use = 0
        self.admitted = 0
        self.waited = 0
        self.ran_alone = 0
        #: Bytes of transfer buffers held now (see hold), and at most.
        self.io_bytes = 0
        self.peak_io_bytes = 0
        self._running = 0
        self._lock = threading.Lock()

    def fits_alone(self, need: int) -> bool:
        return need <= self.capacity

    def try_acquire(self, need: int, *, reserve: int = 0) -> bool:
        """Take ``need`` if it fits, leaving ``reserve`` free for a job waiting ahead."""
        with self._lock:
            if self.in_use + need + reserve > self.capacity:
                self.waited += 1
                return False
            self._take(need)
            return True

    def force_acquire(self, need: int) -> None:
        """Admit a job bigger than what is free, when nothing else runs: it runs alone."""
        with self._lock:
            self.ran_alone += 1
            self._take(need)

    def _take(self, need: int) -> None:
        self.in_use += need
        self._running += 1
        self.admitted += 1
        self.peak_in_use = max(self.peak_in_use, self.in_use)

    def release(self, need: int) -> None:
        with self._lock:
            self.in_use -= need
            self._running -= 1

    def hold(self, size: int) -> None:
        """Count ``size`` bytes of buffers (fetched sources, outputs to upload) as in
        use: they delay the admission of images like an image's own memory does."""
        with self._lock:
            self.in_use += size
            self.io_bytes += size
            self.peak_in_use = max(self.peak_in_use, self.in_use)
            self.peak_io_bytes = max(self.peak_io_bytes, self.io_bytes)

    def free(self, size: int) -> None:
        with self._lock:
            self.in_use -= size
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
