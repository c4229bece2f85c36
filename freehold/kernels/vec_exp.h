/* e^x for 16 lanes, shared by the kernels that need a vector exponential (paged_attention.c, swiglu.c); each
   compiles it under its own flags. native.py's build key covers this header's text too. */
#ifndef FREEHOLD_VEC_EXP_H
#define FREEHOLD_VEC_EXP_H
#ifdef __AVX512F__
#include <immintrin.h>

/* e^x for 16 lanes of x <= 0, relative error ~1e-7 (expf's is ~6e-8): x = n ln2 + r with |r| <= ln2 / 2
   (ln2 split in two so n ln2 is exact), e^r by its Taylor series to r^7 (remainder < 6e-9), times 2^n. */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));  /* e^-87 ~ 1.6e-38: the smallest normal float */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  /* ln2 high part: 12 bits */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);     /* ln2 - high part */
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    const float taylor[] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
    for (int i = 0; i < 7; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(taylor[i]));
    return _mm512_scalef_ps(p, n);
}
#endif
#endif
