/* Attention straight from the paged KV cache, for decode rows and (on CPU) prompt chunks alike: query rows attend
   to their sequence's context in place, no gather copy. For row b, query head h (KV head g = h / G, G = H / KVH)
   and its context of n_b tokens:
       s_t = scale * q[b,h] . K[slot(b,t), g]            slot(b,t) = table[b][t / bs] * bs + t % bs
       p_t = exp(s_t - max_u s_u) / sum_u exp(s_u - max_u s_u)
       out[b,h] = sum_t p_t V[slot(b,t), g]
   Rows come in runs: consecutive rows of one sequence (a decoded token and its draft tokens, or a prompt chunk), one
   table, context lengths non-decreasing (each row sees the sequence up to itself). A task is (up to MAX_Q / G rows
   of a run, g, a chunk of CHUNK tokens): every query head of those rows that reads KV head g shares each K/V row
   read, so a run's context is read once per step, not once per row; chunks merge by their softmax statistics
   (flash-decoding), so one long sequence still keeps every thread busy. With a bf16 cache and AVX-512, a run of at
   most WIDE_ROWS rows (a decode row and its drafts, bound by reading the cache) does all its KV heads in the task of
   g = 0, reading each token's rows of every head as one run and streaming the chunk 16 tokens at a time
   (attend_stream; the other heads' tasks are empty), where there are at least as many (piece, chunk) tasks as
   threads. Tasks run in parallel (OpenMP, the same libgomp torch uses). A row's arithmetic is the same whatever else
   is in its task: chunks are fixed by the context length (a row's chunks past its own length are empty and skipped),
   and its dot products, exponents and sums run the same instructions in the same order, so a row gets the same
   result in any batch or run. With AVX-512 and head_dim 64 or 128 a task runs attend_vec (16 tokens' scores at a
   time for every query in turn, the V sums in registers; ~1.5x attend()'s speed when the context is in cache, which
   prompt chunks' runs are), or attend_stream for the short runs above (attend_vec's arithmetic, every head at once),
   elsewhere the portable attend(); attend_vec and attend_stream give a row the same bits, so only head_dim and the
   CPU decide a row's arithmetic, never its run or batch.
   Cache element types: 0 = fp32, 1 = bf16, 2 = int8 with one fp16 scale per (slot, KV head). */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include "vec_exp.h"

#define MAX_D 256
#define MAX_G 16
#define AHEAD 32  /* tokens of software prefetch distance */
#define CHUNK 128  /* tokens per task */
#define MAX_Q 64  /* query vectors per task: rows x G */
#define WIDE_ROWS 4  /* a run of at most this many rows reads every KV head's rows in one pass (attend_stream) */
#define WIDE_MAX 512  /* ... where KV heads x head_dim is at most this */

static inline float bf16_to_float(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Ask for the (slot, g) row `ahead` tokens early: rows of one head are 1/KVH of each cache line run and blocks
   are scattered, so the hardware prefetcher alone leaves every row a DRAM round trip. Locality 1 (prefetcht2):
   a batch-64 decode pass over bf16 KV took 0.80-0.94x the time of the non-temporal hint (prefetchnta) on a Zen 4
   (docs/performance.md, issue 19; measured with bf16 caches only); prefetcht0 was slower in one run. */
static inline void prefetch_row(const void *cache, int dtype, int64_t slot, int g, int kvh, int d) {
    int elem = dtype == 0 ? 4 : dtype == 1 ? 2 : 1;
    const char *row = (const char *)cache + (slot * kvh + g) * (int64_t)d * elem;
    for (int off = 0; off < d * elem; off += 64) __builtin_prefetch(row + off, 0, 1);
}

/* Cache slot of a sequence's token t: its block from the table, then the offset inside the block. */
static inline int64_t slot_of(const int64_t *table, int64_t t, int block_size, int log2_bs) {
    return table[t >> log2_bs] * block_size + (t & (block_size - 1));
}

/* Token t's (slot, g) row of one cache (and its int8 scale), after asking for token t + AHEAD's row. */
static inline const void *token_row(const void *cache, const _Float16 *scales, int dtype, const int64_t *table,
                                    int64_t t, int64_t n, int block_size, int log2_bs, int g, int kvh, int d,
                                    float *scale) {
    if (t + AHEAD < n) prefetch_row(cache, dtype, slot_of(table, t + AHEAD, block_size, log2_bs), g, kvh, d);
    int64_t slot = slot_of(table, t, block_size, log2_bs), row = (slot * kvh + g) * (int64_t)d;
    *scale = dtype == 2 ? (float)scales[slot * kvh + g] : 1.0f;
    return dtype == 0 ? (const void *)((const float *)cache + row)
         : dtype == 1 ? (const void *)((const uint16_t *)cache + row) : (const void *)((const int8_t *)cache + row);
}

/* Element i of a row as stored, widened to fp32 (bf16: a shift; int8: the code, its row scale applied by the
   caller). With `dtype` a constant the loops over i vectorize with the widening inside: no row buffer. */
static inline float row_elem(const void *row, int dtype, int i) {
    if (dtype == 0) return ((const float *)row)[i];
    if (dtype == 1) return bf16_to_float(((const uint16_t *)row)[i]);
    return (float)((const int8_t *)row)[i];
}

#ifdef __AVX512F__
/* 16 bf16 values at src widened (exactly) to fp32 at dst */
static inline void widen16_bf16(const uint16_t *src, float *dst) {
    _mm512_storeu_si512(dst, _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src)), 16));
}

