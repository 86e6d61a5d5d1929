"""Draw a small sample library, so ``make run`` has something real to convert.

``python -m optimizr.samples DIR`` writes, with libvips only:

* ``photos/landscape.jpg``: a photo-like 1600x1067 JPEG (smooth sky, textured ground);
* ``photos/portrait_rotated.jpg``: the same kind of picture stored sideways with
  EXIF Orientation 6, as phones write it;
* ``graphics/badge.png``: a flat-colour graphic with soft transparent edges;
* ``graphics/grey_scan.jpg``: a one-channel grayscale JPEG;
* ``animations/spinner.gif``: an 8-frame animated GIF that loops forever;
* ``README.txt``: not an image (it is skipped, not failed).

``--photos N`` adds N more photo-like JPEGs of assorted sizes under ``photos/more/``,
for a run long enough to show progress over time (``make report-demo`` uses it).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pyvips


def _photo(width: int, height: int, seed: int) -> Any:
    x = pyvips.Image.xyz(width, height)
    yy = x[1] / height
    sky = (
        pyvips.Image.black(width, height, bands=3)
        + [90, 150, 230]
        - yy.bandjoin([yy, yy]) * [60, 60, 20]
    )
    texture = pyvips.Image.perlin(width, height, cell_size=64, seed=seed)
    fine = pyvips.Image.perlin(width, height, cell_size=8, seed=seed + 1)
    ground = (texture * 60 + fine * 25 + 90).bandjoin(
        [texture * 40 + fine * 20 + 110, texture * 20 + fine * 10 + 50]
    )
    horizon = (yy > 0.55 + (texture * 0.05)).ifthenelse(ground, sky)
    noise = pyvips.Image.gaussnoise(width, height, sigma=4, mean=0, seed=seed)
    return (horizon + noise).cast("uchar")


def _badge(size: int) -> Any:
    xy = pyvips.Image.xyz(size, size) - size / 2
    radius = (xy[0] ** 2 + xy[1] ** 2) ** 0.5
    # Alpha falls off over 3 px at the rim: anti-aliased, partly transparent.
    alpha = ((size * 0.45 - radius) * 85).cast("uchar")
    rgb = pyvips.Image.black(size, size, bands=3) + [220, 60, 40]
    stripe = (xy[0].abs() < size * 0.08).ifthenelse([255, 255, 255], rgb)
    return stripe.cast("uchar").bandjoin(alpha).copy(interpretation="srgb")


def _spinner(size: int, frames: int) -> Any:
    xy = pyvips.Image.xyz(size, size) - size / 2
    angle = xy.polar()[1]
    pages = []
    for i in range(frames):
        lit = ((angle - i * 360 / frames) % 360) < 45
        ring = (xy[0] ** 2 + xy[1] ** 2) ** 0.5
        in_ring = (ring > size * 0.25) & (ring < size * 0.45)
        # A soft gradient behind the ring, as in real loading animations: GIF
        # has to dither it, which is where an animated WebP saves the most.
        shade = (xy[1] + size / 2) * (120 / size) + 120
        background = shade.bandjoin([shade + 10, shade + 40])
        frame = (in_ring & lit).ifthenelse([30, 120, 220], background)
        pages.append(frame.cast("uchar"))
    strip = pyvips.Image.arrayjoin(pages, across=1)
    strip = strip.copy(interpretation="srgb")
    strip.set_type(pyvips.GValue.gint_type, "page-height", size)
    strip.set_type(pyvips.GValue.array_int_type, "delay", [80] * frames)
    strip.set_type(pyvips.GValue.gint_type, "loop", 0)
    return strip


def write_samples(root: Path, extra_photos: int = 0) -> list[Path]:
    """Write the sample library under ``root``; return the files written."""
    (root / "photos").mkdir(parents=True, exist_ok=True)
    (root / "graphics").mkdir(parents=True, exist_ok=True)
    (root / "animations").mkdir(parents=True, exist_ok=True)
    written = []

    path = root / "photos" / "landscape.jpg"
    _photo(1600, 1067, seed=1).jpegsave(str(path), Q=90)
    written.append(path)

    # Stored sideways (rotated 90 degrees anticlockwise) with Orientation 6,
    # which tells viewers to turn it clockwise to display it upright.
    path = root / "photos" / "portrait_rotated.jpg"
    sideways = _photo(1067, 1600, seed=2).rot270().copy()
    sideways.set_type(pyvips.GValue.gint_type, "orientation", 6)
    sideways.jpegsave(str(path), Q=90)
    written.append(path)

    path = root / "graphics" / "badge.png"
    _badge(256).pngsave(str(path))
    written.append(path)

    path = root / "graphics" / "grey_scan.jpg"
    _photo(800, 600, seed=3).colourspace("b-w").jpegsave(str(path), Q=85)
    written.append(path)

    path = root / "animations" / "spinner.gif"
    _spinner(160, 8).gifsave(str(path))
    written.append(path)

    path = root / "README.txt"
    path.write_text("Sample images drawn by optimizr.samples; this file is not an image.\n")
    written.append(path)

    if extra_photos:
        (root / "photos" / "more").mkdir(exist_ok=True)
    for i in range(extra_photos):
        width = 800 + (i * 397) % 2400  # 800 to 3200 px wide, in no particular order
        path = root / "photos" / "more" / f"photo_{i:03}.jpg"
        _photo(width, width * 2 // 3, seed=10 + i).jpegsave(str(path), Q=88)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    extra = 0
    if "--photos" in args:
        at = args.index("--photos")
        extra = int(args[at + 1])
        del args[at : at + 2]
    root = Path(args[0] if args else "samples")
    for path in write_samples(root, extra):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
