"""Is the engine's libwebp as fast as the others'? Encode only, one thread, same settings.

The same decoded RGB image is encoded to lossy WebP (quality 80, method/effort 4)
by libvips' ``webpsave`` (the libwebp statically linked into pyvips-binary, which
optimizr uses) and by Pillow's WebP plugin (Pillow's bundled libwebp), alternately,
``--reps`` times each, in one process with ``VIPS_CONCURRENCY=1``; CPU time is
``time.process_time``. cwebp (decode + encode) is timed as a separate process for
scale. Both encoders get identical pixels, so the output sizes should agree
closely; the printed ratio is libvips CPU / Pillow CPU (medians).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["VIPS_CONCURRENCY"] = "1"

import numpy as np  # noqa: E402
import pyvips  # noqa: E402
from PIL import Image, features  # noqa: E402


def measure(path: Path, reps: int, quality: int, effort: int) -> list[object]:
    pyvips.cache_set_max(0)
    vips_image = pyvips.Image.new_from_file(str(path)).copy_memory()
    pil_image = Image.fromarray(np.asarray(Image.open(path).convert("RGB")))
    vips_cpu: list[float] = []
    pil_cpu: list[float] = []
    vips_bytes = pil_bytes = 0
    for _ in range(reps):
        started = time.process_time()
        vips_bytes = len(vips_image.webpsave_buffer(Q=quality, effort=effort))
        vips_cpu.append(time.process_time() - started)
        started = time.process_time()
        buffer = io.BytesIO()
        pil_image.save(buffer, "WEBP", quality=quality, method=effort)
        pil_cpu.append(time.process_time() - started)
        pil_bytes = len(buffer.getvalue())
    cwebp = shutil.which("cwebp")
    cwebp_cpu = float("nan")
    if cwebp:
        with tempfile.TemporaryDirectory() as tmp:
            runs = []
            for _ in range(reps):
                before = os.times()
                subprocess.run([cwebp, "-quiet", "-q", str(quality), "-m", str(effort),
                                str(path), "-o", f"{tmp}/o.webp"], check=True)  # fmt: skip
                after = os.times()
                runs.append(after.children_user - before.children_user
                            + after.children_system - before.children_system)  # fmt: skip
            cwebp_cpu = statistics.median(runs)
    mp = vips_image.width * vips_image.height / 1e6
    vips_median, pil_median = statistics.median(vips_cpu), statistics.median(pil_cpu)
    ratio = vips_median / pil_median
    return [path.name, f"{mp:.1f}", f"{vips_median:.3f}", f"{pil_median:.3f}",
            f"{ratio:.3f}", f"{cwebp_cpu:.3f}", vips_bytes, pil_bytes]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("images", type=Path, nargs="+", help="JPEG/PNG files to encode")
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--quality", type=int, default=80)
    parser.add_argument("--effort", type=int, default=4)
    args = parser.parse_args(argv)
    print(f"libvips {pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)} (pyvips-binary), "
          f"Pillow libwebp {features.version('webp')}")  # fmt: skip
    headers = ["image", "MP", "libvips s", "Pillow s", "libvips/Pillow", "cwebp s (decode+enc)",
               "libvips bytes", "Pillow bytes"]  # fmt: skip
    rows = [measure(path, args.reps, args.quality, args.effort) for path in args.images]
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for row in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
