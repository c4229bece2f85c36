/* Products of fp32 activations with packed weights, for decode rows: y[m, n] = sum_k x[m, k] w[n, k]; and the int4
   weight rebuilt as bf16 W^T for prompt rows' GEMM (int4_dequantize_t, at the end).

   int4, in PyTorch's CPU int4pack layout (freehold/quant/int4_unpack.py), group g = k / 32:
       packed[b][k][j], j < 32: low nibble = code of row 64 b + j, high nibble = code of row 64 b + 32 + j
       w[n, k] = (q[n, k] - 8) s[g, n] + z[g, n],      (s, z) = the bf16 pair at sz[g][n]
       y[m, n] = sum_g ( s[g, n] * sum_{k in g} q[n, k] x[m, k]  +  (z[g, n] - 8 s[g, n]) * sum_{k in g} x[m, k] )
   The inner sum runs in integers, exactly: each group of x is written in fixed point, x[k] = e * X[k] with
   e = 2^(floor(log2 max|x|) + 1 - 22) and |X| <= 2^22, and X as three signed base-256 digits,
       X = 65536 a + 256 b + c,     sum_k q X = 65536 sum q a + 256 sum q b + sum q c   (int32, no overflow)
   so the only rounding of x is to 22 bits below the group's largest element (fp32 keeps 24 bits of each
   element; the error is of the order of the fp32 accumulation's own). AVX512-VNNI's vpdpbusd adds 4 code x
   digit products per 32-bit lane: a lane is one output row, and one instruction covers 16 rows x 4 k.
   vpermt2b gathers the 4 columns' bytes of a row into its lane; the low and high nibbles are rows j, j + 32.

   bf16 table (an LM head): w[n, k] bf16 [N, K] and x rounded to bf16 by the caller, as PyTorch's bf16 GEMM does;
   each product is exact in fp32 and the sums are fp32 (AVX512-BF16's dot product, 32 k per instruction).

   Q8_0 table (a GGUF's embedding / LM head as stored): w[n, k] = d[n, b] q[n, k], b = k / 32, q int8, d fp16;
   fp32 x; d q is exact in fp32, so every product is exact and the sums are fp32.
   Both table kernels exist only in AVX512F builds (tables_supported); int4 needs AVX512-VNNI and VBMI.

   No output element's result depends on M or on the other rows of x: a sequence gets the same logits alone or in
   any batch. int4 passes take the rows of x in pairs (int4_pair), sharing the unpacking of the weights; each row's
   result is bit for bit the one it gets alone (int4_block). Threads (OpenMP, the libgomp torch uses)
   split the output rows (int4: 64-row blocks, times the pairs of rows). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 64   /* output rows per int4 block */
#define GROUP 32  /* k per (s, z) pair */
#define PREFETCH 8192  /* bytes of software prefetch distance in an int4 block (all prefetches: prefetcht1) */
#define PAIR 2         /* activation rows per int4_pair pass */
#define MT 4      /* activation rows per bf16 pass */
#define NT 4      /* bf16 table rows per pass */
#define AHEAD_ROWS 16  /* table rows of software prefetch distance */
#define Q8_MT 6   /* activation rows per Q8_0 pass, at most */
#define Q8_NT 4   /* Q8_0 table rows per pass, at most */

#ifdef __AVX512F__
#include <immintrin.h>
#define TABLES_NATIVE 1

/* acc[i] += a[2i] b[2i] + a[2i+1] b[2i+1] over bf16 pairs (exact products, fp32 sums: high pair first). */
static inline __m512 dot_bf16(__m512 acc, __m512i a, __m512i b) {
#ifdef __AVX512BF16__
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
#else
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(a, high)),
                          _mm512_castsi512_ps(_mm512_and_si512(b, high)), acc);
    return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(a, 16)),
                           _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)), acc);
#endif
}

/* Rows n0 .. n0 + nt of a bf16 table against bf16 x[0:mt]: y[m][n0 + j]. Products of two bf16 numbers are exact
   in fp32; AVX512-BF16's dot product adds each pair to the fp32 accumulator, 32 k per instruction. */
