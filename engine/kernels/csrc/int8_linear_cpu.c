/* INT8 weight-only linear on the CPU (W8A16 / W8A32): out = x @ (w * scale)^T + bias
 *
 *   x      [M, K]  bf16 or fp32, rows strided (row stride xs, last dim contiguous)
 *   w      [N, K]  int8, contiguous
 *   scale  [N, G]  fp32, G groups of K / G columns (G = 1: per output channel)
 *   bias   [N]     x's dtype, or NULL
 *   out    [M, N]  x's dtype, rows strided (os)
 *
 * For few rows (decode) the product is bound by reading w, so w is read once per call
 * as int8 (half bf16's bytes) and widened in registers: 16 weights -> 16 int32
 * (vpmovsxbd) -> 16 fp32, then one FMA per activation row held in registers. A tile is
 * R = 4 output rows x MB <= 4 activation rows: 16 accumulators + 4 weight vectors + 1
 * activation vector of the 32 zmm; the 4 rows' weights (4 K bytes) stay in L1 while the
 * next 4 activation rows pass over them. The per-channel scale multiplies each output
 * once at the end; a group's scale multiplies its widened weights (groups of a multiple
 * of 16 columns). bf16 activations are widened to fp32 once per call (exact), so every
 * product and sum is fp32 and each output is rounded once. Threads split N.
 *
 * AVX-512 F+BW only (masked byte loads for a K tail): elsewhere int8_linear_supported()
 * is 0 and engine/quant/ops.py keeps its torch path.
 */
#include "cpu_vec.h"
#include <stdlib.h>

/* Prefill rows go to the dense GEMM on w dequantized per call: out = bf16(w * scale),
 * scale already rounded to bf16, so each product is exact in fp32 and rounds once, as
 * torch's bf16 multiply does (engine/quant/ops.py dequantize): bit-equal, one pass. */
int int8_dequant_bf16(const int8_t *w, const float *scale, int groups, uint16_t *out,
                      int64_t N, int64_t K, int threads) {
    int64_t gs = K / groups;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t n = 0; n < N; n++)
        for (int64_t g = 0; g < groups; g++) {
            float s = scale[n * groups + g];
            const int8_t *src = w + n * K + g * gs;
            uint16_t *dst = out + n * K + g * gs;
#pragma omp simd
            for (int64_t k = 0; k < gs; k++) dst[k] = f32_to_bf16((float)src[k] * s);
        }
    return 0;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

int int8_linear_supported(void) { return 1; }

#define R 4
#define MBMAX 4

typedef struct {
    const int8_t *w;
    const float *x, *scale;
    int64_t K, xs, groups, gsize;
} tile_args;

static inline __attribute__((always_inline)) __m512 widen(const int8_t *p, __mmask16 mask,
                                                         int full) {
    _mm_prefetch((const char *)p + 4096, _MM_HINT_T0); /* 4 rows: 4 streams to keep ahead */
    __m128i b = full ? _mm_loadu_si128((const __m128i *)p) : _mm_maskz_loadu_epi8(mask, p);
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}