#endif

/* s[t] <- e^(s[t] - m) for t < n; returns their sum */
static inline float exp_shifted(float *s, int64_t n, float m) {
    float sum = 0.0f;
    int64_t t = 0;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps(), mv = _mm512_set1_ps(m);
    for (; t + 16 <= n; t += 16) {
        __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(s + t), mv));
        _mm512_storeu_ps(s + t, e);
        acc = _mm512_add_ps(acc, e);
    }
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; t < n; t++) { s[t] = expf(s[t] - m); sum += s[t]; }
    return sum;
}

/* Softmax state of `group` query heads over a range of tokens: m = max score, l = sum_t exp(s_t - m),
   acc = sum_t exp(s_t - m) V_t. Ranges merge exactly: with M = max(m_a, m_b),
       l = e^(m_a - M) l_a + e^(m_b - M) l_b,    acc = e^(m_a - M) acc_a + e^(m_b - M) acc_b,    out = acc / l. */
typedef struct {
    float *m, *l;  /* [group] */
    float *acc;    /* [group][head_dim] */
} Partial;

/* Task i's state inside flat buffers: m and l hold `group` floats per task, acc group * head_dim */
static inline Partial partial_at(float *m, float *l, float *acc, int64_t i, int group, int head_dim) {
    Partial p = {m + i * group, l + i * group, acc + i * group * head_dim};
    return p;
}

/* K/V row `row` as fp32 (the widening is exact): the cache itself for fp32, else `buf`. */
static inline __attribute__((always_inline)) const float *widen(const void *row, int dtype, float *buf,
                                                                 const int head_dim) {
    if (dtype == 0) return (const float *)row;
    for (int i = 0; i < head_dim; i++) buf[i] = row_elem(row, dtype, i);
    return buf;
}

/* q . k over head_dim in a fixed order (16 lanes, then the lanes' sum): the same for every row and task. */
static inline __attribute__((always_inline)) float dot(const float *q, const float *k, const int head_dim) {
    int i = 0;
    float sum = 0.0f;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= head_dim; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), _mm512_loadu_ps(k + i), acc);
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; i < head_dim; i++) sum += q[i] * k[i];
    return sum;
}

/* One task: `rows` consecutive rows of a run (context lengths lens[0..rows), the last the longest), the `group`
   query heads of KV head g of each, over tokens [t0, t0 + CHUNK) of the run's sequence, each row up to its own
   length (a row whose length ends before t0 gets an empty range: l = 0). parts[x]: row x's partial for this chunk.
   Inlined with a constant head_dim for the common sizes so the row loops unroll into registers. */
static inline __attribute__((always_inline)) void attend(
        const float *q, int64_t q_row_stride, Partial *parts, const void *k_cache, const void *v_cache,
        const _Float16 *k_scales, const _Float16 *v_scales, const int dtype, const int64_t *table, int64_t t0,
        const int64_t *lens, int rows, int g, int group, int kv_heads, int block_size, int log2_bs, float scale,
        const int head_dim) {
    float scores[MAX_Q][CHUNK], acc[MAX_Q][MAX_D], mx[MAX_Q], sum[MAX_Q], row_buf[MAX_D];
    int64_t n_ctx = lens[rows - 1], t1 = t0 + CHUNK < n_ctx ? t0 + CHUNK : n_ctx, n = t1 - t0, seen[MAX_Q];
    int nq = rows * group;
    for (int x = 0; x < rows; x++) {
        int64_t m = lens[x] - t0;
        seen[x] = m < 0 ? 0 : m < n ? m : n;  /* row x's tokens in this chunk */
    }
    for (int j = 0; j < nq; j++) mx[j] = -INFINITY, sum[j] = 0.0f;
    for (int64_t t = 0; t < n; t++) {
        float s;
        const float *k = widen(token_row(k_cache, k_scales, dtype, table, t0 + t, n_ctx, block_size, log2_bs, g,
                                         kv_heads, head_dim, &s), dtype, row_buf, head_dim);
        for (int x = 0; x < rows; x++) {
            if (t >= seen[x]) continue;
            const float *qx = q + x * q_row_stride;
            for (int j = 0; j < group; j++) {
                float d = dot(qx + (int64_t)j * head_dim, k, head_dim) * (scale * s);
                scores[x * group + j][t] = d;
                if (d > mx[x * group + j]) mx[x * group + j] = d;
            }
        }
    }
    for (int x = 0; x < rows; x++)
        for (int j = 0; j < group; j++) {
            int qi = x * group + j;
            sum[qi] = seen[x] ? exp_shifted(scores[qi], seen[x], mx[qi]) : 0.0f;
            memset(acc[qi], 0, sizeof(float) * head_dim);
        }
    for (int64_t t = 0; t < n; t++) {
        float s;
        const float *v = widen(token_row(v_cache, v_scales, dtype, table, t0 + t, n_ctx, block_size, log2_bs, g,
                                         kv_heads, head_dim, &s), dtype, row_buf, head_dim);
        for (int x = 0; x < rows; x++) {
            if (t >= seen[x]) continue;
            for (int j = 0; j < group; j++) {
                int qi = x * group + j;
                float w = scores[qi][t] * s;
                for (int i = 0; i < head_dim; i++) acc[qi][i] += w * v[i];
            }
        }
    }
    for (int x = 0; x < rows; x++) {
        Partial p = parts[x];
        for (int j = 0; j < group; j++) {
            int qi = x * group + j;
            p.m[j] = mx[qi];
            p.l[j] = sum[qi];
            memcpy(p.acc + (int64_t)j * head_dim, acc[qi], sizeof(float) * head_dim);
        }
    }
}