static inline __attribute__((always_inline)) void bf16_rows(
        const uint16_t *x, int64_t ldx, int mt, const uint16_t *w, int64_t k_total, int nt, float *y, int64_t ldy) {
    __m512 acc[MT][NT];
    for (int m = 0; m < mt; m++)
        for (int j = 0; j < nt; j++) acc[m][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < k_total; k += 32) {
        __mmask32 mask = k_total - k >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << (k_total - k)) - 1);
        __m512i wv[NT];
        for (int j = 0; j < nt; j++) {
            _mm_prefetch((const char *)(w + (j + AHEAD_ROWS) * k_total + k), _MM_HINT_T1);
            wv[j] = _mm512_maskz_loadu_epi16(mask, w + j * k_total + k);
        }
        for (int m = 0; m < mt; m++) {
            __m512i xv = _mm512_maskz_loadu_epi16(mask, x + m * ldx + k);
            for (int j = 0; j < nt; j++) acc[m][j] = dot_bf16(acc[m][j], wv[j], xv);
        }
    }
    for (int m = 0; m < mt; m++)
        for (int j = 0; j < nt; j++) y[m * ldy + j] = _mm512_reduce_add_ps(acc[m][j]);
}

/* Rows n0 .. n0 + nt of a Q8_0 table against fp32 x[0:mt]: y[m][n0 + j] = sum_k (d[b] q[k]) x[k], b = k / 32.
   d q is exact in fp32 (an fp16 times an int8: 19 significant bits), so each product is exact; sums are fp32. */
static inline __attribute__((always_inline)) void q8_rows(
        const float *x, int64_t ldx, int mt, const int8_t *q, const _Float16 *d, int64_t k_total, int nt, float *y,
        int64_t ldy) {
    __m512 acc[Q8_MT][Q8_NT];
    for (int m = 0; m < mt; m++)
        for (int j = 0; j < nt; j++) acc[m][j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < k_total / GROUP; b++) {
        __m512 w0[Q8_NT], w1[Q8_NT];
        for (int j = 0; j < nt; j++) {
            const int8_t *row = q + j * k_total + b * GROUP;
            _mm_prefetch((const char *)(row + AHEAD_ROWS * k_total), _MM_HINT_T1);
            __m512 scale = _mm512_set1_ps((float)d[j * (k_total / GROUP) + b]);
            w0[j] = _mm512_mul_ps(scale, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)row))));
            w1[j] = _mm512_mul_ps(scale, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                _mm_loadu_si128((const __m128i *)(row + 16)))));
        }
        for (int m = 0; m < mt; m++) {
            __m512 x0 = _mm512_loadu_ps(x + m * ldx + b * GROUP), x1 = _mm512_loadu_ps(x + m * ldx + b * GROUP + 16);
            for (int j = 0; j < nt; j++) acc[m][j] = _mm512_fmadd_ps(w1[j], x1, _mm512_fmadd_ps(w0[j], x0, acc[m][j]));
        }
    }
    for (int m = 0; m < mt; m++)
        for (int j = 0; j < nt; j++) y[m * ldy + j] = _mm512_reduce_add_ps(acc[m][j]);
}

#endif

/* ---- int4 ---- */

#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
#define INT4_NATIVE 1

/* x[m] in fixed point, per group: x[k] = e[g] * (65536 a[k] + 256 b[k] + c[k]) and xs[g] = sum_k x[k] (fp32) */
typedef struct {
    int8_t *digits;  /* [M][3][K]: a, then b, then c */
    float *e;        /* [M][G] */
    float *xs;       /* [M][G] */
} FixedPoint;

/* Signed base-256 digit of v, in [-128, 127], and what is left: v = 256 rest + digit. */
static inline __m512i low_digit(__m512i v, __m512i *rest) {
    __m512i digit = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(v, _mm512_set1_epi32(128)),
                                                      _mm512_set1_epi32(255)), _mm512_set1_epi32(128));
    *rest = _mm512_srai_epi32(_mm512_sub_epi32(v, digit), 8);  /* exact: v - digit is a multiple of 256 */
    return digit;
}

