/* The attentive probe's per-sample products on the CPU (probes/attentive_grads.py): scores,
 * softmax over tokens, the attention-weighted token sums and the heads' value products
 * forward; the value products' and scores' gradients and the queries' gradient backward.
 * Shapes: B samples of T tokens of width D, H heads of width E.
 *
 * Every sample is computed by one thread from its own inputs, in blocks of samples fixed
 * whatever the thread count, so the result does not depend on it. Two register-blocked
 * product shapes: dot products of rows (dots, 4 x 4 at a time) and sums of rows weighted by
 * coefficients (sums, 8 rows x 3 vectors at a time). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "common.h"
#include "jitter.h"

static float dot(const float *x, const float *y, int64_t D) {
    vf acc = {0};
    int64_t d = 0;
    for (; d + VL <= D; d += VL) acc += load(x + d) * load(y + d);
    float s = hsum(acc);
    for (; d < D; d++) s += x[d] * y[d];
    return s;
}

/* out[r ldo + c] = X[r ldx] . Y[c ldy] + (add ? add[c] : 0), rows of length D: R x C dot
 * products, 4 x 4 per pass over D. */
static void dots(const float *X, int64_t ldx, int64_t R, const float *Y, int64_t ldy, int64_t C,
                 int64_t D, const float *add, float *out, int64_t ldo) {
    int64_t r = 0, Dv = D - D % VL;
    for (; r + 4 <= R; r += 4) {
        int64_t c = 0;
        for (; c + 4 <= C; c += 4) {
            vf acc[4][4] = {{0}};
            for (int64_t d = 0; d < Dv; d += VL) {
                vf xv[4], yv[4];
                for (int i = 0; i < 4; i++) xv[i] = load(X + (r + i) * ldx + d);
                for (int j = 0; j < 4; j++) yv[j] = load(Y + (c + j) * ldy + d);
                for (int i = 0; i < 4; i++)
                    for (int j = 0; j < 4; j++) acc[i][j] += xv[i] * yv[j];
            }
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) {
                    float s = hsum(acc[i][j]);
                    for (int64_t d = Dv; d < D; d++) s += X[(r + i) * ldx + d] * Y[(c + j) * ldy + d];
                    out[(r + i) * ldo + c + j] = s;
                }
        }
        for (; c < C; c++)
            for (int i = 0; i < 4; i++) out[(r + i) * ldo + c] = dot(X + (r + i) * ldx, Y + c * ldy, D);
    }
    for (; r < R; r++)
        for (int64_t c = 0; c < C; c++) out[r * ldo + c] = dot(X + r * ldx, Y + c * ldy, D);
    if (add)
        for (r = 0; r < R; r++)
            for (int64_t c = 0; c < C; c++) out[r * ldo + c] += add[c];
}

/* sums: out[r ldo + d] = sum_j K[r kr + j kj] M[j ldm + d] for d < D: R rows, each the sum
 * of the J rows of M weighted by coefficients K, in the order of j; 8 rows x 3 vectors at a
 * time (and smaller blocks at the edges). The sums start from the first term (J >= 1). */
#define SUMS_BLOCK(RB, VB)                                                                      \
    static inline void sums_##RB##x##VB(const float *K, int64_t kr, int64_t kj, int64_t J,     \
                                        const float *M, int64_t ldm, float *out, int64_t ldo,   \
                                        int add) {                                              \
        vf acc[RB][VB], m[VB];                                                                  \
        int64_t j = 0;                                                                          \
        if (add) {                                                                              \
            for (int i = 0; i < RB; i++)                                                        \
                for (int v = 0; v < VB; v++) acc[i][v] = load(out + i * ldo + v * VL);          \
        } else {                                                                                \
            for (int v = 0; v < VB; v++) m[v] = load(M + v * VL);                               \
            for (int i = 0; i < RB; i++)                                                        \
                for (int v = 0; v < VB; v++) acc[i][v] = K[i * kr] * m[v];                      \
            j = 1;                                                                              \
        }                                                                                       \
        for (; j < J; j++) {                                                                    \
            for (int v = 0; v < VB; v++) m[v] = load(M + j * ldm + v * VL);                     \
            for (int i = 0; i < RB; i++) {                                                      \
                float k = K[i * kr + j * kj];                                                   \
                for (int v = 0; v < VB; v++) acc[i][v] += k * m[v];                             \
            }                                                                                   \
        }                                                                                       \
        for (int i = 0; i < RB; i++)                                                            \
            for (int v = 0; v < VB; v++) store(out + i * ldo + v * VL, acc[i][v]);              \
    }
SUMS_BLOCK(8, 3)
SUMS_BLOCK(8, 2)
SUMS_BLOCK(8, 1)
SUMS_BLOCK(1, 3)
SUMS_BLOCK(1, 2)
SUMS_BLOCK(1, 1)

