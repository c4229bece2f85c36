/* The SwiGLU activation of a fused gate/up projection's output (freehold/models/llama.py, MLP):
       out[t, i] = silu(g) * u,   g = gu[t, i], u = gu[t, I + i],   silu(g) = g * sigmoid(g)
   sigmoid from e = e^-|g| (never overflows): 1 / (1 + e) for g >= 0, e * (1 / (1 + e)) below, and 0 below -87
   (e^-87 is about fp32's smallest normal, where exp_ps stops; PyTorch's fp32 silu gives -0 there too, and NaN for
   -inf). With AVX-512 every element takes the same 16-lane path (the row's tail masked), so an element's result
   depends only on its inputs: the same in any batch. Elsewhere the same formula with expf. */
#include <math.h>
#include <stdint.h>
#include "vec_exp.h"

int silu_mul(const float *gu, float *out, int64_t rows, int64_t inter) {
    #pragma omp parallel for schedule(static) if (rows * inter >= 1 << 15)
    for (int64_t t = 0; t < rows; t++) {
        const float *g = gu + t * 2 * inter, *u = g + inter;
        float *o = out + t * inter;
        int64_t i = 0;
#ifdef __AVX512F__
        for (; i < inter; i += 16) {
            __mmask16 lanes = (__mmask16)(inter - i >= 16 ? 0xFFFF : (1u << (inter - i)) - 1);
            __m512 gv = _mm512_maskz_loadu_ps(lanes, g + i), uv = _mm512_maskz_loadu_ps(lanes, u + i);
            __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(gv)));
            __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
            __m512 sig = _mm512_mask_mul_ps(inv, _mm512_cmp_ps_mask(gv, _mm512_setzero_ps(), _CMP_LT_OQ), e, inv);
            sig = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(gv, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ), sig);
            _mm512_mask_storeu_ps(o + i, lanes, _mm512_mul_ps(_mm512_mul_ps(gv, sig), uv));
        }
#endif
        for (; i < inter; i++) {
            float e = expf(-fabsf(g[i])), inv = 1.0f / (1.0f + e);
            float sig = g[i] < -87.0f ? 0.0f : g[i] < 0.0f ? e * inv : inv;
            o[i] = g[i] * sig * u[i];
        }
    }
    return 0;
}