static void to_fixed_point(const float *x, FixedPoint fp, int64_t m_total, int64_t k_total) {
    int64_t groups = k_total / GROUP;
    for (int64_t m = 0; m < m_total; m++)
        for (int64_t g = 0; g < groups; g++) {
            const float *xg = x + m * k_total + g * GROUP;
            int8_t *digits = fp.digits + m * 3 * k_total + g * GROUP;
            __m512 v[2] = {_mm512_loadu_ps(xg), _mm512_loadu_ps(xg + 16)};
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
            int exponent = 0;
            frexpf(amax, &exponent);  /* amax < 2^exponent, so |x / e| < 2^22 */
            float e = amax > 0 ? ldexpf(1.0f, exponent - 22) : 0.0f, inv_e = amax > 0 ? 1.0f / e : 0.0f;
            for (int h = 0; h < 2; h++) {
                __m512i fixed = _mm512_cvtps_epi32(_mm512_mul_ps(v[h], _mm512_set1_ps(inv_e)));  /* nearest */
                __m512i rest, c = low_digit(fixed, &rest), b = low_digit(rest, &rest);  /* rest: |a| <= 64 */
                _mm_storeu_si128((__m128i *)(digits + 16 * h), _mm512_cvtepi32_epi8(rest));
                _mm_storeu_si128((__m128i *)(digits + k_total + 16 * h), _mm512_cvtepi32_epi8(b));
                _mm_storeu_si128((__m128i *)(digits + 2 * k_total + 16 * h), _mm512_cvtepi32_epi8(c));
            }
            fp.e[m * groups + g] = e;
            fp.xs[m * groups + g] = _mm512_reduce_add_ps(_mm512_add_ps(v[0], v[1]));
        }
}

/* One 64-row block against one activation row: y[0:64]. */
static void int4_block(const int8_t *digits, const float *e, const float *xs, const uint8_t *block,
                       const uint32_t *sz, int64_t n_total, int64_t k_total, float *y) {
    /* byte 4 j + i of a gathered row: column k + i's byte j (columns are 32 bytes apart in the 128 loaded) */
    uint8_t order[2][64];
    for (int h = 0; h < 2; h++)
        for (int j = 0; j < 16; j++)
            for (int i = 0; i < 4; i++) order[h][4 * j + i] = (uint8_t)(32 * i + 16 * h + j);
    const __m512i rows_lo = _mm512_loadu_si512(order[0]), rows_hi = _mm512_loadu_si512(order[1]);
    const __m512i nibble = _mm512_set1_epi8(15), high_half = _mm512_set1_epi32((int)0xFFFF0000u);
    const int8_t *da = digits, *db = digits + k_total, *dc = digits + 2 * k_total;
    __m512 out[4];
    for (int i = 0; i < 4; i++) out[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < k_total / GROUP; g++) {
        __m512i sa[4], sb[4], sc[4];  /* sum_k q * digit, per row */
        for (int i = 0; i < 4; i++) sa[i] = sb[i] = sc[i] = _mm512_setzero_si512();
        for (int64_t k = g * GROUP; k < (g + 1) * GROUP; k += 4) {
            _mm_prefetch((const char *)(block + k * 32 + PREFETCH), _MM_HINT_T1);
            _mm_prefetch((const char *)(block + k * 32 + PREFETCH + 64), _MM_HINT_T1);
            __m512i c01 = _mm512_loadu_si512((const void *)(block + k * 32));       /* columns k, k + 1 */
            __m512i c23 = _mm512_loadu_si512((const void *)(block + k * 32 + 64));  /* columns k + 2, k + 3 */
            __m512i r0 = _mm512_permutex2var_epi8(c01, rows_lo, c23);  /* rows 0..15 | 32..47 */
            __m512i r1 = _mm512_permutex2var_epi8(c01, rows_hi, c23);  /* rows 16..31 | 48..63 */
            __m512i q[4] = {_mm512_and_si512(r0, nibble), _mm512_and_si512(r1, nibble),
                            _mm512_and_si512(_mm512_srli_epi16(r0, 4), nibble),
                            _mm512_and_si512(_mm512_srli_epi16(r1, 4), nibble)};
            int32_t a4, b4, c4;
            memcpy(&a4, da + k, 4);
            memcpy(&b4, db + k, 4);
            memcpy(&c4, dc + k, 4);
            __m512i xa = _mm512_set1_epi32(a4), xb = _mm512_set1_epi32(b4), xc = _mm512_set1_epi32(c4);
            for (int i = 0; i < 4; i++) {
                sa[i] = _mm512_dpbusd_epi32(sa[i], q[i], xa);
                sb[i] = _mm512_dpbusd_epi32(sb[i], q[i], xb);
                sc[i] = _mm512_dpbusd_epi32(sc[i], q[i], xc);
            }
        }
        __m512 eg = _mm512_set1_ps(e[g]), xsg = _mm512_set1_ps(xs[g]);
        for (int i = 0; i < 4; i++) {
            __m512i pair = _mm512_loadu_si512((const void *)(sz + g * n_total + 16 * i));  /* s low, z high */
            __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
            __m512 z8 = _mm512_fmadd_ps(s, _mm512_set1_ps(-8.0f), _mm512_castsi512_ps(_mm512_and_si512(pair, high_half)));
            __m512 qx = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sa[i]), _mm512_set1_ps(65536.0f),
                                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(sb[i]), _mm512_set1_ps(256.0f),
                                                        _mm512_cvtepi32_ps(sc[i])));
            out[i] = _mm512_fmadd_ps(s, _mm512_mul_ps(qx, eg), _mm512_fmadd_ps(z8, xsg, out[i]));
        }
    }
    for (int i = 0; i < 4; i++) _mm512_storeu_ps(y + 16 * i, out[i]);
}

