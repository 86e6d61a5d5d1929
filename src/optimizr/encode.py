"""One image in, WebP bytes and the facts about it out.

``encode_webp`` is pure: it takes a source (a path to read, or the bytes
themselves) and a frozen :class:`EncodeOptions`, touches no global state and
writes nothing. That keeps it safe to run in a worker process now and as a
Dask task later. Everything that can go wrong with the image is raised as an
:class:`~optimizr.errors.ImageError` subclass with a one-line reason.

The order of operations matters for correctness and for speed:

1. sniff the signature (the name is never trusted);
2. read the header only, and refuse decompression bombs before any pixel is decoded;
3. decode with shrink-on-load when a smaller size is wanted, applying EXIF orientation;
4. bring the colours to something WebP can carry (CMYK, Lab, 16-bit, float -> 8-bit RGB),
   keeping the ICC profile unless asked otherwise;
5. encode; libwebp itself drops an alpha plane that is fully opaque.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyvips

from optimizr import decoders
from optimizr.config import WEBP_MAX_DIMENSION, EncodeOptions
from optimizr.decoders import damaged_jpeg
from optimizr.errors import (
    CorruptImage,
    EncodeFailed,
    ImageError,
    NotAnImage,
    PermissionDenied,
    SourceDisappeared,
    SourceUnreadable,
    TooLarge,
    TruncatedImage,
    UnsupportedImage,
)
from optimizr.libwebp import LibWebP
from optimizr.libwebp import load as load_libwebp
from optimizr.size_target import RATE_CONTROL_PASSES, SizeSearch, fit_to_size
from optimizr.sniff import HEAD_SIZE, Sniffed, sniff_bytes, sniff_file
from optimizr.webp_writer import (
    Phases,
    make_config,
    metadata_chunks,
    oriented_size,
    orients_in_planes,
    saveable,
)
from optimizr.webp_writer import encode as libwebp_encode

if TYPE_CHECKING:
    from optimizr.quality_search import SearchOutcome

Source = str | bytes


@dataclass(frozen=True)
class ImageFacts:
    """What one conversion did, for the summary and for checks."""

    format: str
    width_in: int
    height_in: int
    width_out: int
    height_out: int
    frames: int
    bytes_in: int
    bytes_out: int
    has_alpha: bool
    icc_kept: bool
    converted_to_srgb: bool
    resized: bool
    seconds: float
    cpu_seconds: float
    #: Where ``seconds`` went. read: sniffing and parsing the header; decode:
    #: until the last pixel reached the encoder (colour conversion and resizing
    #: included: libvips runs them in the same streaming pass); encode: libwebp
    #: after that. For animations libwebp encodes frame by frame as pixels
    #: arrive, so most of their encoding is counted as decode.
    read_seconds: float = 0.0
    decode_seconds: float = 0.0
    encode_seconds: float = 0.0
    #: With libwebp's own binding (not libvips' webpsave), the decoded strips'
    #: import into libwebp's picture (rotation included) and the mux of
    #: metadata and container, which are otherwise inside decode and encode.
    import_seconds: float = 0.0
    mux_seconds: float = 0.0
    #: Pages in the file (a multi-page TIFF); ``frames`` counts animation frames.
    pages: int = 1
    #: What the conversion did that the user should know of, one line each
    #: ("multi-page: ..."): the output is right, but not all of the source.
    warnings: tuple[str, ...] = ()
    #: --target-size: the quality kept (None: libwebp's rate control chose it), the
    #: encodes of the whole image it took, and whether the output fits the target.
    target_quality: int | None = None
    target_encodes: int = 0
    target_met: bool | None = None
    #: --target-score (issue 14): what the search chose ("q72", "lossless",
    #: "near-lossless 60"), its lossy quality, the score it verified (None when
    #: not scored: a tiny image) and the encodes it made. None and 0 without it.
    chosen: str | None = None
    chosen_quality: int | None = None
    score: float | None = None
    probes: int = 0


@dataclass(frozen=True)
class Encoded:
    webp: bytes
    facts: ImageFacts
    #: --pages all: the WebP of pages 2, 3, ... (``webp`` is page 1).
    more_pages: tuple[bytes, ...] = ()


# Formats with no signature to sniff, recognised by name only to say what they are.
_NO_SIGNATURE_FORMATS = {".tga": "tga", ".icb": "tga", ".vda": "tga", ".pcx": "pcx"}

# How strict each decoder is. libjpeg reports recoverable damage inside the
# entropy-coded data (a bad restart marker, say) as a warning and decodes the
# rest; such files are common from cameras and every viewer shows them, so for
# JPEG and GIF only a truncated file fails. (libvips still gives up on a JPEG
# after 100 such warnings, whatever fail_on says: decoders/damaged_jpeg.py then
# decodes it without that limit.) libpng reports CRC mismatches on
# critical chunks as errors, and those files must fail, not decode to garbage.
_FAIL_ON = {"jpeg": "truncated", "gif": "truncated"}

# Loaders that understand n=-1 (all frames) and produce a "toilet roll" image.
_ANIMATED_LOADERS = frozenset({"gif", "webp"})
#: Formats whose pages are separate images (not frames of one animation).
_PAGED_LOADERS = frozenset({"tiff"})


def encode_webp(source: Source, options: EncodeOptions) -> Encoded:
    """Convert one image to WebP in memory.

    ``source`` is a filesystem path (read-only, streamed by libvips) or the
    file's bytes. Raises an :class:`~optimizr.errors.ImageError` subclass when
    the image cannot be converted.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    sniffed, bytes_in = _sniff(source)
    if sniffed.format is None:
        suffix = "" if isinstance(source, bytes) else os.path.splitext(source)[1].lower()
        if suffix in _NO_SIGNATURE_FORMATS:
            raise UnsupportedImage(
                f"{_NO_SIGNATURE_FORMATS[suffix]} is not a format optimizr converts"
            )
        raise NotAnImage("no known image signature")
    if not sniffed.supported:
        raise UnsupportedImage(f"{sniffed.format} is not a format optimizr converts")
    # libvips keeps one error log per thread and appends to it; without this a
    # failure would be reported with the messages of earlier images attached.
    pyvips.vips_lib.vips_error_clear()
    clock = _PhaseClock(started)
    fail_on = _FAIL_ON.get(sniffed.format)
    if options.strict_decode and sniffed.format == "jpeg":
        fail_on = "warning"  # any corrupt-data warning fails the image
    damage: list[str] | None = None
    try:
        loaded, image, webp, more_pages, warnings = _convert_all(
            source, sniffed, options, fail_on, clock
        )
    except OSError as exc:  # in-memory decoders read the file themselves
        raise SourceUnreadable(exc.strerror or str(exc)) from None
    except pyvips.Error as exc:
        if sniffed.format == "jpeg":
            damage = damaged_jpeg.corrupt_data_warnings(str(exc.detail or ""))
        if damage is None:
            raise _image_error(exc, sniffed.format, source) from None
    if damage is not None:
        # Out of the except clause: the traceback that held the failed attempt's
        # image is gone, so its memory is freed before the second decode.
        loaded, image, webp, more_pages, warnings = _convert_damaged(
            source, sniffed, options, clock, damage
        )
    has_alpha = webp_has_alpha(webp)
    search = clock.size_search
    if search is not None and not search.met:
        warnings.append(str(search.warning(len(webp))))
    icc_kept = options.metadata != "none" and image.get_typeof("icc-profile-data") != 0
    width_out, height_out = oriented_size(image.width, _page_height(image), loaded.orientation)
    facts = ImageFacts(
        format=sniffed.kind,
        width_in=loaded.width,
        height_in=loaded.height,
        width_out=width_out,
        height_out=height_out,
        frames=loaded.frames,
        bytes_in=bytes_in,
        bytes_out=len(webp),
        has_alpha=has_alpha,
        icc_kept=icc_kept,
        converted_to_srgb=loaded.converted_to_srgb,
        resized=loaded.resized,
        seconds=time.perf_counter() - started,
        cpu_seconds=time.process_time() - cpu_started,
        read_seconds=round(clock.read, 6),
        decode_seconds=round(clock.decode, 6),
        encode_seconds=round(clock.encode, 6),
        import_seconds=round(clock.import_, 6),
        mux_seconds=round(clock.mux, 6),
        pages=loaded.pages,
        warnings=tuple(warnings),
        target_quality=search.quality if search else None,
        target_encodes=search.encodes if search else 0,
        target_met=search.met if search else None,
        **_search_facts(loaded.search),
    )
    return Encoded(webp, facts, tuple(more_pages))


