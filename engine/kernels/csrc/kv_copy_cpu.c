/* KV page moves and checksums for the transfer planes (engine/kernels/cpu_kv_copy.py).
 *
 * kv_copy_blocks:  dst[dst_ids[i]] = src[src_ids[i]] for whole blocks of block_bytes,
 *                  one memcpy per run of pairs that are consecutive on both sides:
 *
 *     src ids  7 8 9 | 3 | 12 13        dst ids  40 41 42 | 5 | 6 7
 *              ------+---+------                 ---------+---+----
 *              run 1  r2  run 3   ->  3 memcpys of 3, 1 and 2 blocks
 *
 *                  one read and one write of every byte: the physical minimum.
 * kv_crc32c:       CRC32C (Castagnoli, as iSCSI/ext4) with the SSE4.2 instruction,
 *                  three independent streams over 3 x CRC_LANE bytes combined with a
 *                  precomputed zero-shift operator (the instruction's 3-cycle latency
 *                  would otherwise leave two thirds of its throughput idle); a table
 *                  fallback where the instruction is missing.
 */
#include <stdint.h>
#include <string.h>
#if defined(__SSE4_2__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define NT_MIN 4096 /* runs at least this long bypass the cache */

/* A copy whose destination is not read soon (the decode worker reads these pages at its
 * next step, long after a whole layer went by): non-temporal stores skip reading every
 * destination line first, which ordinary stores must do, so the copy moves two bytes of
 * memory per byte instead of three. glibc's memcpy does the same only for copies larger
 * than most of the last-level cache, never for one block. */
static void copy_run(uint8_t *dst, const uint8_t *src, size_t n) {
#if defined(__AVX2__)
    if (n >= NT_MIN) {
        size_t head = (size_t)(-(uintptr_t)dst & 31);
        memcpy(dst, src, head);
        dst += head, src += head, n -= head;
        for (; n >= 128; n -= 128, dst += 128, src += 128) {
            __m256i a = _mm256_loadu_si256((const __m256i *)src);
            __m256i b = _mm256_loadu_si256((const __m256i *)(src + 32));
            __m256i c = _mm256_loadu_si256((const __m256i *)(src + 64));
            __m256i d = _mm256_loadu_si256((const __m256i *)(src + 96));
            _mm256_stream_si256((__m256i *)dst, a);
            _mm256_stream_si256((__m256i *)(dst + 32), b);
            _mm256_stream_si256((__m256i *)(dst + 64), c);
            _mm256_stream_si256((__m256i *)(dst + 96), d);
        }
    }
#endif
    memcpy(dst, src, n);
}

int kv_copy_blocks(uint8_t *dst, const int64_t *dst_ids, const uint8_t *src,
                   const int64_t *src_ids, int64_t n, int64_t block_bytes) {
    int64_t i = 0;
    while (i < n) {
        int64_t run = 1;
        while (i + run < n && dst_ids[i + run] == dst_ids[i] + run &&
               src_ids[i + run] == src_ids[i] + run)
            run++;
        copy_run(dst + dst_ids[i] * block_bytes, src + src_ids[i] * block_bytes,
                 (size_t)(run * block_bytes));
        i += run;
    }
#if defined(__AVX2__)
    _mm_sfence(); /* the streamed stores are visible before anyone is told they are done */
#endif
    return 0;
}

#define POLY 0x82F63B78u /* CRC32C, bit-reflected */
#define CRC_LANE 4096    /* bytes per stream per round: 3 x 4 KiB */

static uint32_t table[256];
static uint32_t shift_table[4][256]; /* x -> x * x^(8 * CRC_LANE): CRC_LANE zero bytes */
static int ready;

static uint32_t gf2_times(const uint32_t *mat, uint32_t vec) {
    uint32_t sum = 0;
    for (int i = 0; vec; i++, vec >>= 1)
        if (vec & 1) sum ^= mat[i];
    return sum;
}

static void gf2_square(uint32_t *out, const uint32_t *mat) {
    for (int i = 0; i < 32; i++) out[i] = gf2_times(mat, mat[i]);
}

/* The operator that feeds `bytes` zero bytes through the CRC register (a power of two). */
static void zeros_operator(uint32_t *op, uint32_t bytes) {
    uint32_t a[32], b[32];
    a[0] = POLY; /* one zero bit: shift right, xor the polynomial if bit 0 was set */
    for (int i = 1; i < 32; i++) a[i] = 1u << (i - 1);
    gf2_square(b, a); /* 2 bits */
    gf2_square(a, b); /* 4 bits */
    gf2_square(b, a); /* 8 bits: one byte */
    uint32_t *cur = b, *next = a;
    for (uint32_t n = 1; n < bytes; n <<= 1) {
        gf2_square(next, cur);
        uint32_t *t = cur; cur = next; next = t;
    }
    memcpy(op, cur, sizeof(a));
}

static void init_tables(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ POLY : c >> 1;
        table[i] = c;
    }
    uint32_t op[32];
    zeros_operator(op, CRC_LANE);
    for (int k = 0; k < 4; k++)
        for (uint32_t b = 0; b < 256; b++) shift_table[k][b] = gf2_times(op, b << (8 * k));
    ready = 1;
}

static inline uint32_t shift(uint32_t c) {
    return shift_table[0][c & 0xff] ^ shift_table[1][(c >> 8) & 0xff] ^
           shift_table[2][(c >> 16) & 0xff] ^ shift_table[3][c >> 24];
}

static uint32_t crc_bytes(uint32_t c, const uint8_t *p, int64_t n) {
#if defined(__SSE4_2__)
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = (uint32_t)_mm_crc32_u64(c, w);
    }
    for (; n > 0; n--) c = _mm_crc32_u8(c, *p++);
#else
    for (; n > 0; n--) c = table[(c ^ *p++) & 0xff] ^ (c >> 8);
#endif
    return c;
}

/* crc: the previous value (0 to start); returns the CRC32C of everything so far. */
uint32_t kv_crc32c(uint32_t crc, const uint8_t *p, int64_t n) {
    if (!ready) init_tables(); /* idempotent: a race only builds the same tables twice */
    uint32_t c = ~crc;
#if defined(__SSE4_2__)
    for (; n >= 3 * CRC_LANE; n -= 3 * CRC_LANE, p += 3 * CRC_LANE) {
        uint64_t c0 = c, c1 = 0, c2 = 0, w0, w1, w2;
        for (int i = 0; i < CRC_LANE; i += 8) {
            memcpy(&w0, p + i, 8);
            memcpy(&w1, p + CRC_LANE + i, 8);
            memcpy(&w2, p + 2 * CRC_LANE + i, 8);
            c0 = _mm_crc32_u64(c0, w0);
            c1 = _mm_crc32_u64(c1, w1);
            c2 = _mm_crc32_u64(c2, w2);
        }
        c = shift(shift((uint32_t)c0) ^ (uint32_t)c1) ^ (uint32_t)c2;
    }
#endif
    return ~crc_bytes(c, p, n);
}
