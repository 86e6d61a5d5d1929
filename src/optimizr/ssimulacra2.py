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
   scale.

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
"""

from __future__ import annotations

import functools
import math

import numpy as np
import numpy.typing as npt

__all__ = ["MIN_SIDE", "Reference", "score"]

Floats = npt.NDArray[np.float32]

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

    def _pair_sums(self, x: Floats) -> Floats:
        """x[n-N-1] + x[n+N-1] for n = -N+1 .. L-1 (zero outside), float32."""
        n = self.radius
        length = x.shape[0]
        padded = np.zeros((length + 3 * n, *x.shape[1:]), dtype=np.float32)
        padded[2 * n : 2 * n + length] = x
        steps = length + n - 1
        return padded[:steps] + padded[2 * n : 2 * n + steps]

    def vertical(self, x: Floats) -> Floats:
        """Along axis 0 of (L, M): libjxl's VerticalStrip, one FMA step per row."""
        n = self.radius
        sums = self._pair_sums(x)
        steps = sums.shape[0]
        n2s = np.multiply(sums[:, None, :], self.n2, dtype=np.float64)
        y = np.zeros((steps + 2, 3, x.shape[1]), dtype=np.float32)
        neg_d1 = self.neg_d1
        inner = np.empty((3, x.shape[1]), dtype=np.float64)
        inner32 = np.empty((3, x.shape[1]), dtype=np.float32)
        for i in range(steps):
            # MulAdd(n2, sum, NegMulSub(d1, y[n-1], y[n-2])): two roundings.
            np.multiply(y[i + 1], neg_d1, out=inner)
            np.subtract(inner, y[i], out=inner)
            np.copyto(inner32, inner, casting="same_kind")
            np.add(n2s[i], inner32, out=inner)
            np.copyto(y[i + 2], inner, casting="same_kind")
        out = y[n + 1 :]
        summed: Floats = out[:, 0] + (out[:, 1] + out[:, 2])
        return summed

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
        while n < length - n_r + 1 - 3:
            base = n + n_r - 1
            o = np.multiply(sums[base], shifted[0], dtype=np.float32)
            for q in (1, 2, 3):
                o = _fma(sums[base + q], shifted[q], o)
            o = _fma(prev2, self.mul_prev2, o)
            o = _fma(prev, self.mul_prev, o)
            prev2, prev = o[2], o[3]
            out[n : n + 4] = o[:, 0] + (o[:, 1] + o[:, 2])
            n += 4
        while n < length:
            single(n)
            n += 1
        return out

    def blur(self, planes: Floats) -> Floats:
        """(H, W, C) planes blurred as the tool does: horizontal pass, then vertical."""
        h, w, c = planes.shape
        rows = np.ascontiguousarray(planes.transpose(1, 0, 2)).reshape(w, h * c)
        across = self.horizontal(rows).reshape(w, h, c)
        down = np.ascontiguousarray(across.transpose(1, 0, 2)).reshape(h, w * c)
        return self.vertical(down).reshape(h, w, c)


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
    (enc_xyb.cc LinearRGBToXYB, then ssimulacra2's MakePositiveXYB)."""
    red, green, blue = linear[..., 0], linear[..., 1], linear[..., 2]
    mixed = []
    for row in _OPSIN:
        m = _fma(red, row[0], _fma(green, row[1], _fma(blue, row[2], _OPSIN_BIAS)))
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


_GAUSSIAN = _RecursiveGaussian(_SIGMA)


class _Scale:
    """The original's side of one scale: XYB, its local mean and variance, its edges."""

    __slots__ = ("detail", "mu", "variance", "xyb")

    def __init__(self, xyb: Floats) -> None:
        self.xyb = xyb
        blurred = _GAUSSIAN.blur(np.concatenate([xyb, xyb * xyb], axis=2))
        self.mu = blurred[..., :3]
        self.variance = blurred[..., 3:] - self.mu * self.mu
        # 1 + |x - mu| in double, as the tool's edge map takes it.
        self.detail = np.abs(xyb - self.mu).astype(np.float64) + 1.0


def _norms(error: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], ...]:
    """Per-channel 1-norm and 4-norm (means over the pixels) of a non-negative map."""
    pixels = error.shape[0] * error.shape[1]
    flat = error.reshape(pixels, 3)
    one = flat.sum(axis=0) / pixels
    squared = flat * flat
    four = np.sqrt(np.sqrt((squared * squared).sum(axis=0) / pixels))
    return one, four


class _Pyramid:
    """The original's planes at every scale for one alpha background."""

    def __init__(self, pixels: npt.NDArray[np.uint8], background: float | None) -> None:
        self.background = background
        self.scales: list[_Scale] = []
        linear = _to_linear(pixels, background)
        for index in range(_SCALES):
            # The tool checks the size of the previous scale before halving, so
            # the last scale it computes can be under 8 px (ssimulacra2.cc).
            if linear.shape[0] < MIN_SIDE or linear.shape[1] < MIN_SIDE:
                break
            if index:
                linear = _downsample(linear)
            self.scales.append(_Scale(_to_xyb(linear)))

    def score(self, distorted: npt.NDArray[np.uint8], background: float | None) -> float:
        linear = _to_linear(distorted, background)
        # values[channel, scale, norm, map]: the tool's order of the weights.
        values = np.zeros((3, len(self.scales), 2, 3), dtype=np.float64)
        one, c2 = _F(1.0), _F(_C2)
        for index, ref in enumerate(self.scales):
            if index:
                linear = _downsample(linear)
            xyb = _to_xyb(linear)
            blurred = _GAUSSIAN.blur(np.concatenate([xyb, xyb * xyb, ref.xyb * xyb], axis=2))
            mu = blurred[..., :3]
            # SSIM without its luminance denominator (see the tool's SSIMMap),
            # float32 in the tool's order, 1 - SSIM' in double.
            diff = ref.mu - mu
            num_m = one - diff * diff
            num_s = _F(2.0) * (blurred[..., 6:] - ref.mu * mu) + c2
            denom_s = (ref.variance + (blurred[..., 3:6] - mu * mu)) + c2
            error = 1.0 - ((num_m * num_s) / denom_s).astype(np.float64)
            np.maximum(error, 0.0, out=error)
            values[:, index, 0, 0], values[:, index, 1, 0] = _norms(error)
            # > 0: edges the original lacks (ringing, banding, blocking);
            # < 0: edges the distorted image lost (blurring, smearing).
            ratio = (np.abs(xyb - mu).astype(np.float64) + 1.0) / ref.detail - 1.0
            values[:, index, 0, 1], values[:, index, 1, 1] = _norms(np.maximum(ratio, 0.0))
            values[:, index, 0, 2], values[:, index, 1, 2] = _norms(np.maximum(-ratio, 0.0))
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
