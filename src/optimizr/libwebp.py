"""A thin ctypes binding of libwebp's encoder, mux and animation encoder.

Why not libvips' own webpsave: pyvips-binary compiles libwebp at ``-Os``,
which costs ~1.24x the CPU of an ``-O3`` build for identical bytes (issue 12;
``make bench-encoder``). Pillow's manylinux wheels vendor libwebp built ``-O3``
as shared libraries exporting the whole public API, and Pillow is a runtime
dependency anyway, so this module binds those. Only the declarations libwebp
1.6's ``encode.h``, ``mux.h`` and ``mux_types.h`` give (ABI 0x0210 and 0x0109)
are here, once; pointers and buffers never leave this module and
:mod:`optimizr.webp_writer`.

The libraries are found by a glob in Pillow's installed package (their file
names carry a hash that changes with every wheel), loaded once per process
and their version checked at load. Anything missing or too old is reported
by :func:`encoder_info` with the reason; optimizr then uses libvips' webpsave.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
from ctypes import (
    POINTER,
    Structure,
    c_char_p,
    c_float,
    c_int,
    c_size_t,
    c_uint8,
    c_uint32,
    c_void_p,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The oldest libwebp whose structs match the declarations below, and whose
#: output the byte-identity tests were run against.
MIN_VERSION = (1, 6, 0)
ENCODER_ABI_VERSION = 0x0210
MUX_ABI_VERSION = 0x0109

#: The environment variable a user (or a test) sets to point at other libwebp
#: shared libraries: a folder holding libwebp, libwebpmux (and libsharpyuv).
LIBRARY_DIR_ENV = "OPTIMIZR_LIBWEBP_DIR"


class WebPConfig(Structure):
    _fields_ = [
        ("lossless", c_int),
        ("quality", c_float),
        ("method", c_int),
        ("image_hint", c_int),
        ("target_size", c_int),
        ("target_PSNR", c_float),
        ("segments", c_int),
        ("sns_strength", c_int),
        ("filter_strength", c_int),
        ("filter_sharpness", c_int),
        ("filter_type", c_int),
        ("autofilter", c_int),
        ("alpha_compression", c_int),
        ("alpha_filtering", c_int),
        ("alpha_quality", c_int),
        ("pass_", c_int),  # "pass" in C
        ("show_compressed", c_int),
        ("preprocessing", c_int),
        ("partitions", c_int),
        ("partition_limit", c_int),
        ("emulate_jpeg_size", c_int),
        ("thread_level", c_int),
        ("low_memory", c_int),
        ("near_lossless", c_int),
        ("exact", c_int),
        ("use_delta_palette", c_int),
        ("use_sharp_yuv", c_int),
        ("qmin", c_int),
        ("qmax", c_int),
    ]


class WebPPicture(Structure):
    _fields_ = [
        ("use_argb", c_int),
        ("colorspace", c_int),
        ("width", c_int),
        ("height", c_int),
        ("y", POINTER(c_uint8)),
        ("u", POINTER(c_uint8)),
        ("v", POINTER(c_uint8)),
        ("y_stride", c_int),
        ("uv_stride", c_int),
        ("a", POINTER(c_uint8)),
        ("a_stride", c_int),
        ("pad1", c_uint32 * 2),
        ("argb", POINTER(c_uint32)),
        ("argb_stride", c_int),
        ("pad2", c_uint32 * 3),
        ("writer", c_void_p),
        ("custom_ptr", c_void_p),
        ("extra_info_type", c_int),
        ("extra_info", POINTER(c_uint8)),
        ("stats", c_void_p),
        ("error_code", c_int),
        ("progress_hook", c_void_p),
        ("user_data", c_void_p),
        ("pad3", c_uint32 * 3),
        ("pad4", c_void_p),
        ("pad5", c_void_p),
        ("pad6", c_uint32 * 8),
        ("memory_", c_void_p),
        ("memory_argb_", c_void_p),
        ("pad7", c_void_p * 2),
    ]


class WebPMemoryWriter(Structure):
    _fields_ = [
        ("mem", POINTER(c_uint8)),
        ("size", c_size_t),
        ("max_size", c_size_t),
        ("pad", c_uint32 * 1),
    ]


class WebPData(Structure):
    _fields_ = [("bytes", POINTER(c_uint8)), ("size", c_size_t)]


class WebPMuxAnimParams(Structure):
    _fields_ = [("bgcolor", c_uint32), ("loop_count", c_int)]


class WebPAnimEncoderOptions(Structure):
    _fields_ = [
        ("anim_params", WebPMuxAnimParams),
        ("minimize_size", c_int),
        ("kmin", c_int),
        ("kmax", c_int),
        ("allow_mixed", c_int),
        ("verbose", c_int),
        ("padding", c_uint32 * 4),
    ]


# WebPPicture.colorspace
YUV420 = 0
YUV420A = 4
# WebPMuxGetFeatures flags
ANIMATION_FLAG = 0x00000002
MUX_OK = 1

#: WebPEncodingError, for messages.
ENCODING_ERRORS = (
    "ok",
    "out of memory",
    "out of memory while flushing bits",
    "a NULL parameter",
    "invalid configuration",
    "bad picture dimension",
    "partition 0 is bigger than 512k",
    "a partition is bigger than 16M",
    "error while flushing bytes",
    "file bigger than 4G",
    "aborted",
)

#: WebPPreset, by the names --preset takes.
PRESETS = {"default": 0, "picture": 1, "photo": 2, "drawing": 3, "icon": 4, "text": 5}

_P = ctypes.POINTER
# name: (library, restype, argtypes)
_FUNCTIONS: dict[str, tuple[str, Any, list[Any]]] = {
    "WebPGetEncoderVersion": ("webp", c_int, []),
    "WebPConfigInitInternal": ("webp", c_int, [_P(WebPConfig), c_int, c_float, c_int]),
    "WebPConfigLosslessPreset": ("webp", c_int, [_P(WebPConfig), c_int]),
    "WebPValidateConfig": ("webp", c_int, [_P(WebPConfig)]),
    "WebPPictureInitInternal": ("webp", c_int, [_P(WebPPicture), c_int]),
    "WebPPictureAlloc": ("webp", c_int, [_P(WebPPicture)]),
    "WebPPictureFree": ("webp", None, [_P(WebPPicture)]),
    "WebPPictureImportRGB": ("webp", c_int, [_P(WebPPicture), c_void_p, c_int]),
    "WebPPictureImportRGBA": ("webp", c_int, [_P(WebPPicture), c_void_p, c_int]),
    "WebPEncode": ("webp", c_int, [_P(WebPConfig), _P(WebPPicture)]),
    "WebPMemoryWriterInit": ("webp", None, [_P(WebPMemoryWriter)]),
    "WebPMemoryWriterClear": ("webp", None, [_P(WebPMemoryWriter)]),
    "WebPFree": ("webp", None, [c_void_p]),
    "WebPGetMuxVersion": ("mux", c_int, []),
    "WebPMuxCreateInternal": ("mux", c_void_p, [_P(WebPData), c_int, c_int]),
    "WebPMuxDelete": ("mux", None, [c_void_p]),
    "WebPMuxSetChunk": ("mux", c_int, [c_void_p, c_char_p, _P(WebPData), c_int]),
    "WebPMuxAssemble": ("mux", c_int, [c_void_p, _P(WebPData)]),
    "WebPMuxGetFeatures": ("mux", c_int, [c_void_p, _P(c_uint32)]),
    "WebPMuxGetAnimationParams": ("mux", c_int, [c_void_p, _P(WebPMuxAnimParams)]),
    "WebPMuxSetAnimationParams": ("mux", c_int, [c_void_p, _P(WebPMuxAnimParams)]),
    "WebPAnimEncoderOptionsInitInternal": ("mux", c_int, [_P(WebPAnimEncoderOptions), c_int]),
    "WebPAnimEncoderNewInternal": (
        "mux",
        c_void_p,
        [c_int, c_int, _P(WebPAnimEncoderOptions), c_int],
    ),
    "WebPAnimEncoderAdd": ("mux", c_int, [c_void_p, _P(WebPPicture), c_int, _P(WebPConfig)]),
    "WebPAnimEncoderAssemble": ("mux", c_int, [c_void_p, _P(WebPData)]),
    "WebPAnimEncoderGetError": ("mux", c_char_p, [c_void_p]),
    "WebPAnimEncoderDelete": ("mux", None, [c_void_p]),
}


@dataclass(frozen=True)
class EncoderInfo:
    """Which encoder a process uses, for --version, summary.json and Prometheus."""

    #: "libwebp" (this binding) or "libvips webpsave" (the fallback).
    name: str
    #: libwebp's version, "1.6.0" (libvips does not report the one it links).
    libwebp_version: str
    #: Where libwebp comes from: the library's path, or "pyvips-binary".
    origin: str
    #: Why the binding is not used, when it is not ("" when it is).
    reason: str = ""

    @property
    def fallback(self) -> bool:
        return self.name != "libwebp"

    def describe(self) -> str:
        """One line: ``encoder: libwebp 1.6.0 (...)`` or why the slower one runs."""
        if not self.fallback:
            return f"encoder: libwebp {self.libwebp_version} ({self.origin})"
        return (
            f"encoder: libvips webpsave (slower: libwebp built -Os in {self.origin}; {self.reason})"
        )


class LibWebP:
    """The loaded libraries' functions, as attributes named like the C functions."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths
        # RTLD_GLOBAL is not needed: each library finds its own dependencies
        # (libsharpyuv, libwebp) through its $ORIGIN rpath, loaded first here.
        handles = {}
        if "sharpyuv" in paths:
            handles["sharpyuv"] = ctypes.CDLL(str(paths["sharpyuv"]))
        handles["webp"] = ctypes.CDLL(str(paths["webp"]))
        handles["mux"] = ctypes.CDLL(str(paths["mux"]))
        self._handles = handles
        for name, (library, restype, argtypes) in _FUNCTIONS.items():
            function = getattr(handles[library], name)
            function.restype = restype
            function.argtypes = argtypes
            setattr(self, name, function)
        # The C writer libwebp itself provides: no Python callback per chunk.
        self.memory_write = ctypes.cast(handles["webp"].WebPMemoryWrite, c_void_p).value
        self.version = _unpack_version(self.WebPGetEncoderVersion())
        self.mux_version = _unpack_version(self.WebPGetMuxVersion())

    def __getattr__(self, name: str) -> Any:  # for mypy: the functions set above
        raise AttributeError(name)