def _convert_all(
    source: Source,
    sniffed: Sniffed,
    options: EncodeOptions,
    fail_on: str | None,
    clock: _PhaseClock | None,
    unlimited: bool = False,
) -> tuple[_Loaded, Any, bytes, list[bytes], list[str]]:
    """The first page (and with --pages all the others), and the warnings."""
    loaded, image, webp = _convert(source, sniffed, options, fail_on, clock, unlimited=unlimited)
    more_pages: list[bytes] = []
    warnings: list[str] = []
    if loaded.search is not None and loaded.search.warning:
        warnings.append(loaded.search.warning)
    elif options.target_score is not None and loaded.search is None:
        warnings.append(
            f"target score: libwebp's binding does not load here, so no search: "
            f"encoded at --quality {options.quality}"
        )
    if loaded.pages > 1 and options.pages == "all":
        more_pages.extend(
            _convert(source, sniffed, options, fail_on, None, page)[2]
            for page in range(1, loaded.pages)
        )
    elif loaded.pages > 1:
        warnings.append(
            f"multi-page: {loaded.pages} pages, only the first was converted "
            "(--pages all converts each)"
        )
    return loaded, image, webp, more_pages, warnings


def _convert_damaged(
    source: Source,
    sniffed: Sniffed,
    options: EncodeOptions,
    clock: _PhaseClock | None,
    damage: list[str],
) -> tuple[_Loaded, Any, bytes, list[bytes], list[str]]:
    """A JPEG libvips refused for libjpeg's corrupt-data warnings alone (issue 13):
    converted past its 100-warning limit, the damage recorded on the image, or
    with --strict-decode refused, naming it. A truncated file still fails as one."""
    fail_on = _FAIL_ON["jpeg"]
    try:
        count = damaged_jpeg.count_warnings(lambda **kwargs: _open(source, fail_on, **kwargs))
        what = damaged_jpeg.describe(count, damage)
        if options.strict_decode:
            raise CorruptImage(f"jpeg: damaged compressed data, {what}; --strict-decode refuses it")
        loaded, image, webp, more_pages, warnings = _convert_all(
            source, sniffed, options, fail_on, clock, unlimited=True
        )
    except OSError as exc:
        raise SourceUnreadable(exc.strerror or str(exc)) from None
    except pyvips.Error as exc:
        raise _image_error(exc, "jpeg", source) from None
    warnings.append(f"{damaged_jpeg.DAMAGE_WARNING}: {what}")
    return loaded, image, webp, more_pages, warnings


