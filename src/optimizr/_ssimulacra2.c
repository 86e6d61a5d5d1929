/* The hot loops of optimizr.ssimulacra2, in C (issue 14: the metric must run at
 * least as fast as the reference tool per megapixel, and the search within 5x
 * the CPU of a fixed-quality run).
 *
 * Each function here does the float32 arithmetic of its numpy twin in
 * ssimulacra2.py, operation by operation and in the same order, which is the
 * reference tool's order. Where the tool fuses a multiply and an add (its
 * MulAdd), this code calls fmaf: one rounding, as the tool's hardware FMA;
 * the numpy twin emulates it in double, which rounds twice and so differs in
 * rare ties by one unit in the last place (tests/test_ssimulacra2.py bounds
 * the difference; the agreement with the tool is tested on this path).
 * Compiled with -ffp-contract=off: a compiler that fused other a*b+c on its
 * own would change the roundings.
 *
 * The recursive passes run along axis 0 of an (L, M) float32 array whose M
 * columns are independent, the inner loop over columns (which the compiler
 * vectorises), in tiles of columns so the recursion state stays in cache.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Coefficients as ssimulacra2._RecursiveGaussian holds them (float32 values in
 * doubles): n2[3], neg_d1[3], mul_in[4][3], mul_prev[4][3], mul_prev2[4][3]. */
#define N_COEFFS 42

typedef struct {
    double n2[3], neg_d1[3];
    double mul_in[4][3], mul_prev[4][3], mul_prev2[4][3];
} coeffs_t;

#define TILE 256

static void unpack(const double *c, coeffs_t *k) {
    memcpy(k->n2, c, 3 * sizeof(double));
    memcpy(k->neg_d1, c + 3, 3 * sizeof(double));
    memcpy(k->mul_in, c + 6, 12 * sizeof(double));
    memcpy(k->mul_prev, c + 18, 12 * sizeof(double));
    memcpy(k->mul_prev2, c + 30, 12 * sizeof(double));
}

#define XYB_BLOCK 512
#define ERROR_BLOCK 512

/* The kernels, twice on x86-64: for CPUs with AVX2 and FMA (twice the lanes
 * of the SSE2 baseline, and one-instruction fmaf) and for any CPU (where fmaf
 * is libm's, exact but slow); the module picks one when it loads. The same
 * operations either way, so the same bits. */
#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_FAST 1
#define K(name) name##_fast
#define TARGET __attribute__((target("avx2,fma")))
#include "_ssimulacra2_kernels.h"
#undef K
#undef TARGET
#endif
#define K(name) name##_base
#define TARGET
#include "_ssimulacra2_kernels.h"
#undef K
#undef TARGET

typedef struct {
    void (*vertical)(const float *, float *, Py_ssize_t, Py_ssize_t, Py_ssize_t, const coeffs_t *);
    void (*horizontal)(const float *, float *, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                       const coeffs_t *);
    void (*to_xyb)(const float *, float *, Py_ssize_t, const float *, float, float);
    void (*error_sums)(const float *, const float *, const float *, const float *, const float *,
                       Py_ssize_t, const int32_t *, Py_ssize_t, const int32_t *, Py_ssize_t,
                       double *);
    int (*blur_stack)(const float *, const float *, Py_ssize_t, Py_ssize_t, const int32_t *,
                      Py_ssize_t, const int32_t *, Py_ssize_t, float *, Py_ssize_t,
                      const coeffs_t *);
    void (*downsample)(const float *, float *, Py_ssize_t, Py_ssize_t);
    const char *name;
} kernels_t;

static const kernels_t base_kernels = {
    vertical_base, horizontal_base, to_xyb_base, error_sums_base,
    blur_stack_base, downsample_base, "baseline",
};
#ifdef HAVE_FAST
static const kernels_t fast_kernels = {
    vertical_fast, horizontal_fast, to_xyb_fast, error_sums_fast,
    blur_stack_fast, downsample_fast, "avx2+fma",
};
#endif
static const kernels_t *kernels = &base_kernels;

static PyObject *py_to_xyb(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer lin, out, matrix;
    Py_ssize_t pixels;
    float bias, neg_bias_cbrt;
    if (!PyArg_ParseTuple(args, "y*w*ny*ff", &lin, &out, &pixels, &matrix, &bias, &neg_bias_cbrt))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t need = pixels * 3 * (Py_ssize_t)sizeof(float);
    if (pixels < 0 || lin.len < need || out.len < need ||
        matrix.len != 9 * (Py_ssize_t)sizeof(float)) {
        PyErr_SetString(PyExc_ValueError, "to_xyb: buffer sizes do not match");
    } else {
        Py_BEGIN_ALLOW_THREADS
        kernels->to_xyb((const float *)lin.buf, (float *)out.buf, pixels, (const float *)matrix.buf, bias,
               neg_bias_cbrt);
        Py_END_ALLOW_THREADS
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&lin);
    PyBuffer_Release(&out);
    PyBuffer_Release(&matrix);
    return result;
}

