/* Every decoder layer of a step whose rows are all decode rows, in one call: the kernels the layer-by-layer path
   calls (freehold/models/llama.py), in the same order, on the same values, so each row gets the same bits; only the
   Python between the ~10 kernel calls of each layer is gone (freehold/models/native_layers.py says when it runs).
   The kernels come as function pointers from their own shared objects, each built with its own flags. For the
   step's T rows, x the previous layer's output and r the residual stream (none before layer 0), layer l does
       h, r = add_rms_norm(x, r; w_in)
       qkv = int4(h; W_qkv) (+ b_qkv)                  [T, (H + 2 KVH) D]
       qk = rope(qkv[:, :H + KVH])                     [T, H + KVH, D]
       a = attention(q = qk[:, :H]; stores k = qk[:, H:], v = qkv[:, H + KVH:] at the step's slots first)
       x = int4(a; W_o)
       h, r = add_rms_norm(x, r; w_post)
       gu = int4(h; W_gate_up);  x = int4(silu(gu[:, :I]) * gu[:, I:]; W_down)
   and leaves x and r for the final norm. */
#include <stdint.h>
#include <string.h>

typedef int (*Int4Fn)(const float *x, float *y, const void *packed, const void *sz, int64_t m, int64_t n,
                      int64_t k);
typedef int (*NormFn)(const float *x, const float *residual, const float *w, float *r, float *y, int64_t rows,
                      int64_t dim, float eps);
typedef int (*RopeFn)(const float *x, float *y, const float *cos, const float *sin, int64_t tokens, int64_t heads,
                      int64_t head_dim, int64_t stride);
typedef int (*SiluMulFn)(const float *gu, float *out, int64_t rows, int64_t inter);
typedef int (*AttentionFn)(const float *q, float *out, const void *k_cache, const void *v_cache,
                           const void *k_scales, const void *v_scales, int dtype, const int64_t *block_tables,
                           const int64_t *context_lens, int batch, int max_blocks, int heads, int kv_heads,
                           int head_dim, int block_size, float scale, const float *k_new, const float *v_new,
                           int64_t k_stride, int64_t v_stride, const int64_t *slots, const int64_t *runs,
                           int num_runs);

typedef struct {
    Int4Fn int4;
    NormFn norm;
    RopeFn rope;
    SiluMulFn silu_mul;
    AttentionFn attention;
} Kernels;

typedef struct {  /* one layer's weights and KV storage (the plan in native_layers.py holds them alive) */
    const float *w_in, *w_post;  /* RMSNorm weights [E] */
    const void *qkv, *qkv_sz, *o, *o_sz, *gate_up, *gate_up_sz, *down, *down_sz;  /* packed int4 and (s, z) */
    const float *qkv_bias;  /* [(H + 2 KVH) D] or NULL */
    void *k_cache, *v_cache, *k_scales, *v_scales;  /* scales: int8 caches only, else NULL */
} Layer;

typedef struct {  /* the model's sizes */
    int64_t hidden, inter, heads, kv_heads, head_dim;
    float eps, scale;
    int kv_dtype, block_size;
} Dims;

typedef struct {  /* the step: its rows' positions in the cache, RoPE tables and scratch buffers */
    int64_t rows;
    const float *cos, *sin;  /* [T, D] */
    const int64_t *block_tables, *context_lens, *slots, *runs;  /* as paged_decode_attention takes them */
    int max_blocks, num_runs;
    float *h, *qkv, *qk, *q, *attn, *gu, *act;  /* [T, E], [T, (H + 2 KVH) D], [T, (H + KVH) D], [T, H D] x 2,
                                                   [T, 2 I], [T, I] */
} Step;

/* x [T, E]: the embeddings in, the last layer's output out; r [T, E]: the residual stream out. 0, or the first
   failing kernel's status plus 100 times its position in the layer (1-based) and 1000 times its layer. */
int decode_layers(const Kernels *k, const Layer *layers, int num_layers, const Dims *d, const Step *s, float *x,
                  float *r) {
    int64_t t = s->rows, e = d->hidden, hd = d->head_dim, qkv_w = (d->heads + 2 * d->kv_heads) * hd;
    int64_t qk_w = (d->heads + d->kv_heads) * hd, q_w = d->heads * hd;
    for (int l = 0; l < num_layers; l++) {
        const Layer *w = layers + l;
        int status;
#define CALL(at, expr) do { if ((status = (expr)) != 0) return status + 100 * (at) + 1000 * l; } while (0)
        CALL(1, k->norm(x, l ? r : NULL, w->w_in, r, s->h, t, e, d->eps));
        CALL(2, k->int4(s->h, s->qkv, w->qkv, w->qkv_sz, t, qkv_w, e));
        if (w->qkv_bias)
            for (int64_t i = 0; i < t; i++)
                for (int64_t j = 0; j < qkv_w; j++) s->qkv[i * qkv_w + j] += w->qkv_bias[j];
        CALL(3, k->rope(s->qkv, s->qk, s->cos, s->sin, t, d->heads + d->kv_heads, hd, qkv_w));
        for (int64_t i = 0; i < t; i++) memcpy(s->q + i * q_w, s->qk + i * qk_w, sizeof(float) * q_w);
        CALL(4, k->attention(s->q, s->attn, w->k_cache, w->v_cache, w->k_scales, w->v_scales, d->kv_dtype,
                             s->block_tables, s->context_lens, (int)t, s->max_blocks, (int)d->heads,
                             (int)d->kv_heads, (int)hd, d->block_size, d->scale, s->qk + q_w,
                             s->qkv + qk_w, qk_w, qkv_w, s->slots, s->runs, s->num_runs));
        CALL(5, k->int4(s->attn, x, w->o, w->o_sz, t, e, q_w));
        CALL(6, k->norm(x, r, w->w_post, r, s->h, t, e, d->eps));
        CALL(7, k->int4(s->h, s->gu, w->gate_up, w->gate_up_sz, t, 2 * d->inter, e));
        CALL(8, k->silu_mul(s->gu, s->act, t, d->inter));
        CALL(9, k->int4(s->act, x, w->down, w->down_sz, t, e, d->inter));
#undef CALL
    }
    return 0;
}