#define SUMS_ROWS(RB)                                                                           \
    {                                                                                           \
        const float *k = K + r * kr;                                                            \
        float *o = out + r * ldo;                                                               \
        int64_t d = 0;                                                                          \
        for (; d + 3 * VL <= D; d += 3 * VL)                                                    \
            sums_##RB##x3(k, kr, kj, J, M + d, ldm, o + d, ldo, add);                           \
        if (d + 2 * VL <= D) {                                                                  \
            sums_##RB##x2(k, kr, kj, J, M + d, ldm, o + d, ldo, add);                           \
            d += 2 * VL;                                                                        \
        }                                                                                       \
        for (; d + VL <= D; d += VL) sums_##RB##x1(k, kr, kj, J, M + d, ldm, o + d, ldo, add);  \
        for (; d < D; d++)                                                                      \
            for (int i = 0; i < RB; i++) {                                                      \
                float s = add ? o[i * ldo + d] : 0.0f;                                          \
                for (int64_t j = 0; j < J; j++) s += k[i * kr + j * kj] * M[j * ldm + d];       \
                o[i * ldo + d] = s;                                                             \
            }                                                                                   \
    }

/* sums_into: sums, or with add set, the sums added to out's values (continued in the order
 * of j, so sums over j in parts equal the sums over all j at once). */
static void sums_into(const float *K, int64_t kr, int64_t kj, int64_t J, const float *M,
                      int64_t ldm, int64_t D, int64_t R, float *out, int64_t ldo, int add) {
    int64_t r = 0;
    for (; r + 8 <= R; r += 8) SUMS_ROWS(8)
    for (; r < R; r++) SUMS_ROWS(1)
}

static inline void sums(const float *K, int64_t kr, int64_t kj, int64_t J, const float *M,
                        int64_t ldm, int64_t D, int64_t R, float *out, int64_t ldo) {
    sums_into(K, kr, kj, J, M, ldm, D, R, out, ldo, 0);
}

/* Y (H rows of D, row stride ldy) -> Yt (D, Hp), Yt[d Hp + h] = Y[h ldy + d], zero for
 * h >= H: the dot products with Y become sums of Yt's rows, full vectors wide. */
static void transpose(const float *Y, int64_t ldy, int64_t H, int64_t D, int64_t Hp, float *Yt) {
    for (int64_t d = 0; d < D; d++) {
        for (int64_t h = 0; h < H; h++) Yt[d * Hp + h] = Y[h * ldy + d];
        for (int64_t h = H; h < Hp; h++) Yt[d * Hp + h] = 0.0f;
    }
}

/* out[t H + h] = X[t] . Y[h] for X (T, D) and Y given as Yt (D, Hp) (transpose): dots as
 * sums of Yt's rows, faster where Yt is made once for many samples; scratch: T Hp floats. */
static void dots_transposed(const float *X, int64_t T, const float *Yt, int64_t Hp, int64_t D,
                            int64_t H, float *scratch, float *out) {
    sums(X, D, 1, D, Yt, Hp, Hp, T, scratch, Hp);
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < H; h++) out[t * H + h] = scratch[t * Hp + h];
}

/* H rounded up to whole vectors. */
static int64_t padded(int64_t H) { return (H + VL - 1) / VL * VL; }

/* Samples are taken in fixed blocks, a thread's each: the probe's value weights W are read
 * once per block (not once per sample), and which samples share a block does not depend on
 * the thread count. Blocks of CHUNK, the last CHUNK + B % CHUNK samples in blocks of half that:
 * threads take blocks as they finish one, and the small ones at the end let them end
 * together (25 blocks of 16 would keep one of two threads waiting for a sixteenth of B). */
#define CHUNK 16

static int64_t full_blocks(int64_t B) { return B / CHUNK > 0 ? B / CHUNK - 1 : 0; }

static int64_t block_count(int64_t B) {
    int64_t full = full_blocks(B);
    return full + (B - full * CHUNK + CHUNK / 2 - 1) / (CHUNK / 2);
}

/* Block k: samples [*first, *last). */
static void block(int64_t B, int64_t k, int64_t *first, int64_t *last) {
    int64_t full = full_blocks(B);
    *first = k < full ? k * CHUNK : full * CHUNK + (k - full) * (CHUNK / 2);
    *last = k < full ? *first + CHUNK : *first + CHUNK / 2 < B ? *first + CHUNK / 2 : B;
}

/* dst[0 .. n) = src[0 .. n) with stores that bypass the caches where dst is aligned (z, 15 MB
 * a step, is next read in the backward, long after the cache has dropped it: a store through
 * the cache would first read each line from memory). */
