/* One probe's optimiser step on the CPU: the gradient-norm clipping and AdamW over all its
 * tensors in one call (torch's path: a norm per tensor, their norm, then torch's fused AdamW
 * tensor by tensor). The update is torch.optim.AdamW's (decoupled decay, bias corrections,
 * eps added to the corrected root); the gradients are read, not written.
 *
 * A gradient may be given in parts and composed here as it is read, block by block, never
 * stored whole: g[r, c] = base[r, c] cscale[c] + left[r] right[r / group, c] (any part
 * absent), for the attentive probe's k and q weights (rank one per head) and v weights
 * (params.c), so their gradients cost no pass over memory of their own.
 *
 * The norm is summed in fixed blocks of BLOCK elements, each in double, and the blocks'
 * sums in order, so it does not depend on the thread count. */
#include <math.h>
#include <stdlib.h>

#include "common.h"

#define BLOCK 4096

/* n tensors of sizes[i] floats. Blocks: tensor i's elements cut at multiples of BLOCK. */
static int64_t blocks_of(const int64_t *sizes, int64_t n, int64_t *first) {
    int64_t total = 0;
    for (int64_t i = 0; i < n; i++) {
        first[i] = total;
        total += (sizes[i] + BLOCK - 1) / BLOCK;
    }
    first[n] = total;
    return total;
}

/* Block k -> tensor *i and its elements [*lo, *hi). */
static void locate(const int64_t *first, const int64_t *sizes, int64_t n, int64_t k, int64_t *i,
                   int64_t *lo, int64_t *hi) {
    int64_t t = 0;
    while (t + 1 < n && first[t + 1] <= k) t++;
    *i = t;
    *lo = (k - first[t]) * BLOCK;
    *hi = *lo + BLOCK < sizes[t] ? *lo + BLOCK : sizes[t];
}

/* The gradients of the n tensors: tensor i's as base[i] alone (cscale[i], left[i] NULL) or
 * in parts, rows of cols[i]. */
typedef struct {
    const float *const *base, *const *cscale, *const *left, *const *right;
    const int64_t *cols, *group;
} Grads;

/* Tensor i's gradient, elements [lo, hi): where it is stored as is, else composed into buf
 * (row by row: left[r] times right's row r / group, plus base times cscale). */
static const float *gradient(const Grads *g, int64_t i, int64_t lo, int64_t hi, float *buf) {
    const float *base = g->base[i], *cscale = g->cscale[i], *left = g->left[i];
    if (!cscale && !left) return base + lo;
    int64_t cols = g->cols[i], r = lo / cols, c = lo - r * cols;
    for (int64_t e = lo; e < hi; r++, c = 0) {
        int64_t n = cols - c < hi - e ? cols - c : hi - e;
        const float *row = left ? g->right[i] + (r / g->group[i]) * cols + c : NULL;
        float l = left ? left[r] : 0.0f;
        float *out = buf + (e - lo);
        for (int64_t j = 0; j < n; j++) {
            float x = base ? (cscale ? base[e + j] * cscale[c + j] : base[e + j]) : 0.0f;
            out[j] = row ? x + l * row[j] : x;
        }
        e += n;
    }
    return buf;
}

/* The update's constants, in float as torch.optim.AdamW casts its double scalars. */
typedef struct {
    float divisor, decay, b1, b2, c1, c2, step_size, root2, eps;
} Consts;

/* sum of g[e]^2 over count elements, count a multiple of VL, in VL double lanes then in
 * order: one compiled sequence for every block (and the padded tail), whatever the address. */
__attribute__((noinline)) static double squares(const float *g, int64_t count) {
    double acc[VL] = {0};
    for (int64_t e = 0; e < count; e += VL) {
        vf x = load(g + e);
        for (int l = 0; l < VL; l++) acc[l] += (double)x[l] * (double)x[l];
    }
    double s = 0.0;
    for (int l = 0; l < VL; l++) s += acc[l];
    return s;
}

/* AdamW on count elements (a multiple of VL), VL at a time: one compiled sequence for all
 * (the compiler's vector division and root are approximations refined by a Newton step,
 * its scalar ones exact: a loop it splits into a vector body and a scalar rest by address
 * would round elements differently from run to run). */
