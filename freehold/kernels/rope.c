/* Rotary position embedding, "rotate half" layout (freehold/layers/rotary.py):
       y[i] = x[i] cos[i] + x[(i + D/2) % D] sin[i]        cos = (c, c), sin = (-s, s) per token, [T, D]
   over `heads` consecutive heads of each token; x rows are `stride` floats apart (a query/key slice of the
   fused qkv output), y is contiguous [T, heads, D]. One call per layer instead of five PyTorch ops; each
   element's arithmetic is the same in any batch. */
#include <stdint.h>

int rope(const float *x, float *y, const float *cos, const float *sin, int64_t tokens, int64_t heads,
         int64_t head_dim, int64_t stride) {
    if (head_dim % 2) return 1;
    int64_t half = head_dim / 2;
    #pragma omp parallel for schedule(static) if (tokens * heads * head_dim >= 1 << 16)
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos + t * head_dim, *s = sin + t * head_dim;
        for (int64_t h = 0; h < heads; h++) {
            const float *v = x + t * stride + h * head_dim;
            float *out = y + (t * heads + h) * head_dim;
            for (int64_t i = 0; i < half; i++) out[i] = v[i] * c[i] + v[i + half] * s[i];
            for (int64_t i = half; i < head_dim; i++) out[i] = v[i] * c[i] + v[i - half] * s[i];
        }
    }
    return 0;
}