static void copy_out(float *dst, const float *src, int64_t n) {
    int64_t i = 0;
#ifdef __AVX512F__
    if (((uintptr_t)dst & 63) == 0 && ((uintptr_t)src & 63) == 0) {
        for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_load_ps(src + i));
        _mm_sfence();
    }
#endif
    memcpy(dst + i, src + i, sizeof(float) * (size_t)(n - i));
}

/* Forward. x (B, T, D) normalised tokens; u (H, D) the queries in token space; Wt (H, D, E)
 * the heads' value weights, transposed; shift (H, E) their shift; drop (B, H, T) dropout
 * multipliers or NULL. Out: attn (B, T, H) softmax over t, z (B, H, D) the sums of the tokens
 * weighted by attn x drop, mass (B, H) the sums of those weights (1 without dropout),
 * o (B, H, E) = W_h z[b, h] + mass[b, h] shift[h].
 * With src: x is an output too, sample b jittered here from src[index[b]] (index NULL:
 * src[b]) as jitter_tokens does (rows, key, sigma, eps: its arguments), in a thread's buffer
 * from which the products read it, then written to x past the caches: the batch's tokens
 * are read from memory once, not written by one pass and read again by the next. */
void attend_forward(float *x, const float *src, const int64_t *index, const int64_t *rows,
                    uint64_t key, float sigma, float eps, const float *u, const float *Wt,
                    const float *shift, const float *drop, float *attn, float *z, float *mass,
                    float *o, int64_t B, int64_t T, int64_t D, int64_t H, int64_t E,
                    int threads) {
    int64_t chunks = block_count(B), Hp = padded(H);
    float *ut = malloc(sizeof(float) * (size_t)(D * Hp));
    transpose(u, D, H, D, Hp, ut);
#pragma omp parallel num_threads(threads)
    {
        float *w = malloc(sizeof(float) * (size_t)(T * H + H + T * Hp));
        float *top = w + T * H, *scratch = top + H;
        float *zk = aligned_alloc(64, sizeof(float) * (size_t)(CHUNK * H * D));  /* the block's z */
        float *xs = src ? aligned_alloc(64, sizeof(float) * (size_t)(T * D)) : NULL;
#pragma omp for schedule(dynamic)
        for (int64_t k = 0; k < chunks; k++) {
            int64_t first, last;
            block(B, k, &first, &last);
            for (int64_t b = first; b < last; b++) {
                const float *xb = x + b * T * D;
                if (src) {
                    jitter_sample(xs, src + (index ? index[b] : b) * T * D, rows[b], key, sigma,
                                  eps, T * D, D);
                    xb = xs;
                }
                float *a = attn + b * T * H;
                dots_transposed(xb, T, ut, Hp, D, H, scratch, a);
                for (int64_t h = 0; h < H; h++) top[h] = a[h];
                for (int64_t t = 1; t < T; t++)
                    for (int64_t h = 0; h < H; h++) top[h] = fmaxf(top[h], a[t * H + h]);
                float *m = mass + b * H;
                for (int64_t h = 0; h < H; h++) m[h] = 0.0f;
                for (int64_t t = 0; t < T; t++) {
#pragma omp simd
                    for (int64_t h = 0; h < H; h++) a[t * H + h] = expf(a[t * H + h] - top[h]);
                    for (int64_t h = 0; h < H; h++) m[h] += a[t * H + h];
                }
                for (int64_t h = 0; h < H; h++) top[h] = 1.0f / m[h];
                for (int64_t t = 0; t < T; t++)
                    for (int64_t h = 0; h < H; h++) a[t * H + h] *= top[h];
                const float *weights = a;
                if (drop) {
                    const float *db = drop + b * H * T;
                    for (int64_t h = 0; h < H; h++) m[h] = 0.0f;
                    for (int64_t t = 0; t < T; t++)
                        for (int64_t h = 0; h < H; h++) {
                            w[t * H + h] = a[t * H + h] * db[h * T + t];
                            m[h] += w[t * H + h];
                        }
                    weights = w;
                } else {
                    for (int64_t h = 0; h < H; h++) m[h] = 1.0f;
                }
                /* z[b, h] = sum_t weights[t, h] x[b, t] */
                sums(weights, 1, H, T, xb, D, D, H, zk + (b - first) * H * D, D);
                if (src) copy_out(x + b * T * D, xs, T * D);
            }
            for (int64_t h = 0; h < H; h++)  /* o[b, h] = sum_d z[b, h, d] Wt[h, d] */
                sums(zk + h * D, H * D, 1, D, Wt + h * D * E, E, E, last - first,
                     o + first * H * E + h * E, H * E);
            for (int64_t b = first; b < last; b++)
                for (int64_t h = 0; h < H; h++)
                    for (int64_t e = 0; e < E; e++)
                        o[(b * H + h) * E + e] += mass[b * H + h] * shift[h * E + e];
            copy_out(z + first * H * D, zk, (last - first) * H * D);
        }
        free(w);
        free(zk);
        free(xs);
    }
    free(ut);
}