/* _Scale.errors followed by _pooled, without the maps: per pixel the 1 - SSIM'
 * of each SSIM channel and the ringing and blurring of each mean channel, in
 * the numpy twin's float32 operations, summed (and their 4th powers) in
 * double. Inputs, all float32 with P rows:
 *   blurred (P, k + 2s): the distorted means, squares and cross products, blurred;
 *   dist (P, 3): the distorted XYB; mean_channels[k]: which of its channels;
 *   mu (P, k), edge (P, k), variance (P, s): the original's;
 *   ssim_at[s]: where each SSIM channel sits among the k means.
 * sums (2 (s + 2k) doubles): the sums, then the sums of 4th powers, per map in
 * the order SSIM, ringing, blurring. */
static PyObject *py_error_sums(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer blurred, dist, mu, edge, variance, means, ssim_at, sums;
    Py_ssize_t pixels;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*ny*y*w*", &blurred, &dist, &mu, &edge, &variance,
                          &pixels, &means, &ssim_at, &sums))
        return NULL;
    PyObject *result = NULL;
    const Py_ssize_t f = sizeof(float);
    const Py_ssize_t k = means.len / (Py_ssize_t)sizeof(int32_t);
    const Py_ssize_t s = ssim_at.len / (Py_ssize_t)sizeof(int32_t);
    if (pixels < 0 || blurred.len < pixels * (k + 2 * s) * f || dist.len < pixels * 3 * f ||
        mu.len < pixels * k * f || edge.len < pixels * k * f || variance.len < pixels * s * f ||
        sums.len != 2 * (s + 2 * k) * (Py_ssize_t)sizeof(double)) {
        PyErr_SetString(PyExc_ValueError, "error_sums: buffer sizes do not match");
    } else {
        Py_BEGIN_ALLOW_THREADS
        kernels->error_sums((const float *)blurred.buf, (const float *)dist.buf, (const float *)mu.buf,
                   (const float *)edge.buf, (const float *)variance.buf, pixels,
                   (const int32_t *)means.buf, k, (const int32_t *)ssim_at.buf, s,
                   (double *)sums.buf);
        Py_END_ALLOW_THREADS
        result = Py_None;
        Py_INCREF(result);
    }
    Py_buffer *all[] = {&blurred, &dist, &mu, &edge, &variance, &means, &ssim_at, &sums};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) PyBuffer_Release(all[i]);
    return result;
}

/* blur_stack(xyb, ref_or_None, height, width, means, ssim, out, radius, coeffs). */
static PyObject *py_blur_stack(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer xyb, means, ssim, out, coeffs, ref = {0};
    PyObject *ref_obj;
    Py_ssize_t height, width, radius;
    if (!PyArg_ParseTuple(args, "y*Onny*y*w*ny*", &xyb, &ref_obj, &height, &width, &means, &ssim,
                          &out, &radius, &coeffs))
        return NULL;
    PyObject *result = NULL;
    int have_ref = ref_obj != Py_None;
    if (have_ref && PyObject_GetBuffer(ref_obj, &ref, PyBUF_SIMPLE) < 0) goto done;
    {
        const Py_ssize_t f = sizeof(float);
        const Py_ssize_t k = means.len / (Py_ssize_t)sizeof(int32_t);
        const Py_ssize_t s = ssim.len / (Py_ssize_t)sizeof(int32_t);
        const Py_ssize_t c_n = k + s + (have_ref ? s : 0), pixels = height * width;
        if (height < 1 || width < 1 || c_n < 1 || radius < 1 || xyb.len < pixels * 3 * f ||
            out.len < pixels * c_n * f || (have_ref && ref.len < pixels * s * f) ||
            coeffs.len != N_COEFFS * (Py_ssize_t)sizeof(double)) {
            PyErr_SetString(PyExc_ValueError, "blur_stack: buffer sizes do not match");
            goto done;
        }
        coeffs_t kc;
        unpack((const double *)coeffs.buf, &kc);
        int failed;
        Py_BEGIN_ALLOW_THREADS
        failed = kernels->blur_stack((const float *)xyb.buf, have_ref ? (const float *)ref.buf : NULL,
                            height, width, (const int32_t *)means.buf, k,
                            (const int32_t *)ssim.buf, s, (float *)out.buf, radius, &kc);
        Py_END_ALLOW_THREADS
        if (failed) {
            PyErr_NoMemory();
            goto done;
        }
        result = Py_None;
        Py_INCREF(result);
    }
done:
    if (have_ref && ref.buf) PyBuffer_Release(&ref);
    PyBuffer_Release(&xyb);
    PyBuffer_Release(&means);
    PyBuffer_Release(&ssim);
    PyBuffer_Release(&out);
    PyBuffer_Release(&coeffs);
    return result;
}

