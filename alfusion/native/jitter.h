/* One sample's feature jitter: Gaussian noise from Philox4x32-10 added to it, then
 * (optionally) its tokens' LayerNorm without affine. Shared by the jitter pass (jitter.c) and
 * the attention forward, which jitters each sample as it reads it (attention.c): both give
 * the same numbers, bit for bit.
 *
 * The noise is a function of (key, row, i) only: normal i of global batch row `row` under a
 * step's 64-bit key. tests/test_native.py holds the same generator in plain Python (its
 * oracle), whose layout this file must keep:
 *   block c of PHILOX_BLOCK (64) counters (i, row_lo, row_hi, 0), i = c * 64 + j, j < 64,
 *   gives 256 normals: [cos(a, b) for j] [sin(a, b) for j] [cos(c, d) for j] [sin(c, d) for j]
 *   with the Box-Muller pair r = sqrt(-2 log u1), theta = 2 pi u2 of 24-bit uniforms
 *   u1 = ((w >> 8) + 1) / 2^24 in (0, 1], u2 = (w >> 8) / 2^24.
 * The logarithm, cosine and sine are this file's own (log_unit, sincos_unit: vector code
 * without calls; 0.84 against 1.11 ns a normal with glibc's vector logf and cosf, one
 * thread): r cos theta and r sin theta are within 1e-6 of double precision for every one of
 * the 2^24 values of u1 and of u2 (checked exhaustively when written; the tests hold them to
 * the plain-Python oracle). */
#ifndef ALFUSION_JITTER_H
#define ALFUSION_JITTER_H
#include <math.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "common.h"

#define PHILOX_BLOCK 64

#ifdef __AVX512F__
/* The high and low 32 bits of the 16 lanes' products x * m, 32 x 32 -> 64 bits: the even
 * lanes' and (shifted down) the odd lanes' products, put back in lane order. */
static inline void mul_hi_lo(__m512i x, __m512i m, __m512i *hi, __m512i *lo) {
    __m512i even = _mm512_mul_epu32(x, m), odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), m);
    *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
    *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}
#endif

/* Philox4x32's ten rounds on PHILOX_BLOCK counters (a, b, c, d) under the key (k0, k1), in
 * place. With AVX-512, 16 counters a vector and the products' halves from 32 x 32 -> 64 bit
 * multiplies (the compiler's own vector code widens every lane to 64 bits first, three times
 * slower); both give the same bits. */
static void philox_rounds(uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d, uint32_t k0,
                          uint32_t k1) {
#ifdef __AVX512F__
    enum { N = PHILOX_BLOCK / 16 };
    __m512i va[N], vb[N], vc[N], vd[N];
    const __m512i m0 = _mm512_set1_epi32((int)0xD2511F53u),
                  m1 = _mm512_set1_epi32((int)0xCD9E8D57u);
    for (int i = 0; i < N; i++) {
        va[i] = _mm512_loadu_si512(a + 16 * i);
        vb[i] = _mm512_loadu_si512(b + 16 * i);
        vc[i] = _mm512_loadu_si512(c + 16 * i);
        vd[i] = _mm512_loadu_si512(d + 16 * i);
    }
    for (int r = 0; r < 10; r++) {
        const __m512i key0 = _mm512_set1_epi32((int)k0), key1 = _mm512_set1_epi32((int)k1);
        for (int i = 0; i < N; i++) {
            __m512i hi0, lo0, hi1, lo1;
            mul_hi_lo(va[i], m0, &hi0, &lo0);
            mul_hi_lo(vc[i], m1, &hi1, &lo1);
            va[i] = _mm512_xor_si512(_mm512_xor_si512(hi1, vb[i]), key0);
            vc[i] = _mm512_xor_si512(_mm512_xor_si512(hi0, vd[i]), key1);
            vb[i] = lo1;
            vd[i] = lo0;
        }
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    for (int i = 0; i < N; i++) {
        _mm512_storeu_si512(a + 16 * i, va[i]);
        _mm512_storeu_si512(b + 16 * i, vb[i]);
        _mm512_storeu_si512(c + 16 * i, vc[i]);
        _mm512_storeu_si512(d + 16 * i, vd[i]);
    }
#else
    for (int r = 0; r < 10; r++) {
        for (int j = 0; j < PHILOX_BLOCK; j++) {
            uint64_t p0 = (uint64_t)0xD2511F53u * a[j];
            uint64_t p1 = (uint64_t)0xCD9E8D57u * c[j];
            uint32_t n0 = (uint32_t)(p1 >> 32) ^ b[j] ^ k0;
            uint32_t n2 = (uint32_t)(p0 >> 32) ^ d[j] ^ k1;
            b[j] = (uint32_t)p1;
            d[j] = (uint32_t)p0;
            a[j] = n0;
            c[j] = n2;
        }
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
#endif
}

/* ln u1 for u1 = ((w >> 8) + 1) / 2^24: n = (w >> 8) + 1 (exact in float) = 2^e m with m in
 * [sqrt(1/2), sqrt(2)), ln m = 2 atanh((m - 1) / (m + 1)) by its series to the 9th power;
 * (e - 24) ln 2 is exact near u1 = 1, where ln u1 is smallest. */
static inline float log_unit(uint32_t w) {
    float n = (float)((w >> 8) + 1), m;
    uint32_t bits;
    memcpy(&bits, &n, sizeof bits);
    int32_t e = (int32_t)((bits - 0x3f3504f3u) >> 23);  /* 0x3f3504f3: sqrt(1/2) */
    bits -= (uint32_t)e << 23;
    memcpy(&m, &bits, sizeof m);
    float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
    float atanh = s * (1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 / 9))));
    return (float)(e - 24) * 0.693147180560f + 2.0f * atanh;
}