def _image_error(exc: pyvips.Error, fmt: str, source: Source) -> ImageError:
    error = _classify_vips_error(exc, fmt)
    if fmt == "png" and isinstance(error, CorruptImage) and _png_cut_short(source):
        error = TruncatedImage("png: the file ends before its IEND chunk")
    return error


class _PhaseClock:
    """Splits one conversion's time into read, decode and encode.

    libvips decodes lazily, inside the save: the boundary between decoding and
    encoding is the moment the save's progress reaches 100% (every pixel has
    been handed to libwebp, which then compresses). Measured with libvips'
    own ``eval`` progress signal, so nothing is decoded twice to time it.
    """

    def __init__(self, started: float) -> None:
        self.started = started
        self.read = self.decode = self.encode = self.import_ = self.mux = 0.0
        self._built = self._pixels = 0.0
        #: Filled by the libwebp binding, which times its own steps.
        self.phases: Phases | None = None
        #: --target-size: how the first page's size target was met.
        self.size_search: SizeSearch | None = None

    def built(self, decoded_already: bool) -> None:
        self._built = time.perf_counter()
        if decoded_already:  # in-memory decoders finish before the save
            self.decode = self._built - self.started
        else:
            self.read = self._built - self.started

    def watch(self, image: Any) -> None:
        def on_eval(_image: Any, progress: Any) -> None:
            if not self._pixels and progress.percent >= 100:
                self._pixels = time.perf_counter()

        image.set_progress(True)
        image.signal_connect("eval", on_eval)

    def saved(self) -> None:
        end = time.perf_counter()
        if self.phases is not None:
            phases, self.phases = self.phases, None
            self.decode += phases.decode
            self.import_ += phases.import_
            self.encode += phases.encode
            self.mux += phases.mux
            return
        pixels = self._pixels or end
        self.decode += pixels - self._built
        self.encode = end - pixels