static PyObject *py_downsample(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer in, out;
    Py_ssize_t height, width;
    if (!PyArg_ParseTuple(args, "y*w*nn", &in, &out, &height, &width)) return NULL;
    PyObject *result = NULL;
    const Py_ssize_t f = sizeof(float);
    if (height < 1 || width < 1 || in.len < height * width * 3 * f ||
        out.len < ((height + 1) / 2) * ((width + 1) / 2) * 3 * f) {
        PyErr_SetString(PyExc_ValueError, "downsample: buffer sizes do not match");
    } else {
        Py_BEGIN_ALLOW_THREADS
        kernels->downsample((const float *)in.buf, (float *)out.buf, height, width);
        Py_END_ALLOW_THREADS
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    return result;
}


typedef void (*pass_fn)(const float *, float *, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                        const coeffs_t *);

/* pass(x, out, length, cols, radius, coeffs): x and out C-contiguous float32
 * buffers of length * cols values, coeffs a buffer of 42 doubles. */
static PyObject *run_pass(PyObject *args, pass_fn fn) {
    Py_buffer x, out, coeffs;
    Py_ssize_t length, cols, radius;
    if (!PyArg_ParseTuple(args, "y*w*nnny*", &x, &out, &length, &cols, &radius, &coeffs))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t need = length * cols * (Py_ssize_t)sizeof(float);
    if (length < 0 || cols < 0 || radius < 1 || x.len < need || out.len < need) {
        PyErr_SetString(PyExc_ValueError, "buffers do not match length * cols float32 values");
    } else if (coeffs.len != N_COEFFS * (Py_ssize_t)sizeof(double)) {
        PyErr_SetString(PyExc_ValueError, "coeffs must be 42 float64 values");
    } else {
        coeffs_t k;
        unpack((const double *)coeffs.buf, &k);
        Py_BEGIN_ALLOW_THREADS
        fn((const float *)x.buf, (float *)out.buf, length, cols, radius, &k);
        Py_END_ALLOW_THREADS
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    PyBuffer_Release(&coeffs);
    return result;
}

static PyObject *py_vertical(PyObject *self, PyObject *args) {
    (void)self;
    return run_pass(args, kernels->vertical);
}

static PyObject *py_horizontal(PyObject *self, PyObject *args) {
    (void)self;
    return run_pass(args, kernels->horizontal);
}

/* use_kernels(name) -> the previous name: "baseline" or "avx2+fma" (where the
 * CPU has it), for tests and measurements of the path other CPUs take. */
static PyObject *py_use_kernels(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    const kernels_t *chosen = NULL;
    if (strcmp(name, base_kernels.name) == 0) chosen = &base_kernels;
#ifdef HAVE_FAST
    if (strcmp(name, fast_kernels.name) == 0 && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma"))
        chosen = &fast_kernels;
#endif
    if (!chosen) {
        PyErr_Format(PyExc_ValueError, "kernels %s are not available here", name);
        return NULL;
    }
    const char *previous = kernels->name;
    kernels = chosen;
    PyObject *said = PyUnicode_FromString(chosen->name);
    int failed = said == NULL || PyObject_SetAttrString(self, "KERNELS", said) < 0;
    Py_XDECREF(said);
    if (failed) return NULL;
    return PyUnicode_FromString(previous);
}

static PyMethodDef methods[] = {
    {"use_kernels", py_use_kernels, METH_VARARGS, "Choose the kernels; returns the previous."},
    {"vertical", py_vertical, METH_VARARGS, "The recursive Gaussian's vertical pass."},
    {"horizontal", py_horizontal, METH_VARARGS, "The recursive Gaussian's horizontal pass."},
    {"blur_stack", py_blur_stack, METH_VARARGS, "One scale's stacked planes, blurred."},
    {"downsample", py_downsample, METH_VARARGS, "2x2 box average."},
    {"to_xyb", py_to_xyb, METH_VARARGS, "Linear sRGB to positive XYB."},
    {"error_sums", py_error_sums, METH_VARARGS, "The pooled error maps of one scale."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ssimulacra2", "The C loops of optimizr.ssimulacra2.", -1, methods,
};

PyMODINIT_FUNC PyInit__ssimulacra2(void) {
#ifdef HAVE_FAST
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) kernels = &fast_kernels;
#endif
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddStringConstant(m, "KERNELS", kernels->name) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