__attribute__((noinline)) static void update(float *p, float *m, float *v, const float *g,
                                            int64_t count, const Consts *k) {
    for (int64_t e = 0; e < count; e += VL) {
        vf gc = load(g + e) / k->divisor;
        vf me = load(m + e) * k->b1 + gc * k->c1;
        vf ve = load(v + e) * k->b2 + gc * gc * k->c2;
        vf root;
        for (int l = 0; l < VL; l++) root[l] = sqrtf(ve[l]);
        store(m + e, me);
        store(v + e, ve);
        store(p + e, load(p + e) * k->decay - k->step_size * me / (root / k->root2 + k->eps));
    }
}

/* params, exp_avgs, exp_avg_sqs: n pointers each to sizes[i] floats; their gradients given
 * as Grads (base, cscale, left, right, cols, group: n entries each). step: the step number
 * after increment; lr, wd: this step's; max_norm: the clipping norm. The gradients are
 * divided by divisor = max(1, (norm + 1e-6) / max_norm) (clip_grad_norm_'s rule, norm their
 * total 2-norm), written to *divisor. */
void adamw_step(float *const *params, const float *const *base, const float *const *cscale,
                const float *const *left, const float *const *right, const int64_t *cols,
                const int64_t *group, float *const *exp_avgs, float *const *exp_avg_sqs,
                const int64_t *sizes, int64_t n, double step, double lr, double wd,
                double beta1, double beta2, double eps, double max_norm, float *divisor,
                int threads) {
    const Grads grads = {base, cscale, left, right, cols, group};
    int64_t *first = malloc(sizeof(int64_t) * (size_t)(n + 1));
    int64_t blocks = blocks_of(sizes, n, first);
    double *sums = malloc(sizeof(double) * (size_t)blocks);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t k = 0; k < blocks; k++) {
        int64_t i, lo, hi;
        locate(first, sizes, n, k, &i, &lo, &hi);
        float buf[BLOCK];
        const float *g = gradient(&grads, i, lo, hi, buf);
        int64_t body = (hi - lo) / VL * VL;
        float rest[VL] = {0};
        memcpy(rest, g + body, sizeof(float) * (size_t)(hi - lo - body));
        sums[k] = squares(g, body) + squares(rest, VL);
    }
    double total = 0.0;
    for (int64_t k = 0; k < blocks; k++) total += sums[k];
    float clip = ((float)sqrt(total) + 1e-6f) / (float)max_norm;
    Consts c = {.divisor = clip > 1.0f ? clip : 1.0f, .decay = (float)(1.0 - lr * wd),
                .b1 = (float)beta1, .b2 = (float)beta2, .c1 = (float)(1.0 - beta1),
                .c2 = (float)(1.0 - beta2), .step_size = (float)(lr / (1.0 - pow(beta1, step))),
                .root2 = (float)sqrt(1.0 - pow(beta2, step)), .eps = (float)eps};
    *divisor = c.divisor;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t k = 0; k < blocks; k++) {
        int64_t i, lo, hi;
        locate(first, sizes, n, k, &i, &lo, &hi);
        int64_t body = (hi - lo) / VL * VL, r = hi - lo - body;
        float *p = params[i] + lo, *m = exp_avgs[i] + lo, *v = exp_avg_sqs[i] + lo;
        float buf[BLOCK];
        const float *g = gradient(&grads, i, lo, hi, buf);
        update(p, m, v, g, body, &c);
        if (r) {  /* the rest through the same sequence, padded to a vector */
            float tail[4][VL] = {{0}};
            const size_t bytes = sizeof(float) * (size_t)r;
            memcpy(tail[0], p + body, bytes);
            memcpy(tail[1], m + body, bytes);
            memcpy(tail[2], v + body, bytes);
            memcpy(tail[3], g + body, bytes);
            update(tail[0], tail[1], tail[2], tail[3], VL, &c);
            memcpy(p + body, tail[0], bytes);
            memcpy(m + body, tail[1], bytes);
            memcpy(v + body, tail[2], bytes);
        }
    }
    free(sums);
    free(first);
}