def _convert(
    source: Source,
    sniffed: Sniffed,
    options: EncodeOptions,
    fail_on: str | None,
    clock: _PhaseClock | None,
    page: int = 0,
    unlimited: bool = False,
) -> tuple[_Loaded, Any, bytes]:
    loaded = _load(source, sniffed, options, fail_on or "error", page, unlimited)
    image, converted = _prepare_colour(loaded.image, options)
    image = _fit_to_webp(image, options)
    loaded = dataclasses.replace(loaded, converted_to_srgb=converted)
    if clock is not None:
        clock.built(decoded_already=decoders.module_for(sniffed.kind) is not None)
    if options.target_score is not None and encoder_for(options) is not None:
        outcome = _search(image, options, clock, loaded.orientation, _source_size(source))
        loaded = dataclasses.replace(loaded, search=outcome)
        if clock is not None:
            clock.saved()
        return loaded, image, outcome.chosen.webp
    if loaded.resized and encoder_for(options) is not None:
        # Strips pulled from a shrinking pipeline (thumbnail: shrink-on-load, then
        # resample) cost libvips ~12 bytes per input pixel, against ~1 for its own
        # sink (an 8 MP JPEG to 1024 px: 97 against 21 MiB, measured); the shrunk
        # image is small, so libvips renders it whole first, with its own sink.
        image = image.copy_memory()
    webp = _save(image, options, clock, loaded.orientation)
    if clock is not None:
        clock.saved()
    return loaded, image, webp