/* acc += q . x (vpdpbusd: u8 codes times s8 digits, 4 per lane). In asm so that GCC keeps each accumulator in its
   register: with the intrinsic and int4_pair's 24 accumulators it copies the tied operand around and spills. */
static inline __m512i dot_digits(__m512i acc, __m512i q, __m512i x) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(q), "v"(x));
    return acc;
}

/* One 64-row block against two activation rows (row 1's digits, e and xs at digits + 3 K, e + G, xs + G):
   y[0:64] and y[ldy:ldy + 64]. Each row gets int4_block's results bit for bit, so its outputs do not depend on
   whether it shares a pass: the same integer sums, the same fp32 epilogue in the same order, except that
   qx = sum_k q X is converted once from int32 (65536 sa + 256 sb + sc) where int4_block adds the three converted
   sums with two fmas. Both are that integer rounded once to fp32: |sa| <= 32 * 15 * 64, |sb|, |sc| <= 32 * 15 * 128,
   so int4_block's inner fma (256 sb + sc, below 2^24) is exact and its outer fma rounds the exact sum once, as the
   conversion does (round to nearest even; neither gives -0); |sum q X| <= 32 * 15 * 2^22 < 2^31, so int32 holds it.
   (A group holding an inf has unbounded digits, but its xs is inf or NaN, and so is the row's every output from that
   group on, whatever the finite qx.)
   What the rows share is the unpacking of the weights (loads, vpermt2b, masks), done once per 4 columns for both. */
