/* Paged attention on the CPU: one query token per row over its paged context.
 *
 * Block-table layout (engine/kv_cache/layout.py):
 *
 *   k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim]   (strides in elements)
 *   block_tables:     int32 [num_rows, max_blocks]  block ids in token order
 *   token t of row r lives in block block_tables[r][t / block_size], slot t % block_size
 *
 * Row r attends to tokens [start, seq_lens[r]) with start = max(0, seq_lens[r] - window)
 * (window <= 0: no window). A decode is one row; a prefill token at position p over a
 * cached prefix is a row with seq_len p + 1, so causal prefill needs no mask either.
 * Nothing is gathered: each (row, kv head) task streams its blocks once, computing all
 * the query heads of its group (GQA) with an online softmax in fp32 over 512-token chunks.
 *
 * Built by engine/kernels/cpu_paged_attention.py with gcc -O3 -march=native -fopenmp;
 * the OpenMP runtime is the one torch already loaded (same soname, libgomp.so.1).
 */
#include "cpu_vec.h"

#define MAX_GROUP 32
#define MAX_DIM 256
#define MAX_BS 256
#define CHUNK 512
#define MAX_VEC (MAX_DIM / 16)

typedef struct {
    int64_t q_row, q_head;             /* query  [rows, heads, dim]   */
    int64_t o_row, o_head;             /* out    [rows, heads, dim]   */
    int64_t c_block, c_tok, c_head;    /* caches [blocks, bs, kvh, dim] */
} strides_t;

/* One (row, kv head) task: T is float or uint16_t (bf16); LOAD converts to float.
 * Tokens go in chunks of CHUNK positions (aligned at 0, as torch's flash attention splits
 * the KV): scores of the chunk, one max, exp, then P.V. ROUND_P rounds the softmax
 * numerators before P.V as torch does for 16-bit inputs (a bf16 GEMM there) while the
 * normaliser sums them unrounded, also as torch does, so bf16 greedy output tracks HF. */