#ifdef __AVX512F__
/* out[u] = the sum of v[u]'s 16 lanes, u < 16: 8-lane halves added, then 4-lane quarters, then pairs, then lanes
   (46 instructions for 16 sums, against ~8 each for one vector's reduction). A fixed order for every row. */
static inline __attribute__((always_inline)) __m512 sum16(__m512 v[16]) {
    __m512 w[8], x[4];
    for (int k = 0; k < 8; k++)  /* w[k]: v[2k]'s 8 half sums in 128-bit lanes 0-1, v[2k+1]'s in 2-3 */
        w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE));
    for (int k = 0; k < 4; k++)  /* x[k]: 128-bit lane L holds 4 partial sums of v[4k + L] */
        x[k] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0x88),
                             _mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0xDD));
    __m512 y0 = _mm512_add_ps(_mm512_unpacklo_ps(x[0], x[1]), _mm512_unpackhi_ps(x[0], x[1]));
    __m512 y1 = _mm512_add_ps(_mm512_unpacklo_ps(x[2], x[3]), _mm512_unpackhi_ps(x[2], x[3]));
    __m512 z = _mm512_add_ps(_mm512_shuffle_ps(y0, y1, 0x44), _mm512_shuffle_ps(y0, y1, 0xEE));
    /* z[4L + c] = the sum of v[4c + L] */
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(order, z);
}

/* attend() with AVX-512 for head_dim a multiple of 16 (64 and 128 are compiled): the chunk's K and V rows of head g
   as fp32 (the cache in place, or widened once into a buffer: exact), then the scores 16 tokens at a time, each
   block for every query before the next block (each token's 16-lane products q . k summed by sum16, not one
   horizontal sum per token; a query's blocks in order, so its arithmetic is the per-query loop's), softmax, and
   sum_t p_t V_t for QB queries at a time with their accumulators in registers (attend() keeps them in memory).
   A query's arithmetic is the same whatever else is in its task (rows, tokens beyond its own length skipped). */
