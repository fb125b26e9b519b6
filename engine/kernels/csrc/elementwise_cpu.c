/* Fused elementwise ops of a decoder layer on the CPU, one pass over memory each, with
 * the rounding steps of the torch code they replace (engine/layers/basic.py), so bf16
 * output keeps tracking HF's:
 *
 *   rms_norm:   [res = round(res + x)];  out = round(w * round(src / rms(src)))   fp32 stats
 *   silu_mul:   out = round(round(silu(gate)) * up)      gate_up rows = [gate | up]
 *   rotary:     x = [x1 | x2] per head, in place:
 *               x1' = round(round(x1 c1) + round(-x2 s1)),  x2' = round(round(x2 c2) + round(x1 s2))
 *               with c, s = round(cos[pos]), round(sin[pos])
 *
 * (round = to the tensor dtype: identity for fp32.) Rows are strided (row stride in
 * elements; rms_norm's x may be [T, H, D] with two strides, as q/k heads are), the last
 * dim contiguous. Built with paged_attention_cpu.c into one library.
 */
#include "cpu_vec.h"

#define DEFINE_RMS_NORM(NAME, T, LOAD, STORE)                                               \
int NAME(const T *x, int64_t xs, int inner, int64_t xs_in, T *res, int64_t rs, const T *w, \
         T *out, int64_t os, int rows, int dim, float eps, int threads) {                   \
    _Pragma("omp parallel for num_threads(threads) if(threads > 1)")                       \
    for (int r = 0; r < rows; r++) {                                                        \
        const T *xr = x + (r / inner) * xs + (r % inner) * xs_in;                           \
        T *src = (T *)xr;                                                                   \
        if (res) {                                                                          \
            src = res + r * rs;                                                             \
            for (int d = 0; d < dim; d++) src[d] = STORE(LOAD(src[d]) + LOAD(xr[d]));       \
        }                                                                                   \
        float ss = 0.0f;                                                                    \
        _Pragma("omp simd reduction(+ : ss)")                                               \
        for (int d = 0; d < dim; d++) ss += LOAD(src[d]) * LOAD(src[d]);                    \
        float inv = 1.0f / sqrtf(ss / dim + eps);                                           \
        T *o = out + r * os;                                                                \
        for (int d = 0; d < dim; d++)                                                       \
            o[d] = STORE(LOAD(w[d]) * LOAD(STORE(LOAD(src[d]) * inv)));                     \
    }                                                                                       \
    return 0;                                                                               \
}

/* silu(g) = g / (1 + e^-g), from e = exp(-|g|) so the exponent never overflows. */
static inline v16f vsilu(v16f g) {
    v16i neg = g < 0;
    v16f a = (v16f)((v16i)g & ~((v16i){0} + (int32_t)0x80000000)); /* |g| */
    v16f e = vexp(-a);
    v16f pos = g / (1.0f + e), negv = g * e / (1.0f + e);
    return (v16f)(((v16i)negv & neg) | ((v16i)pos & ~neg));
}

static inline float silu1(float g) { return g / (1.0f + expf(-g)); }

#define DEFINE_SILU_MUL(NAME, T, LOAD, STORE, VLOAD)                                        \
int NAME(const T *gu, int64_t gs, T *out, int64_t os, int rows, int inter, int threads) {  \
    _Pragma("omp parallel for num_threads(threads) if(threads > 1)")                       \
    for (int r = 0; r < rows; r++) {                                                        \
        const T *g = gu + r * gs, *u = g + inter;                                           \
        T *o = out + r * os;                                                                \
        int d = 0;                                                                          \
        for (; d + 16 <= inter; d += 16) {                                                  \
            v16f s = vsilu(VLOAD(g + d)), up = VLOAD(u + d);                                \
            for (int k = 0; k < 16; k++) o[d + k] = STORE(LOAD(STORE(s[k])) * up[k]);      \
        }                                                                                   \
        for (; d < inter; d++) o[d] = STORE(LOAD(STORE(silu1(LOAD(g[d])))) * LOAD(u[d]));   \
    }                                                                                       \
    return 0;                                                                               \
}

#define DEFINE_ROTARY(NAME, T, LOAD, STORE, ROUND)                                          \
static void NAME##_rows(T *x, int64_t ts, int heads, int half, const float *c,              \
                        const float *s) {                                                   \
    for (int h = 0; h < heads; h++) {                                                       \
        T *a = x + h * 2 * half, *b = a + half;                                             \
        for (int d = 0; d < half; d++) {                                                    \
            float x1 = LOAD(a[d]), x2 = LOAD(b[d]);                                         \
            float c1 = ROUND(c[d]), s1 = ROUND(s[d]);                                       \
            float c2 = ROUND(c[d + half]), s2 = ROUND(s[d + half]);                         \
            float o1 = ROUND(x1 * c1) + ROUND(-x2 * s1);                                    \
            float o2 = ROUND(x2 * c2) + ROUND(x1 * s2);                                     \
            a[d] = STORE(o1);                                                               \
            b[d] = STORE(o2);                                                               \
        }                                                                                   \
    }                                                                                       \
    (void)ts;                                                                               \
}                                                                                           \
int NAME(T *q, int64_t qs, int qh, T *k, int64_t ks, int kh, const int64_t *pos,          \
         const float *cos, const float *sin, int tokens, int dim, int threads) {           \
    _Pragma("omp parallel for num_threads(threads) if(threads > 1)")                       \
    for (int t = 0; t < tokens; t++) {                                                      \
        const float *c = cos + pos[t] * dim, *s = sin + pos[t] * dim;                       \
        NAME##_rows(q + t * qs, qs, qh, dim / 2, c, s);                                     \
        NAME##_rows(k + t * ks, ks, kh, dim / 2, c, s);                                     \
    }                                                                                       \
    return 0;                                                                               \
}

DEFINE_RMS_NORM(rms_norm_f32, float, F32_SAME, F32_SAME)
DEFINE_RMS_NORM(rms_norm_bf16, uint16_t, bf16_to_f32, f32_to_bf16)
DEFINE_SILU_MUL(silu_mul_f32, float, F32_SAME, F32_SAME, vload_f32)
DEFINE_SILU_MUL(silu_mul_bf16, uint16_t, bf16_to_f32, f32_to_bf16, vload_bf16)
DEFINE_ROTARY(rotary_f32, float, F32_SAME, F32_SAME, F32_SAME)
DEFINE_ROTARY(rotary_bf16, uint16_t, bf16_to_f32, f32_to_bf16, round_bf16)
