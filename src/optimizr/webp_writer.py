"""Encode a libvips image with the libwebp of :mod:`optimizr.libwebp`, fed in strips.

This does what libvips' webpsave does (libvips 8.18 ``foreign/webpsave.c``),
step for step, so the files are byte-identical to it (``tests/test_webp_writer.py``):
the same ``WebPConfig`` from the same options, the same picture import, the
same animation encoder settings and frame timestamps, and the same mux of
ICC, EXIF and XMP. It differs in how pixels reach libwebp:

* webpsave copies the whole decoded frame into one RGB(A) buffer and then
  imports it (3-4 bytes per pixel on top of libwebp's own picture). Here
  libvips renders the pipeline in horizontal strips of an even number of rows,
  each imported on its own and copied into the picture's planes: libwebp's
  RGB to YUV 4:2:0 import works two rows at a time, so the planes are the
  same bytes as a whole-image import, and the RGB image never exists whole.
* A photo to be rotated by its EXIF orientation is not decoded whole first
  (libvips cannot read it sequentially in rotated order): its strips, read in
  stored order, are rotated into place in the picture's planes. Each plane
  pixel depends only on its own source pixel (ARGB, Y, alpha) or on one 2x2
  block (U, V), so this is exact wherever the 2x2 blocks of the stored image
  land on the blocks of the rotated one: always for ARGB, and for YUV when
  the flipped dimensions are even (:func:`orients_in_planes`). Other images
  are rotated by libvips first.
"""

from __future__ import annotations

import contextlib
import ctypes
import struct
import time
from collections.abc import Callable, Iterator
from ctypes import byref, c_uint8, c_uint32
from dataclasses import dataclass, field
from typing import Any

import pyvips

from optimizr.config import EncodeOptions
from optimizr.errors import EncodeFailed
from optimizr.libwebp import (
    ANIMATION_FLAG,
    ENCODER_ABI_VERSION,
    ENCODING_ERRORS,
    MUX_ABI_VERSION,
    MUX_OK,
    PRESETS,
    YUV420,
    YUV420A,
    LibWebP,
    WebPAnimEncoderOptions,
    WebPConfig,
    WebPData,
    WebPMemoryWriter,
    WebPMuxAnimParams,
    WebPPicture,
)

#: Bytes of RGB(A) rendered per strip: small enough that libvips' decode of a strip
#: and libwebp's import of it happen in the CPU's cache, big enough that the
#: per-strip overhead is nothing. Measured on a 9 MP JPEG (effort 0, min of 5):
#: decode 33 ms with 128 KiB strips, 89 ms with 1 MiB ones (webpsave's sink: 47 ms).
STRIP_BYTES = 128 << 10

_INT_MAX = 2**31 - 1


@dataclass
class Phases:
    """Seconds spent in each step of one encode (for ImageFacts)."""

    decode: float = 0.0  # libvips rendering the strips (decode, colour, resize)
    import_: float = 0.0  # RGB(A) to the picture's planes, rotation included
    encode: float = 0.0  # WebPEncode / WebPAnimEncoderAdd + Assemble
    mux: float = 0.0  # metadata and container
    strips: int = 0
    extra: dict[str, float] = field(default_factory=dict)


def uses_argb(options: EncodeOptions) -> bool:
    """Whether libwebp gets ARGB (lossless, near-lossless, sharp YUV) rather than YUV.

    As webpsave does: smart subsampling happens in libwebp's own ARGB to YUV step."""
    return options.lossless or options.near_lossless is not None or options.smart_subsample


def orients_in_planes(width: int, height: int, orientation: int, options: EncodeOptions) -> bool:
    """Can an image stored ``width`` x ``height`` be rotated by ``orientation`` in the
    picture's planes, exactly as if libvips had rotated its pixels first? Always:
    where a flipped side is odd, the strips and columns are cut so that the 2x2
    chroma blocks of the stored image are the rotated image's (see _StripImporter)."""
    del width, height, orientation, options
    return True


#: Orientations that reverse the stored rows, and those that reverse its columns.
_FLIPS_ROWS = frozenset({3, 4, 6, 7})
_FLIPS_COLUMNS = frozenset({2, 3, 7, 8})