/* cos and sin of theta = 2 pi u2 for u2 = (w >> 8) / 2^24: the nearest quarter turn q taken
 * off exactly, the rest phi (|phi| <= pi / 4) by Taylor series (to phi^9 and phi^10), then
 * rotated by q. */
static inline void sincos_unit(uint32_t w, float *cos_out, float *sin_out) {
    float u4 = (float)(w >> 8) * (4.0f / 16777216.0f), q = rintf(u4);
    float f = (u4 - q) * 1.57079632679f, f2 = f * f;
    float sn = f + f * f2 * (-1.0f / 6 + f2 * (1.0f / 120 + f2 * (-1.0f / 5040
                                                                  + f2 * (1.0f / 362880))));
    float cs = 1.0f + f2 * (-0.5f + f2 * (1.0f / 24 + f2 * (-1.0f / 720 + f2 * (1.0f / 40320
                                                                              - f2 / 3628800))));
    int k = (int)q & 3;
    *cos_out = k == 0 ? cs : k == 1 ? -sn : k == 2 ? -cs : sn;
    *sin_out = k == 0 ? sn : k == 1 ? cs : k == 2 ? -sn : -cs;
}

static void philox_block(uint32_t first, uint64_t row, uint64_t key, float *restrict out) {
    uint32_t a[PHILOX_BLOCK], b[PHILOX_BLOCK], c[PHILOX_BLOCK], d[PHILOX_BLOCK];
    for (int j = 0; j < PHILOX_BLOCK; j++) {
        a[j] = first + (uint32_t)j;
        b[j] = (uint32_t)row;
        c[j] = (uint32_t)(row >> 32);
        d[j] = 0;
    }
    philox_rounds(a, b, c, d, (uint32_t)key, (uint32_t)(key >> 32));
#pragma omp simd
    for (int j = 0; j < PHILOX_BLOCK; j++) {
        float r = sqrtf(-2.0f * log_unit(a[j])), cs, sn;
        sincos_unit(b[j], &cs, &sn);
        out[j] = r * cs;
        out[PHILOX_BLOCK + j] = r * sn;
    }
#pragma omp simd
    for (int j = 0; j < PHILOX_BLOCK; j++) {
        float r = sqrtf(-2.0f * log_unit(c[j])), cs, sn;
        sincos_unit(d[j], &cs, &sn);
        out[2 * PHILOX_BLOCK + j] = r * cs;
        out[3 * PHILOX_BLOCK + j] = r * sn;
    }
}

/* sum_k (v[k] - shift)^p for p = 1 or 2, k < D, in four vector accumulators: one would make
 * each addition wait for the one before. */
static float power_sum(const float *v, int64_t D, float shift, int p) {
    vf acc[4] = {{0}}, c = shift - (vf){0};
    int64_t k = 0;
    for (; k + 4 * VL <= D; k += 4 * VL)
        for (int i = 0; i < 4; i++) {
            vf d = load(v + k + i * VL) - c;
            acc[i] += p == 1 ? d : d * d;
        }
    float s = hsum((acc[0] + acc[1]) + (acc[2] + acc[3]));
    for (; k < D; k++) s += p == 1 ? v[k] - shift : (v[k] - shift) * (v[k] - shift);
    return s;
}

/* v (D) <- (v - mean) / sqrt(var + eps), LayerNorm without affine. */
static void normalise(float *v, int64_t D, float eps) {
    float mean = power_sum(v, D, 0.0f, 1) / (float)D;
    float rstd = 1.0f / sqrtf(power_sum(v, D, mean, 2) / (float)D + eps);
#pragma omp simd
    for (int64_t k = 0; k < D; k++) v[k] = (v[k] - mean) * rstd;
}

/* xs (n floats: tokens of width D) = in (may be xs itself) + sigma x the noise of global row
 * `row` under `key` (row < 0: none), then each token normalised (eps < 0: not). */
static void jitter_sample(float *xs, const float *in, int64_t row, uint64_t key, float sigma,
                          float eps, int64_t n, int64_t D) {
    if (row >= 0) {
        float noise[4 * PHILOX_BLOCK];
        for (int64_t i = 0; i < n; i += 4 * PHILOX_BLOCK) {
            philox_block((uint32_t)(i / 4), (uint64_t)row, key, noise);
            int64_t m = n - i < 4 * PHILOX_BLOCK ? n - i : 4 * PHILOX_BLOCK;
#pragma omp simd
            for (int64_t k = 0; k < m; k++) xs[i + k] = in[i + k] + sigma * noise[k];
        }
    } else if (in != xs) {
        memcpy(xs, in, sizeof(float) * (size_t)n);
    }
    if (eps < 0) return;
    for (int64_t t = 0; t < n; t += D) normalise(xs + t, D, eps);
}
#endif