#define QB 4  /* queries per pass over V */
static inline __attribute__((always_inline)) void attend_vec(
        const float *q, int64_t q_row_stride, Partial *parts, const void *k_cache, const void *v_cache,
        const _Float16 *k_scales, const _Float16 *v_scales, const int dtype, const int64_t *table, int64_t t0,
        const int64_t *lens, int rows, int g, int group, int kv_heads, int block_size, int log2_bs, float scale,
        const int head_dim) {
    enum { V = 16 };
    const int nv = head_dim / V;
    float scores[MAX_Q][CHUNK] __attribute__((aligned(64))), ks[CHUNK], vs[CHUNK], mx[MAX_Q], sum[MAX_Q];
    const float *krow[CHUNK], *vrow[CHUNK];
    float kbuf[dtype == 0 ? 1 : CHUNK * head_dim], vbuf[dtype == 0 ? 1 : CHUNK * head_dim];  /* bf16 / int8 widened */
    int64_t n_ctx = lens[rows - 1], t1 = t0 + CHUNK < n_ctx ? t0 + CHUNK : n_ctx, n = t1 - t0, seen[MAX_Q];
    for (int x = 0; x < rows; x++) {
        int64_t m = lens[x] - t0;
        seen[x] = m < 0 ? 0 : m < n ? m : n;
    }
    for (int64_t t = 0; t < n; t++) {
        const void *kr = token_row(k_cache, k_scales, dtype, table, t0 + t, n_ctx, block_size, log2_bs, g, kv_heads,
                                   head_dim, &ks[t]);
        const void *vr = token_row(v_cache, v_scales, dtype, table, t0 + t, n_ctx, block_size, log2_bs, g, kv_heads,
                                   head_dim, &vs[t]);
        ks[t] *= scale;
        if (dtype == 0) {
            krow[t] = (const float *)kr, vrow[t] = (const float *)vr;
        } else {
            krow[t] = kbuf + t * head_dim, vrow[t] = vbuf + t * head_dim;
            for (int i = 0; i < head_dim; i += V) {
                if (dtype == 1) {
                    widen16_bf16((const uint16_t *)kr + i, kbuf + t * head_dim + i);
                    widen16_bf16((const uint16_t *)vr + i, vbuf + t * head_dim + i);
                } else {
                    __m128i kb = _mm_loadu_si128((const __m128i *)((const int8_t *)kr + i));
                    __m128i vb = _mm_loadu_si128((const __m128i *)((const int8_t *)vr + i));
                    _mm512_storeu_ps(kbuf + t * head_dim + i, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(kb)));
                    _mm512_storeu_ps(vbuf + t * head_dim + i, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(vb)));
                }
            }
        }
    }
    int nq = rows * group;
    int64_t scored = 0;  /* the task's longest range of tokens */
    __m512 m16[MAX_Q];  /* per query: the running maximum of its scores, lane by lane */
    for (int qi = 0; qi < nq; qi++) {
        m16[qi] = _mm512_set1_ps(-INFINITY);
        if (seen[qi / group] > scored) scored = seen[qi / group];
    }
    /* scores, 16 tokens at a time, block by block for every query: a block's K rows (4-8 KB) stay in L1 for all
       the queries, where each query read the chunk's rows (32-64 KB) again */
    for (int64_t tb = 0; tb < scored; tb += 16) {
        for (int qi = 0; qi < nq; qi++) {
            int64_t own = seen[qi / group];
            if (tb >= own) continue;
            const float *qv = q + (int64_t)(qi / group) * q_row_stride + (int64_t)(qi % group) * head_dim;
            int cnt = own - tb < 16 ? (int)(own - tb) : 16;
            __mmask16 valid = (__mmask16)(cnt == 16 ? 0xFFFF : (1u << cnt) - 1);
            __m512 s;
            if (cnt == 16) {  /* a full block: no test per token, so the 16 sums stay in registers */
                __m512 acc[16];
                for (int u = 0; u < 16; u++) {
                    acc[u] = _mm512_setzero_ps();
                    for (int i = 0; i < nv; i++)
                        acc[u] = _mm512_fmadd_ps(_mm512_loadu_ps(qv + i * V), _mm512_loadu_ps(krow[tb + u] + i * V),
                                                 acc[u]);
                }
                s = _mm512_mul_ps(sum16(acc), _mm512_loadu_ps(ks + tb));
            } else {  /* the same arithmetic for the block's first cnt tokens */
                __m512 acc[16];
                for (int u = 0; u < 16; u++) {
                    acc[u] = _mm512_setzero_ps();
                    if (u < cnt)
                        for (int i = 0; i < nv; i++)
                            acc[u] = _mm512_fmadd_ps(_mm512_loadu_ps(qv + i * V),
                                                     _mm512_loadu_ps(krow[tb + u] + i * V), acc[u]);
                }
                s = _mm512_mul_ps(sum16(acc), _mm512_maskz_loadu_ps(valid, ks + tb));
            }
            _mm512_store_ps(scores[qi] + tb, s);
            m16[qi] = _mm512_mask_max_ps(m16[qi], valid, m16[qi], s);
        }
    }
    for (int qi = 0; qi < nq; qi++) {
        int64_t own = seen[qi / group];
        mx[qi] = own ? _mm512_reduce_max_ps(m16[qi]) : -INFINITY;
        sum[qi] = own ? exp_shifted(scores[qi], own, mx[qi]) : 0.0f;
    }
    for (int q0 = 0; q0 < nq; q0 += QB) {  /* sum_t p_t V_t, QB queries at once */
        int nb = nq - q0 < QB ? nq - q0 : QB;
        __m512 acc[QB][MAX_D / V];
        int64_t own[QB], longest = 0;
        for (int j = 0; j < QB; j++) {
            own[j] = j < nb ? seen[(q0 + j) / group] : 0;
            if (own[j] > longest) longest = own[j];
            for (int i = 0; i < nv; i++) acc[j][i] = _mm512_setzero_ps();
        }
        for (int64_t t = 0; t < longest; t++) {
            const float *v = vrow[t];
            for (int j = 0; j < QB; j++) {
                if (t >= own[j]) continue;
                __m512 w = _mm512_set1_ps(scores[q0 + j][t] * vs[t]);
                for (int i = 0; i < nv; i++) acc[j][i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(v + i * V), acc[j][i]);
            }
        }
        for (int j = 0; j < nb; j++) {
            int qi = q0 + j;
            Partial p = parts[qi / group];
            p.m[qi % group] = mx[qi];
            p.l[qi % group] = sum[qi];
            for (int i = 0; i < nv; i++)
                _mm512_storeu_ps(p.acc + (int64_t)(qi % group) * head_dim + i * V, acc[j][i]);
        }
    }
}
#endif

#ifdef __AVX512F__
/* bf16 rows of tokens t .. t + count - 1 (every KV head's, `width` values each, one run per token in the cache)
   widened exactly into dst[count][width] */
static inline void widen_block(const uint16_t *cache, const int64_t *table, int64_t t, int count, int block_size,
                               int log2_bs, int64_t width, float *dst) {
    for (int u = 0; u < count; u++) {
        const uint16_t *row = cache + slot_of(table, t + u, block_size, log2_bs) * width;
        for (int64_t i = 0; i < width; i += 16) widen16_bf16(row + i, dst + u * width + i);
    }
}

/* How many of the 16 tokens from tb a row with `own` tokens in this chunk scores (0: none) */
static inline int block_tokens(int64_t own, int64_t tb) {
    return tb >= own ? 0 : own - tb < 16 ? (int)(own - tb) : 16;
}