def oriented_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    return (height, width) if orientation >= 5 else (width, height)


def saveable(image: Any) -> Any:
    """The image webpsave would encode: 8-bit RGB or RGBA (as libvips' save does:
    grey becomes RGB, extra bands go, other formats are cast)."""
    if image.bands in (1, 2):
        image = image.colourspace("srgb")
    if image.bands > 4:
        image = image.extract_band(0, n=4 if image.hasalpha() else 3)
    if image.format != "uchar":
        image = image.cast("uchar")
    return image


def make_config(lib: LibWebP, options: EncodeOptions, **overrides: int | float) -> WebPConfig:
    """The WebPConfig webpsave builds from the same options.

    ``overrides`` set any other field of libwebp's config by its name
    (``target_size=200_000, pass_=6``), before it is validated: the knobs
    webpsave does not offer, for callers that search over them."""
    config = WebPConfig()
    near_lossless = options.near_lossless is not None
    lossless = options.lossless and not near_lossless
    # webpsave reads the near-lossless level from Q (libwebp: 100 = off, 0 = most).
    quality = options.near_lossless if near_lossless else options.quality
    assert quality is not None
    if not lib.WebPConfigInitInternal(byref(config), 0, 75.0, ENCODER_ABI_VERSION):
        raise EncodeFailed("libwebp: config version error")
    if not (lossless or near_lossless) and not lib.WebPConfigInitInternal(
        byref(config), PRESETS[options.preset], float(quality), ENCODER_ABI_VERSION
    ):
        raise EncodeFailed("libwebp: config version error")
    config.lossless = int(lossless or near_lossless)
    config.exact = 0
    config.alpha_quality = options.alpha_quality
    config.method = options.effort
    config.target_size = 0
    config.pass_ = 1
    if lossless or near_lossless:
        # webpsave passes near-lossless as lossless with Q the level, and Q is also
        # lossless' effort: --near-lossless 60 encodes at lossless quality 60.
        config.quality = float(quality)
    if near_lossless:
        config.near_lossless = int(quality)
    if options.smart_subsample:
        config.use_sharp_yuv = 1
    fields = {spec[0] for spec in WebPConfig._fields_}
    for name, value in overrides.items():
        if name not in fields:
            raise ValueError(f"WebPConfig has no field {name!r}")
        setattr(config, name, value)
    if not lib.WebPValidateConfig(byref(config)):
        raise EncodeFailed("libwebp: invalid configuration")
    return config


class _Picture:
    """A WebPPicture that is freed whatever happens."""

    def __init__(self, lib: LibWebP, width: int, height: int, use_argb: bool) -> None:
        self.lib = lib
        self.pic = WebPPicture()
        if not lib.WebPPictureInitInternal(byref(self.pic), ENCODER_ABI_VERSION):
            raise EncodeFailed("libwebp: picture version error")
        self.pic.use_argb = int(use_argb)
        self.pic.width, self.pic.height = width, height

    def __enter__(self) -> WebPPicture:
        return self.pic

    def __exit__(self, *exc: object) -> None:
        self.lib.WebPPictureFree(byref(self.pic))


def _plane(pointer: Any, rows: int, stride: int, width: int) -> Any:
    """A numpy view (rows x width) of a plane libwebp allocated."""
    import numpy as np

    return np.ctypeslib.as_array(pointer, shape=(rows, stride))[:, :width]


def _place(
    dst: Any,
    src: Any,
    top: int,
    left: int,
    shape: tuple[int, int],
    orientation: int,
) -> None:
    """Copy ``src``, the block at (``top``, ``left``) of a plane ``shape`` (rows,
    columns) big as stored, into ``dst``, the whole plane oriented (EXIF 2.32, tag
    0x0112: 2 mirrors, 3 turns 180, 4 flips, 5 transposes, 6 turns 90 clockwise, 7
    transverses, 8 turns 90 anticlockwise)."""
    rows, cols = src.shape[0], src.shape[1]
    total_rows, total_cols = shape
    r0, r1 = top, top + rows  # where the stored rows go, unreversed
    c0, c1 = left, left + cols
    if orientation in _FLIPS_ROWS:
        r0, r1 = total_rows - r1, total_rows - r0
        src = src[::-1]
    if orientation in _FLIPS_COLUMNS:
        c0, c1 = total_cols - c1, total_cols - c0
        src = src[:, ::-1]
    if orientation >= 5:  # stored rows become columns
        dst[c0:c1, r0:r1] = src.T
    else:
        dst[r0:r1, c0:c1] = src


