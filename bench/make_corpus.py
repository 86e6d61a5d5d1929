"""Build the benchmark corpora from the shared corpus's real photos.

Default mode: at least 50 multi-megapixel JPEG photos in OUT: the real photos of
``$OPTIMIZR_CORPUS/photos`` (default ``../shared/corpus`` from the repository
root) that have at least --min-mp megapixels, copied as they are, plus larger
ones made by upscaling every photo of 1 MP or more with libvips (``resize``
1.5x, 2x and 2.5x, then 1.25x, 1.75x, ... while more are needed; saved with
``jpegsave Q=90``). Photos whose JPEG data is damaged (libjpeg warnings) are
left out, so every converter can convert every image. The EXIF orientation is
kept as it is, so the converters have to autorotate.

``--big``: the memory benchmark's corpus: --count (default 100) images of
12-60 MP, each photo upscaled to a target size that varies from image to image,
plus the kinds of image whose memory differs from a plain JPEG's, made from the
same photos: four JPEGs with EXIF orientation 6 (24-59 MP; phone photos are
mostly so, and a rotation cannot be decoded sequentially), two RGBA PNGs (5120x2880
as in issue 12, and 30 MP; the alpha an elliptic vignette) and a 16-bit RGB PNG
(24 MP). ``--no-extras``: the JPEGs only.

``--link-to N --from DIR``: OUT becomes a folder of N hard links cycling over
DIR's images (1,000 images to convert without 1,000 distinct files on disk).

Everything is deterministic: the same sources and arguments give the same
files. Existing files are kept, so an interrupted build resumes. Prints the
number of images, total MB, total megapixels and min/median/max MP.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import REPO_ROOT, corpus_stats, describe_corpus, list_images

#: Scale factors, in the order they are used while more images are needed.
SCALES = (1.5, 2.0, 2.5, 1.25, 1.75, 2.25, 3.0)
#: The big corpus's range of sizes, in megapixels (a little inside 12-60 for rounding).
BIG_MIN_MP, BIG_MAX_MP = 12.5, 59.5


@dataclass(frozen=True)
class Source:
    path: Path
    width: int
    height: int
    orientation: int = 1

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6


#: What ``save_variant`` can make of a photo: the JPEG as it is, the JPEG with EXIF
#: orientation 6, an RGBA PNG, a 16-bit RGB PNG.
KINDS = ("jpeg", "o6", "rgba", "png16")


@dataclass(frozen=True)
class Planned:
    """One output image: a source scaled by ``scale`` (1.0: copied as is), saved as ``kind``."""

    source: Source
    scale: float
    name: str
    kind: str = "jpeg"

    @property
    def megapixels(self) -> float:
        return self.source.megapixels * self.scale**2


def default_photos() -> Path:
    root = os.environ.get("OPTIMIZR_CORPUS") or str(REPO_ROOT / ".." / "shared" / "corpus")
    return Path(root).resolve() / "photos"


def load_sources(photos: Path) -> list[Source]:
    """The JPEG photos of 1 MP or more, sorted by name (so the plan is deterministic)."""
    import pyvips

    sources = []
    for path in list_images(photos):
        if path.suffix.lower() not in (".jpg", ".jpeg"):
            continue
        image = pyvips.Image.new_from_file(str(path))
        orientation = image.get("orientation") if image.get_typeof("orientation") else 1
        source = Source(path, image.width, image.height, int(orientation))
        if source.megapixels < 1.0:
            continue
        if not decodes_cleanly(path):
            # Every peer must be able to convert every image; libjpeg's recoverable
            # warnings (bad restart markers, say) make some tools fail the file.
            print(f"skipped {path.name}: its JPEG data is damaged")
            continue
        sources.append(source)
    return sources


def decodes_cleanly(path: Path) -> bool:
    import pyvips

    try:
        pyvips.Image.new_from_file(str(path), fail_on="warning").avg()
    except pyvips.Error:
        return False
    return True


def plan_photos(sources: list[Source], count: int, min_mp: float) -> list[Planned]:
    """Originals first, then upscaled copies, one scale at a time, up to ``count``."""
    plan = [Planned(s, 1.0, s.path.stem + ".jpg") for s in sources if s.megapixels >= min_mp]
    for scale in SCALES:
        plan.extend(
            Planned(s, scale, f"{s.path.stem}_x{scale:g}.jpg")
            for s in sources
            if s.megapixels * scale**2 >= min_mp
        )
    return plan[:count]


def plan_big(sources: list[Source], count: int) -> list[Planned]:
    """``count`` images of 12-60 MP: sources in turn, target sizes spread by the golden ratio."""
    plan = []
    for i in range(count):
        source = sources[i % len(sources)]
        # A low-discrepancy sequence: sizes cover the range evenly and differ between
        # neighbours, without randomness.
        fraction = (0.5 + i * 0.6180339887) % 1.0
        target = BIG_MIN_MP + fraction * (BIG_MAX_MP - BIG_MIN_MP)
        scale = round(math.sqrt(target / source.megapixels), 3)
        name = f"{source.path.stem}_{i:03d}_{target:.0f}mp.jpg"
        plan.append(Planned(source, scale, name))
    return plan


#: The extra kinds of the big corpus: (kind, target megapixels), or exact (width, height).
BIG_EXTRAS: tuple[tuple[str, float | tuple[int, int]], ...] = (
    ("o6", 24.0),
    ("o6", 36.0),
    ("o6", 48.0),
    ("o6", 59.0),
    ("rgba", (5120, 2880)),
    ("rgba", 30.0),
    ("png16", 24.0),
)


def plan_big_extras(sources: list[Source]) -> list[Planned]:
    """The big corpus's rotated JPEGs and PNGs, from upright photos (so orientation 6 is
    the only rotation), each from the next photo in turn."""
    upright = [s for s in sources if s.orientation == 1] or sources
    plan = []
    for i, (kind, size) in enumerate(BIG_EXTRAS):
        source = upright[i % len(upright)]
        if isinstance(size, tuple):
            # A box is landscape: take the next landscape photo, so little is cropped.
            landscape = [s for s in upright if s.width >= s.height] or upright
            source = landscape[i % len(landscape)]
            # The scale that fits the photo inside the box; save_variant crops the rest.
            scale = round(max(size[0] / source.width, size[1] / source.height), 4)
            label = f"{size[0]}x{size[1]}"
        else:
            scale = round(math.sqrt(size / source.megapixels), 3)
            label = f"{size:.0f}mp"
        suffix = "jpg" if kind in ("jpeg", "o6") else "png"
        plan.append(Planned(source, scale, f"{source.path.stem}_{kind}_{label}.{suffix}", kind))
    return plan


def alpha_vignette(width: int, height: int) -> Any:
    """An 8-bit alpha band: opaque in an ellipse, fading to transparent at the corners."""
    import pyvips

    xy = pyvips.Image.xyz(width, height)
    x = (xy[0] - width / 2) / (width / 2)
    y = (xy[1] - height / 2) / (height / 2)
    distance = x * x + y * y
    return ((1.6 - distance) * 255).cast("uchar")  # cast clips to 0..255


def save_variant(image: Any, kind: str, path: Path, box: tuple[int, int] | None = None) -> None:
    """Save a decoded photo as one of KINDS (see there) at ``path``, cropped to ``box``."""
    import pyvips

    if box is not None:
        image = image.crop(0, 0, min(box[0], image.width), min(box[1], image.height))
    if kind == "jpeg":
        image.jpegsave(str(path), Q=90)
    elif kind == "o6":
        image = image.copy()
        image.set_type(pyvips.GValue.gint_type, "orientation", 6)
        image.jpegsave(str(path), Q=90)
    elif kind == "rgba":
        image = image[0:3].bandjoin(alpha_vignette(image.width, image.height))
        image.pngsave(str(path), compression=1, keep="none")
    elif kind == "png16":
        wide = (image[0:3].cast("ushort") * 257).cast("ushort").copy(interpretation="rgb16")
        wide.pngsave(str(path), compression=1, bitdepth=16, keep="none")
    else:
        raise ValueError(f"unknown kind {kind!r}")


def build(plan: list[Planned], out: Path) -> None:
    """Write every planned image that is not there yet (nothing else is written into OUT:
    the converters under test would count any extra file)."""
    import pyvips

    out.mkdir(parents=True, exist_ok=True)
    wanted = {p.name for p in plan}
    extra = [path for path in list_images(out) if path.name not in wanted]
    if extra:
        print(f"warning: {len(extra)} images in {out} are not in this plan; use an empty folder")
    for number, item in enumerate(plan, 1):
        target = out / item.name
        if target.exists() and target.stat().st_size > 0:
            continue
        partial = out / f".{item.name}.part"
        if item.scale == 1.0 and item.kind == "jpeg":
            shutil.copyfile(item.source.path, partial)
        else:
            # No autorotate: the EXIF orientation travels with the pixels as stored.
            image = pyvips.Image.new_from_file(str(item.source.path))
            box = _box(item.name)
            save_variant(image.resize(item.scale), item.kind, partial, box)
        partial.rename(target)
        print(f"  [{number}/{len(plan)}] {item.name} ({item.megapixels:.1f} MP)", flush=True)


def _box(name: str) -> tuple[int, int] | None:
    """The exact size a planned name asks for ("..._5120x2880.png"), if any."""
    last = Path(name).stem.rsplit("_", 1)[-1]
    width, _, height = last.partition("x")
    return (int(width), int(height)) if width.isdigit() and height.isdigit() else None


def link_folder(out: Path, count: int, source_dir: Path) -> None:
    """``count`` hard links in ``out``, cycling over the images of ``source_dir``."""
    files = list_images(source_dir)
    if not files:
        raise SystemExit(f"make_corpus: no images in {source_dir}")
    names = [f"{i:05d}_{files[i % len(files)].name}" for i in range(count)]
    if out.exists():
        if sorted(p.name for p in list_images(out)) == sorted(names):
            return
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for i, name in enumerate(names):
        try:
            os.link(files[i % len(files)], out / name)
        except OSError as exc:
            raise SystemExit(
                f"make_corpus: cannot hard-link into {out} ({exc.strerror}); "
                "it must be on the same filesystem as the source images"
            ) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="folder to fill (created if missing)")
    parser.add_argument("--count", type=int, help="number of images (default 60; --big: 100)")
    parser.add_argument(
        "--min-mp", type=float, default=3.0, help="smallest image kept, in MP (default 3)"
    )
    parser.add_argument("--big", action="store_true", help="12-60 MP images for bench/memory.py")
    parser.add_argument(
        "--no-extras", action="store_true", help="--big without rotated JPEGs and PNGs"
    )
    parser.add_argument(
        "--photos", type=Path, help="source photos (default $OPTIMIZR_CORPUS/photos)"
    )
    parser.add_argument(
        "--link-to", type=int, metavar="N", help="make OUT a folder of N hard links"
    )
    parser.add_argument("--from", dest="link_from", type=Path, help="with --link-to: the images")
    args = parser.parse_args(argv)
    if args.link_to is not None and args.link_from is None:
        parser.error("--link-to needs --from DIR")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.link_to is not None:
        link_folder(args.out, args.link_to, args.link_from)
    else:
        photos = args.photos or default_photos()
        sources = load_sources(photos)
        if not sources:
            print(f"make_corpus: no photos of 1 MP or more in {photos}", file=sys.stderr)
            return 2
        if args.big:
            plan = plan_big(sources, args.count or 100)
            if not args.no_extras:
                plan += plan_big_extras(sources)
        else:
            plan = plan_photos(sources, args.count or 60, args.min_mp)
        print(f"{len(sources)} source photos of 1 MP or more in {photos}; {len(plan)} planned")
        build(plan, args.out)
    print(describe_corpus(str(args.out), corpus_stats(list_images(args.out))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
