/* The kernels of _ssimulacra2.c, included twice there: once compiled for
 * AVX2 with FMA (K(name) = name_fast), once for any CPU (name_base). K and
 * TARGET are defined by the includer. */

/* x[i] + x[i - 2N] with zeros outside 0..L-1, in float32: _pair_sums' row i. */
TARGET static inline void K(pair_sums)(const float *x, Py_ssize_t i, Py_ssize_t length, Py_ssize_t radius,
                             Py_ssize_t cols, Py_ssize_t c0, Py_ssize_t width, float *s) {
    if (i < length) {
        memcpy(s, x + i * cols + c0, width * sizeof(float));
    } else {
        memset(s, 0, width * sizeof(float));
    }
    if (i >= 2 * radius) {
        const float *back = x + (i - 2 * radius) * cols + c0;
        for (Py_ssize_t c = 0; c < width; c++) s[c] += back[c];
    }
}

/* _RecursiveGaussian.vertical: one step per row, per resonator
 * y = f32(f32(neg_d1 * y1 - y2) + n2 * sum), the output (r1 + r2) + r0. */
TARGET static void K(vertical)(const float *x, float *out, Py_ssize_t length, Py_ssize_t cols,
                     Py_ssize_t radius, const coeffs_t *k) {
    float prev[3][TILE], prev2[3][TILE], s[TILE], y[3][TILE];
    Py_ssize_t steps = length + radius - 1;
    for (Py_ssize_t c0 = 0; c0 < cols; c0 += TILE) {
        Py_ssize_t width = cols - c0 < TILE ? cols - c0 : TILE;
        memset(prev, 0, sizeof prev);
        memset(prev2, 0, sizeof prev2);
        for (Py_ssize_t i = 0; i < steps; i++) {
            K(pair_sums)(x, i, length, radius, cols, c0, width, s);
            for (int r = 0; r < 3; r++) {
                const float nd1 = (float)k->neg_d1[r], n2 = (float)k->n2[r];
                float *p = prev[r], *p2 = prev2[r], *o = y[r];
                for (Py_ssize_t c = 0; c < width; c++) {
                    o[c] = fmaf(n2, s[c], fmaf(nd1, p[c], -p2[c]));
                    p2[c] = p[c];
                    p[c] = o[c];
                }
            }
            if (i >= radius - 1) {
                float *row = out + (i - radius + 1) * cols + c0;
                for (Py_ssize_t c = 0; c < width; c++) row[c] = (y[1][c] + y[2][c]) + y[0][c];
            }
        }
    }
}

/* _RecursiveGaussian.horizontal: single steps at the ends, blocks of four
 * outputs (libjxl's FastGaussian1D) in between. */
