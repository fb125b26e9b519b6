/* INT8 weight-only linear for bf16 activations with AVX-512 VNNI (vpdpwssd).
 *
 * Same contract as int8_linear_bf16 (int8_linear_cpu.c). Widening each int8 weight to
 * fp32 costs two instructions per 16 weights before its FMA, which at one activation
 * row is slower than streaming bf16 weights. Here each activation row is put in 16-bit
 * fixed point once per call, x_q = round(x / sx) with sx = max|x| / 32767, and the
 * weights are sign-extended to int16 (one instruction per 32), so one vpdpwssd per
 * activation row does 32 multiply-adds exactly in int32:
 *
 *   acc[n][m] = sum_k w[n][k] * x_q[m][k]        (int32, pairs in natural k order)
 *   y[m][n]   = sx[m] * sum_chunks scale[n][g] * float(acc over the chunk) + bias[n]
 *
 * This is not W8A8: x_q keeps 15 bits relative to the row's max (bf16 keeps 8 relative
 * to each value), an error of at most max|x| / 65534 per element against bf16's own
 * rounding of every output (1 / 256 relative). |w x_q| <= 128 * 32767, so a chunk of
 * 512 columns cannot overflow int32 (2^31 - 2^16 at most); the int32 sums are moved to
 * fp32 (times the chunk's scale) at each chunk end, and a chunk never spans two groups.
 */
#include "cpu_vec.h"
#include <stdlib.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>

#define VR 4
#define VMB 4
#define MAX_CHUNK 512
/* Software prefetch distance per weight row: 4 rows are 4 streams 1 row apart, which
 * the hardware prefetcher alone does not keep far enough ahead (measured: 1.4x faster
 * at one activation row with it; 256 B or 2 KiB ahead helped less). */
#define PREFETCH 4096

typedef struct {
    const int8_t *w;
    const int16_t *x;
    const float *scale;
    int64_t K, xs, groups, gsize, chunk;
} vtile_args;

/* acc[r][m] += w[r, k:k+32] . x[m, k:k+32]; x is zero-padded to a multiple of 32. */
static inline __attribute__((always_inline)) void vstep(const vtile_args *a, int64_t k,
                                                        __mmask32 mask, int rows, int mb,
                                                        __m512i acc[VR][VMB]) {
    __m512i wv[VR];
    for (int r = 0; r < rows; r++) {
        const int8_t *p = a->w + r * a->K + k;
        _mm_prefetch((const char *)p + PREFETCH, _MM_HINT_T0);
        wv[r] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, p));
    }
    for (int m = 0; m < mb; m++) {
        __m512i xv = _mm512_loadu_si512(a->x + m * a->xs + k);
        for (int r = 0; r < rows; r++) acc[r][m] = _mm512_dpwssd_epi32(acc[r][m], wv[r], xv);
    }
}

static inline __attribute__((always_inline)) void vtile(const vtile_args *a, int rows, int mb,
                                                        float *res) {
    __m512i acc[VR][VMB];
    __m512 sum[VR][VMB];
    for (int r = 0; r < rows; r++)
        for (int m = 0; m < mb; m++) sum[r][m] = _mm512_setzero_ps();
    for (int64_t c = 0; c < a->K; c += a->chunk) {
        int64_t end = c + a->chunk < a->K ? c + a->chunk : a->K, k = c;
        for (int r = 0; r < rows; r++)
            for (int m = 0; m < mb; m++) acc[r][m] = _mm512_setzero_si512();
        for (; k + 32 <= end; k += 32) vstep(a, k, 0xffffffffu, rows, mb, acc);
        if (k < end) vstep(a, k, (__mmask32)((1ull << (end - k)) - 1), rows, mb, acc);
        int64_t g = c / a->gsize;
        for (int r = 0; r < rows; r++) {
            __m512 s = _mm512_set1_ps(a->scale[r * a->groups + g]);
            for (int m = 0; m < mb; m++)
                sum[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][m]), s, sum[r][m]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int m = 0; m < mb; m++) res[r * VMB + m] = _mm512_reduce_add_ps(sum[r][m]);
}

static void vtile_any(const vtile_args *a, int rows, int mb, float *res) {
#define CASE(RR, MM)                                                                        \
    if (rows == RR && mb == MM) {                                                           \
        vtile(a, RR, MM, res);                                                              \
        return;                                                                             \
    }
    CASE(4, 1) CASE(4, 2) CASE(4, 3) CASE(4, 4)
    CASE(1, 1) CASE(1, 2) CASE(1, 3) CASE(1, 4)
#undef CASE
}

/* Row m of x -> xq (int16, zero-padded to kp columns); returns its scale sx. */
static float quantize_row(const uint16_t *x, int64_t K, int64_t kp, int16_t *xq) {
    float amax = 0.0f;
    for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(bf16_to_f32(x[k])));
    float sx = amax > 0.0f ? amax / 32767.0f : 1.0f, inv = 1.0f / sx;
    for (int64_t k = 0; k < K; k++) xq[k] = (int16_t)lrintf(bf16_to_f32(x[k]) * inv);
    for (int64_t k = K; k < kp; k++) xq[k] = 0;
    return sx;
}

static void vblock(vtile_args a, const float *sx, int64_t n0, int rows, int M,
                   const uint16_t *bias, uint16_t *out, int64_t os) {
    float res[VR * VMB];
    a.w += n0 * a.K;
    a.scale += n0 * a.groups;
    const int16_t *x0 = a.x;
    for (int m0 = 0; m0 < M; m0 += VMB) {
        int mb = M - m0 < VMB ? M - m0 : VMB;
        a.x = x0 + m0 * a.xs;
        vtile_any(&a, rows, mb, res);
        for (int r = 0; r < rows; r++) {
            float b = bias ? bf16_to_f32(bias[n0 + r]) : 0.0f;
            for (int m = 0; m < mb; m++)
                out[(m0 + m) * os + n0 + r] = f32_to_bf16(res[r * VMB + m] * sx[m0 + m] + b);
        }
    }
}

/* 0; -1 when a group is not a multiple of 32 columns or splits into no chunk <= 512;
 * -2 with no memory. */
int int8_linear_vnni_bf16(const uint16_t *x, int64_t xs, const int8_t *w, const float *scale,
                          int groups, const uint16_t *bias, uint16_t *out, int64_t os, int M,
                          int N, int K, int threads) {
    int64_t kp = (K + 31) / 32 * 32, gsize = K / groups, chunk = gsize;
    if (groups > 1 && (K % groups || gsize % 32)) return -1;
    while (chunk > MAX_CHUNK && chunk % 64 == 0) chunk /= 2;
    if (groups == 1) chunk = MAX_CHUNK;
    if (chunk > MAX_CHUNK) return -1;
    int16_t *xq = aligned_alloc(64, sizeof(int16_t) * (size_t)M * kp + 64);
    float *sx = malloc(sizeof(float) * (size_t)M);
    if (!xq || !sx) {
        free(xq), free(sx);
        return -2;
    }
    for (int m = 0; m < M; m++) sx[m] = quantize_row(x + m * xs, K, kp, xq + m * kp);
    vtile_args a = {w, xq, scale, K, kp, groups, gsize, chunk};
    int blocks = (N + VR - 1) / VR;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int b = 0; b < blocks; b++) {
        int64_t n0 = (int64_t)b * VR;
        if (n0 + VR <= N) vblock(a, sx, n0, VR, M, bias, out, os);
        else for (int64_t n = n0; n < N; n++) vblock(a, sx, n, 1, M, bias, out, os);
    }
    free(xq), free(sx);
    return 0;
}

#endif