#define DEFINE_TASK(NAME, T, LOAD, STORE, ROUND_P)                                           \
static void NAME(const T *q, const T *kc, const T *vc, const int32_t *table, int seq_len, \
                 T *out, int group, int dim, int bs, const strides_t *s, float scale,       \
                 int window) {                                                              \
    float qf[MAX_GROUP][MAX_DIM], acc[MAX_GROUP][MAX_DIM];                                  \
    float m[MAX_GROUP], l[MAX_GROUP], sc[MAX_GROUP][CHUNK];                                 \
    for (int g = 0; g < group; g++) {                                                       \
        for (int d = 0; d < dim; d++) {                                                     \
            qf[g][d] = LOAD(q[g * s->q_head + d]);                                          \
            acc[g][d] = 0.0f;                                                               \
        }                                                                                   \
        m[g] = -INFINITY;                                                                   \
        l[g] = 0.0f;                                                                        \
    }                                                                                       \
    int start = (window > 0 && seq_len > window) ? seq_len - window : 0;                    \
    for (int c0 = start - start % CHUNK; c0 < seq_len; c0 += CHUNK) {                       \
        int lo = c0 > start ? c0 : start;                                                   \
        int hi = seq_len < c0 + CHUNK ? seq_len : c0 + CHUNK;                               \
        for (int t = lo; t < hi; t++) {                                                     \
            const T *k = kc + (int64_t)table[t / bs] * s->c_block + (t % bs) * s->c_tok;    \
            for (int g = 0; g < group; g++) {                                               \
                float dot = 0.0f;                                                           \
                _Pragma("omp simd reduction(+ : dot)")                                      \
                for (int d = 0; d < dim; d++) dot += qf[g][d] * LOAD(k[d]);                 \
                sc[g][t - c0] = dot * scale;                                                \
            }                                                                               \
        }                                                                                   \
        for (int g = 0; g < group; g++) {                                                   \
            float mx = m[g], sum = 0.0f;                                                    \
            for (int t = lo; t < hi; t++) mx = sc[g][t - c0] > mx ? sc[g][t - c0] : mx;     \
            for (int t = lo; t < hi; t++) {                                                 \
                float e = expf(sc[g][t - c0] - mx);                                         \
                sum += e;                                                                   \
                sc[g][t - c0] = ROUND_P(e);                                                 \
            }                                                                               \
            float corr = expf(m[g] - mx);                                                   \
            l[g] = l[g] * corr + sum;                                                       \
            m[g] = mx;                                                                      \
            if (corr != 1.0f)                                                               \
                for (int d = 0; d < dim; d++) acc[g][d] *= corr;                            \
        }                                                                                   \
        for (int t = lo; t < hi; t++) {                                                     \
            const T *v = vc + (int64_t)table[t / bs] * s->c_block + (t % bs) * s->c_tok;    \
            for (int g = 0; g < group; g++) {                                               \
                float p = sc[g][t - c0], *a = acc[g];                                       \
                _Pragma("omp simd")                                                         \
                for (int d = 0; d < dim; d++) a[d] += p * LOAD(v[d]);                       \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
    for (int g = 0; g < group; g++) {                                                       \
        float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;                                       \
        for (int d = 0; d < dim; d++) out[g * s->o_head + d] = STORE(acc[g][d] * inv);      \
    }                                                                                       \
}

DEFINE_TASK(task_f32, float, F32_SAME, F32_SAME, F32_SAME)
DEFINE_TASK(task_bf16, uint16_t, bf16_to_f32, f32_to_bf16, round_bf16)

/* sc[0..n): scores in, rounded numerators out; returns the max in *mx (updated from its
 * old value) and the unrounded sum of exp(score - max). */
#define DEFINE_SOFTMAX(NAME, ROUND_P)                                                        \
static float NAME(float *sc, int n, float *mx) {                                            \
    float m = *mx, sum = 0.0f;                                                              \
    int i = 0;                                                                              \
    v16f vm = (v16f){0} + m;                                                                \
    for (; i + 16 <= n; i += 16) {                                                          \
        v16f x = vload_f32(sc + i);                                                         \
        vm = vmax(x, vm);                                                                   \
    }                                                                                       \
    for (int k = 0; k < 16; k++) m = vm[k] > m ? vm[k] : m;                                 \
    for (int k = i; k < n; k++) m = sc[k] > m ? sc[k] : m;                                  \
    v16f vs = (v16f){0};                                                                    \
    for (i = 0; i + 16 <= n; i += 16) {                                                     \
        v16f e = vexp(vload_f32(sc + i) - m);                                               \
        vs += e;                                                                            \
        for (int k = 0; k < 16; k++) sc[i + k] = ROUND_P(e[k]);                             \
    }                                                                                       \
    sum = hsum(vs);                                                                         \
    for (int k = i; k < n; k++) {                                                           \
        float e = expf(sc[k] - m);                                                          \
        sum += e;                                                                           \
        sc[k] = ROUND_P(e);                                                                 \
    }                                                                                       \
    *mx = m;                                                                                \
    return sum;                                                                             \
}

DEFINE_SOFTMAX(softmax_f32, F32_SAME)
DEFINE_SOFTMAX(softmax_bf16, round_bf16)

/* The same task for head_dim % 16 == 0 on 16-float vectors (GCC vector extensions, which
 * -march=native lowers to AVX-512 or pairs of AVX2 registers): each K/V row is loaded
 * and converted once per token for all the group's heads. */
#define MAX_TASK_HEADS 64
/* nkv consecutive kv heads per task, so each token's K/V row is read front to back
 * (all its heads are adjacent in memory) rather than one head's slice per pass. Query
 * head x = hh * group + g belongs to kv head hh of the task. */
#define DEFINE_VTASK(NAME, T, VLOAD, LOAD, STORE, SOFTMAX)                                   \
static void NAME(const T *q, const T *kc, const T *vc, const int32_t *table, int seq_len, \
                 T *out, int group, int nkv, int dim, int bs, const strides_t *s,           \
                 float scale, int window) {                                                 \
    v16f qv[MAX_TASK_HEADS][MAX_VEC], acc[MAX_TASK_HEADS][MAX_VEC], row[MAX_VEC];           \
    float m[MAX_TASK_HEADS], l[MAX_TASK_HEADS], sc[MAX_TASK_HEADS][CHUNK];                  \
    const int nv = dim / 16, nh = nkv * group;                                              \
    for (int x = 0; x < nh; x++) {                                                          \
        for (int c = 0; c < nv; c++) {                                                      \
            qv[x][c] = VLOAD(q + x * s->q_head + 16 * c);                                   \
            acc[x][c] = (v16f){0};                                                          \
        }                                                                                   \
        m[x] = -INFINITY;                                                                   \
        l[x] = 0.0f;                                                                        \
    }                                                                                       \
    int start = (window > 0 && seq_len > window) ? seq_len - window : 0;                    \
    for (int c0 = start - start % CHUNK; c0 < seq_len; c0 += CHUNK) {                       \
        int lo = c0 > start ? c0 : start;                                                   \
        int hi = seq_len < c0 + CHUNK ? seq_len : c0 + CHUNK;                               \
        for (int t = lo; t < hi; t++) {                                                     \
            const T *k = kc + (int64_t)table[t / bs] * s->c_block + (t % bs) * s->c_tok;    \
            for (int hh = 0; hh < nkv; hh++, k += s->c_head) {                              \
                for (int c = 0; c < nv; c++) row[c] = VLOAD(k + 16 * c);                    \
                for (int x = hh * group; x < (hh + 1) * group; x++) {                       \
                    v16f dot = qv[x][0] * row[0];                                           \
                    for (int c = 1; c < nv; c++) dot += qv[x][c] * row[c];                  \
                    sc[x][t - c0] = hsum(dot) * scale;                                      \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
        for (int x = 0; x < nh; x++) {                                                      \
            float old = m[x], mx = old;                                                     \
            float sum = SOFTMAX(sc[x] + (lo - c0), hi - lo, &mx);                           \
            float corr = expf(old - mx);                                                    \
            l[x] = l[x] * corr + sum;                                                       \
            m[x] = mx;                                                                      \
            if (corr != 1.0f)                                                               \
                for (int c = 0; c < nv; c++) acc[x][c] *= corr;                             \
        }                                                                                   \
        for (int t = lo; t < hi; t++) {                                                     \
            const T *v = vc + (int64_t)table[t / bs] * s->c_block + (t % bs) * s->c_tok;    \
            for (int hh = 0; hh < nkv; hh++, v += s->c_head) {                              \
                for (int c = 0; c < nv; c++) row[c] = VLOAD(v + 16 * c);                    \
                for (int x = hh * group; x < (hh + 1) * group; x++) {                       \
                    float p = sc[x][t - c0];                                                \
                    for (int c = 0; c < nv; c++) acc[x][c] += p * row[c];                   \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
    for (int x = 0; x < nh; x++) {                                                          \
        float inv = l[x] > 0.0f ? 1.0f / l[x] : 0.0f;                                       \
        for (int c = 0; c < nv; c++)                                                        \
            for (int d = 0; d < 16; d++)                                                    \
                out[x * s->o_head + 16 * c + d] = STORE(acc[x][c][d] * inv);                \
    }                                                                                       \
}

DEFINE_VTASK(vtask_f32, float, vload_f32, F32_SAME, F32_SAME, softmax_f32)
DEFINE_VTASK(vtask_bf16, uint16_t, vload_bf16, bf16_to_f32, f32_to_bf16, softmax_bf16)

/* Returns 0, or -1 when a size is past the kernel's fixed limits (the caller falls back).
 * Tasks: (row, run of kv heads); a run spans all kv heads unless that leaves threads idle
 * or exceeds MAX_TASK_HEADS query heads. */
#define DEFINE_OP(NAME, TASK, VTASK, T)                                                     \
int NAME(const T *q, const T *kc, const T *vc, const int32_t *tables, int64_t table_stride, \
         const int32_t *seq_lens, T *out, int rows, int heads, int kv_heads, int dim,       \
         int bs, const int64_t *st, float scale, int window, int threads) {                 \
    int group = heads / kv_heads;                                                           \
    if (group > MAX_GROUP || dim > MAX_DIM || bs > MAX_BS) return -1;                       \
    strides_t s = {st[0], st[1], st[2], st[3], st[4], st[5], st[6]};                        \
    int run = dim % 16 ? 1 : kv_heads;                                                      \
    while (run > 1 && (run * group > MAX_TASK_HEADS || (int64_t)rows * (kv_heads / run)     \
                                                              < 2 * (int64_t)threads))      \
        run = (run + 1) / 2;                                                                \
    while (kv_heads % run) run--;                                                           \
    int runs = kv_heads / run;                                                              \
    int64_t tasks = (int64_t)rows * runs;                                                   \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads) if(threads > 1)")  \
    for (int64_t i = 0; i < tasks; i++) {                                                   \
        int r = (int)(i / runs), h = (int)(i % runs) * run;                                 \
        const T *qr = q + r * s.q_row + (int64_t)h * group * s.q_head;                      \
        T *orow = out + r * s.o_row + (int64_t)h * group * s.o_head;                        \
        if (dim % 16)                                                                       \
            TASK(qr, kc + h * s.c_head, vc + h * s.c_head, tables + r * table_stride,       \
                 seq_lens[r], orow, group, dim, bs, &s, scale, window);                     \
        else                                                                                \
            VTASK(qr, kc + h * s.c_head, vc + h * s.c_head, tables + r * table_stride,      \
                  seq_lens[r], orow, group, run, dim, bs, &s, scale, window);               \
    }                                                                                       \
    return 0;                                                                               \
}

DEFINE_OP(paged_attention_f32, task_f32, vtask_f32, float)
DEFINE_OP(paged_attention_bf16, task_bf16, vtask_bf16, uint16_t)