TARGET static void K(horizontal)(const float *x, float *out, Py_ssize_t length, Py_ssize_t cols,
                       Py_ssize_t radius, const coeffs_t *k) {
    float prev[3][TILE], prev2[3][TILE], s[4][TILE];
    float acc32[4][3][TILE];
    const Py_ssize_t first_aligned = ((radius + 1 + 3) / 4) * 4;
    for (Py_ssize_t c0 = 0; c0 < cols; c0 += TILE) {
        Py_ssize_t width = cols - c0 < TILE ? cols - c0 : TILE;
        memset(prev, 0, sizeof prev);
        memset(prev2, 0, sizeof prev2);
        Py_ssize_t n = -radius + 1;

#define SINGLE_STEP()                                                                   \
    do {                                                                                \
        K(pair_sums)(x, n + radius - 1, length, radius, cols, c0, width, s[0]);            \
        for (int r = 0; r < 3; r++) {                                                   \
            const float m0 = (float)k->mul_in[0][r];                                    \
            const float p0 = (float)k->mul_prev[0][r];                                  \
            for (Py_ssize_t c = 0; c < width; c++) {                                    \
                float o = s[0][c] * m0;                                                 \
                o -= prev2[r][c];                                                       \
                o = fmaf(p0, prev[r][c], o);                                            \
                prev2[r][c] = prev[r][c];                                               \
                prev[r][c] = o;                                                         \
            }                                                                           \
        }                                                                               \
        if (n >= 0) {                                                                   \
            float *row = out + n * cols + c0;                                           \
            for (Py_ssize_t c = 0; c < width; c++)                                      \
                row[c] = prev[0][c] + (prev[1][c] + prev[2][c]);                        \
        }                                                                               \
        n++;                                                                            \
    } while (0)

        while (n < (first_aligned < length ? first_aligned : length)) SINGLE_STEP();
        while (n < length - radius + 1 - 3) {
            Py_ssize_t base = n + radius - 1;
            for (int q = 0; q < 4; q++) K(pair_sums)(x, base + q, length, radius, cols, c0, width, s[q]);
            for (int j = 0; j < 4; j++) {
                for (int r = 0; r < 3; r++) {
                    /* Input 0 reaches every lane, multiplied in float32. */
                    const float m = (float)k->mul_in[j][r];
                    float *a = acc32[j][r];
                    for (Py_ssize_t c = 0; c < width; c++) a[c] = s[0][c] * m;
                    /* Input q reaches lanes q..3 with mul_in[j - q], one rounding each. */
                    for (int q = 1; q <= j; q++) {
                        const float mq = (float)k->mul_in[j - q][r];
                        for (Py_ssize_t c = 0; c < width; c++) a[c] = fmaf(mq, s[q][c], a[c]);
                    }
                    const float mp2 = (float)k->mul_prev2[j][r], mp = (float)k->mul_prev[j][r];
                    for (Py_ssize_t c = 0; c < width; c++)
                        a[c] = fmaf(mp, prev[r][c], fmaf(mp2, prev2[r][c], a[c]));
                }
            }
            for (int r = 0; r < 3; r++) {
                memcpy(prev2[r], acc32[2][r], width * sizeof(float));
                memcpy(prev[r], acc32[3][r], width * sizeof(float));
            }
            for (int j = 0; j < 4; j++) {
                float *row = out + (n + j) * cols + c0;
                for (Py_ssize_t c = 0; c < width; c++)
                    row[c] = (acc32[j][1][c] + acc32[j][2][c]) + acc32[j][0][c];
            }
            n += 4;
        }
        while (n < length) SINGLE_STEP();
#undef SINGLE_STEP
    }
}

/* The tool's MulAdd: a * b + c rounded once (numpy's _fma emulates it). */
#ifndef fma32
#define fma32 fmaf
#endif

/* _cube_root_and_add over n values: libjxl's cube root (an exponent-bits
 * guess, four Newton steps) plus add, in float32; x[i] >= 0. Written as flat
 * loops over arrays, branch-free, so that the compiler vectorises them. */

TARGET static void K(cube_root_and_add)(const float *x, float *out, Py_ssize_t n, float add) {
    int32_t bits[XYB_BLOCK];
    float r[XYB_BLOCK];
    memcpy(bits, x, n * sizeof(float));
    for (Py_ssize_t i = 0; i < n; i++) {
        int32_t guess = (int32_t)0x54800000 - (bits[i] >> 23) * (int32_t)0x002AAAAA;
        bits[i] = bits[i] == 0 ? 0 : guess;
    }
    memcpy(r, bits, n * sizeof(float));
    const float third = 1.0f / 3.0f, four_thirds = 4.0f / 3.0f;
    for (Py_ssize_t i = 0; i < n; i++) {
        const float neg_x_third = -(third * x[i]);
        float v = r[i];
        for (int step = 0; step < 3; step++) {
            float v2 = v * v;
            v = fma32(neg_x_third, v2 * v2, four_thirds * v);
        }
        float v2 = v * v;
        v = fma32(third, fma32(-x[i], v2 * v2, v), v);
        out[i] = fma32(v * v, x[i], add);
    }
}

/* _to_xyb: (P, 3) linear sRGB -> (P, 3) positive XYB. m: the opsin matrix
 * (9 floats, rows L M S), bias, neg_bias_cbrt: as ssimulacra2.py holds them. */
