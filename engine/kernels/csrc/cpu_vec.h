/* Shared helpers of the CPU kernels: bf16 <-> fp32 and 16-float vectors (GCC vector
 * extensions, which -march=native lowers to AVX-512, or pairs of AVX2 registers). */
#ifndef PDSERVE_CPU_VEC_H
#define PDSERVE_CPU_VEC_H
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even, as torch does */
    return (uint16_t)(u >> 16);
}

static inline float round_bf16(float x) { return bf16_to_f32(f32_to_bf16(x)); }

#define F32_SAME(x) (x)

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

static inline v16f vload_f32(const float *p) {
    v16f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline v16f vload_bf16(const uint16_t *p) {
    v16h h;
    memcpy(&h, p, sizeof h);
    v16u u = __builtin_convertvector(h, v16u) << 16;
    v16f v;
    memcpy(&v, &u, sizeof v);
    return v;
}

static inline float hsum(v16f v) {
    v += __builtin_shuffle(v, (v16i){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    v += __builtin_shuffle(v, (v16i){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
    v += __builtin_shuffle(v, (v16i){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
    v += __builtin_shuffle(v, (v16i){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
    return v[0];
}

/* exp on 16 floats: 2^n * p(r), x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial
 * (relative error ~2e-7, as good as expf for softmax) -- expf per score cost more than
 * the whole dot product. Inputs are <= 0 here (scores minus their max). */
static inline v16f vmax(v16f a, v16f b) {
    v16i m = a > b; /* vector casts reinterpret the bits */
    return (v16f)(((v16i)a & m) | ((v16i)b & ~m));
}

static inline v16f vexp(v16f x) {
    x = vmax(x, (v16f){0} - 87.0f);
    v16f t = x * 1.44269504f + 0.5f;
    v16f n = __builtin_convertvector(__builtin_convertvector(t, v16i), v16f);
    n += __builtin_convertvector(n > t, v16f); /* trunc -> floor: the mask is -1 */
    v16f r = x - n * 0.693145752f - n * 1.42860677e-6f;
    v16f p = (v16f){0} + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    v16i e = (__builtin_convertvector(n, v16i) + 127) << 23;
    v16f scale;
    memcpy(&scale, &e, sizeof scale);
    return p * scale;
}

#endif