static void int4_pair(const int8_t *digits, const float *e, const float *xs, const uint8_t *block,
                      const uint32_t *sz, int64_t n_total, int64_t k_total, float *y, int64_t ldy) {
    uint8_t order[2][64];  /* as in int4_block */
    for (int h = 0; h < 2; h++)
        for (int j = 0; j < 16; j++)
            for (int i = 0; i < 4; i++) order[h][4 * j + i] = (uint8_t)(32 * i + 16 * h + j);
    const __m512i rows_lo = _mm512_loadu_si512(order[0]), rows_hi = _mm512_loadu_si512(order[1]);
    const __m512i nibble = _mm512_set1_epi8(15), high_half = _mm512_set1_epi32((int)0xFFFF0000u);
    const int64_t groups = k_total / GROUP;
    const int8_t *d0 = digits, *d1 = digits + 3 * k_total;
    for (int i = 0; i < 4; i++) {  /* the outputs wait in y between groups: 24 accumulators fill the registers */
        _mm512_storeu_ps(y + 16 * i, _mm512_setzero_ps());
        _mm512_storeu_ps(y + ldy + 16 * i, _mm512_setzero_ps());
    }
    for (int64_t g = 0; g < groups; g++) {
        __m512i acc0[12], acc1[12];  /* row 0 and row 1: sum q a (0..3), sum q b (4..7), sum q c (8..11) */
        for (int i = 0; i < 12; i++) acc0[i] = acc1[i] = _mm512_setzero_si512();
        for (int64_t k = g * GROUP; k < (g + 1) * GROUP; k += 4) {
            _mm_prefetch((const char *)(block + k * 32 + PREFETCH), _MM_HINT_T1);
            _mm_prefetch((const char *)(block + k * 32 + PREFETCH + 64), _MM_HINT_T1);
            __m512i c01 = _mm512_loadu_si512((const void *)(block + k * 32));
            __m512i c23 = _mm512_loadu_si512((const void *)(block + k * 32 + 64));
            __m512i r0 = _mm512_permutex2var_epi8(c01, rows_lo, c23);
            __m512i r1 = _mm512_permutex2var_epi8(c01, rows_hi, c23);
            __m512i q[4] = {_mm512_and_si512(r0, nibble), _mm512_and_si512(r1, nibble),
                            _mm512_and_si512(_mm512_srli_epi16(r0, 4), nibble),
                            _mm512_and_si512(_mm512_srli_epi16(r1, 4), nibble)};
            for (int d = 0; d < 3; d++) {
                int32_t x0, x1;
                memcpy(&x0, d0 + d * k_total + k, 4);
                memcpy(&x1, d1 + d * k_total + k, 4);
                __m512i b0 = _mm512_set1_epi32(x0), b1 = _mm512_set1_epi32(x1);
                for (int i = 0; i < 4; i++) {
                    acc0[4 * d + i] = dot_digits(acc0[4 * d + i], q[i], b0);
                    acc1[4 * d + i] = dot_digits(acc1[4 * d + i], q[i], b1);
                }
            }
        }
        for (int i = 0; i < 4; i++) {
            __m512i pair = _mm512_loadu_si512((const void *)(sz + g * n_total + 16 * i));  /* s low, z high */
            __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
            __m512 z8 = _mm512_fmadd_ps(s, _mm512_set1_ps(-8.0f), _mm512_castsi512_ps(_mm512_and_si512(pair, high_half)));
            for (int m = 0; m < PAIR; m++) {
                const __m512i *acc = m ? acc1 : acc0;
                __m512 eg = _mm512_set1_ps(e[m * groups + g]), xsg = _mm512_set1_ps(xs[m * groups + g]);
                float *row = y + m * ldy + 16 * i;
                __m512 qx = _mm512_cvtepi32_ps(_mm512_add_epi32(  /* = int4_block's qx (see above) */
                    _mm512_slli_epi32(_mm512_add_epi32(_mm512_slli_epi32(acc[i], 8), acc[4 + i]), 8), acc[8 + i]));
                _mm512_storeu_ps(row, _mm512_fmadd_ps(s, _mm512_mul_ps(qx, eg),
                                                      _mm512_fmadd_ps(z8, xsg, _mm512_loadu_ps(row))));
            }
        }
    }
}
#endif

/* 1 when this build has the int4 kernel (AVX512-VNNI and VBMI); elsewhere callers keep PyTorch's kernel. */
int int4_supported(void) {
#ifdef INT4_NATIVE
    return 1;
#else
    return 0;
#endif
}

/* x [M, K] fp32, packed [N / 64, K, 32] uint8, sz [K / 32, N] (s, z) bf16 pairs -> y [M, N] fp32.
   Returns 0; 1 when the shape does not fit the layout (N % 64, K % 32); 2 out of memory; 3 when this build has
   no AVX512-VNNI/VBMI (see int4_supported). */
int int4_matmul(const float *x, float *y, const uint8_t *packed, const uint32_t *sz, int64_t m_total,
                int64_t n_total, int64_t k_total) {
#ifndef INT4_NATIVE
    (void)x, (void)y, (void)packed, (void)sz, (void)m_total, (void)n_total, (void)k_total;
    return 3;
#else
    if (n_total % ROWS || k_total % GROUP) return 1;
    int64_t groups = k_total / GROUP, blocks = n_total / ROWS;
    FixedPoint fp = {malloc((size_t)(m_total * 3 * k_total)), malloc(sizeof(float) * (size_t)(m_total * groups)),
                     malloc(sizeof(float) * (size_t)(m_total * groups))};
    int status = fp.digits && fp.e && fp.xs ? 0 : 2;
    if (status == 0) {
        to_fixed_point(x, fp, m_total, k_total);
        int64_t pairs = (m_total + PAIR - 1) / PAIR;  /* of rows of x: the last one may hold one row */
        #pragma omp parallel for schedule(static)
        for (int64_t item = 0; item < blocks * pairs; item++) {  /* the block stays in cache for the next pair */
            int64_t b = item / pairs, m = item % pairs * PAIR;
            const int8_t *digits = fp.digits + m * 3 * k_total;
            const uint8_t *block = packed + b * k_total * 32;
            float *yb = y + m * n_total + b * ROWS;
            if (m + 1 < m_total)
                int4_pair(digits, fp.e + m * groups, fp.xs + m * groups, block, sz + b * ROWS, n_total, k_total, yb,
                          n_total);
            else
                int4_block(digits, fp.e + m * groups, fp.xs + m * groups, block, sz + b * ROWS, n_total, k_total, yb);
        }
    }
    free(fp.digits);
    free(fp.e);
    free(fp.xs);
    return status;
#endif
}

