/* The SwiGLU activation of a fused gate/up projection's output (freehold/models/llama.py, MLP):
       out[t, i] = silu(g) * u,   g = gu[t, i], u = gu[t, I + i],   silu(g) = g * sigmoid(g)
   sigmoid from e = e^-|g| (never overflows): 1 / (1 + e) for g >= 0, e * (1 / (1 + e)) below, and 0 below -87
   (e^-87 is about fp32's smallest normal, where exp_ps stops; PyTorch's fp32 silu gives -0 there too, and NaN for
   -inf). With AVX-512 every element takes the same 16-lane path (the row's tail masked), so an element's result
   depends only on its inputs: the same in any batch. Elsewhere the same formula with expf.
   silu_mul_bf16 takes bf16 in and gives bf16 out (prompt rows, whose gate/up come from a bf16 GEMM and whose
   SwiGLU output goes into one): each input widened exactly, the same 16-lane fp32 arithmetic, the result rounded to
   the nearest bf16 with ties to even as PyTorch rounds, so it is bit for bit silu_mul(gu.float()).to(bfloat16),
   NaN bits aside (this kernel writes 0xFFFF; PyTorch writes 0xFFFF on its vector path, 0x7FC0 on its scalar one),
   without the two conversions' passes over memory. Only built with AVX-512 BW and VL (silu_mul_bf16_supported):
   every CPU with native bf16 GEMMs, the only place it is called, has them. */
#include <math.h>
#include <stdint.h>
#include "vec_exp.h"

#ifdef __AVX512F__
/* silu(g) * u for 16 lanes */
static inline __m512 silu_mul16(__m512 gv, __m512 uv) {
    __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(gv)));
    __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    __m512 sig = _mm512_mask_mul_ps(inv, _mm512_cmp_ps_mask(gv, _mm512_setzero_ps(), _CMP_LT_OQ), e, inv);
    sig = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(gv, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ), sig);
    return _mm512_mul_ps(_mm512_mul_ps(gv, sig), uv);
}
#endif

static inline float silu_mul1(float g, float u) {
    float e = expf(-fabsf(g)), inv = 1.0f / (1.0f + e);
    float sig = g < -87.0f ? 0.0f : g < 0.0f ? e * inv : inv;
    return g * sig * u;
}

int silu_mul(const float *gu, float *out, int64_t rows, int64_t inter) {
    #pragma omp parallel for schedule(static) if (rows * inter >= 1 << 15)
    for (int64_t t = 0; t < rows; t++) {
        const float *g = gu + t * 2 * inter, *u = g + inter;
        float *o = out + t * inter;
        int64_t i = 0;
#ifdef __AVX512F__
        for (; i < inter; i += 16) {
            __mmask16 lanes = (__mmask16)(inter - i >= 16 ? 0xFFFF : (1u << (inter - i)) - 1);
            __m512 r = silu_mul16(_mm512_maskz_loadu_ps(lanes, g + i), _mm512_maskz_loadu_ps(lanes, u + i));
            _mm512_mask_storeu_ps(o + i, lanes, r);
        }
#endif
        for (; i < inter; i++) o[i] = silu_mul1(g[i], u[i]);
    }
    return 0;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SWIGLU_BF16 1
static inline __m512 widen16(__mmask16 lanes, const uint16_t *src) {  /* bf16 -> fp32, exact */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, src)), 16));
}

static inline __m256i narrow16(__m512 x) {  /* fp32 -> bf16: nearest, ties to even (PyTorch's formula); NaN 0xFFFF */
    __m512i bits = _mm512_castps_si512(x);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), odd), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0xFFFF));
    return _mm512_cvtepi32_epi16(r);  /* every lane <= 0xFFFF: truncation keeps it */
}
#else
#define SWIGLU_BF16 0
#endif

int silu_mul_bf16_supported(void) { return SWIGLU_BF16; }

/* Returns 0; 3 when this build lacks AVX-512 BW/VL (see silu_mul_bf16_supported). */
int silu_mul_bf16(const uint16_t *gu, uint16_t *out, int64_t rows, int64_t inter) {
#if !SWIGLU_BF16
    (void)gu, (void)out, (void)rows, (void)inter;
    return 3;
#else
    #pragma omp parallel for schedule(static) if (rows * inter >= 1 << 15)
    for (int64_t t = 0; t < rows; t++) {
        const uint16_t *g = gu + t * 2 * inter, *u = g + inter;
        uint16_t *o = out + t * inter;
        for (int64_t i = 0; i < inter; i += 16) {
            __mmask16 lanes = (__mmask16)(inter - i >= 16 ? 0xFFFF : (1u << (inter - i)) - 1);
            __m512 r = silu_mul16(widen16(lanes, g + i), widen16(lanes, u + i));
            _mm256_mask_storeu_epi16(o + i, lanes, narrow16(r));
        }
    }
    return 0;
#endif
}