/* Floats of scratch attend_stream needs for `rows` rows of `heads` query heads over kvh x d (its layout below). */
static inline int64_t stream_scratch(int rows, int heads, int64_t width) {
    return (int64_t)rows * heads * (CHUNK + 16) + 16 * width + 16;
}

/* The one-pass path (a whole run of at most WIDE_ROWS rows over a bf16 cache: a decode row and its drafts) for every
   KV head at once, streamed 16 tokens at a time. The scores pass widens a block's K rows of every head (one
   contiguous run per token) into `kb`, which stays in L1, and scores it for every query before it reads the next
   block; the sums pass does the same with V. While it scores a block it asks for the K rows AHEAD tokens on and
   for the block's own V rows (the sums pass then finds them in L2), a few rows per query head, spread over the
   arithmetic: asked for all at once they stalled it (1.09-1.28x the time of the old path), spread they overlap it.
   The old path read the whole chunk first (into a 196 KB buffer) and then computed, taking the reading's time plus
   the arithmetic's; this takes 0.75-0.93x its time at 16 sequences of 512 tokens and 0.80-0.96x at 64 (medians
   0.88x and 0.87x over 6-7 runs on a noisy Zen 5 VM; docs/performance.md, issue 19).
   Each query's operations and their order are attend_vec's with bf16 rows (ks = scale, vs = 1): the same bits.
   Query qi = x * heads + h (row x, query head h = g * group + j), its partial parts[x * kvh + g] at j.
   scratch (64-byte aligned, stream_scratch floats): scores [rows * heads][CHUNK], running maxima [rows * heads][16],
   then kb [16][kvh * d]. */
static inline __attribute__((always_inline)) void attend_stream(
        const float *q, int64_t q_row_stride, Partial *parts, const uint16_t *k_cache, const uint16_t *v_cache,
        const int64_t *table, int64_t t0, const int64_t *lens, int rows, int group, int kvh, int block_size,
        int log2_bs, float scale, const int head_dim, float *scratch) {
    enum { V = 16 };
    const int nv = head_dim / V, heads = kvh * group, nq = rows * heads;
    const int64_t width = (int64_t)kvh * head_dim;
    float *scores = scratch, *maxima = scratch + (int64_t)nq * CHUNK, *kb = maxima + (int64_t)nq * 16;
    int64_t n_ctx = lens[rows - 1], t1 = t0 + CHUNK < n_ctx ? t0 + CHUNK : n_ctx, n = t1 - t0, seen[WIDE_ROWS];
    int64_t scored = 0;  /* the task's longest range of tokens */
    for (int x = 0; x < rows; x++) {
        int64_t m = lens[x] - t0;
        seen[x] = m < 0 ? 0 : m < n ? m : n;
        if (seen[x] > scored) scored = seen[x];
    }
    const __m512 scale16 = _mm512_set1_ps(1.0f * scale);
    for (int qi = 0; qi < nq; qi++) _mm512_store_ps(maxima + qi * 16, _mm512_set1_ps(-INFINITY));
    for (int64_t t = 0; t < AHEAD && t < scored; t++) {  /* the first blocks' K rows (the loop asks AHEAD on) */
        const char *kr = (const char *)(k_cache + slot_of(table, t0 + t, block_size, log2_bs) * width);
        for (int64_t off = 0; off < width * 2; off += 64) __builtin_prefetch(kr + off, 0, 3);
    }
    for (int64_t tb = 0; tb < scored; tb += 16) {
        int block = scored - tb < 16 ? (int)(scored - tb) : 16;
        widen_block(k_cache, table, t0 + tb, block, block_size, log2_bs, width, kb);
        for (int x = 0; x < rows; x++) {
            int cnt = block_tokens(seen[x], tb);
            if (cnt == 0) continue;
            __mmask16 valid = (__mmask16)(cnt == 16 ? 0xFFFF : (1u << cnt) - 1);
            for (int h = 0; h < heads; h++) {
                if (x == rows - 1)  /* spread over the heads: K AHEAD tokens on (L1), this block's V (L2) */
                    for (int u = h * 16 / heads; u < (h + 1) * 16 / heads; u++) {
                        if (tb + AHEAD + u < n) {
                            const char *kr = (const char *)(k_cache + width * slot_of(table, t0 + tb + AHEAD + u,
                                                                                      block_size, log2_bs));
                            for (int64_t off = 0; off < width * 2; off += 64) __builtin_prefetch(kr + off, 0, 3);
                        }
                        if (u < block) {
                            const char *vr = (const char *)(v_cache + width * slot_of(table, t0 + tb + u, block_size,
                                                                                      log2_bs));
                            for (int64_t off = 0; off < width * 2; off += 64) __builtin_prefetch(vr + off, 0, 2);
                        }
                    }
                int qi = x * heads + h;
                const float *qv = q + (int64_t)x * q_row_stride + (int64_t)h * head_dim;
                const float *kg = kb + (h / group) * head_dim;
                __m512 s, acc[16];
                if (cnt == 16) {  /* attend_vec's full block */
                    for (int u = 0; u < 16; u++) {
                        acc[u] = _mm512_setzero_ps();
                        for (int i = 0; i < nv; i++)
                            acc[u] = _mm512_fmadd_ps(_mm512_loadu_ps(qv + i * V),
                                                     _mm512_loadu_ps(kg + u * width + i * V), acc[u]);
                    }
                    s = _mm512_mul_ps(sum16(acc), scale16);
                } else {  /* attend_vec's partial block */
                    for (int u = 0; u < 16; u++) {
                        acc[u] = _mm512_setzero_ps();
                        if (u < cnt)
                            for (int i = 0; i < nv; i++)
                                acc[u] = _mm512_fmadd_ps(_mm512_loadu_ps(qv + i * V),
                                                         _mm512_loadu_ps(kg + u * width + i * V), acc[u]);
                    }
                    s = _mm512_mul_ps(sum16(acc), _mm512_maskz_mov_ps(valid, scale16));
                }
                _mm512_store_ps(scores + (int64_t)qi * CHUNK + tb, s);
                __m512 m = _mm512_load_ps(maxima + qi * 16);
                _mm512_store_ps(maxima + qi * 16, _mm512_mask_max_ps(m, valid, m, s));
            }
        }
    }
    for (int x = 0; x < rows; x++)
        for (int h = 0; h < heads; h++) {
            int qi = x * heads + h;
            Partial p = parts[x * kvh + h / group];
            int64_t own = seen[x];
            float mx = own ? _mm512_reduce_max_ps(_mm512_load_ps(maxima + qi * 16)) : -INFINITY;
            p.m[h % group] = mx;
            p.l[h % group] = own ? exp_shifted(scores + (int64_t)qi * CHUNK, own, mx) : 0.0f;
            memset(p.acc + (int64_t)(h % group) * head_dim, 0, sizeof(float) * head_dim);
        }
    for (int64_t tb = 0; tb < scored; tb += 16) {
        int block = scored - tb < 16 ? (int)(scored - tb) : 16;
        widen_block(v_cache, table, t0 + tb, block, block_size, log2_bs, width, kb);
        for (int x = 0; x < rows; x++) {
            int cnt = block_tokens(seen[x], tb);
            if (cnt == 0) continue;
            for (int h = 0; h < heads; h++) {  /* sum_t p_t V_t, continued from the previous blocks in token order */
                const float *p = scores + (int64_t)(x * heads + h) * CHUNK + tb, *vg = kb + (h / group) * head_dim;
                float *out = parts[x * kvh + h / group].acc + (int64_t)(h % group) * head_dim;
                __m512 acc[MAX_D / V];
                for (int i = 0; i < nv; i++) acc[i] = _mm512_loadu_ps(out + i * V);
                for (int u = 0; u < cnt; u++) {
                    __m512 w = _mm512_set1_ps(p[u] * 1.0f);
                    for (int i = 0; i < nv; i++)
                        acc[i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vg + u * width + i * V), acc[i]);
                }
                for (int i = 0; i < nv; i++) _mm512_storeu_ps(out + i * V, acc[i]);
            }
        }
    }
}
#endif