/* 1 when this build has the bf16 and Q8_0 table kernels (AVX512F); without it they would be scalar loops several
   times slower than PyTorch's GEMM, so they are not built and callers keep PyTorch's path. */
int tables_supported(void) {
#ifdef TABLES_NATIVE
    return 1;
#else
    return 0;
#endif
}

/* x [M, K] bf16, w [N, K] bf16 -> y [M, N] fp32. Threads split the rows of w; each reads its rows once for all M.
   Returns 0; 3 when this build has no AVX512F (see tables_supported). */
int bf16_matmul(const uint16_t *x, float *y, const uint16_t *w, int64_t m_total, int64_t n_total, int64_t k_total) {
#ifndef TABLES_NATIVE
    (void)x, (void)y, (void)w, (void)m_total, (void)n_total, (void)k_total;
    return 3;
#else
    int64_t groups = (n_total + NT - 1) / NT;
    #pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        int64_t n0 = g * NT;
        int nt = n_total - n0 < NT ? (int)(n_total - n0) : NT;
        const uint16_t *wg = w + n0 * k_total;
        for (int64_t m0 = 0; m0 < m_total; m0 += MT) {
            int mt = m_total - m0 < MT ? (int)(m_total - m0) : MT;
            const uint16_t *xt = x + m0 * k_total;
            float *yt = y + m0 * n_total + n0;
            if (nt == NT) {
                switch (mt) {
                    case 1: bf16_rows(xt, k_total, 1, wg, k_total, NT, yt, n_total); break;
                    case 2: bf16_rows(xt, k_total, 2, wg, k_total, NT, yt, n_total); break;
                    case 3: bf16_rows(xt, k_total, 3, wg, k_total, NT, yt, n_total); break;
                    default: bf16_rows(xt, k_total, 4, wg, k_total, NT, yt, n_total); break;
                }
            } else {
                for (int j = 0; j < nt; j++)
                    for (int m = 0; m < mt; m++) bf16_rows(xt + m * k_total, k_total, 1, wg + j * k_total, k_total,
                                                           1, yt + m * n_total + j, n_total);
            }
        }
    }
    return 0;
#endif
}

/* x [M, K] fp32, q [N, K] int8, d [N, K / 32] fp16 (GGUF Q8_0: w = d * q per 32-block) -> y [M, N] fp32.
   Threads split the rows of the table; each reads its rows once for all M. Returns 0; 1 when K % 32 != 0; 3 when
   this build has no AVX512F (see tables_supported). */
