"""Is the engine's libwebp as fast as the others'? Encode only, one thread, same settings.

The same decoded RGB image is encoded to lossy WebP (quality 80, method/effort 4)
alternately, ``--reps`` times each, in one process with ``VIPS_CONCURRENCY=1``, by:

- libvips' ``webpsave``: the libwebp statically linked into pyvips-binary, which
  optimizr uses;
- Pillow's WebP plugin (Pillow's bundled libwebp);
- optimizr's own binding of Pillow's libwebp (``optimizr.webp_writer``, strips),
  what optimizr runs unless it falls back to ``webpsave``;
- the libwebp of the ``webp`` wheel from PyPI (a cffi binding), when
  ``make bench-peers`` could put it in ``bench/.peers/python``: called directly
  (``WebPPictureImportRGB`` + ``WebPEncode``), which is what ``webpsave`` does inside.

CPU time is ``time.process_time``. cwebp (decode + encode) is timed as a separate
process for scale. All encoders get identical pixels and settings, so the output
bytes should be identical or nearly so (libvips may add a few metadata bytes); a
speed difference is then the build of libwebp, not the work. Ratios printed are
libvips CPU / the other encoder's CPU (medians), per image and over all images.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ["VIPS_CONCURRENCY"] = "1"

import numpy as np  # noqa: E402
import pyvips  # noqa: E402
from PIL import Image, features  # noqa: E402

from _common import PEERS_DIR, Peer, find_cwebp  # noqa: E402
from optimizr import libwebp as optimizr_libwebp  # noqa: E402
from optimizr import webp_writer  # noqa: E402
from optimizr.config import EncodeOptions  # noqa: E402

WHEEL_DIR = PEERS_DIR / "python"

Encoder = Callable[[], int]


def wheel_libwebp() -> Any | None:
    """The cffi ``lib`` and ``ffi`` of the ``webp`` wheel, or None when it is not installed."""
    if WHEEL_DIR.is_dir() and str(WHEEL_DIR) not in sys.path:
        sys.path.append(str(WHEEL_DIR))
    try:
        return importlib.import_module("webp._webp")
    except ImportError:
        return None


def wheel_encoder(binding: Any, rgb: bytes, width: int, height: int, quality: int,
                  effort: int) -> Encoder:  # fmt: skip
    ffi, lib = binding.ffi, binding.lib

    def encode() -> int:
        config = ffi.new("WebPConfig*")
        lib.WebPConfigPreset(config, 0, float(quality))  # 0: WEBP_PRESET_DEFAULT, as libvips
        config.method = effort
        picture = ffi.new("WebPPicture*")
        writer = ffi.new("WebPMemoryWriter*")
        lib.WebPPictureInit(picture)
        picture.width, picture.height = width, height
        try:
            if not lib.WebPPictureImportRGB(picture, ffi.from_buffer(rgb), width * 3):
                raise MemoryError("WebPPictureImportRGB")
            lib.WebPMemoryWriterInit(writer)
            picture.writer = lib.WebPMemoryWrite
            picture.custom_ptr = writer
            if not lib.WebPEncode(config, picture):
                raise RuntimeError("WebPEncode failed")
            return int(writer.size)
        finally:
            lib.WebPPictureFree(picture)
            lib.WebPMemoryWriterClear(writer)

    return encode


def cwebp_cpu(cwebp: Peer | None, path: Path, reps: int, quality: int, effort: int) -> float:
    if cwebp is None:
        return float("nan")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(reps):
            before = os.times()
            subprocess.run([cwebp.executable, "-quiet", "-q", str(quality), "-m", str(effort),
                            str(path), "-o", f"{tmp}/o.webp"],
                           check=True, env={**os.environ, **cwebp.env})  # fmt: skip
            after = os.times()
            runs.append(after.children_user - before.children_user
                        + after.children_system - before.children_system)  # fmt: skip
    return statistics.median(runs)


@dataclass
class Row:
    image: str
    megapixels: float
    cpu: dict[str, float]  # encoder name -> median CPU seconds
    sizes: dict[str, int]  # encoder name -> output bytes
    cwebp: float


def measure(path: Path, reps: int, quality: int, effort: int, binding: Any | None,
            cwebp: Peer | None) -> Row:  # fmt: skip
    pyvips.cache_set_max(0)
    vips_image = pyvips.Image.new_from_file(str(path)).colourspace("srgb")[0:3].copy_memory()
    rgb = vips_image.write_to_memory()
    width, height = vips_image.width, vips_image.height
    pil_image = Image.fromarray(np.frombuffer(rgb, np.uint8).reshape(height, width, 3))

    def pillow() -> int:
        buffer = io.BytesIO()
        pil_image.save(buffer, "WEBP", quality=quality, method=effort)
        return len(buffer.getvalue())

    encoders: dict[str, Encoder] = {
        "libvips": lambda: len(vips_image.webpsave_buffer(Q=quality, effort=effort, keep="none")),
        "Pillow": pillow,
    }
    lib = optimizr_libwebp.load()
    if lib is not None:
        # optimizr's own binding (Pillow's libwebp, fed in strips): what optimizr runs.
        options = EncodeOptions(quality=quality, effort=effort, metadata="none")
        encoders["optimizr"] = lambda: len(webp_writer.encode(lib, vips_image, options))
    if binding is not None:
        encoders["wheel"] = wheel_encoder(binding, rgb, width, height, quality, effort)
    cpu: dict[str, list[float]] = {name: [] for name in encoders}
    sizes: dict[str, int] = {}
    for _ in range(reps):
        for name, encode in encoders.items():
            started = time.process_time()
            sizes[name] = encode()
            cpu[name].append(time.process_time() - started)
    medians = {name: statistics.median(values) for name, values in cpu.items()}
    return Row(path.name, width * height / 1e6, medians, sizes,
               cwebp_cpu(cwebp, path, reps, quality, effort))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("images", type=Path, nargs="+", help="JPEG/PNG files to encode")
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--quality", type=int, default=80)
    parser.add_argument("--effort", type=int, default=4)
    args = parser.parse_args(argv)
    binding = wheel_libwebp()
    cwebp = find_cwebp()
    wheel = "installed" if binding is not None else "not installed (make bench-peers)"
    print(f"libvips {pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)} (pyvips-binary), "
          f"Pillow libwebp {features.version('webp')}, webp wheel {wheel}, "
          f"cwebp {cwebp.version if cwebp else 'not installed'}")  # fmt: skip
    rows = [measure(path, args.reps, args.quality, args.effort, binding, cwebp)
            for path in args.images]  # fmt: skip
    others = [name for name in rows[0].cpu if name != "libvips"]
    rows.append(Row("all", sum(r.megapixels for r in rows),
                    {n: sum(r.cpu[n] for r in rows) for n in rows[0].cpu}, {},
                    sum(r.cwebp for r in rows)))  # fmt: skip
    headers = ["image", "MP", "libvips s", *(f"{n} s" for n in others),
               *(f"libvips/{n}" for n in others), "cwebp s (dec+enc)", "bytes"]  # fmt: skip
    table = [
        [
            r.image,
            f"{r.megapixels:.1f}",
            f"{r.cpu['libvips']:.3f}",
            *(f"{r.cpu[n]:.3f}" for n in others),
            *(f"{r.cpu['libvips'] / r.cpu[n]:.3f}" for n in others),
            f"{r.cwebp:.3f}",
            " / ".join(str(b) for b in r.sizes.values()),
        ]  # fmt: skip
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in table)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for line in table:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))
    print(f"bytes: {' / '.join(rows[0].cpu)}; identical or nearly so means identical work")
    return 0


if __name__ == "__main__":
    sys.exit(main())