/* out[j] = the merged softmax average of a sequence's chunks (task i, i + stride, ...), chunk by chunk in order */
static void merge(const float *pm, const float *pl, const float *pacc, int64_t first, int64_t count, int64_t stride,
                  int group, int head_dim, float *og) {
    for (int j = 0; j < group; j++) {
        float m = -INFINITY, l = 0.0f;
        for (int64_t c = 0; c < count; c++) m = fmaxf(m, pm[(first + c * stride) * group + j]);
        float *o = og + (int64_t)j * head_dim;
        memset(o, 0, sizeof(float) * head_dim);
        for (int64_t c = 0; c < count; c++) {
            int64_t i = (first + c * stride) * group + j;
            if (pl[i] == 0.0f) continue;  /* an empty range */
            float w = expf(pm[i] - m);
            l += w * pl[i];
            for (int d = 0; d < head_dim; d++) o[d] += w * pacc[i * head_dim + d];
        }
        float inv = l > 0.0f ? 1.0f / l : 0.0f;
        for (int d = 0; d < head_dim; d++) o[d] *= inv;
    }
}

/* Store each sequence's new K and V row (token b's rows `stride` floats apart) at its cache slot, in the cache's
   element type: bf16 by nearest-even, as PyTorch converts; int8 as Int8KVCache.write quantizes (per KV head:
   scale = fp16(max|x| / 127), q = round-half-even(x / max(scale, fp16 tiny)) clamped to [-127, 127]). */
