/* The attentive probe's per-sample token products on the CPU (probes/attentive_grads.py):
 * scores, softmax over tokens and the attention-weighted token sums forward; the scores' and
 * the queries' gradients backward. Shapes: B samples of T tokens of width D, H heads.
 *
 * Every sample is computed by one thread from its own inputs, so the result does not depend
 * on the thread count. Register-blocked products: 4 x 4 outputs per pass over D. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX512F__
#define VL 16
#else
#define VL 8
#endif
typedef float vf __attribute__((vector_size(VL * sizeof(float))));

static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline float hsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < VL; i++) s += v[i];
    return s;
}

static float dot(const float *x, const float *y, int64_t D) {
    vf acc = {0};
    int64_t d = 0;
    for (; d + VL <= D; d += VL) acc += load(x + d) * load(y + d);
    float s = hsum(acc);
    for (; d < D; d++) s += x[d] * y[d];
    return s;
}

/* out[t H + h] = X[t] . Y[h] + (add ? add[h] : 0): X (T, D) rows, Y row h at Y + h ldy. */
static void dots(const float *X, int64_t T, const float *Y, int64_t ldy, int64_t H, int64_t D,
                 const float *add, float *out) {
    int64_t t = 0, Dv = D - D % VL;
    for (; t + 4 <= T; t += 4) {
        int64_t h = 0;
        for (; h + 4 <= H; h += 4) {
            vf acc[4][4] = {{0}};
            for (int64_t d = 0; d < Dv; d += VL) {
                vf xv[4], yv[4];
                for (int i = 0; i < 4; i++) xv[i] = load(X + (t + i) * D + d);
                for (int j = 0; j < 4; j++) yv[j] = load(Y + (h + j) * ldy + d);
                for (int i = 0; i < 4; i++)
                    for (int j = 0; j < 4; j++) acc[i][j] += xv[i] * yv[j];
            }
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) {
                    float s = hsum(acc[i][j]);
                    for (int64_t d = Dv; d < D; d++) s += X[(t + i) * D + d] * Y[(h + j) * ldy + d];
                    out[(t + i) * H + h + j] = s;
                }
        }
        for (; h < H; h++)
            for (int i = 0; i < 4; i++) out[(t + i) * H + h] = dot(X + (t + i) * D, Y + h * ldy, D);
    }
    for (; t < T; t++)
        for (int64_t h = 0; h < H; h++) out[t * H + h] = dot(X + t * D, Y + h * ldy, D);
    if (add)
        for (t = 0; t < T; t++)
            for (int64_t h = 0; h < H; h++) out[t * H + h] += add[h];
}

/* Z[h] = sum_t A[t H + h] X[t]: X (T, D), A (T, H), Z (H, D). */
static void weighted_sums(const float *X, const float *A, int64_t T, int64_t H, int64_t D,
                          float *Z) {
    int64_t h = 0;
    for (; h + 4 <= H; h += 4) {
        int64_t d = 0;
        for (; d + 4 * VL <= D; d += 4 * VL) {
            vf acc[4][4] = {{0}};
            for (int64_t t = 0; t < T; t++) {
                vf xv[4];
                for (int k = 0; k < 4; k++) xv[k] = load(X + t * D + d + k * VL);
                for (int i = 0; i < 4; i++) {
                    float a = A[t * H + h + i];
                    for (int k = 0; k < 4; k++) acc[i][k] += a * xv[k];
                }
            }
            for (int i = 0; i < 4; i++)
                for (int k = 0; k < 4; k++) store(Z + (h + i) * D + d + k * VL, acc[i][k]);
        }
        for (int i = 0; i < 4; i++)
            for (int64_t e = d; e < D; e++) {
                float s = 0.0f;
                for (int64_t t = 0; t < T; t++) s += A[t * H + h + i] * X[t * D + e];
                Z[(h + i) * D + e] = s;
            }
    }
    for (; h < H; h++)
        for (int64_t e = 0; e < D; e++) {
            float s = 0.0f;
            for (int64_t t = 0; t < T; t++) s += A[t * H + h] * X[t * D + e];
            Z[h * D + e] = s;
        }
}

/* Forward. x (B, T, D) normalised tokens; u (H, D) the queries in token space; drop (B, H, T)
 * dropout multipliers or NULL. Out: attn (B, T, H) softmax over t, z (B, H, D) the sums of the
 * tokens weighted by attn x drop, mass (B, H) the sums of those weights (1 without dropout). */
void attend_forward(const float *x, const float *u, const float *drop, float *attn, float *z,
                    float *mass, int64_t B, int64_t T, int64_t D, int64_t H, int threads) {
#pragma omp parallel num_threads(threads)
    {
        float *w = malloc(sizeof(float) * (size_t)(T * H + H));
        float *top = w + T * H;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            const float *xb = x + b * T * D;
            float *a = attn + b * T * H;
            dots(xb, T, u, D, H, D, NULL, a);
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
            weighted_sums(xb, weights, T, H, D, z + b * H * D);
        }
        free(w);
    }
}

/* Backward to the scores and the queries. g_z (H, B, D) the gradient of z; c (B, H) what
 * each weight's gradient gains through the mass; attn, drop as forward. Out: g_s (B, T, H), the
 * gradient of the scores: with g = (x . g_z + c) x drop, g_s = attn (g - sum_t g attn); and
 * g_u (H, D) = sum_b g_s[b]^T x[b], the queries' gradient, summed in blocks of CHUNK samples and
 * then over the blocks in order (so for any thread count alike). */
#define CHUNK 16
void attend_backward(const float *x, const float *g_z, const float *c, const float *attn,
                     const float *drop, float *g_s, float *g_u, int64_t B, int64_t T, int64_t D,
                     int64_t H, int threads) {
    int64_t chunks = (B + CHUNK - 1) / CHUNK;
    float *partial = malloc(sizeof(float) * (size_t)(chunks * H * D));
#pragma omp parallel num_threads(threads)
    {
        float *sum = malloc(sizeof(float) * (size_t)H);
#pragma omp for schedule(static)
        for (int64_t k = 0; k < chunks; k++) {
            int64_t first = k * CHUNK, last = first + CHUNK < B ? first + CHUNK : B;
            for (int64_t b = first; b < last; b++) {
                float *g = g_s + b * T * H;
                const float *a = attn + b * T * H;
                dots(x + b * T * D, T, g_z + b * D, B * D, H, D, c + b * H, g);
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
            }
            /* the block's samples' tokens as one (rows, D) matrix */
            weighted_sums(x + first * T * D, g_s + first * T * H, (last - first) * T, H, D,
                          partial + k * H * D);
        }
        free(sum);
#pragma omp for schedule(static)
        for (int64_t e = 0; e < H * D; e++) {
            float total = 0.0f;
            for (int64_t k = 0; k < chunks; k++) total += partial[k * H * D + e];
            g_u[e] = total;
        }
    }
    free(partial);
}