TARGET static void K(to_xyb)(const float *lin, float *out, Py_ssize_t pixels, const float *m, float bias,
                   float neg_bias_cbrt) {
    float plane[3][XYB_BLOCK], mixed[XYB_BLOCK], lms[3][XYB_BLOCK];
    for (Py_ssize_t p0 = 0; p0 < pixels; p0 += XYB_BLOCK) {
        const Py_ssize_t n = pixels - p0 < XYB_BLOCK ? pixels - p0 : XYB_BLOCK;
        const float *in = lin + 3 * p0;
        for (Py_ssize_t i = 0; i < n; i++) {
            plane[0][i] = in[3 * i];
            plane[1][i] = in[3 * i + 1];
            plane[2][i] = in[3 * i + 2];
        }
        for (int row = 0; row < 3; row++) {
            const float m0 = m[3 * row], m1 = m[3 * row + 1], m2 = m[3 * row + 2];
            for (Py_ssize_t i = 0; i < n; i++) {
                float v = fma32(plane[0][i], m0, fma32(plane[1][i], m1, fma32(plane[2][i], m2, bias)));
                mixed[i] = v > 0.0f ? v : 0.0f; /* np.maximum(v, 0) */
            }
            K(cube_root_and_add)(mixed, lms[row], n, neg_bias_cbrt);
        }
        float *o = out + 3 * p0;
        const float half = 0.5f;
        for (Py_ssize_t i = 0; i < n; i++) {
            const float y = half * (lms[0][i] + lms[1][i]);
            o[3 * i] = half * (lms[0][i] - lms[1][i]) * 14.0f + 0.42f;
            o[3 * i + 1] = y + 0.01f;
            o[3 * i + 2] = (lms[2][i] - y) + 0.55f;
        }
    }
}

/* Adds x[0..n) and their 4th powers (in double) to sums[0] and fours[0], with
 * four partial sums each, so the loop vectorises. */
TARGET static inline void K(accumulate)(const float *x, Py_ssize_t n, double *sums, double *fours) {
    double a[4] = {0, 0, 0, 0}, b[4] = {0, 0, 0, 0};
    Py_ssize_t i = 0;
    for (; i + 4 <= n; i += 4) {
        for (int l = 0; l < 4; l++) {
            const double d = x[i + l], d2 = d * d;
            a[l] += d;
            b[l] += d2 * d2;
        }
    }
    for (; i < n; i++) {
        const double d = x[i], d2 = d * d;
        a[0] += d;
        b[0] += d2 * d2;
    }
    *sums += (a[0] + a[1]) + (a[2] + a[3]);
    *fours += (b[0] + b[1]) + (b[2] + b[3]);
}


TARGET static void K(error_sums)(const float *blurred, const float *dist, const float *mu,
                                     const float *edge, const float *variance, Py_ssize_t pixels,
                                     const int32_t *mean_channels, Py_ssize_t k,
                                     const int32_t *ssim_at, Py_ssize_t s, double *sums) {
    const Py_ssize_t width = k + 2 * s, maps = s + 2 * k;
    const float one = 1.0f, c2 = 0.0009f;
    float error[ERROR_BLOCK], artifact[ERROR_BLOCK], lost[ERROR_BLOCK];
    memset(sums, 0, 2 * maps * sizeof(double));
    /* Partial double sums per block and lane (numpy sums in yet another
     * order): over 100 MP the rounding stays near 1e-8 of a sum, far below
     * what a score shows. */
    for (Py_ssize_t p0 = 0; p0 < pixels; p0 += ERROR_BLOCK) {
        const Py_ssize_t n = pixels - p0 < ERROR_BLOCK ? pixels - p0 : ERROR_BLOCK;
        const float *bl = blurred + p0 * width;
        for (Py_ssize_t i = 0; i < s; i++) {
            const Py_ssize_t at = ssim_at[i];
            const float *m1 = mu + p0 * k + at, *var = variance + p0 * s + i;
            for (Py_ssize_t q = 0; q < n; q++) {
                const float mu1 = m1[q * k], mu2 = bl[q * width + at];
                float num_m = mu1 - mu2;
                num_m *= num_m;
                num_m = one - num_m;
                float num_s = bl[q * width + k + s + i] - mu1 * mu2;
                num_s *= 2.0f;
                num_s += c2;
                float denom_s = bl[q * width + k + i] - mu2 * mu2;
                denom_s += var[q * s];
                denom_s += c2;
                num_m *= num_s;
                num_m /= denom_s;
                const float e = one - num_m;
                error[q] = e > 0.0f ? e : 0.0f;
            }
            K(accumulate)(error, n, &sums[i], &sums[maps + i]);
        }
        for (Py_ssize_t j = 0; j < k; j++) {
            const float *d = dist + 3 * p0 + mean_channels[j], *ed = edge + p0 * k + j;
            for (Py_ssize_t q = 0; q < n; q++) {
                float ratio = fabsf(d[3 * q] - bl[q * width + j]);
                ratio += one;
                ratio /= ed[q * k];
                ratio -= one;
                const float a = ratio > 0.0f ? ratio : 0.0f;
                artifact[q] = a;
                lost[q] = a - ratio;
            }
            K(accumulate)(artifact, n, &sums[s + j], &sums[maps + s + j]);
            K(accumulate)(lost, n, &sums[s + k + j], &sums[maps + s + k + j]);
        }
    }
}