def _unpack_version(packed: int) -> tuple[int, int, int]:
    return (packed >> 16) & 0xFF, (packed >> 8) & 0xFF, packed & 0xFF


def _version_text(version: tuple[int, int, int]) -> str:
    return ".".join(map(str, version))


class LibWebPUnavailable(Exception):
    """Internal: why the binding cannot be used (turned into EncoderInfo.reason)."""


# Pillow's wheels: manylinux keeps the shared libraries in pillow.libs/ beside the
# package, macOS in PIL/.dylibs/. Windows and source builds link libwebp into
# PIL._webp itself, with nothing to bind.
_GLOBS = {
    "webp": ("libwebp-*.so*", "libwebp.*.dylib", "libwebp.so*"),
    "mux": ("libwebpmux-*.so*", "libwebpmux.*.dylib", "libwebpmux.so*"),
    "sharpyuv": ("libsharpyuv-*.so*", "libsharpyuv.*.dylib", "libsharpyuv.so*"),
}


def _library_dirs() -> list[Path]:
    override = os.environ.get(LIBRARY_DIR_ENV)
    if override is not None:
        return [Path(override)]
    spec = importlib.util.find_spec("PIL")
    if spec is None or spec.origin is None:
        raise LibWebPUnavailable("Pillow is not installed")
    package = Path(spec.origin).parent
    return [package.parent / "pillow.libs", package / ".dylibs"]


