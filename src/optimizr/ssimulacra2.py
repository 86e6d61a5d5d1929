"""SSIMULACRA 2.1, the perceptual metric that --target-score aims at (issue 14).

Written from the description of the metric by its author (Jon Sneyers, Cloudinary,
github.com/cloudinary/ssimulacra2, version 2.1 at commit 81feacf) and checked
against that tool's scores on the 120 pairs of ``../shared/quality`` (within 0.5
points, tests/test_ssimulacra2.py). The steps:

1. 8-bit sRGB -> linear sRGB (alpha, when present, is first blended in the
   *encoded* values over a grey background, as the tool does);
2. six scales, 1:1 to 1:32, each halved by a 2x2 box average in linear RGB;
3. at each scale, linear RGB -> XYB (libjxl's opsin absorbance, cube root),
   shifted into a positive 0..1 range;
4. per XYB channel, three error maps: 1 - SSIM' (SSIM without its luminance
   denominator) and the two halves of an edge-difference ratio ("ringing":
   the distorted image has edges the original lacks; "blurring": the
   reverse), each pooled by the 1-norm and the 4-norm: 108 numbers;
5. a weighted sum of those, a cubic, and a power law onto the 100-is-identical
   scale. Maps whose weights are all zero or negligible (below 0.0021, 0.02
   together) are not computed: see _weighted_channels.

All local means are a Gaussian of sigma 1.5. The tool computes it with libjxl's
recursive (IIR) Gaussian after Charalampidis 2016, "Recursive implementation of
the Gaussian filter using truncated cosine functions"; that filter's impulse
response is finite (its cosines cancel after 2N samples), so here it is an
equivalent short FIR kernel derived from the same equations, applied with the
same zero padding at the borders (which darkens the border means: the scores
depend on it).

The original's side of the computation (its XYB planes, their means and
variances at every scale) is done once in :class:`Reference`; each
:meth:`Reference.score` then costs one distorted image's worth of work, which
is what a quality search pays per probe.

The colour conversion, the blurs, the downsampling and the error maps with
their pooling run in C when the extension is built (``_ssimulacra2.c``: the
same float32 operations, with the tool's fused multiply-adds, vectorised; the
maps are summed as they are made, never stored). The numpy functions here are
its twins and the fallback; tests/test_ssimulacra2.py checks they agree.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from types import ModuleType

import numpy as np
import numpy.typing as npt

__all__ = ["MIN_SIDE", "Reference", "score"]

Floats = npt.NDArray[np.float32]

_C_PASSES: ModuleType | None
try:
    # The hot loops in C (src/optimizr/_ssimulacra2.c), built with the package
    # by setup.py; where no C compiler was found the numpy twins below do the
    # same arithmetic, about 4x slower per probe.
    from optimizr import _ssimulacra2 as _C_PASSES
except ImportError:  # pragma: no cover - depends on the build
    _C_PASSES = None

#: The tool refuses images under 8 px on a side; so does this module.
MIN_SIDE = 8
_SCALES = 6
_SIGMA = 1.5
_C2 = 0.0009

# libjxl's opsin absorbance matrix and bias (lib/jxl/opsin_params.h), rows L, M, S;
# the third entry of each row is computed in float32 as there.
_F = np.float32
_OPSIN = np.array(
    [
        [_F(0.30), _F(1.0) - _F(0.078) - _F(0.30), _F(0.078)],
        [_F(0.23), _F(1.0) - _F(0.078) - _F(0.23), _F(0.078)],
        [
            _F(0.24342268924547819),
            _F(0.20476744424496821),
            _F(1.0) - _F(0.24342268924547819) - _F(0.20476744424496821),
        ],
    ],
    dtype=np.float32,
)
_OPSIN_BIAS = _F(0.0037930732552754493)
_NEG_BIAS_CBRT = -np.cbrt(_OPSIN_BIAS)

# libjxl's sRGB decoding (transfer_functions-inl.h, TF_SRGB::DisplayFromEncoded):
# linear below 0.04045, above it a rational polynomial fit of the sRGB curve
# (relative error about 5e-6); coefficients of x^0 .. x^4.
_SRGB_P = np.array(
    [2.200248328e-04, 1.043637593e-02, 1.624820318e-01, 7.961564959e-01, 8.210152774e-01],
    dtype=np.float32,
)
_SRGB_Q = np.array(
    [2.631846970e-01, 1.076976492e00, 4.987528350e-01, -5.512498495e-02, 6.521209011e-03],
    dtype=np.float32,
)

# SSIMULACRA 2.1's 108 weights, in the tool's order: channel X, Y, B; scale 1:1 ..
# 1:32; 1-norm then 4-norm; SSIM', ringing, blurring (ssimulacra2.cc, Msssim::Score).
_WEIGHTS = np.array(
    [
        0.0, 0.0007376606707406586, 0.0, 0.0, 0.0007793481682867309, 0.0,
        0.0, 0.0004371155730107379, 0.0, 1.1041726426657346, 0.00066284834129271,
        0.00015231632783718752, 0.0, 0.0016406437456599754, 0.0, 1.8422455520539298,
        11.441172603757666, 0.0, 0.0007989109436015163, 0.000176816438078653, 0.0,
        1.8787594979546387, 10.94906990605142, 0.0, 0.0007289346991508072,
        0.9677937080626833, 0.0, 0.00014003424285435884, 0.9981766977854967,
        0.00031949755934435053, 0.0004550992113792063, 0.0, 0.0, 0.0013648766163243398,
        0.0, 0.0, 0.0, 0.0, 0.0, 7.466890328078848, 0.0, 17.445833984131262,
        0.0006235601634041466, 0.0, 0.0, 6.683678146179332, 0.00037724407979611296,
        1.027889937768264, 225.20515300849274, 0.0, 0.0, 19.213238186143016,
        0.0011401524586618361, 0.001237755635509985, 176.39317598450694, 0.0, 0.0,
        24.43300999870476, 0.28520802612117757, 0.0004485436923833408, 0.0, 0.0, 0.0,
        34.77906344483772, 44.835625328877896, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        0.0008680556573291698, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0005313191874358747, 0.0,
        0.00016533814161379112, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0004179171803251336,
        0.0017290828234722833, 0.0, 0.0020827005846636437, 0.0, 0.0, 8.826982764996862,
        23.19243343998926, 0.0, 95.1080498811086, 0.9863978034400682, 0.9834382792465353,
        0.0012286405048278493, 171.2667255897307, 0.9807858872435379, 0.0, 0.0, 0.0,
        0.0005130064588990679, 0.0, 0.00010854057858411537,
    ],
    dtype=np.float64,
)  # fmt: skip

# The tool's backgrounds for transparent images: a dark and a bright grey, the
# worse score kept; 0.5 when only the distorted image has alpha (ssimulacra2_main.cc).
_ALPHA_BACKGROUNDS = (0.1, 0.9)
_LONE_ALPHA_BACKGROUND = 0.5


def _fma(a: npt.ArrayLike, b: npt.ArrayLike, c: npt.ArrayLike) -> Floats:
    """a * b + c rounded once to float32, as a fused multiply-add does.

    float32 operands multiply exactly in float64 (24 + 24 < 53 bits), so one
    float64 product-and-sum then one rounding gives the FMA's result (barring a
    double-rounding tie, far rarer than anything the scores can notice).
    """
    fused: Floats = (np.multiply(a, b, dtype=np.float64) + c).astype(np.float32)
    return fused


class _RecursiveGaussian:
    """libjxl's recursive Gaussian (Charalampidis 2016), reproduced in its float32 arithmetic.

    The filter is three resonators y[n] = n2 (x[n-N-1] + x[n+N-1]) - d1 y[n-1] -
    y[n-2] whose poles sit on the unit circle. In exact arithmetic that is a
    9-tap FIR, but the tool runs it in float32 and the rounding errors of an
    undamped recursion never decay: they add a noise of about 1e-6 to every
    local mean and variance. In flat areas SSIM divides by the variance plus
    C2 = 0.0009, so that noise moves the tool's scores by up to two points
    (a flat grey image, a screenshot). To agree with the tool, this class does
    the same float32 operations in the same order as libjxl (gauss_blur.cc):
    the vertical pass as one fused multiply-add per resonator and row, the
    horizontal pass in blocks of four outputs with the coefficients of four
    unrolled steps, single steps at the ends. Each operation is vectorised
    across the other axis (all rows, or all columns, of all planes at once).
    """

    def __init__(self, sigma: float) -> None:
        # Equations (33)-(57) of the paper, solved in double as libjxl does.
        radius = round(3.2795 * sigma + 0.2546)  # (57)
        omega = np.array([1.0, 3.0, 5.0]) * math.pi / (2.0 * radius)
        p = np.array([1.0, -1.0, 1.0]) / np.tan(0.5 * omega)  # (37)
        r = np.array([1.0, -1.0, 1.0]) * p * p / np.sin(omega)  # (44)
        rho = np.exp(-0.5 * sigma * sigma * omega * omega) / radius  # (50)
        d_13 = p[0] * r[1] - r[0] * p[1]
        d_35 = p[1] * r[2] - r[1] * p[2]
        d_51 = p[2] * r[0] - r[2] * p[0]
        zeta_15, zeta_35 = d_35 / d_13, d_51 / d_13  # (52)
        a = np.array([p, r, [zeta_15, zeta_35, 1.0]])  # (56)
        gamma = np.array(
            [1.0, radius * radius - sigma * sigma, zeta_15 * rho[0] + zeta_35 * rho[1] + rho[2]]
        )  # (55)
        beta = np.linalg.solve(a, gamma)  # (53)
        n2 = -beta * np.cos(omega * (radius + 1.0))  # (33)
        d1 = -2.0 * np.cos(omega)  # (33)
        self.radius = radius
        # Coefficients as float32 values held in float64 (exact), shaped to
        # broadcast over (resonator, columns) or (lane, resonator, columns).
        self.n2 = n2.astype(np.float32).astype(np.float64)[:, None]
        self.neg_d1 = -d1.astype(np.float32).astype(np.float64)[:, None]
        # Four steps of the recursion expanded (o_j in terms of the inputs
        # i_0..i_j and the two outputs before the block), per lane j.
        d2 = d1 * d1
        mul_in = np.array([n2, -d1 * n2, d2 * n2 - n2, -d2 * d1 * n2 + 2.0 * d1 * n2])
        mul_prev = np.array([-d1, d2 - 1.0, -d2 * d1 + 2.0 * d1, d2 * d2 - 3.0 * d2 + 1.0])
        mul_prev2 = np.array([-np.ones(3), d1, 1.0 - d2, d2 * d1 - 2.0 * d1])

        def f32(v: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
            return v.astype(np.float32).astype(np.float64)[..., None]

        self.mul_in = f32(mul_in)
        self.mul_prev = f32(mul_prev)
        self.mul_prev2 = f32(mul_prev2)
        # Input i_q reaches lane j >= q with coefficient mul_in[j - q].
        self.mul_in_shifted = [
            f32(np.concatenate([np.zeros((q, 3)), mul_in[: 4 - q]])) for q in range(4)
        ]
        # The same coefficients for the C passes (optimizr._ssimulacra2).
        self.packed = np.concatenate(
            [
                c.reshape(-1)
                for c in (self.n2, self.neg_d1, self.mul_in, self.mul_prev, self.mul_prev2)
            ]
        )

    def _pair_sums(self, x: Floats) -> Floats:
        """x[n-N-1] + x[n+N-1] for n = -N+1 .. L-1 (zero outside), float32; row n+N-1."""
        n = self.radius
        length = x.shape[0]
        steps = length + n - 1
        sums = np.empty((steps, *x.shape[1:]), dtype=np.float32)
        sums[:length] = x  # x[n+N-1], inside for every row < L
        sums[length:] = 0.0
        if steps > 2 * n:
            sums[2 * n :] += x[: steps - 2 * n]  # x[n-N-1]
        return sums

    def vertical(self, x: Floats, chunk: int = 32) -> Floats:
        """Along axis 0 of (L, M): libjxl's VerticalStrip, one FMA step per row.

        MulAdd(n2, sum, NegMulSub(d1, y[n-1], y[n-2])): the inner part rounded
        to float32, then the fused add of n2 * sum rounded again. The state is
        kept in float64 holding float32 values, so every step is same-type
        numpy operations over all columns of all planes.
        """
        n = self.radius
        sums = self._pair_sums(x)
        steps, cols = sums.shape
        out: Floats = np.empty((steps, cols), dtype=np.float32)
        prev = np.zeros((3, cols))
        prev2 = np.zeros((3, cols))
        acc = np.empty((3, cols))
        acc32 = np.empty((3, cols), dtype=np.float32)
        n2s = np.empty((chunk, 3, cols))
        ys = np.empty((chunk, 3, cols), dtype=np.float32)
        for start in range(0, steps, chunk):
            stop = min(steps, start + chunk)
            np.multiply(sums[start:stop, None, :], self.n2, out=n2s[: stop - start])
            for i in range(stop - start):
                np.multiply(prev, self.neg_d1, out=acc)
                acc -= prev2
                np.copyto(acc32, acc, casting="same_kind")
                np.copyto(acc, acc32)
                acc += n2s[i]
                np.copyto(ys[i], acc, casting="same_kind")
                prev2, prev = prev, prev2
                np.copyto(prev, ys[i])
            done = ys[: stop - start]
            # Add(y1, Add(y3, y5)), as the tool sums its resonators.
            np.add(done[:, 1], done[:, 2], out=out[start:stop])
            out[start:stop] += done[:, 0]
        return out[n - 1 :]

    def horizontal(self, x: Floats) -> Floats:
        """Along axis 0 of (L, M): libjxl's FastGaussian1D, in blocks of four steps."""
        n_r = self.radius
        length, cols = x.shape
        sums = self._pair_sums(x)  # sums[n + N - 1]
        out = np.empty((length, cols), dtype=np.float32)
        prev = np.zeros((3, cols), dtype=np.float32)
        prev2 = np.zeros((3, cols), dtype=np.float32)
        mul_in0, mul_prev0 = self.mul_in[0], self.mul_prev[0]

        def single(n: int) -> None:
            nonlocal prev, prev2
            # Mul(sum, n2), then MulAdd(-1, prev2, .), then MulAdd(-d1, prev, .).
            o = np.multiply(sums[n + n_r - 1], mul_in0, dtype=np.float32)
            o -= prev2
            o = _fma(prev, mul_prev0, o)
            prev2, prev = prev, o
            if n >= 0:
                out[n] = o[0] + (o[1] + o[2])

        n = -n_r + 1
        first_aligned = -(-(n_r + 1) // 4) * 4
        while n < min(first_aligned, length):
            single(n)
            n += 1
        shifted = self.mul_in_shifted
        if n < length - n_r + 1 - 3:
            # The state in float64 holding float32 values; same-type operations
            # into preallocated buffers, one rounding per FMA as in libjxl.
            inputs = np.empty((4, cols))
            first32 = shifted[0].astype(np.float32)
            acc = np.empty((4, 3, cols))
            acc32 = np.empty((4, 3, cols), dtype=np.float32)
            term = np.empty((4, 3, cols))
            before = prev.astype(np.float64)
            before2 = prev2.astype(np.float64)
            while n < length - n_r + 1 - 3:
                base = n + n_r - 1
                np.multiply(sums[base], first32, out=acc32)
                np.copyto(acc, acc32)
                np.copyto(inputs, sums[base : base + 4])
                for q in (1, 2, 3):
                    # Input q reaches lanes q..3 only (the others add 0).
                    part = term[q:]
                    np.multiply(shifted[q][q:], inputs[q], out=part)
                    part += acc[q:]
                    np.copyto(acc32[q:], part, casting="same_kind")
                    np.copyto(acc[q:], acc32[q:])
                np.multiply(self.mul_prev2, before2, out=term)
                term += acc
                np.copyto(acc32, term, casting="same_kind")
                np.copyto(acc, acc32)
                np.multiply(self.mul_prev, before, out=term)
                term += acc
                np.copyto(acc32, term, casting="same_kind")
                np.copyto(before2, acc32[2])
                np.copyto(before, acc32[3])
                rows = out[n : n + 4]
                np.add(acc32[:, 1], acc32[:, 2], out=rows)
                rows += acc32[:, 0]
                n += 4
            prev, prev2 = before.astype(np.float32), before2.astype(np.float32)
        while n < length:
            single(n)
            n += 1
        return out

    def blur(self, planes: Floats) -> Floats:
        """(H, W, C) planes blurred as the tool does: horizontal pass, then vertical
        (the numpy path; with the C loops _blurred_stack blurs in C instead)."""
        h, w, c = planes.shape
        rows = np.ascontiguousarray(planes.transpose(1, 0, 2)).reshape(w, h * c)
        across = _in_tiles(self.horizontal, rows).reshape(w, h, c)
        del rows
        down = np.ascontiguousarray(across.transpose(1, 0, 2)).reshape(h, w * c)
        del across
        return _in_tiles(self.vertical, down).reshape(h, w, c)

    def _c_pass(self, name: str, x: Floats) -> Floats:
        """One C pass alone, as the tests hold it against its numpy twin."""
        assert _C_PASSES is not None
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty_like(x)
        getattr(_C_PASSES, name)(x, out, x.shape[0], x.shape[1], self.radius, self.packed)
        return out


# Columns per tile of a recursive pass: the recursions are independent across
# columns, so a wide image is done a tile at a time and the pass's own arrays
# (pair sums, resonator outputs) stay a few tiles' worth, not the whole image.
_TILE_COLUMNS = 8192


def _in_tiles(recursion: Callable[[Floats], Floats], x: Floats) -> Floats:
    if x.shape[1] <= _TILE_COLUMNS:
        return recursion(x)
    out = np.empty_like(x)
    for start in range(0, x.shape[1], _TILE_COLUMNS):
        out[:, start : start + _TILE_COLUMNS] = recursion(x[:, start : start + _TILE_COLUMNS])
    return out


def _srgb_to_linear(encoded: Floats) -> Floats:
    """The tool's sRGB decoding of float32 values in 0..1 (Horner steps as FMAs)."""
    num = np.full_like(encoded, _SRGB_P[4])
    den = np.full_like(encoded, _SRGB_Q[4])
    for k in (3, 2, 1, 0):
        num = _fma(num, encoded, _SRGB_P[k])
        den = _fma(den, encoded, _SRGB_Q[k])
    low = encoded * (_F(1.0) / _F(12.92))
    return np.where(encoded > _F(0.04045), num / den, low).astype(np.float32)


@functools.cache
def _linear_table(background: float | None) -> Floats:
    """Linear-light value of every (alpha, 8-bit value) pair, shape (256, 256).

    The tool reads 8-bit samples as v * (1/255) in float32 and, for an image
    with alpha, blends a * v + (1 - a) * bg in float32 on those *encoded*
    values, before decoding the sRGB curve. Without a background only row 255
    (opaque) is meaningful.
    """
    scale = _F(1.0) / _F(255.0)
    value = np.arange(256, dtype=np.float32)[None, :] * scale
    alpha = np.arange(256, dtype=np.float32)[:, None] * scale
    if background is None:
        encoded = np.broadcast_to(value, (256, 256))
    else:
        encoded = alpha * value + (_F(1.0) - alpha) * _F(background)
    table = _srgb_to_linear(np.ascontiguousarray(encoded, dtype=np.float32))
    table.setflags(write=False)
    return table


def _to_linear(pixels: npt.NDArray[np.uint8], background: float | None) -> Floats:
    """(H, W, 3|4) uint8 sRGB -> (H, W, 3) float32 linear, alpha blended if given."""
    table = _linear_table(background)
    linear: Floats
    if pixels.shape[2] == 4 and background is not None:
        linear = table[pixels[:, :, 3:4], pixels[:, :, :3]]
    else:
        linear = table[255][pixels[:, :, :3]]
    return linear


def _downsample(linear: Floats) -> Floats:
    """2x2 box average; an odd last row or column is paired with itself (the tool clamps)."""
    h, w = linear.shape[:2]
    if _C_PASSES is not None:
        out = np.empty(((h + 1) // 2, (w + 1) // 2, 3), dtype=np.float32)
        _C_PASSES.downsample(np.ascontiguousarray(linear), out, h, w)
        return out
    if h % 2:
        linear = np.concatenate([linear, linear[-1:]], axis=0)
    if w % 2:
        linear = np.concatenate([linear, linear[:, -1:]], axis=1)
    h2, w2 = linear.shape[0] // 2, linear.shape[1] // 2
    quads = linear.reshape(h2, 2, w2, 2, 3)
    # The tool's order of the additions: (top-left + top-right) + bottom-left + bottom-right.
    out = quads[:, 0, :, 0] + quads[:, 0, :, 1]
    out += quads[:, 1, :, 0]
    out += quads[:, 1, :, 1]
    out *= _F(0.25)
    return out


def _cube_root_and_add(x: Floats, add: np.float32) -> Floats:
    """cbrt(x) + add as libjxl computes it (fast_math-inl.h): x * r^2 with r ~ x^(-1/3)
    from an exponent-bits guess and four Newton steps, each operation in float32."""
    bits = x.view(np.int32)
    guess = np.int32(0x54800000) - (bits >> 23) * np.int32(0x002AAAAA)
    r = np.where(bits == 0, np.int32(0), guess).view(np.float32)
    third, four_thirds = _F(1.0) / _F(3.0), _F(4.0) / _F(3.0)
    neg_x_third = -(third * x)
    for _ in range(3):
        r2 = r * r
        r = _fma(neg_x_third, r2 * r2, four_thirds * r)
    r2 = r * r
    r = _fma(third, _fma(-x, r2 * r2, r), r)
    return _fma(r * r, x, add)


def _to_xyb(linear: Floats) -> Floats:
    """Linear sRGB -> XYB moved into 0..1, in libjxl's float32 operations
    (enc_xyb.cc LinearRGBToXYB, then ssimulacra2's MakePositiveXYB).

    Done in bands of rows: the forty-odd elementwise passes then run on
    temporaries that stay in the CPU cache.
    """
    out = np.empty_like(linear)
    if _C_PASSES is not None:
        linear = np.ascontiguousarray(linear)
        pixels = linear.shape[0] * linear.shape[1]
        _C_PASSES.to_xyb(linear, out, pixels, _OPSIN, float(_OPSIN_BIAS), float(_NEG_BIAS_CBRT))
        return out
    height, width = linear.shape[:2]
    band = max(1, _BAND_PIXELS // width)
    for top in range(0, height, band):
        out[top : top + band] = _xyb_band(linear[top : top + band])
    return out


def _xyb_band(linear: Floats) -> Floats:
    mixed = []
    for row in _OPSIN:
        # MulAdd(m0, r, MulAdd(m1, g, MulAdd(m2, b, bias))), clamped at 0.
        m = _fma(
            linear[..., 0],
            row[0],
            _fma(linear[..., 1], row[1], _fma(linear[..., 2], row[2], _OPSIN_BIAS)),
        )
        np.maximum(m, _F(0.0), out=m)
        mixed.append(_cube_root_and_add(m, _NEG_BIAS_CBRT))
    lum, med, short = mixed
    half = _F(0.5)
    y = half * (lum + med)
    out = np.empty_like(linear)
    out[..., 0] = half * (lum - med) * _F(14.0) + _F(0.42)
    out[..., 1] = y + _F(0.01)
    out[..., 2] = (short - y) + _F(0.55)
    return out


# Pixels per band of the elementwise colour conversion (a few hundred KB of temporaries).
_BAND_PIXELS = 65536


_GAUSSIAN = _RecursiveGaussian(_SIGMA)


def _scale_count(height: int, width: int) -> int:
    """How many scales the tool computes: it checks the size of the previous
    scale before halving, so the last one can be under 8 px (ssimulacra2.cc)."""
    count = 0
    for index in range(_SCALES):
        if height < MIN_SIDE or width < MIN_SIDE:
            break
        if index:
            height, width = (height + 1) // 2, (width + 1) // 2
        count += 1
    return count


def _weighted_channels(scales: int) -> list[tuple[list[int], list[int]]]:
    """Per scale, the channels whose maps carry a weight: (any map, the SSIM map).

    56 of the 108 weights are exactly zero and 27 more are below 0.0021 (the
    next one up is 0.285): residue of the tuning, 0.02 all together, whose terms
    moved no score of the 120 reference pairs by more than 0.0013 points. The
    blurs and maps of a channel whose weights at a scale are all below
    _NEGLIGIBLE_WEIGHT are skipped (at 1:1 only Y's are left: 3 planes to blur
    per probe, not 9). With fewer than six scales the tool takes the weights in
    sequence (_final_score), hence the index formula.
    """
    used = []
    for scale in range(scales):

        def weighted(channel: int, kind: int, scale: int = scale) -> bool:
            first = (channel * scales + scale) * 6 + kind
            return bool((_WEIGHTS[[first, first + 3]] > _NEGLIGIBLE_WEIGHT).any())

        ssim = [c for c in range(3) if weighted(c, 0)]
        edges = [c for c in range(3) if weighted(c, 1) or weighted(c, 2)]
        used.append((sorted(set(ssim) | set(edges)), ssim))
    return used


_NEGLIGIBLE_WEIGHT = 0.01


def _channels(channels: list[int]) -> slice | list[int]:
    """A slice when the channels are consecutive (a view, not a copy)."""
    if channels and channels == list(range(channels[0], channels[-1] + 1)):
        return slice(channels[0], channels[-1] + 1)
    return channels


def _blurred_stack(
    xyb: Floats, means: list[int], ssim: list[int], ssim_ref: Floats | None = None
) -> Floats:
    """The blurred planes of a scale (see _stacked): in C when it is built, which
    stacks and blurs in bands instead of transposing whole planes."""
    if _C_PASSES is None:
        stack = _stacked(xyb[..., _channels(means)], xyb[..., _channels(ssim)], ssim_ref)
        return _GAUSSIAN.blur(stack)
    h, w = xyb.shape[:2]
    planes = len(means) + len(ssim) * (1 if ssim_ref is None else 2)
    out = np.empty((h, w, planes), dtype=np.float32)
    _C_PASSES.blur_stack(
        np.ascontiguousarray(xyb),
        None if ssim_ref is None else np.ascontiguousarray(ssim_ref),
        h,
        w,
        np.array(means, dtype=np.int32),
        np.array(ssim, dtype=np.int32),
        out,
        _GAUSSIAN.radius,
        _GAUSSIAN.packed,
    )
    return out


def _stacked(means: Floats, ssim: Floats, ssim_ref: Floats | None = None) -> Floats:
    """The planes to blur, side by side: x, x^2 of the SSIM channels, and
    x * x_ref of those when there is a reference to correlate with."""
    k, s = means.shape[-1], ssim.shape[-1]
    parts = 2 if ssim_ref is None else 3
    stack = np.empty((*means.shape[:-1], k + (parts - 1) * s), dtype=np.float32)
    stack[..., :k] = means
    np.multiply(ssim, ssim, out=stack[..., k : k + s])
    if ssim_ref is not None:
        np.multiply(ssim_ref, ssim, out=stack[..., k + s :])
    return stack


class _Scale:
    """The original's side of one scale: XYB, local means and variances, edges,
    for the channels that carry a weight at this scale."""

    __slots__ = (
        "edge",
        "means",
        "mu",
        "mu_ssim",
        "ssim",
        "ssim_at",
        "ssim_at_list",
        "variance",
        "xyb",
        "xyb_ssim",
    )

    def __init__(self, xyb: Floats, means: list[int], ssim: list[int]) -> None:
        self.means, self.ssim = means, ssim
        if not means:  # nothing weighs at this scale (1:32 of a large image)
            return
        self.ssim_at_list = [means.index(c) for c in ssim]  # SSIM channels among the means
        self.ssim_at = _channels(self.ssim_at_list)
        self.xyb = xyb[..., _channels(means)]
        self.xyb_ssim = np.ascontiguousarray(xyb[..., _channels(ssim)])  # read by every probe
        blurred = _blurred_stack(xyb, means, ssim)
        k = len(means)
        self.mu = np.ascontiguousarray(blurred[..., :k])
        self.mu_ssim = self.mu[..., self.ssim_at]
        self.variance = blurred[..., k:] - self.mu_ssim * self.mu_ssim
        self.edge = np.abs(self.xyb - self.mu) + _F(1.0)

    def norms(self, xyb: Floats) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """The 1-norms and 4-norms of the error maps (``errors`` then ``_pooled``);
        in C, without the maps, when the extension is built."""
        if _C_PASSES is None:
            ones, fours = _pooled(self.errors(xyb)[0])
            return ones, fours
        k, s = len(self.means), len(self.ssim)
        blurred = _blurred_stack(xyb, self.means, self.ssim, self.xyb_ssim)
        pixels = xyb.shape[0] * xyb.shape[1]
        sums = np.empty(2 * (s + 2 * k))
        _C_PASSES.error_sums(
            blurred,
            np.ascontiguousarray(xyb),
            self.mu,
            self.edge,
            self.variance if s else self.edge,  # unused without SSIM channels
            pixels,
            np.array(self.means, dtype=np.int32),
            np.array(self.ssim_at_list, dtype=np.int32),
            sums,
        )
        half = s + 2 * k
        return sums[:half] / pixels, np.sqrt(np.sqrt(sums[half:] / pixels))

    def errors(self, xyb: Floats) -> tuple[Floats, list[int], list[int]]:
        """(H, W, |ssim| + 2 |means|) error maps of a distorted image's XYB at this scale:
        1 - SSIM', then ringing, then blurring."""
        one, c2 = _F(1.0), _F(_C2)
        means = xyb[..., _channels(self.means)]
        k, s = len(self.means), len(self.ssim)
        blurred = _blurred_stack(xyb, self.means, self.ssim, self.xyb_ssim)
        mu = blurred[..., :k]
        maps = np.empty((*xyb.shape[:2], s + 2 * k), dtype=np.float32)
        if s:
            # SSIM without its luminance denominator (the tool's SSIMMap), in
            # float32 in the tool's order. The tool takes 1 - SSIM' in double;
            # in float32 it is the same number (exact for SSIM' in 0.5..2).
            mu1, mu2 = self.mu_ssim, mu[..., self.ssim_at]
            num_m = mu1 - mu2
            num_m *= num_m
            np.subtract(one, num_m, out=num_m)
            num_s = blurred[..., k + s :] - mu1 * mu2
            num_s *= _F(2.0)
            num_s += c2
            denom_s = blurred[..., k : k + s] - mu2 * mu2
            denom_s += self.variance
            denom_s += c2
            num_m *= num_s
            num_m /= denom_s
            error = maps[..., :s]
            np.subtract(one, num_m, out=error)
            np.maximum(error, _F(0.0), out=error)
        # Edge ratio (1 + |x2 - mu2|) / (1 + |x1 - mu1|) - 1: > 0 where the
        # distorted image has edges the original lacks (ringing, banding,
        # blocking), < 0 where it lost them (blurring, smearing). float32
        # here, double in the tool: a 1e-7 difference that no map amplifies.
        ratio = np.abs(means - mu)
        ratio += one
        ratio /= self.edge
        ratio -= one
        artifact, lost = maps[..., s : s + k], maps[..., s + k :]
        np.maximum(ratio, _F(0.0), out=artifact)
        np.subtract(artifact, ratio, out=lost)
        return maps, self.means, self.ssim


def _pooled(maps: Floats) -> tuple[npt.NDArray[np.float64], ...]:
    """1-norms and 4-norms (means over the pixels) of (H, W, K) non-negative maps.

    Summed in double, as the tool does, by matrix-vector products with ones: one
    pass over memory for all K columns (numpy's reduction along the pixel axis of
    an (N, K) array accumulates row by row, several times slower); in bands, so
    the double copy stays small.
    """
    flat = maps.reshape(-1, maps.shape[-1])
    pixels = flat.shape[0]
    ones = np.ones(min(pixels, _BAND_PIXELS))
    one = np.zeros(flat.shape[1])
    four = np.zeros(flat.shape[1])
    for start in range(0, pixels, _BAND_PIXELS):
        band = flat[start : start + _BAND_PIXELS].astype(np.float64)
        weights = ones[: band.shape[0]]
        one += weights @ band
        np.multiply(band, band, out=band)
        np.multiply(band, band, out=band)
        four += weights @ band
    return one / pixels, np.sqrt(np.sqrt(four / pixels))


class _Pyramid:
    """The original's planes at every scale for one alpha background."""

    def __init__(self, pixels: npt.NDArray[np.uint8], background: float | None) -> None:
        self.background = background
        self.scales: list[_Scale] = []
        used = _weighted_channels(_scale_count(*pixels.shape[:2]))
        linear = _to_linear(pixels, background)
        for index, (means, ssim) in enumerate(used):
            if index:
                linear = _downsample(linear)
            self.scales.append(_Scale(_to_xyb(linear), means, ssim))

    def score(self, distorted: npt.NDArray[np.uint8], background: float | None) -> float:
        linear = _to_linear(distorted, background)
        # values[channel, scale, norm, map]: the tool's order of the weights.
        values = np.zeros((3, len(self.scales), 2, 3), dtype=np.float64)
        for index, ref in enumerate(self.scales):
            if index:
                linear = _downsample(linear)
            if not ref.means:
                continue
            ones, fours = ref.norms(_to_xyb(linear))
            means, ssim = ref.means, ref.ssim
            s, k = len(ssim), len(means)
            values[ssim, index, 0, 0], values[ssim, index, 1, 0] = ones[:s], fours[:s]
            ring, blur = slice(s, s + k), slice(s + k, s + 2 * k)
            values[means, index, 0, 1], values[means, index, 1, 1] = ones[ring], fours[ring]
            values[means, index, 0, 2], values[means, index, 1, 2] = ones[blur], fours[blur]
        return _final_score(values.reshape(-1))


def _final_score(values: npt.NDArray[np.float64]) -> float:
    # With fewer than six scales the tool still takes the weights in sequence,
    # so they shift against the scales; kept for agreement with its scores.
    total = float(np.dot(_WEIGHTS[: len(values)], np.abs(values))) * 0.9562382616834844
    total = (
        2.326765642916932 * total
        - 0.020884521182843837 * total**2
        + 6.248496625763138e-05 * total**3
    )
    if total > 0:
        return 100.0 - 10.0 * math.pow(total, 0.6276336467831387)
    return 100.0


def _check(pixels: npt.NDArray[np.uint8], what: str) -> None:
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(
            f"{what}: expected an HxWx3 or HxWx4 uint8 array, got {pixels.dtype} {pixels.shape}"
        )


class Reference:
    """The original image prepared once: linear/XYB planes and their blurs at every scale."""

    def __init__(self, pixels: npt.NDArray[np.uint8]) -> None:
        _check(pixels, "reference")
        height, width = pixels.shape[:2]
        if height < MIN_SIDE or width < MIN_SIDE:
            raise ValueError(
                f"SSIMULACRA 2 needs at least {MIN_SIDE}x{MIN_SIDE} pixels, got {width}x{height}"
            )
        self.shape = (height, width)
        self._has_alpha = pixels.shape[2] == 4
        # A fully opaque alpha blends to the same planes over any background.
        self._opaque = not self._has_alpha or bool(pixels[:, :, 3].min() == 255)
        if self._opaque:
            self._pyramids = [_Pyramid(pixels, None)]
        else:
            self._pyramids = [_Pyramid(pixels, bg) for bg in _ALPHA_BACKGROUNDS]

    def score(self, distorted: npt.NDArray[np.uint8]) -> float:
        """SSIMULACRA 2.1 score of ``distorted`` (same size, uint8 sRGB) against this original."""
        _check(distorted, "distorted")
        if distorted.shape[:2] != self.shape:
            raise ValueError(
                f"distorted image is {distorted.shape[1]}x{distorted.shape[0]}, "
                f"the reference {self.shape[1]}x{self.shape[0]}"
            )
        dist_opaque = distorted.shape[2] == 3 or bool(distorted[:, :, 3].min() == 255)
        if not self._has_alpha:
            # Only the distorted image has alpha: the tool blends it over mid grey.
            background = None if dist_opaque else _LONE_ALPHA_BACKGROUND
            return self._pyramids[0].score(distorted, background)
        if self._opaque:
            if dist_opaque:
                return self._pyramids[0].score(distorted, None)
            # An opaque original blends to itself: one pyramid serves both backgrounds.
            return min(self._pyramids[0].score(distorted, bg) for bg in _ALPHA_BACKGROUNDS)
        return min(p.score(distorted, p.background) for p in self._pyramids)


def score(reference: npt.NDArray[np.uint8], distorted: npt.NDArray[np.uint8]) -> float:
    """One-shot SSIMULACRA 2.1 score of ``distorted`` against ``reference``."""
    return Reference(reference).score(distorted)