__attribute__((optimize("no-unsafe-math-optimizations")))  /* x / divisor rounded as PyTorch rounds it */
static void store_rows(const float *rows, int64_t stride, const int64_t *slots, void *cache, _Float16 *scales,
                       int dtype, int batch, int kv_heads, int head_dim) {
    int64_t width = (int64_t)kv_heads * head_dim;
    for (int b = 0; b < batch; b++) {
        const float *src = rows + b * stride;
        if (dtype == 0) {
            memcpy((float *)cache + slots[b] * width, src, sizeof(float) * width);
        } else if (dtype == 1) {
            uint16_t *dst = (uint16_t *)cache + slots[b] * width;
            for (int64_t i = 0; i < width; i++) {
                uint32_t bits;
                memcpy(&bits, src + i, sizeof bits);
                dst[i] = (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
            }
        } else {
            for (int g = 0; g < kv_heads; g++) {
                const float *x = src + (int64_t)g * head_dim;
                int8_t *dst = (int8_t *)cache + slots[b] * width + (int64_t)g * head_dim;
                float amax = 0.0f;
                for (int i = 0; i < head_dim; i++) amax = fmaxf(amax, fabsf(x[i]));
                _Float16 scale = (_Float16)(amax / 127.0f);
                float divisor = fmaxf((float)scale, 6.103515625e-05f);  /* fp16's smallest normal */
                for (int i = 0; i < head_dim; i++) dst[i] = (int8_t)fminf(fmaxf(nearbyintf(x[i] / divisor), -127.0f), 127.0f);
                scales[slots[b] * kv_heads + g] = scale;
            }
        }
    }
}

/* k_new / v_new (or NULL): the step's new rows, one token per row, stored first (see store_rows).
   runs (or NULL: every row its own run): num_runs + 1 row offsets; run r is rows [runs[r], runs[r + 1]), one
   sequence's rows with the same block table and non-decreasing context lengths. */
int paged_decode_attention(const float *q, float *out, const void *k_cache, const void *v_cache,
                           const _Float16 *k_scales, const _Float16 *v_scales, int dtype,
                           const int64_t *block_tables, const int64_t *context_lens,
                           int batch, int max_blocks, int heads, int kv_heads, int head_dim, int block_size,
                           float scale, const float *k_new, const float *v_new, int64_t k_stride, int64_t v_stride,
                           const int64_t *slots, const int64_t *runs, int num_runs) {
    int group = heads / kv_heads;
    int log2_bs = __builtin_ctz((unsigned)block_size);  /* block_size is a power of two (EngineConfig checks) */
    if (head_dim > MAX_D || group > MAX_G || heads % kv_heads || block_size != 1 << log2_bs) return 1;
    if (runs != NULL && (num_runs < 0 || runs[0] != 0 || runs[num_runs] != batch)) return 1;
    if (k_new != NULL) {
        store_rows(k_new, k_stride, slots, (void *)k_cache, (_Float16 *)k_scales, dtype, batch, kv_heads, head_dim);
        store_rows(v_new, v_stride, slots, (void *)v_cache, (_Float16 *)v_scales, dtype, batch, kv_heads, head_dim);
    }
    /* pieces: runs cut into at most MAX_Q / group rows; piece i is rows [first[i], first[i + 1]), its chunks are
       task_base[i] .. task_base[i + 1] - 1 (times kv_heads); row x's partials start at row_base[x] (times kv_heads) */
    int max_rows = MAX_Q / group;
    int64_t *first = malloc(sizeof(int64_t) * ((size_t)batch + 1)), *task_base = malloc(sizeof(int64_t) * ((size_t)batch + 1));
    int64_t *row_base = malloc(sizeof(int64_t) * ((size_t)batch + 1));
    unsigned char *short_run = malloc((size_t)batch + 1);  /* piece i is a whole run of at most WIDE_ROWS rows */
    int64_t pieces = 0, run = 0;
    if (first == NULL || task_base == NULL || row_base == NULL || short_run == NULL) {
        free(first), free(task_base), free(row_base), free(short_run);
        return 2;
    }
    task_base[0] = row_base[0] = 0;
    for (int64_t x = 0; x < batch;) {
        int64_t run_end = runs == NULL ? x + 1 : runs[run + 1];
        if (run_end <= x || run_end > batch) {
            free(first), free(task_base), free(row_base), free(short_run);
            return 1;
        }
        int64_t end = run_end - x > max_rows ? x + max_rows : run_end;
        int64_t n = context_lens[end - 1], chunks = n > 0 ? (n + CHUNK - 1) / CHUNK : 1;
        first[pieces] = x;
        short_run[pieces] = (runs == NULL || x == runs[run]) && end == run_end && end - x <= WIDE_ROWS;
        task_base[pieces + 1] = task_base[pieces] + chunks;
        for (int64_t y = x; y < end; y++) row_base[y + 1] = row_base[y] + chunks;
        pieces++;
        x = end;
        if (x == run_end) run++;
    }
    first[pieces] = batch;
    int64_t tasks = task_base[pieces] * kv_heads, entries = row_base[batch] * kv_heads;
    float *pm = malloc(sizeof(float) * (size_t)(entries * group)), *pl = malloc(sizeof(float) * (size_t)(entries * group));
    float *pacc = malloc(sizeof(float) * (size_t)(entries * group * head_dim));
    int status = pm && pl && pacc ? 0 : 2;
    if (status == 0) {
#ifdef __AVX512F__
        /* attend_stream for the short runs: a bf16 cache, a vector head size (so kv_heads <= WIDE_MAX / 64, which
           bounds `parts` below), a token's rows of every head in at most WIDE_MAX floats (`kb`: 16 tokens, 32 KB),
           some short run, and at least as many (piece, chunk) tasks as threads, so that taking a piece's heads
           together leaves no thread idle */
        int any_short = 0;
        for (int64_t i = 0; i < pieces; i++) any_short |= short_run[i];
        int stream = any_short && dtype == 1 && (head_dim == 64 || head_dim == 128)
                     && kv_heads * head_dim <= WIDE_MAX && task_base[pieces] >= omp_get_max_threads();
        int stream_failed = 0;  /* some thread's scratch could not be allocated: every task takes the per-head path */
#endif
        #pragma omp parallel
        {
            float *scratch = NULL;  /* this thread's for attend_stream */
#ifdef __AVX512F__
            if (stream) {
                size_t floats = (size_t)stream_scratch(WIDE_ROWS, heads, (int64_t)kv_heads * head_dim);
                scratch = aligned_alloc(64, sizeof(float) * ((floats + 15) / 16 * 16));
                if (scratch == NULL) {
                    #pragma omp atomic write
                    stream_failed = 1;
                }
            }
            #pragma omp barrier
            int streamed = stream && !stream_failed;  /* the same for every thread: a run's heads go one way */
#endif
            #pragma omp for schedule(dynamic)
            for (int64_t task = 0; task < tasks; task++) {  /* task = (task_base[piece] + chunk) * kv_heads + g */
                int64_t index = task / kv_heads, piece = 0;
                while (task_base[piece + 1] <= index) piece++;
                int64_t chunk = index - task_base[piece], x0 = first[piece], t0 = chunk * CHUNK;
                int rows = (int)(first[piece + 1] - x0);
                const int64_t *table = block_tables + (first[piece + 1] - 1) * max_blocks;
                /* A whole run of a few rows (a decode row and its drafts: bound by reading the cache) takes every KV
                   head in the task of g = 0 (attend_stream); the other tasks of its chunk are empty. A longer run (a
                   prompt chunk, cache-resident) keeps one head per task. Either way each row computes the same thing,
                   in the same order (a failed allocation means the per-head path for every task of the call). */
                int g_first = (int)(task % kv_heads);
#ifdef __AVX512F__
                if (streamed && short_run[piece]) {
                    if (g_first != 0) continue;
                    Partial parts[WIDE_ROWS * (WIDE_MAX / 64)];
                    for (int x = 0; x < rows; x++)
                        for (int g = 0; g < kv_heads; g++)
                            parts[x * kv_heads + g] = partial_at(pm, pl, pacc,
                                                                 (row_base[x0 + x] + chunk) * kv_heads + g, group,
                                                                 head_dim);
#define STREAM(HD) attend_stream(q + x0 * heads * head_dim, (int64_t)heads * head_dim, parts, \
                                 (const uint16_t *)k_cache, (const uint16_t *)v_cache, table, t0, context_lens + x0, \
                                 rows, group, kv_heads, block_size, log2_bs, scale, HD, scratch)
                    if (head_dim == 64) STREAM(64);
                    else STREAM(128);
#undef STREAM
                    continue;
                }
#endif
                {
                    int g = g_first;
                    Partial parts[MAX_Q];
                    for (int x = 0; x < rows; x++)
                        parts[x] = partial_at(pm, pl, pacc, (row_base[x0 + x] + chunk) * kv_heads + g, group,
                                              head_dim);
                    const float *qg = q + (x0 * heads + (int64_t)g * group) * head_dim;
                    /* constant element types and common head sizes: each loop nest compiles for its case */
#define ATTEND(DT, HD) attend(qg, (int64_t)heads * head_dim, parts, k_cache, v_cache, k_scales, v_scales, DT, table, \
                              t0, context_lens + x0, rows, g, group, kv_heads, block_size, log2_bs, scale, HD)
#define ATTEND_DT(DT) do { if (head_dim == 64) ATTEND(DT, 64); else if (head_dim == 128) ATTEND(DT, 128); \
                           else ATTEND(DT, head_dim); } while (0)
#ifdef __AVX512F__
#define ATTEND_VEC(DT, HD) attend_vec(qg, (int64_t)heads * head_dim, parts, k_cache, v_cache, k_scales, v_scales, \
                                  DT, table, t0, context_lens + x0, rows, g, group, kv_heads, block_size, log2_bs, \
                                  scale, HD)
                    if (head_dim == 64) {
                        if (dtype == 0) ATTEND_VEC(0, 64);
                        else if (dtype == 1) ATTEND_VEC(1, 64);
                        else ATTEND_VEC(2, 64);
                    } else if (head_dim == 128) {
                        if (dtype == 0) ATTEND_VEC(0, 128);
                        else if (dtype == 1) ATTEND_VEC(1, 128);
                        else ATTEND_VEC(2, 128);
                    } else
#endif
                    if (dtype == 0) ATTEND_DT(0);
                    else if (dtype == 1) ATTEND_DT(1);
                    else ATTEND_DT(2);
#undef ATTEND_VEC
#undef ATTEND_DT
#undef ATTEND
                }
            }
            free(scratch);
        }
        #pragma omp parallel for collapse(2) schedule(static)
        for (int b = 0; b < batch; b++)
            for (int g = 0; g < kv_heads; g++)
                merge(pm, pl, pacc, row_base[b] * kv_heads + g, row_base[b + 1] - row_base[b], kv_heads,
                      group, head_dim, out + ((int64_t)b * heads + (int64_t)g * group) * head_dim);
    }
    free(pm);
    free(pl);
    free(pacc);
    free(first);
    free(task_base);
    free(row_base);
    free(short_run);
    return status;
}