/* The blur of one scale's stacked planes, as ssimulacra2 _stacked then
 * _RecursiveGaussian.blur: the planes are, per pixel, xyb[means[j]] (k of
 * them), xyb[ssim[i]]^2 (s), and ref[i] * xyb[ssim[i]] (s, when ref is given),
 * in float32. The horizontal pass runs on bands of T rows gathered into a
 * (W, T*C) scratch (the numpy twin transposes the whole image instead), the
 * vertical pass on the (H, W*C) result. out: (H, W, C). */
TARGET static int K(blur_stack)(const float *xyb, const float *ref, Py_ssize_t height, Py_ssize_t width,
                      const int32_t *means, Py_ssize_t k, const int32_t *ssim, Py_ssize_t s,
                      float *out, Py_ssize_t radius, const coeffs_t *coeffs) {
    const Py_ssize_t c_n = k + s + (ref ? s : 0);
    Py_ssize_t band = TILE / c_n;
    if (band < 1) band = 1;
    float *mid = malloc((size_t)(height * width * c_n) * sizeof(float));
    float *in = malloc((size_t)(width * band * c_n) * sizeof(float));
    float *across = malloc((size_t)(width * band * c_n) * sizeof(float));
    if (!mid || !in || !across) {
        free(mid);
        free(in);
        free(across);
        return -1;
    }
    for (Py_ssize_t h0 = 0; h0 < height; h0 += band) {
        const Py_ssize_t rows = height - h0 < band ? height - h0 : band, cols = rows * c_n;
        /* Plane by plane, strided: a loop per plane vectorises, a loop over
         * the planes of each pixel does not. */
        for (Py_ssize_t t = 0; t < rows; t++) {
            const float *px = xyb + (h0 + t) * width * 3;
            float *col = in + t * c_n;
            for (Py_ssize_t j = 0; j < k; j++) {
                const float *src = px + means[j];
                for (Py_ssize_t w = 0; w < width; w++) col[w * cols + j] = src[3 * w];
            }
            for (Py_ssize_t i = 0; i < s; i++) {
                const float *src = px + ssim[i];
                for (Py_ssize_t w = 0; w < width; w++) {
                    const float v = src[3 * w];
                    col[w * cols + k + i] = v * v;
                }
                if (ref) {
                    const float *pr = ref + (h0 + t) * width * s + i;
                    for (Py_ssize_t w = 0; w < width; w++)
                        col[w * cols + k + s + i] = pr[w * s] * src[3 * w];
                }
            }
        }
        K(horizontal)(in, across, width, cols, radius, coeffs);
        for (Py_ssize_t t = 0; t < rows; t++) {
            float *dst = mid + (h0 + t) * width * c_n;
            const float *src = across + t * c_n;
            for (Py_ssize_t c = 0; c < c_n; c++)
                for (Py_ssize_t w = 0; w < width; w++) dst[w * c_n + c] = src[w * cols + c];
        }
    }
    free(in);
    free(across);
    K(vertical)(mid, out, height, width * c_n, radius, coeffs);
    free(mid);
    return 0;
}

/* _downsample: (H, W, 3) -> (ceil(H/2), ceil(W/2), 3), 2x2 box averages in the
 * numpy twin's order, an odd last row or column paired with itself. */
TARGET static void K(downsample)(const float *in, float *out, Py_ssize_t height,
                                     Py_ssize_t width) {
    const Py_ssize_t h2 = (height + 1) / 2, w2 = (width + 1) / 2;
    for (Py_ssize_t y = 0; y < h2; y++) {
        const float *r0 = in + (2 * y) * width * 3;
        const float *r1 = 2 * y + 1 < height ? r0 + width * 3 : r0;
        float *o = out + y * w2 * 3;
        for (Py_ssize_t x = 0; x < w2; x++) {
            const Py_ssize_t x0 = 2 * x, x1 = 2 * x + 1 < width ? 2 * x + 1 : 2 * x;
            for (int c = 0; c < 3; c++) {
                float v = r0[3 * x0 + c] + r0[3 * x1 + c];
                v += r1[3 * x0 + c];
                v += r1[3 * x1 + c];
                o[3 * x + c] = v * 0.25f;
            }
        }
    }
}

