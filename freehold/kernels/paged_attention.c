/* Decode attention straight from the paged KV cache: one query token per sequence, no gather copy.

   For sequence b, query head h (KV head g = h / G, G = H / KVH) and its context of n tokens:
       s_t = scale * q[b,h] . K[slot(b,t), g]            slot(b,t) = table[b][t / bs] * bs + t % bs
       p_t = exp(s_t - max_u s_u) / sum_u exp(s_u - max_u s_u)
       out[b,h] = sum_t p_t V[slot(b,t), g]
   Each (b, g) pair is one task: its G query heads share every K/V row they read, so the cache is read once per
   step. Tasks run in parallel (OpenMP, the same libgomp torch uses); a task's arithmetic does not depend on the
   other rows of the batch, so a sequence gets the same result in any batch.

   Cache element types: 0 = fp32, 1 = bf16, 2 = int8 with one fp16 scale per (slot, KV head). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_D 256
#define MAX_G 16
#define AHEAD 16  /* tokens of software prefetch distance */

static inline float bf16_to_float(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Ask for the (slot, g) row `ahead` tokens early: rows of one head are 1/KVH of each cache line run and blocks
   are scattered, so the hardware prefetcher alone leaves every row a DRAM round trip. */
static inline void prefetch_row(const void *cache, int dtype, int64_t slot, int g, int kvh, int d) {
    int elem = dtype == 0 ? 4 : dtype == 1 ? 2 : 1;
    const char *row = (const char *)cache + (slot * kvh + g) * (int64_t)d * elem;
    for (int off = 0; off < d * elem; off += 64) __builtin_prefetch(row + off, 0, 0);
}

/* Cache slot of a sequence's token t: its block from the table, then the offset inside the block. */
static inline int64_t slot_of(const int64_t *table, int64_t t, int block_size, int log2_bs) {
    return table[t >> log2_bs] * block_size + (t & (block_size - 1));
}

/* row[0:D] <- the (slot, g) vector of a cache as fp32 */
static inline const float *load_row(const void *cache, const _Float16 *scales, int dtype, int64_t slot, int g,
                                    int kvh, int d, float *buf) {
    int64_t off = (slot * kvh + g) * (int64_t)d;
    if (dtype == 0) return (const float *)cache + off;
    if (dtype == 1) {
        const uint16_t *src = (const uint16_t *)cache + off;
        for (int i = 0; i < d; i++) buf[i] = bf16_to_float(src[i]);
    } else {
        const int8_t *src = (const int8_t *)cache + off;
        float s = (float)scales[slot * kvh + g];
        for (int i = 0; i < d; i++) buf[i] = s * (float)src[i];
    }
    return buf;
}

/* Token t's (slot, g) row of one cache as fp32, after asking for token t + AHEAD's row. */
static inline const float *token_row(const void *cache, const _Float16 *scales, int dtype, const int64_t *table,
                                     int64_t t, int64_t n, int block_size, int log2_bs, int g, int kvh, int d,
                                     float *buf) {
    if (t + AHEAD < n) prefetch_row(cache, dtype, slot_of(table, t + AHEAD, block_size, log2_bs), g, kvh, d);
    return load_row(cache, scales, dtype, slot_of(table, t, block_size, log2_bs), g, kvh, d, buf);
}

/* One task: the `group` query heads of KV head g over one sequence's n tokens. Inlined with a constant head_dim
   for the common sizes so the row loops unroll into registers. */
static inline __attribute__((always_inline)) int attend(
        const float *qg, float *og, const void *k_cache, const void *v_cache, const _Float16 *k_scales,
        const _Float16 *v_scales, int dtype, const int64_t *table, int64_t n, int g, int group, int kv_heads,
        int block_size, int log2_bs, float scale, const int head_dim) {
    float *scores = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1) * group);
    if (scores == NULL) return 1;
    float buf[MAX_D], acc[MAX_G][MAX_D], mx[MAX_G], sum[MAX_G];
    for (int j = 0; j < group; j++) { mx[j] = -INFINITY; sum[j] = 0.0f; }
    for (int64_t t = 0; t < n; t++) {
        const float *k = token_row(k_cache, k_scales, dtype, table, t, n, block_size, log2_bs, g, kv_heads, head_dim,
                                    buf);
        for (int j = 0; j < group; j++) {
            const float *qj = qg + (int64_t)j * head_dim;
            float dot = 0.0f;
            for (int i = 0; i < head_dim; i++) dot += qj[i] * k[i];
            dot *= scale;
            scores[j * n + t] = dot;
            if (dot > mx[j]) mx[j] = dot;
        }
    }
    for (int j = 0; j < group; j++) {
        float *sj = scores + j * n;
        for (int64_t t = 0; t < n; t++) { sj[t] = expf(sj[t] - mx[j]); sum[j] += sj[t]; }
        memset(acc[j], 0, sizeof(float) * head_dim);
    }
    for (int64_t t = 0; t < n; t++) {
        const float *v = token_row(v_cache, v_scales, dtype, table, t, n, block_size, log2_bs, g, kv_heads, head_dim,
                                    buf);
        for (int j = 0; j < group; j++) {
            float p = scores[j * n + t];
            for (int i = 0; i < head_dim; i++) acc[j][i] += p * v[i];
        }
    }
    for (int j = 0; j < group; j++) {
        float inv = sum[j] > 0.0f ? 1.0f / sum[j] : 0.0f;
        for (int i = 0; i < head_dim; i++) og[(int64_t)j * head_dim + i] = acc[j][i] * inv;
    }
    free(scores);
    return 0;
}

int paged_decode_attention(const float *q, float *out, const void *k_cache, const void *v_cache,
                           const _Float16 *k_scales, const _Float16 *v_scales, int dtype,
                           const int64_t *block_tables, const int64_t *context_lens,
                           int batch, int max_blocks, int heads, int kv_heads, int head_dim, int block_size,
                           float scale) {
    int group = heads / kv_heads;
    int log2_bs = __builtin_ctz((unsigned)block_size);  /* block_size is a power of two (EngineConfig checks) */
    if (head_dim > MAX_D || group > MAX_G || heads % kv_heads || block_size != 1 << log2_bs) return 1;
    int failed = 0;
    #pragma omp parallel for collapse(2) schedule(dynamic)
    for (int b = 0; b < batch; b++) {
        for (int g = 0; g < kv_heads; g++) {
            int64_t first = ((int64_t)b * heads + (int64_t)g * group) * head_dim;
            const int64_t *table = block_tables + (int64_t)b * max_blocks;
            int64_t n = context_lens[b];
            int rc;
            if (head_dim == 64)
                rc = attend(q + first, out + first, k_cache, v_cache, k_scales, v_scales, dtype, table, n, g, group,
                            kv_heads, block_size, log2_bs, scale, 64);
            else if (head_dim == 128)
                rc = attend(q + first, out + first, k_cache, v_cache, k_scales, v_scales, dtype, table, n, g, group,
                            kv_heads, block_size, log2_bs, scale, 128);
            else
                rc = attend(q + first, out + first, k_cache, v_cache, k_scales, v_scales, dtype, table, n, g, group,
                            kv_heads, block_size, log2_bs, scale, head_dim);
            if (rc) failed = 1;
        }
    }
    return failed ? 2 : 0;
}
