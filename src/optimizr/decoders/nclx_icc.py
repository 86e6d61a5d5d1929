"""An ICC profile that says what an nclx colour description (ISO/IEC 23091-2) says.

HEIF (and AVIF) files describe their colours either with an ICC profile or with
nclx code points: primaries, transfer characteristics, matrix coefficients. The
matrix is libheif's business (it turns YCbCr into RGB with it); the primaries and
the transfer function still describe the RGB it returns. A WebP can carry only an
ICC profile, so for RGB whose primaries are not sRGB's (Display P3 from phones,
BT.2020) an equivalent matrix/TRC display profile is written here: the image
then keeps its gamut, and ``--srgb`` converts it like any tagged image.

ICC.1:2001-04 (version 2.1) layout: header, tag table, tags; every number big-endian.
"""

from __future__ import annotations

import struct

import numpy as np

__all__ = ["SRGB_LIKE_PRIMARIES", "SRGB_LIKE_TRANSFERS", "icc_from_nclx"]

#: ISO/IEC 23091-2 ColourPrimaries: 1 BT.709 (= sRGB's), 2 unspecified (read as sRGB).
SRGB_LIKE_PRIMARIES = frozenset({1, 2})
#: TransferCharacteristics drawn as the sRGB curve: 13 sRGB, 2 unspecified, and the
#: BT.709 family (1, 6, 14, 15), which displays show through the sRGB-like curve
#: (as libvips does with untagged video-range stills).
SRGB_LIKE_TRANSFERS = frozenset({1, 2, 6, 13, 14, 15})

_D50 = np.array([0.9642, 1.0, 0.8249])
# Bradford cone response (ICC.1 Annex E): the adaptation of the colorants to D50.
_BRADFORD = np.array(
    [[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]]
)
_CURVE_POINTS = 1024


def _xyz(x: float, y: float) -> np.ndarray:
    return np.array([x / y, 1.0, (1.0 - x - y) / y])


def _colorants(
    primaries: tuple[tuple[float, float], ...], white: tuple[float, float]
) -> np.ndarray:
    """The D50-adapted XYZ of full red, green and blue, one per column."""
    columns = np.column_stack([_xyz(*xy) for xy in primaries])
    white_xyz = _xyz(*white)
    matrix = columns * np.linalg.solve(columns, white_xyz)  # R+G+B = the white, Y = 1
    cone_white, cone_d50 = _BRADFORD @ white_xyz, _BRADFORD @ _D50
    adapt = np.linalg.inv(_BRADFORD) @ np.diag(cone_d50 / cone_white) @ _BRADFORD
    result: np.ndarray = adapt @ matrix
    return result


def _s15f16(values: np.ndarray) -> bytes:
    return b"".join(struct.pack(">i", round(float(v) * 65536)) for v in values)


def _xyz_tag(values: np.ndarray) -> bytes:
    return b"XYZ \0\0\0\0" + _s15f16(values)


def _srgb_curve_tag() -> bytes:
    x = np.linspace(0.0, 1.0, _CURVE_POINTS)
    linear = np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    table = np.round(linear * 65535).astype(">u2")
    return b"curv\0\0\0\0" + struct.pack(">I", _CURVE_POINTS) + table.tobytes()


def _text_description(text: str) -> bytes:
    ascii_text = text.encode("ascii") + b"\0"
    # textDescriptionType: ASCII, then empty Unicode and ScriptCode descriptions.
    return (
        b"desc\0\0\0\0"
        + struct.pack(">I", len(ascii_text))
        + ascii_text
        + struct.pack(">II", 0, 0)
        + struct.pack(">HB", 0, 0)
        + b"\0" * 67
    )


def icc_from_nclx(nclx: dict[str, float]) -> bytes:
    """An RGB display profile with the primaries and white point of ``nclx`` (the
    chromaticities libheif reports: ``color_primary_red_x`` ... ``white_y``) and
    the sRGB tone curve."""
    primaries = tuple(
        (float(nclx[f"color_primary_{c}_x"]), float(nclx[f"color_primary_{c}_y"]))
        for c in ("red", "green", "blue")
    )
    white = (float(nclx["color_primary_white_x"]), float(nclx["color_primary_white_y"]))
    colorants = _colorants(primaries, white)
    curve = _srgb_curve_tag()
    code = int(nclx.get("color_primaries", 0))
    tags = [
        (b"desc", _text_description(f"nclx colour primaries {code} (optimizr)")),
        (b"cprt", b"text\0\0\0\0No copyright, use freely\0"),
        (b"wtpt", _xyz_tag(_D50)),  # colorants are adapted to D50: so is the white
        (b"rXYZ", _xyz_tag(colorants[:, 0])),
        (b"gXYZ", _xyz_tag(colorants[:, 1])),
        (b"bXYZ", _xyz_tag(colorants[:, 2])),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
    ]
    table_size = 4 + 12 * len(tags)
    offset = 128 + table_size
    entries, bodies = [], b""
    shared: dict[bytes, int] = {}
    for signature, body in tags:
        if body not in shared:  # the three TRCs share one curve, as ICC allows
            shared[body] = offset + len(bodies)
            bodies += body + b"\0" * (-len(body) % 4)
        entries.append(struct.pack(">4sII", signature, shared[body], len(body)))
    size = offset + len(bodies)
    header = (
        struct.pack(">I", size)
        + b"\0\0\0\0"  # preferred CMM
        + bytes([2, 0x10, 0, 0])  # version 2.1
        + b"mntrRGB XYZ "
        + struct.pack(">6H", 2026, 1, 1, 0, 0, 0)
        + b"acsp"
        + b"\0" * 24  # platform, flags, manufacturer, model, attributes
        + struct.pack(">I", 0)  # perceptual intent
        + _s15f16(_D50)
        + b"\0" * 48  # creator, profile ID, reserved
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + b"".join(entries) + bodies