class _StripImporter:
    """Fills one picture, allocated whole, from strips of the stored image."""

    def __init__(
        self, lib: LibWebP, pic: WebPPicture, width: int, height: int, bands: int, orientation: int
    ) -> None:
        self.lib, self.pic = lib, pic
        self.width, self.height, self.bands = width, height, bands
        self.orientation = orientation
        self.import_rows = lib.WebPPictureImportRGBA if bands == 4 else lib.WebPPictureImportRGB
        self.any_alpha = False
        self.planes: dict[str, Any] = {}
        if orientation != 1:
            self._map_planes()

    def _map_planes(self) -> None:
        # numpy (in _plane) only for rotated photos: an idle worker is 14 MB smaller
        # without it.
        pic = self.pic
        out_w, out_h = pic.width, pic.height
        if pic.use_argb:
            argb = ctypes.cast(pic.argb, ctypes.POINTER(c_uint32))
            self.planes["argb"] = _plane(argb, out_h, pic.argb_stride, out_w)
            return
        uv_w, uv_h = (out_w + 1) // 2, (out_h + 1) // 2
        self.planes["y"] = _plane(pic.y, out_h, pic.y_stride, out_w)
        self.planes["u"] = _plane(pic.u, uv_h, pic.uv_stride, uv_w)
        self.planes["v"] = _plane(pic.v, uv_h, pic.uv_stride, uv_w)
        if self.bands == 4:
            self.planes["a"] = _plane(pic.a, out_h, pic.a_stride, out_w)

    def add(self, data: Any, top: int, rows: int) -> None:
        address, stride = _address(data), self.width * self.bands
        if self.orientation == 1:
            with self._imported(address, stride, self.width, rows) as strip:
                self._copy_rows(strip, top, rows, self._alpha_in(strip))
            return
        # A stored width that is odd and reversed: the first column is a block of
        # its own (it becomes the rotated image's last row or column, alone),
        # the others pair from the second on, as the rotated image's pairs do.
        pieces = [(0, self.width)]
        if self.width % 2 and self.orientation in _FLIPS_COLUMNS and self.width > 1:
            pieces = [(0, 1), (1, self.width - 1)]
        for left, width in pieces:
            with self._imported(address + left * self.bands, stride, width, rows) as strip:
                self._rotate_block(strip, top, left, rows, width, self._alpha_in(strip))

    @contextlib.contextmanager
    def _imported(self, address: int, stride: int, width: int, rows: int) -> Iterator[WebPPicture]:
        with _Picture(self.lib, width, rows, bool(self.pic.use_argb)) as strip:
            if not self.import_rows(byref(strip), address, stride):
                raise EncodeFailed("libwebp: picture memory error")
            yield strip

    def _alpha_in(self, strip: WebPPicture) -> bool:
        has_alpha = not strip.use_argb and bool(strip.colorspace & YUV420A)
        self.any_alpha = self.any_alpha or has_alpha
        return has_alpha

    def _copy_rows(self, strip: WebPPicture, top: int, rows: int, has_alpha: bool) -> None:
        """Upright: each plane of the strip is one block of the picture's plane (both
        pictures are as wide, so libwebp gave them the same strides)."""
        pic = self.pic

        def move(dst: Any, src: Any, stride: int, first: int, count: int, size: int = 1) -> None:
            offset = first * stride * size
            ctypes.memmove(ctypes.addressof(dst.contents) + offset, src, count * stride * size)

        if pic.use_argb:
            move(pic.argb, strip.argb, pic.argb_stride, top, rows, 4)
            return
        move(pic.y, strip.y, pic.y_stride, top, rows)
        uv_rows = (rows + 1) // 2
        move(pic.u, strip.u, pic.uv_stride, top // 2, uv_rows)
        move(pic.v, strip.v, pic.uv_stride, top // 2, uv_rows)
        if self.bands != 4:
            return
        if has_alpha:
            move(pic.a, strip.a, pic.a_stride, top, rows)
        else:  # this strip is opaque: libwebp gave it no alpha plane
            ctypes.memset(
                ctypes.addressof(pic.a.contents) + top * pic.a_stride, 255, rows * pic.a_stride
            )

    def _rotate_block(
        self, strip: WebPPicture, top: int, left: int, rows: int, width: int, has_alpha: bool
    ) -> None:
        import numpy as np

        o, planes = self.orientation, self.planes
        shape = (self.height, self.width)
        if strip.use_argb:
            src = _plane(strip.argb, rows, strip.argb_stride, width)
            _place(planes["argb"], src, top, left, shape, o)
            return
        _place(planes["y"], _plane(strip.y, rows, strip.y_stride, width), top, left, shape, o)
        # A block's chroma starts at (top + 1) // 2: at top / 2 for blocks of even
        # offset, and after the lone first row or column when that is cut off.
        uv_shape = ((self.height + 1) // 2, (self.width + 1) // 2)
        uv_top, uv_left = (top + 1) // 2, (left + 1) // 2
        uv_rows, uv_width = (rows + 1) // 2, (width + 1) // 2
        for name, pointer in (("u", strip.u), ("v", strip.v)):
            src = _plane(pointer, uv_rows, strip.uv_stride, uv_width)
            _place(planes[name], src, uv_top, uv_left, uv_shape, o)
        if self.bands != 4:
            return
        if has_alpha:
            alpha = _plane(strip.a, rows, strip.a_stride, width)
        else:
            alpha = np.full((rows, width), 255, dtype=np.uint8)
        _place(planes["a"], alpha, top, left, shape, o)

    def finish(self) -> None:
        if not self.pic.use_argb and self.bands == 4 and not self.any_alpha:
            # All opaque: as a whole-image import would, give libwebp no alpha plane.
            self.pic.colorspace = YUV420
            self.pic.a = None
            self.pic.a_stride = 0


def _address(data: Any) -> int:
    """The address of a writable buffer (libvips' region fetch gives one), no copy."""
    return ctypes.addressof((ctypes.c_char * len(data)).from_buffer(data))


def _strips(height: int, step: int, orientation: int) -> Iterator[tuple[int, int]]:
    """(top, rows) of each strip. An odd height that is reversed starts with its
    first row alone (it becomes the rotated image's lone last row or column), so
    that the other rows pair as the rotated image's rows do."""
    top = 0
    if height % 2 and orientation in _FLIPS_ROWS and height > 1:
        yield 0, 1
        top = 1
    while top < height:
        rows = min(step, height - top)
        yield top, rows
        top += rows


def _strip_rows(width: int, bands: int) -> int:
    rows = max(2, STRIP_BYTES // max(1, width * bands))
    return rows - rows % 2  # even: 4:2:0 chroma rows never straddle two strips


def _encode_error(pic: WebPPicture) -> EncodeFailed:
    code = pic.error_code
    reason = ENCODING_ERRORS[code] if 0 <= code < len(ENCODING_ERRORS) else f"error {code}"
    return EncodeFailed(f"libwebp: {reason}")


def _encode_still(
    lib: LibWebP,
    image: Any,
    config: WebPConfig,
    options: EncodeOptions,
    orientation: int,
    phases: Phases,
) -> bytes:
    width, height, bands = image.width, image.height, image.bands
    out_w, out_h = oriented_size(width, height, orientation)
    with _Picture(lib, out_w, out_h, uses_argb(options)) as pic:
        started = time.perf_counter()
        if not pic.use_argb:
            pic.colorspace = YUV420A if bands == 4 else YUV420
        if not lib.WebPPictureAlloc(byref(pic)):
            raise EncodeFailed(f"libwebp: cannot allocate a {out_w}x{out_h} picture")
        importer = _StripImporter(lib, pic, width, height, bands, orientation)
        region = pyvips.Region.new(image)
        step = _strip_rows(width, bands)
        phases.import_ += time.perf_counter() - started
        for top, rows in _strips(height, step, orientation):
            started = time.perf_counter()
            data = region.fetch(0, top, width, rows)
            fetched = time.perf_counter()
            importer.add(data, top, rows)
            del data
            phases.decode += fetched - started
            phases.import_ += time.perf_counter() - fetched
            phases.strips += 1
        importer.finish()
        return _encode_picture(lib, config, pic, phases)


def _encode_picture(lib: LibWebP, config: WebPConfig, pic: WebPPicture, phases: Phases) -> bytes:
    writer = WebPMemoryWriter()
    lib.WebPMemoryWriterInit(byref(writer))
    try:
        pic.writer = lib.memory_write
        pic.custom_ptr = ctypes.addressof(writer)
        started = time.perf_counter()
        ok = lib.WebPEncode(byref(config), byref(pic))
        phases.encode += time.perf_counter() - started
        if not ok:
            raise _encode_error(pic)
        return ctypes.string_at(writer.mem, writer.size)
    finally:
        lib.WebPMemoryWriterClear(byref(writer))


def _frame_delay(image: Any, page: int) -> int:
    """Milliseconds of frame ``page``, exactly as webpsave reads them."""
    delays: list[int] = []
    if image.get_typeof("delay"):
        delays = list(image.get("delay"))
    if page < len(delays):
        delay = int(delays[page])
    else:
        gif_delay = int(image.get("gif-delay")) if image.get_typeof("gif-delay") else 10
        delay = gif_delay * 10  # centiseconds
    # Frames of no or tiny duration play at 100 ms in browsers, and webpsave says so.
    return 100 if delay <= 10 else delay


def _encode_animation(
    lib: LibWebP,
    image: Any,
    config: WebPConfig,
    options: EncodeOptions,
    page_height: int,
    phases: Phases,
) -> bytes:
    width, bands = image.width, image.bands
    anim_options = WebPAnimEncoderOptions()
    if not lib.WebPAnimEncoderOptionsInitInternal(byref(anim_options), MUX_ABI_VERSION):
        raise EncodeFailed("libwebp: animation config version error")
    anim_options.minimize_size = 0
    anim_options.allow_mixed = 0
    # webpsave's defaults: no keyframes forced.
    anim_options.kmin = _INT_MAX - 1
    anim_options.kmax = _INT_MAX
    encoder = lib.WebPAnimEncoderNewInternal(
        width, page_height, byref(anim_options), MUX_ABI_VERSION
    )
    if not encoder:
        raise EncodeFailed("libwebp: unable to start the animation encoder")
    try:
        region = pyvips.Region.new(image)
        importer = lib.WebPPictureImportRGBA if bands == 4 else lib.WebPPictureImportRGB
        timestamp = 0
        for page in range(image.height // page_height):
            started = time.perf_counter()
            data = region.fetch(0, page * page_height, width, page_height)
            fetched = time.perf_counter()
            with _Picture(lib, width, page_height, uses_argb(options)) as pic:
                if not importer(byref(pic), _address(data), width * bands):
                    raise EncodeFailed("libwebp: picture memory error")
                del data
                imported = time.perf_counter()
                ok = lib.WebPAnimEncoderAdd(encoder, byref(pic), timestamp, byref(config))
                encoded = time.perf_counter()
            if not ok:
                raise _anim_error(lib, encoder)
            phases.decode += fetched - started
            phases.import_ += imported - fetched
            phases.encode += encoded - imported
            timestamp += _frame_delay(image, page)
        started = time.perf_counter()
        if not lib.WebPAnimEncoderAdd(encoder, None, timestamp, None):
            raise _anim_error(lib, encoder)
        data_out = WebPData()
        if not lib.WebPAnimEncoderAssemble(encoder, byref(data_out)):
            raise _anim_error(lib, encoder)
        try:
            result = ctypes.string_at(data_out.bytes, data_out.size)
        finally:
            lib.WebPFree(ctypes.cast(data_out.bytes, ctypes.c_void_p))
        phases.encode += time.perf_counter() - started
        return result
    finally:
        lib.WebPAnimEncoderDelete(encoder)


def _anim_error(lib: LibWebP, encoder: Any) -> EncodeFailed:
    message = lib.WebPAnimEncoderGetError(encoder) or b"animation encoder error"
    return EncodeFailed(f"libwebp: {message.decode('utf-8', 'replace')}")


def _mux(lib: LibWebP, webp: bytes, image: Any, chunks: list[tuple[bytes, bytes]]) -> bytes:
    """Parse the bitstream into a mux, set the loop count and metadata, assemble:
    what webpsave does to every file it writes, metadata or not."""
    buffer = (c_uint8 * len(webp)).from_buffer_copy(webp)
    data = WebPData(ctypes.cast(buffer, ctypes.POINTER(c_uint8)), len(webp))
    mux = lib.WebPMuxCreateInternal(byref(data), 1, MUX_ABI_VERSION)
    if not mux:
        raise EncodeFailed("libwebp: mux error")
    try:
        loop = _loop_count(image)
        if loop is not None:
            features = c_uint32()
            params = WebPMuxAnimParams()
            if (
                lib.WebPMuxGetFeatures(mux, byref(features)) == MUX_OK
                and features.value & ANIMATION_FLAG
                and lib.WebPMuxGetAnimationParams(mux, byref(params)) == MUX_OK
            ):
                params.loop_count = loop
                lib.WebPMuxSetAnimationParams(mux, byref(params))
        for fourcc, payload in chunks:
            blob = (c_uint8 * len(payload)).from_buffer_copy(payload)
            chunk = WebPData(ctypes.cast(blob, ctypes.POINTER(c_uint8)), len(payload))
            if lib.WebPMuxSetChunk(mux, fourcc, byref(chunk), 1) != MUX_OK:
                raise EncodeFailed("libwebp: chunk add error")
        out = WebPData()
        if lib.WebPMuxAssemble(mux, byref(out)) != MUX_OK:
            raise EncodeFailed("libwebp: mux error")
        try:
            return ctypes.string_at(out.bytes, out.size)
        finally:
            lib.WebPFree(ctypes.cast(out.bytes, ctypes.c_void_p))
    finally:
        lib.WebPMuxDelete(mux)


def _loop_count(image: Any) -> int | None:
    if image.get_typeof("loop"):
        return int(image.get("loop"))
    if image.get_typeof("gif-loop"):  # libvips' older name, counted differently
        gif_loop = int(image.get("gif-loop"))
        return 0 if gif_loop == 0 else gif_loop + 1
    return None


def metadata_chunks(
    image: Any, options: EncodeOptions, orientation: int
) -> list[tuple[bytes, bytes]]:
    """The EXIF, XMP and ICC chunks webpsave writes for ``--metadata``, in its order.

    ``image`` is stored unrotated when ``orientation`` is not 1: its metadata is
    made to say what libvips' autorot would have left."""
    chunks: list[tuple[bytes, bytes]] = []
    if options.metadata == "all":
        exif = updated_exif(image, orientation)
        if exif:
            chunks.append((b"EXIF", exif))
        if image.get_typeof("xmp-data"):
            chunks.append((b"XMP ", bytes(image.get("xmp-data"))))
    if options.metadata in ("icc", "all") and image.get_typeof("icc-profile-data"):
        profile = bytes(image.get("icc-profile-data"))
        if _compatible_profile(profile, image.bands):
            chunks.append((b"ICCP", profile))
    return chunks


def _compatible_profile(profile: bytes, bands: int) -> bool:
    # libvips drops a profile that cannot describe the image (a grey profile on
    # RGB) rather than let the file carry a wrong one.
    space = profile[16:20]
    return space == b"RGB " if bands >= 3 else space == b"GRAY"


_PROXY_SKIP = frozenset(
    {
        "width",
        "height",
        "bands",
        "format",
        "coding",
        "interpretation",
        "xoffset",
        "yoffset",
        "xres",
        "yres",
        "filename",
    }
)


def updated_exif(image: Any, orientation: int) -> bytes:
    """The EXIF block libvips would write for ``image``.

    Every libvips saver rewrites the EXIF from the image's header (dimensions,
    resolution, orientation, the ``exif-*`` fields) with libexif before it
    writes it, and that is not exposed. So a black proxy with the same header
    and fields is saved as JPEG, whose EXIF segment comes before any pixel is
    compressed, and the save is stopped as soon as that segment is complete
    (~3 ms for a 24 MP header). An EXIF over JPEG's 64 KB segment limit is
    written as the source had it."""
    width, height = oriented_size(image.width, image.height, orientation)
    xres, yres = (image.yres, image.xres) if orientation >= 5 else (image.xres, image.yres)
    proxy = pyvips.Image.black(width, height)
    kept = [name for name in image.get_fields() if name not in _PROXY_SKIP]
    if orientation != 1:
        kept = [name for name in kept if name != "orientation"]  # autorot removes it
    # exif-data first: setting it makes libvips parse it into the other fields,
    # which are then set to what the image holds.
    kept.sort(key=lambda name: name != "exif-data")
    for name in kept:
        proxy.set_type(image.get_typeof(name), name, image.get(name))
    wanted = set(kept)
    for name in proxy.get_fields():
        if name not in wanted and name not in _PROXY_SKIP:
            proxy.remove(name)
    # Last: setting exif-data also set the resolution from the EXIF's, which the
    # image may not have taken (libvips' HEIF loader keeps its own).
    proxy = proxy.copy(xres=xres, yres=yres)
    found: list[bytes] = []
    received = bytearray()

    def on_write(chunk: bytes) -> int:
        received.extend(chunk)
        segment = _exif_segment(received)
        if segment is None:
            return len(chunk)
        found.append(segment)
        return -1  # enough: stop the save

    target = pyvips.TargetCustom()
    target.on_write(on_write)
    try:
        proxy.jpegsave_target(target, keep=pyvips.enums.ForeignKeep.ALL, Q=1)
    except pyvips.Error:
        pass  # stopped on purpose, or the EXIF did not fit a JPEG segment
    pyvips.vips_lib.vips_error_clear()
    if found:
        return found[0]
    if image.get_typeof("exif-data"):
        return bytes(image.get("exif-data"))
    return b""


def _exif_segment(data: bytearray) -> bytes | None:
    """The EXIF payload of a JPEG's APP1 segment once it is complete; b"" when the
    header ended without one; None while more bytes are needed."""
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return b""
        marker = data[at + 1]
        (length,) = struct.unpack_from(">H", data, at + 2)
        if at + 2 + length > len(data):
            return None
        if marker == 0xE1 and data[at + 4 : at + 10] == b"Exif\0\0":
            return bytes(data[at + 4 : at + 2 + length])
        if marker == 0xDA:  # start of scan: no EXIF
            return b""
        at += 2 + length
    return None


def encode(
    lib: LibWebP,
    image: Any,
    options: EncodeOptions,
    *,
    orientation: int = 1,
    page_height: int | None = None,
    phases: Phases | None = None,
    config: WebPConfig | None = None,
) -> bytes:
    """WebP bytes of ``image`` (libvips, lazy), as webpsave would write them.

    ``orientation``: the EXIF orientation still to apply (see
    :func:`orients_in_planes`); ``page_height``: the frame height of an
    animation stored as a strip of frames; ``config``: libwebp's settings, when
    not :func:`make_config`'s for ``options``."""
    phases = phases if phases is not None else Phases()
    image = saveable(image)
    config = config if config is not None else make_config(lib, options)
    started = time.perf_counter()
    # Read before any pixel is: a sequential JPEG load attaches some blobs (the XMP
    # of an Ultra HDR photo) only once decoding starts, and webpsave never sees them.
    chunks = metadata_chunks(image, options, orientation)
    phases.mux += time.perf_counter() - started
    if page_height is not None and page_height != image.height:
        webp = _encode_animation(lib, image, config, options, page_height, phases)
    else:
        webp = _encode_still(lib, image, config, options, orientation, phases)
    started = time.perf_counter()
    out = _mux(lib, webp, image, chunks)
    phases.mux += time.perf_counter() - started
    return out


#: What encode.py calls to know the phases (here so the signature is in one place).
Encoder = Callable[..., bytes]

__all__ = ["Phases", "encode", "orients_in_planes", "oriented_size", "uses_argb"]