/* acc[r][m] += w[r, k:k+16] . x[m, k:k+16] (times sv[r] when grouped). */
static inline __attribute__((always_inline)) void step(const tile_args *a, int64_t k,
                                                       __mmask16 mask, int full, int rows,
                                                       int mb, int grouped, const __m512 *sv,
                                                       __m512 acc[R][MBMAX]) {
    __m512 wv[R];
    for (int r = 0; r < rows; r++) {
        wv[r] = widen(a->w + r * a->K + k, mask, full);
        if (grouped) wv[r] = _mm512_mul_ps(wv[r], sv[r]);
    }
    for (int m = 0; m < mb; m++) {
        const float *xp = a->x + m * a->xs + k;
        __m512 xv = full ? _mm512_loadu_ps(xp) : _mm512_maskz_loadu_ps(mask, xp);
        for (int r = 0; r < rows; r++) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
}

/* One tile: rows x mb dot products of length K into res[r * MBMAX + m]. */
static inline __attribute__((always_inline)) void tile(const tile_args *a, int rows, int mb,
                                                       int grouped, float *res) {
    __m512 acc[R][MBMAX], sv[R];
    for (int r = 0; r < rows; r++)
        for (int m = 0; m < mb; m++) acc[r][m] = _mm512_setzero_ps();
    if (grouped) {
        for (int64_t g = 0; g < a->groups; g++) {
            for (int r = 0; r < rows; r++) sv[r] = _mm512_set1_ps(a->scale[r * a->groups + g]);
            for (int64_t k = g * a->gsize; k < (g + 1) * a->gsize; k += 16)
                step(a, k, 0xffff, 1, rows, mb, 1, sv, acc);
        }
    } else {
        int64_t k = 0;
        for (; k + 16 <= a->K; k += 16) step(a, k, 0xffff, 1, rows, mb, 0, sv, acc);
        if (k < a->K) step(a, k, (__mmask16)((1u << (a->K - k)) - 1), 0, rows, mb, 0, sv, acc);
    }
    for (int r = 0; r < rows; r++) {
        float s = grouped ? 1.0f : a->scale[r];
        for (int m = 0; m < mb; m++) res[r * MBMAX + m] = _mm512_reduce_add_ps(acc[r][m]) * s;
    }
}

/* Specialised per (rows, mb, grouped) so every loop above unrolls into registers. */
static void tile_any(const tile_args *a, int rows, int mb, int grouped, float *res) {
#define CASE(RR, MM)                                                                        \
    if (rows == RR && mb == MM) {                                                           \
        if (grouped) tile(a, RR, MM, 1, res); else tile(a, RR, MM, 0, res);                 \
        return;                                                                             \
    }
    CASE(4, 1) CASE(4, 2) CASE(4, 3) CASE(4, 4)
    CASE(1, 1) CASE(1, 2) CASE(1, 3) CASE(1, 4)
#undef CASE
}

static void widen_bf16_rows(const uint16_t *x, int64_t xs, float *dst, int M, int64_t K) {
    for (int m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) dst[m * K + k] = bf16_to_f32(x[m * xs + k]);
}

/* Output rows [n0, n0 + rows) for every activation row, through tiles of MBMAX rows. */
#define DEFINE_BLOCK(NAME, T, LOAD, STORE)                                                  \
static void NAME(tile_args a, int64_t n0, int rows, int M, const T *bias, T *out,           \
                 int64_t os) {                                                              \
    float res[R * MBMAX];                                                                   \
    a.w += n0 * a.K;                                                                        \
    a.scale += n0 * a.groups;                                                               \
    const float *x0 = a.x;                                                                  \
    for (int m0 = 0; m0 < M; m0 += MBMAX) {                                                 \
        int mb = M - m0 < MBMAX ? M - m0 : MBMAX;                                           \
        a.x = x0 + m0 * a.xs;                                                               \
        tile_any(&a, rows, mb, a.groups > 1, res);                                          \
        for (int r = 0; r < rows; r++) {                                                    \
            float b = bias ? LOAD(bias[n0 + r]) : 0.0f;                                     \
            for (int m = 0; m < mb; m++)                                                    \
                out[(m0 + m) * os + n0 + r] = STORE(res[r * MBMAX + m] + b);                \
        }                                                                                   \
    }                                                                                       \
}

DEFINE_BLOCK(block_f32, float, F32_SAME, F32_SAME)
DEFINE_BLOCK(block_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

/* Returns 0, or -1 for a group size that is not a multiple of 16 columns (or -2: no
 * memory), leaving out untouched so the caller can take its torch path. */
#define DEFINE_LINEAR(NAME, T, BLOCK, WIDEN)                                                \
int NAME(const T *x, int64_t xs, const int8_t *w, const float *scale, int groups,          \
         const T *bias, T *out, int64_t os, int M, int N, int K, int threads) {            \
    tile_args a = {w, NULL, scale, K, xs, groups, K / groups};                              \
    if (groups > 1 && (K % groups || a.gsize % 16)) return -1;                              \
    float *buf = NULL;                                                                      \
    if (WIDEN) {                                                                            \
        buf = malloc(sizeof(float) * (size_t)M * K + 64);                                   \
        if (!buf) return -2;                                                                \
        widen_bf16_rows((const uint16_t *)x, xs, buf, M, K);                                \
        a.x = buf, a.xs = K;                                                                \
    } else {                                                                                \
        a.x = (const float *)x;                                                             \
    }                                                                                       \
    int blocks = (N + R - 1) / R;                                                           \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1)")      \
    for (int b = 0; b < blocks; b++) {                                                      \
        int64_t n0 = (int64_t)b * R;                                                        \
        if (n0 + R <= N) BLOCK(a, n0, R, M, bias, out, os);                                 \
        else for (int64_t n = n0; n < N; n++) BLOCK(a, n, 1, M, bias, out, os);             \
    }                                                                                       \
    free(buf);                                                                              \
    return 0;                                                                               \
}

DEFINE_LINEAR(int8_linear_f32, float, block_f32, 0)
DEFINE_LINEAR(int8_linear_fma_bf16, uint16_t, block_bf16, 1)

/* bf16 activations take the VNNI kernel (int8_linear_vnni.c) where it is built and
 * takes the group size; the FMA kernel otherwise. */
int int8_linear_vnni_bf16(const uint16_t *, int64_t, const int8_t *, const float *, int,
                          const uint16_t *, uint16_t *, int64_t, int, int, int, int);

int int8_linear_bf16(const uint16_t *x, int64_t xs, const int8_t *w, const float *scale,
                     int groups, const uint16_t *bias, uint16_t *out, int64_t os, int M, int N,
                     int K, int threads) {
#ifdef __AVX512VNNI__
    int rc = int8_linear_vnni_bf16(x, xs, w, scale, groups, bias, out, os, M, N, K, threads);
    if (rc != -1) return rc;
#endif
    return int8_linear_fma_bf16(x, xs, w, scale, groups, bias, out, os, M, N, K, threads);
}

#else /* no AVX-512: the torch path runs */

int int8_linear_supported(void) { return 0; }

int int8_linear_f32(void) { return -1; }
int int8_linear_bf16(void) { return -1; }
int int8_linear_fma_bf16(void) { return -1; }

#endif