/* Backward. g_o (B, H, E) the gradient of o; x, z, W, shift, mass, attn, drop as forward.
 * Per sample, with g_z[h] = g_o[b, h] W_h (the gradient of z, never stored whole) and
 * g = (x . g_z + g_o[b, h] . shift[h]) x drop, the scores' gradient is
 * g_s = attn (g - sum_t g attn). Out: g_u (H, D) = sum_b g_s[b]^T x[b], the queries' gradient,
 * and g_shift (H, E) = sum_b mass[b, h] g_o[b, h], summed within each block of samples and then
 * over the blocks in order (so for any thread count alike); g_w (H, E, D) =
 * sum_b g_o[b, h]^T z[b, h], the value weights'. */
void attend_backward(const float *x, const float *z, const float *g_o, const float *W,
                     const float *shift, const float *mass, const float *attn,
                     const float *drop, float *g_u, float *g_shift, float *g_w, int64_t B,
                     int64_t T, int64_t D, int64_t H, int64_t E, int threads) {
    int64_t chunks = block_count(B), A = H * E;
    float *partial = malloc(sizeof(float) * (size_t)(chunks * (H * D + A)));
    float *partial_shift = partial + chunks * H * D;
#pragma omp parallel num_threads(threads)
    {
        float *g_z = malloc(sizeof(float) * (size_t)(CHUNK * H * D + T * H + 2 * H));
        float *g = g_z + CHUNK * H * D, *sum = g + T * H, *c = sum + H;  /* g: one sample's g_s */
#pragma omp for schedule(dynamic)
        for (int64_t k = 0; k < chunks; k++) {
            int64_t first, last;
            block(B, k, &first, &last);
            float *ps = partial_shift + k * A;
            for (int64_t a = 0; a < A; a++) ps[a] = 0.0f;
            for (int64_t b = first; b < last; b++)
                for (int64_t h = 0; h < H; h++)
                    for (int64_t e = 0; e < E; e++)
                        ps[h * E + e] += mass[b * H + h] * g_o[b * A + h * E + e];
            for (int64_t h = 0; h < H; h++)
                sums(g_o + first * H * E + h * E, H * E, 1, E, W + h * E * D, D, D, last - first,
                     g_z + h * D, H * D);  /* g_z[b, h] = sum_e g_o[b, h, e] W[h, e] */
            for (int64_t b = first; b < last; b++) {
                const float *a = attn + b * T * H;
                for (int64_t h = 0; h < H; h++) {  /* what each weight gains through the mass */
                    c[h] = 0.0f;
                    for (int64_t e = 0; e < E; e++) c[h] += g_o[b * A + h * E + e] * shift[h * E + e];
                }
                dots(x + b * T * D, D, T, g_z + (b - first) * H * D, D, H, D, c, g, H);
                if (drop) {
                    const float *db = drop + b * H * T;
                    for (int64_t t = 0; t < T; t++)
                        for (int64_t h = 0; h < H; h++) g[t * H + h] *= db[h * T + t];
                }
                for (int64_t h = 0; h < H; h++) sum[h] = 0.0f;
                for (int64_t t = 0; t < T; t++)
                    for (int64_t h = 0; h < H; h++) sum[h] += g[t * H + h] * a[t * H + h];
                for (int64_t t = 0; t < T; t++)
                    for (int64_t h = 0; h < H; h++)
                        g[t * H + h] = a[t * H + h] * (g[t * H + h] - sum[h]);
                /* the block's part of g_u, its samples' terms in order (x[b] still cached) */
                sums_into(g, 1, H, T, x + b * T * D, D, D, H, partial + k * H * D, D, b > first);
            }
        }
        free(g_z);
#pragma omp for schedule(static)
        for (int64_t e = 0; e < H * D; e++) {
            float total = 0.0f;
            for (int64_t k = 0; k < chunks; k++) total += partial[k * H * D + e];
            g_u[e] = total;
        }
#pragma omp for schedule(static)
        for (int64_t a = 0; a < A; a++) {
            float total = 0.0f;
            for (int64_t k = 0; k < chunks; k++) total += partial_shift[k * A + a];
            g_shift[a] = total;
        }
#pragma omp for schedule(static)
        for (int64_t h = 0; h < H; h++)
            sums(g_o + h * E, 1, H * E, B, z + h * D, H * D, D, E, g_w + h * E * D, D);
    }
    free(partial);
}