def find_libraries() -> dict[str, Path]:
    """The paths of libwebp, libwebpmux and libsharpyuv in Pillow's package."""
    for folder in _library_dirs():
        found: dict[str, Path] = {}
        for role, patterns in _GLOBS.items():
            matches = sorted(m for pattern in patterns for m in folder.glob(pattern))
            if matches:
                found[role] = matches[0]
        if "webp" in found and "mux" in found:
            return found
    where = " or ".join(str(folder) for folder in _library_dirs())
    raise LibWebPUnavailable(f"no libwebp and libwebpmux shared libraries in {where}")


@functools.cache
def load() -> LibWebP | None:
    """The binding, loaded once per process; None when it cannot be used."""
    return _load()[0]


@functools.cache
def _load() -> tuple[LibWebP | None, str]:
    try:
        paths = find_libraries()
        lib = LibWebP(paths)
    except LibWebPUnavailable as exc:
        return None, str(exc)
    except (OSError, AttributeError) as exc:  # not loadable, or a symbol missing
        return None, f"cannot load libwebp: {exc}"
    if lib.version < MIN_VERSION or lib.mux_version < MIN_VERSION:
        return None, (
            f"libwebp {_version_text(lib.version)} in {paths['webp'].parent} is older "
            f"than {_version_text(MIN_VERSION)}"
        )
    return lib, ""


def encoder_info(wanted: str = "auto") -> EncoderInfo:
    """Which encoder ``--encoder wanted`` gives in this process, and why."""
    lib, reason = _load()
    if wanted == "libvips":
        reason = "--encoder libvips"
    elif lib is not None:
        return EncoderInfo("libwebp", _version_text(lib.version), str(lib.paths["webp"]))
    return EncoderInfo("libvips webpsave", _vips_libwebp_version(), "pyvips-binary", reason)


def _vips_libwebp_version() -> str:
    # libvips does not say which libwebp it links; pyvips-binary's wheel of
    # libvips 8.18 builds libwebp 1.6.0 (libvips-packaging's versions.properties).
    return "unknown"


__all__ = [
    "EncoderInfo",
    "LibWebP",
    "WebPAnimEncoderOptions",
    "WebPConfig",
    "WebPData",
    "WebPMemoryWriter",
    "WebPMuxAnimParams",
    "WebPPicture",
    "encoder_info",
    "find_libraries",
    "load",
]