def _sniff(source: Source) -> tuple[Sniffed, int]:
    if isinstance(source, bytes):
        return sniff_bytes(source), len(source)
    try:
        with open(source, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            return sniff_file(fh), size
    except PermissionError:
        raise PermissionDenied("cannot read the file") from None
    except FileNotFoundError:
        raise SourceDisappeared("the file disappeared before it could be read") from None
    except IsADirectoryError:
        raise SourceUnreadable("is a directory") from None
    except OSError as exc:
        raise SourceUnreadable(exc.strerror or str(exc)) from None


@dataclass(frozen=True)
class _Loaded:
    image: Any
    width: int  # as stored, before orientation
    height: int  # of one frame
    frames: int
    resized: bool
    converted_to_srgb: bool = False
    #: Pages in the file: a multi-page TIFF (each page its own image, unlike frames).
    pages: int = 1
    #: The EXIF orientation the encoder still has to apply (1: the image is upright).
    orientation: int = 1
    #: What --target-score's search chose.
    search: SearchOutcome | None = None


def _load(
    source: Source,
    sniffed: Sniffed,
    options: EncodeOptions,
    fail_on: str,
    page: int = 0,
    unlimited: bool = False,
) -> _Loaded:
    """Decode ``page`` (of a multi-page file), oriented and (if asked) shrunk.

    ``unlimited``: past libvips' limit of 100 libjpeg warnings (a damaged JPEG)."""
    fmt = sniffed.format
    assert fmt is not None
    in_memory = decoders.module_for(sniffed.kind)
    if in_memory is not None:
        # A decoder of the table that holds the whole image (see optimizr.decoders).
        image = in_memory.decode(source, options)
        resized = _resize_in_memory(image, options)
        return _Loaded(
            resized, image.width, _page_height(image), _pages(image), resized is not image
        )

    all_frames = fmt in _ANIMATED_LOADERS
    paged = fmt in _PAGED_LOADERS
    on_page: dict[str, Any] = {"page": page} if paged else {}
    if unlimited:
        on_page["unlimited"] = True
    header = _open(source, fail_on, n=-1) if all_frames else _open(source, fail_on, **on_page)
    frames = _pages(header) if all_frames else 1
    pages = int(header.get("n-pages")) if paged and header.get_typeof("n-pages") else 1
    width, page_height = header.width, _page_height(header)
    check_pixels(width, page_height, frames, options)
    orientation = _orientation(header)
    out_w, out_h = _oriented(width, page_height, orientation)
    target = options.shrink_box(out_w, out_h)

    if target is None:
        # Flips and rotations read the rows out of order, which a sequential
        # (streaming) decode cannot do. The libwebp binding rotates the stored
        # rows into its picture instead (webp_writer); other images to rotate
        # are fully decoded first.
        rotate_in_planes = frames == 1 and rotates_in_encoder(
            width, page_height, orientation, options
        )
        access = "sequential" if orientation == 1 or rotate_in_planes else "random"
        image = (
            _open(source, fail_on, n=-1, access=access)
            if all_frames
            else _open(source, fail_on, access=access, **on_page)
        )
        if rotate_in_planes:
            return _Loaded(
                image, width, page_height, frames, False, pages=pages, orientation=orientation
            )
        if orientation != 1 and frames == 1:
            image = image.autorot()
        return _Loaded(image, width, page_height, frames, False, pages=pages)

    # Shrink on load: libvips' thumbnail asks the JPEG/WebP/HEIF decoder for a
    # reduced image directly, then finishes with a high-quality resize. It also
    # applies the EXIF orientation and keeps the embedded profile untouched.
    t_w, t_h = target
    kwargs: dict[str, Any] = {"height": t_h, "size": "down", "fail_on": fail_on}
    load_options = "n=-1" if all_frames else (f"page={page}" if paged else "")
    if unlimited:
        load_options = "unlimited=true"
    if isinstance(source, bytes):
        image = pyvips.Image.thumbnail_buffer(source, t_w, option_string=load_options, **kwargs)
    else:
        # thumbnail_source hands its loader the option string alone: a fail_on
        # argument would be dropped, and a truncated file "converted".
        loader_options = f"fail_on={fail_on}" + (f",{load_options}" if load_options else "")
        image = pyvips.Image.thumbnail_source(
            open_vips_source(source), t_w, option_string=loader_options, height=t_h, size="down"
        )
    return _Loaded(image, width, page_height, frames, True, pages=pages)


def encoder_for(options: EncodeOptions) -> LibWebP | None:
    """libwebp's binding, unless --encoder libvips or it cannot be loaded here."""
    return None if options.encoder == "libvips" else load_libwebp()


def rotates_in_encoder(width: int, height: int, orientation: int, options: EncodeOptions) -> bool:
    """Will a photo to rotate by ``orientation`` stream, rotated in libwebp's picture,
    rather than be decoded whole? (The memory estimate asks the same.)"""
    return (
        orientation != 1
        and encoder_for(options) is not None
        and orients_in_planes(width, height, orientation, options)
    )


def _png_cut_short(source: Source) -> bool:
    try:
        if isinstance(source, bytes):
            tail = source[-12:]
        else:
            with open(source, "rb") as fh:
                fh.seek(max(0, os.fstat(fh.fileno()).st_size - 12))
                tail = fh.read()
    except OSError:
        return False
    return tail[4:8] != b"IEND"


def _open(source: Source, fail_on: str, **kwargs: Any) -> Any:
    kwargs["fail_on"] = fail_on
    if isinstance(source, bytes):
        return pyvips.Image.new_from_buffer(source, "", **kwargs)
    return pyvips.Image.new_from_source(open_vips_source(source), "", **kwargs)


def open_vips_source(path: str) -> Any:
    """A libvips source that streams the file at ``path``, whatever its name holds.

    The name never reaches libvips: pyvips encodes it as UTF-8, which a name
    that is not (``caf\\xe9.jpg``, a surrogate here) cannot be, and libvips
    reads a trailing ``[...]`` as load options (``scan[1]`` was "does not
    exist"). Python opens the file, libvips reads a duplicate of the descriptor
    with the same loaders, streaming and shrink-on-load as from a file name.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return pyvips.Source.new_from_descriptor(fd)
    finally:
        os.close(fd)  # libvips holds its own duplicate for as long as the image lives


def _resize_in_memory(image: Any, options: EncodeOptions) -> Any:
    page_height = _page_height(image)
    target = options.shrink_box(image.width, page_height)
    if target is None:
        return image
    pages = _pages(image)
    if pages == 1:
        return image.thumbnail_image(target[0], height=target[1], size="down")
    # An animation is a strip of frames: scale it as one image, with the
    # vertical scale chosen so every frame lands on a whole number of rows.
    scale = min(target[0] / image.width, target[1] / page_height)
    new_page_height = max(1, round(page_height * scale))
    strip = image.resize(scale, vscale=new_page_height / page_height)
    strip = strip.copy()
    strip.set_type(pyvips.GValue.gint_type, "page-height", new_page_height)
    return strip


def check_pixels(width: int, height: int, frames: int, options: EncodeOptions) -> None:
    """Refuse a decompression bomb from its header: over ``--max-pixels`` in all frames."""
    pixels = width * height * frames
    if pixels > options.max_pixels:
        what = f"{width}x{height}" + (f"x{frames} frames" if frames > 1 else "")
        raise TooLarge(f"{what} = {pixels:,} px exceeds --max-pixels {options.max_pixels:,}")


def _prepare_colour(image: Any, options: EncodeOptions) -> tuple[Any, bool]:
    """Bring the pixels to 8-bit sRGB-family data WebP can carry. Returns (image, to_srgb)."""
    interpretation = image.interpretation
    has_icc = image.get_typeof("icc-profile-data") != 0
    to_srgb = False

    if interpretation == "cmyk":
        # Untagged CMYK has no single right answer: browsers invert the inks
        # naively, Photoshop applies its working CMYK profile. We take the
        # profile route (libvips' built-in CMYK profile), which is right for
        # files made from print workflows; see the corpus tests for both cases.
        image = image.icc_transform("srgb", embedded=True, input_profile="cmyk", intent="relative")
        image = _without_icc(image)
        return image, True
    if interpretation in ("lab", "labs", "labq", "xyz", "yxy", "lch", "cmc", "hsv", "scrgb"):
        return _without_icc(image.colourspace("srgb")), True

    is_grey = image.bands - (1 if image.hasalpha() else 0) == 1
    if has_icc and is_grey:
        # A grey ICC profile cannot describe the RGB data a WebP holds, so grey
        # images are brought to sRGB-encoded grey: still one neutral channel.
        image = image.icc_transform("srgb", embedded=True, intent="relative").colourspace("b-w")
        return _without_icc(image), True

    wants_srgb = options.srgb or options.metadata == "none"
    if has_icc and wants_srgb and not _is_srgb_profile(image.get("icc-profile-data")):
        image = image.icc_transform("srgb", embedded=True, intent="relative")
        to_srgb = True
    if wants_srgb and has_icc:
        image = _without_icc(image)

    if image.format != "uchar":
        # 16-bit and float data: the colourspace converters scale to 8 bits
        # (65535 -> 255) rather than clipping as a plain cast would.
        image = image.colourspace("b-w" if is_grey else "srgb")
    return image, to_srgb


def _without_icc(image: Any) -> Any:
    if image.get_typeof("icc-profile-data") == 0:
        return image
    image = image.copy()
    image.remove("icc-profile-data")
    return image


def _is_srgb_profile(profile: bytes) -> bool:
    """True for the common sRGB profiles, judged by the profile's description tag."""
    return b"srgb" in _icc_description(profile).lower().replace(b" ", b"")


def _icc_description(profile: bytes) -> bytes:
    try:
        count = struct.unpack_from(">I", profile, 128)[0]
        for i in range(min(count, 100)):
            sig, offset, size = struct.unpack_from(">4sII", profile, 132 + 12 * i)
            if sig == b"desc":
                body = profile[offset : offset + size]
                if body[:4] == b"desc":  # v2 textDescriptionType: ASCII
                    length = struct.unpack_from(">I", body, 8)[0]
                    return body[12 : 12 + length].rstrip(b"\0")
                if body[:4] == b"mluc":  # v4: first record, UTF-16BE
                    rec_len, rec_off = struct.unpack_from(">II", body, 20)
                    return body[rec_off : rec_off + rec_len].decode("utf-16-be", "replace").encode()
    except struct.error:
        pass
    return b""


def check_webp_limit(width: int, height: int, options: EncodeOptions) -> None:
    """Refuse an output over WebP's size limit, unless ``--oversize fit`` shrinks it."""
    if options.oversize == "fail" and max(width, height) > WEBP_MAX_DIMENSION:
        raise TooLarge(
            f"{width}x{height} is over WebP's {WEBP_MAX_DIMENSION} px limit; "
            "use --oversize fit to downscale it, or --max-width/--max-height"
        )


def _fit_to_webp(image: Any, options: EncodeOptions) -> Any:
    page_height = _page_height(image)
    if image.width <= WEBP_MAX_DIMENSION and page_height <= WEBP_MAX_DIMENSION:
        return image
    check_webp_limit(image.width, page_height, options)
    # Only images that reached here without shrink-on-load (BMP, APNG) need this.
    return image.thumbnail_image(WEBP_MAX_DIMENSION, height=WEBP_MAX_DIMENSION, size="down")


_WEBP_MAX_LOOP = 65535


def _save(
    image: Any, options: EncodeOptions, clock: _PhaseClock | None = None, orientation: int = 1
) -> bytes:
    image = _with_webp_loop(image)
    if options.target_size is not None:
        return _save_to_size(image, options, clock, orientation)
    lib = encoder_for(options)
    if lib is not None:
        phases = Phases()
        data = libwebp_encode(
            lib,
            image,
            options,
            orientation=orientation,
            page_height=_page_height(image),
            phases=phases,
        )
        if clock is not None:
            clock.phases = phases
        return data
    assert orientation == 1, "only the libwebp binding rotates in the encoder"
    return _webpsave(image, options, clock)


def _save_to_size(
    image: Any, options: EncodeOptions, clock: _PhaseClock | None, orientation: int
) -> bytes:
    """--target-size: the best quality that fits (size_target.py), each probe
    encoding the same pixels, decoded once (budget.TARGET_SIZE_BYTES_PER_PIXEL)."""
    assert options.target_size is not None
    phases = Phases()
    started = time.perf_counter()
    image = image.copy_memory()  # a no-op for an image rendered already (shrunk)
    phases.decode += time.perf_counter() - started
    lib, page_height = encoder_for(options), _page_height(image)
    fixed = dataclasses.replace(options, target_size=None)

    def at_quality(quality: int) -> bytes:
        probe = dataclasses.replace(fixed, quality=quality)
        if lib is None:
            assert orientation == 1, "only the libwebp binding rotates in the encoder"
            started = time.perf_counter()
            data = _webpsave(image, probe, None)
            phases.encode += time.perf_counter() - started
            return data
        return libwebp_encode(
            lib, image, probe, orientation=orientation, page_height=page_height, phases=phases
        )

    def rate_controlled() -> bytes:
        assert lib is not None and options.target_size is not None
        # libwebp aims at the VP8 bitstream: the container and metadata come on top.
        overhead = 12 + 8 + sum(8 + len(p) + len(p) % 2 for _, p in chunks) + 18 * bool(chunks)
        config = make_config(
            lib,
            fixed,
            target_size=max(1, options.target_size - overhead),
            pass_=RATE_CONTROL_PASSES,
        )
        return libwebp_encode(
            lib, image, fixed, orientation=orientation, phases=phases, config=config
        )

    # libwebp's animation encoder has no rate control for a whole animation (its
    # target_size would apply to each frame): animations are searched by quality.
    still = page_height == image.height
    chunks = metadata_chunks(saveable(image), options, orientation) if lib and still else []
    data, search = fit_to_size(
        options.target_size,
        at_quality,
        rate_controlled if lib is not None and still else None,
        options.quality,
    )
    if clock is not None:
        clock.phases = phases
        clock.size_search = search
    return data


def _search(
    image: Any, options: EncodeOptions, clock: _PhaseClock | None, orientation: int, bytes_in: int
) -> SearchOutcome:
    """--target-score: the smallest candidate that meets it (optimizr.quality_search)."""
    from optimizr.quality_search import search_image

    lib = encoder_for(options)
    assert lib is not None
    phases = Phases()
    outcome = search_image(
        lib,
        _with_webp_loop(image),
        options,
        orientation=orientation,
        page_height=_page_height(image),
        bytes_in=bytes_in,
        phases=phases,
    )
    if clock is not None:
        clock.phases = phases
    return outcome


def _search_facts(outcome: SearchOutcome | None) -> dict[str, Any]:
    if outcome is None:
        return {}
    chosen = outcome.chosen
    score = None if chosen.score != chosen.score else round(chosen.score, 3)  # NaN: not scored
    return {
        "chosen": chosen.label,
        "chosen_quality": chosen.quality if chosen.mode == "lossy" else None,
        "score": score,
        "probes": outcome.probes,
    }


def _source_size(source: Source) -> int:
    if isinstance(source, bytes):
        return len(source)
    try:
        return os.path.getsize(source)
    except OSError:
        return 0


def _with_webp_loop(image: Any) -> Any:
    if _pages(image) > 1 and image.get_typeof("loop") and int(image.get("loop")) > _WEBP_MAX_LOOP:
        # WebP stores 16 bits of loop count; libvips writes anything larger
        # as 0, which means "forever". A finite animation must stay finite.
        image = image.copy()
        image.set_type(pyvips.GValue.gint_type, "loop", _WEBP_MAX_LOOP)
    return image


def _webpsave(image: Any, options: EncodeOptions, clock: _PhaseClock | None) -> bytes:
    """libvips' own WebP save: the fallback where libwebp's binding cannot load."""
    keep = {
        "none": pyvips.enums.ForeignKeep.NONE,
        "icc": pyvips.enums.ForeignKeep.ICC,
        "all": pyvips.enums.ForeignKeep.ALL,
    }[options.metadata]
    kwargs: dict[str, Any] = {
        "Q": options.quality,
        "effort": options.effort,
        "alpha_q": options.alpha_quality,
        "smart_subsample": options.smart_subsample,
        "preset": options.preset,
        "keep": keep,
    }
    if options.near_lossless is not None:
        # libvips reads the near-lossless level from Q (libwebp: 100 = off, 0 = most).
        kwargs.update(lossless=True, near_lossless=True, Q=options.near_lossless)
    elif options.lossless:
        kwargs["lossless"] = True
    if _pages(image) > 1:
        kwargs["page_height"] = _page_height(image)
    if clock is not None:
        clock.watch(image)
    data: bytes = image.webpsave_buffer(**kwargs)
    if not data:
        raise EncodeFailed("libwebp produced no data")
    return data


def webp_has_alpha(webp: bytes) -> bool:
    """Whether the WebP bitstream carries alpha (libwebp drops an all-opaque plane)."""
    chunk = webp[12:16]
    if chunk == b"VP8X":
        return bool(webp[20] & 0x10)
    if chunk == b"VP8L" and len(webp) >= 25:
        # Lossless header: signature 0x2f, 14+14 bits of size, then alpha_is_used.
        bits = int.from_bytes(webp[21:25], "little")
        return bool((bits >> 28) & 1)
    return False


def _pages(image: Any) -> int:
    return int(image.height) // _page_height(image)


def _page_height(image: Any) -> int:
    if image.get_typeof("page-height"):
        page_height = int(image.get("page-height"))
        if 0 < page_height <= image.height and image.height % page_height == 0:
            return page_height
    return int(image.height)


def _orientation(image: Any) -> int:
    if image.get_typeof("orientation"):
        value = int(image.get("orientation"))
        if 1 <= value <= 8:
            return value
    return 1


def _oriented(width: int, height: int, orientation: int) -> tuple[int, int]:
    # Orientations 5-8 transpose the image (EXIF 2.32, tag 0x0112).
    return (height, width) if orientation >= 5 else (width, height)


_TRUNCATED_HINTS = ("premature end", "unexpected end", "truncat", "end of file", "read error")
_UNSUPPORTED_HINTS = (
    "support for this compression",
    "unsupported",
    "not supported",
    "not configured",
)


def _classify_vips_error(exc: pyvips.Error, fmt: str) -> ImageError:
    """Turn libvips' multi-line error log into one typed, one-line reason."""
    lines = [line.strip() for line in str(exc.detail or "").splitlines() if line.strip()]
    # "unable to call X" only says which operation failed, not why.
    reasons = [line for line in lines if not line.lower().startswith("unable to call")]
    reasons = list(dict.fromkeys(reasons))  # libvips often repeats a line per thread
    detail = "; ".join(reasons)[:240]
    lower = detail.lower()
    if any(hint in lower for hint in _UNSUPPORTED_HINTS):
        return UnsupportedImage(f"{fmt}: {detail}")
    if "libpng read error" in lower and fmt == "png":
        return CorruptImage("png: damaged or incomplete image data (libpng read error)")
    if "corrupt jpeg data" in lower:
        if damaged_jpeg.corrupt_data_warnings("\n".join(reasons)) is not None:
            # libvips gives up after 100 libjpeg warnings ("read gave 100 warnings").
            return CorruptImage(f"jpeg: too much damage in the compressed data ({detail})")
        # Damage, then a worse reason (the file ends early): that reason decides,
        # not the words of a warning ("premature end of data segment").
        lower = "; ".join(r for r in reasons if "corrupt jpeg data" not in r.lower()).lower()
    if any(hint in lower for hint in _TRUNCATED_HINTS):
        return TruncatedImage(f"{fmt}: {detail}")
    # Decoding is lazy, so a decoder failure often surfaces as "unable to call
    # webpsave_buffer"; only libwebp's own messages mean the encoder refused.
    if "webpsave:" in lower or "webpencode" in lower or "vips2webp" in lower:
        return EncodeFailed(detail)
    if not detail:
        return CorruptImage(f"{fmt}: the decoder rejected the file as invalid")
    return CorruptImage(f"{fmt}: {detail}")


__all__ = [
    "HEAD_SIZE",
    "Encoded",
    "ImageFacts",
    "Source",
    "check_pixels",
    "check_webp_limit",
    "encode_webp",
    "open_vips_source",
    "webp_has_alpha",
]