int q8_matmul(const float *x, float *y, const int8_t *q, const _Float16 *d, int64_t m_total, int64_t n_total,
              int64_t k_total) {
#ifndef TABLES_NATIVE
    (void)x, (void)y, (void)q, (void)d, (void)m_total, (void)n_total, (void)k_total;
    return 3;
#else
    if (k_total % GROUP) return 1;
    /* Below 6 rows of x, passes of up to 4 x 4; from 6 rows on, 6 x 3 (6 x 3 sums + 6 widened table vectors + 2 of x:
       26 of the 32 registers), so each table row is widened once per 6 rows of x instead of once per 4
       (scripts/kernel_ab.py q8: 0.85-0.87x the time at 16 and 64 rows). A sum's arithmetic is the same in any pass. */
    if (m_total >= 6) {
        int64_t groups = (n_total + 2) / 3;
        #pragma omp parallel for schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            int64_t n0 = g * 3;
            int nt = n_total - n0 < 3 ? (int)(n_total - n0) : 3;
            const int8_t *qg = q + n0 * k_total;
            const _Float16 *dg = d + n0 * (k_total / GROUP);
            for (int64_t m0 = 0; m0 < m_total; m0 += 6) {
                int mt = m_total - m0 < 6 ? (int)(m_total - m0) : 6;
                const float *xt = x + m0 * k_total;
                float *yt = y + m0 * n_total + n0;
                if (nt == 3) {
                    switch (mt) {  /* a constant size per case: the sums stay in registers */
#define Q8_CASE(M) case M: q8_rows(xt, k_total, M, qg, dg, k_total, 3, yt, n_total); break;
                        Q8_CASE(1) Q8_CASE(2) Q8_CASE(3) Q8_CASE(4) Q8_CASE(5) Q8_CASE(6)
#undef Q8_CASE
                    }
                } else
                    for (int j = 0; j < nt; j++)
                        for (int m = 0; m < mt; m++)
                            q8_rows(xt + m * k_total, k_total, 1, qg + j * k_total, dg + j * (k_total / GROUP),
                                    k_total, 1, yt + m * n_total + j, n_total);
            }
        }
        return 0;
    }
    int64_t groups = (n_total + NT - 1) / NT;
    #pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        int64_t n0 = g * NT;
        int nt = n_total - n0 < NT ? (int)(n_total - n0) : NT;
        const int8_t *qg = q + n0 * k_total;
        const _Float16 *dg = d + n0 * (k_total / GROUP);
        for (int64_t m0 = 0; m0 < m_total; m0 += 4) {
            int mt = m_total - m0 < 4 ? (int)(m_total - m0) : 4;
            const float *xt = x + m0 * k_total;
            float *yt = y + m0 * n_total + n0;
            if (nt == NT && mt == 4) q8_rows(xt, k_total, 4, qg, dg, k_total, NT, yt, n_total);
            else if (nt == NT && mt == 3) q8_rows(xt, k_total, 3, qg, dg, k_total, NT, yt, n_total);
            else if (nt == NT && mt == 2) q8_rows(xt, k_total, 2, qg, dg, k_total, NT, yt, n_total);
            else if (nt == NT) q8_rows(xt, k_total, 1, qg, dg, k_total, NT, yt, n_total);
            else
                for (int j = 0; j < nt; j++)
                    for (int m = 0; m < mt; m++)
                        q8_rows(xt + m * k_total, k_total, 1, qg + j * k_total, dg + j * (k_total / GROUP), k_total, 1,
                                yt + m * n_total + j, n_total);
        }
    }
    return 0;
#endif
}

/* ---- int4 -> bf16 W^T, for prompt rows' GEMM ---- */

/* fp32 -> bf16 bits, round to nearest even, subnormals kept (as torch's .to(torch.bfloat16)); a NaN becomes 0xFFFF,
   as torch's vectorized conversion writes it (its scalar one writes 0x7FC0: NaN bits are not promised). */
static inline uint16_t bf16_bits(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0xFFFF;
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

/* packed [N / 64, K, 32] uint8 (the layout int4_matmul reads), sz [K / 32, N] (s, z) bf16 pairs -> wt [K, N] bf16:
       wt[k, n] = bf16((q[n, k] - 8) s[g, n] + z[g, n]),    g = k / 32
   the product is exact in fp32 ((q - 8) is an integer in [-8, 7] and s a bf16: at most 11 significant bits, unless
   it overflows, |s| >= 2^125, far above any GGUF or quantize_int4 scale), so the fma rounds once, as
   freehold.quant.int4's dequantize_t does with a multiply and an add. A plain loop the compiler vectorizes; threads
   split K. Returns 0; 1 when the shape does not fit the layout (N % 64, K % 32). */
int int4_dequantize_t(const uint8_t *restrict packed, const uint32_t *restrict sz, uint16_t *restrict wt,
                      int64_t n_total, int64_t k_total) {
    if (n_total % ROWS || k_total % GROUP) return 1;
    int64_t blocks = n_total / ROWS;
    #pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < k_total; k++) {
        const uint32_t *szg = sz + (k / GROUP) * n_total;
        uint16_t *out = wt + k * n_total;
        for (int64_t b = 0; b < blocks; b++) {
            const uint8_t *bytes = packed + (b * k_total + k) * (ROWS / 2);
            const uint32_t *pairs = szg + b * ROWS;
            uint16_t *row = out + b * ROWS;
            for (int half = 0; half < 2; half++)  /* rows 0..31: low nibbles; rows 32..63: high nibbles */
                for (int j = 0; j < ROWS / 2; j++) {
                    int r = half * (ROWS / 2) + j, q = (bytes[j] >> (4 * half)) & 15;
                    uint32_t s_bits = pairs[r] << 16, z_bits = pairs[r] & 0xFFFF0000u;
                    float s, z;
                    memcpy(&s, &s_bits, 4);
                    memcpy(&z, &z_bits, 4);
                    row[r] = bf16_bits(fmaf((float)(q - 8), s, z));
                }
        }
    }
    return 0;
}
