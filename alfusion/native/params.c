/* The attentive probe's parameter-side arithmetic on the CPU (probes/attentive_grads.py): the
 * query mapped into token space and the heads' value weights forward, their parameters'
 * gradients backward, each weight matrix read once. Shapes: D token width, H heads of width
 * E, A = H E; q, k, v weights (A, D), row a = h E + e.
 *
 * Sums along a row are one thread's; sums over rows run per feature, rows in order, over a
 * thread's range of features: the result does not depend on the thread count. */
#include <math.h>
#include <stdlib.h>

#include "common.h"

/* Forward. query (D); nq_w, nq_b LN_q's affine; q_w, k_w, v_w the projections; nk_w LN_k's
 * gain; nv_w, nv_b LN_v's affine. Out: qhat (D) the normalised query and rstd_q (1) its
 * 1 / std; qn (D) = qhat nq_w + nq_b; q (A) = q_w qn; k_q (H, D) = sum_e q[h, e] k_w[h, e],
 * the query in token space; u (H, D) = k_q nk_w scale; w (H, E, D) = v_w nv_w and wt its
 * transpose (H, D, E); shift (A) = v_w nv_b. */
void params_forward(const float *query, const float *nq_w, const float *nq_b, const float *q_w,
                    const float *k_w, const float *nk_w, const float *v_w, const float *nv_w,
                    const float *nv_b, float scale, float eps_q, float *qhat, float *rstd_q,
                    float *qn, float *q, float *k_q, float *u, float *w, float *wt,
                    float *shift, int64_t H, int64_t E, int64_t D, int threads) {
    int64_t A = H * E;
    float mean = 0.0f, var = 0.0f;
    for (int64_t d = 0; d < D; d++) mean += query[d];
    mean /= (float)D;
    for (int64_t d = 0; d < D; d++) var += (query[d] - mean) * (query[d] - mean);
    *rstd_q = 1.0f / sqrtf(var / (float)D + eps_q);
    for (int64_t d = 0; d < D; d++) {
        qhat[d] = (query[d] - mean) * *rstd_q;
        qn[d] = qhat[d] * nq_w[d] + nq_b[d];
    }
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t a = 0; a < A; a++) {
            float s = 0.0f, t = 0.0f;
            for (int64_t d = 0; d < D; d++) {
                s += q_w[a * D + d] * qn[d];
                w[a * D + d] = v_w[a * D + d] * nv_w[d];
                t += v_w[a * D + d] * nv_b[d];
            }
            q[a] = s;
            shift[a] = t;
        }
#pragma omp for schedule(static)
        for (int64_t h = 0; h < H; h++) {
            float *kq = k_q + h * D;
            for (int64_t d = 0; d < D; d++) kq[d] = 0.0f;
            for (int64_t e = 0; e < E; e++)
                for (int64_t d = 0; d < D; d++) kq[d] += q[h * E + e] * k_w[(h * E + e) * D + d];
            for (int64_t d = 0; d < D; d++) u[h * D + d] = kq[d] * nk_w[d] * scale;
            for (int64_t d = 0; d < D; d++)
                for (int64_t e = 0; e < E; e++) wt[(h * D + d) * E + e] = w[(h * E + e) * D + d];
        }
    }
}

/* Backward. g_u (H, D) the gradient of u, g_w (H, E, D) of w, g_shift (A) of shift; the
 * parameters and qhat, rstd_q, qn, q, k_q as forward. Out: the gradients of query, nq_w,
 * nq_b (D), q_w, k_w (A, D), nk_w (D), v_w (A, D), nv_w, nv_b (D), and g_k_q (H, D) and
 * g_q (A), of which those of k_w (q[a] g_k_q[h]) and q_w (g_q[a] qn) are made. The three
 * matrices' gradients may be NULL: not written (adamw.c composes them as it reads them). */
void params_backward(const float *g_u, const float *g_w, const float *g_shift,
                     const float *nq_w, const float *q_w, const float *k_w, const float *nk_w,
                     const float *v_w, const float *nv_w, const float *nv_b, float scale,
                     const float *qhat, const float *rstd_q, const float *qn, const float *q,
                     const float *k_q, float *g_query, float *g_nq_w, float *g_nq_b,
                     float *g_q_w, float *g_k_w, float *g_nk_w, float *g_v_w, float *g_nv_w,
                     float *g_nv_b, float *g_k_q, float *g_q, int64_t H, int64_t E, int64_t D,
                     int threads) {
    int64_t A = H * E;
    float *g_qn = malloc(sizeof(float) * (size_t)D);
#pragma omp parallel num_threads(threads)
    {
        int64_t d0, d1;
        share(D, &d0, &d1);
        for (int64_t d = d0; d < d1; d++) g_nk_w[d] = 0.0f;
        for (int64_t h = 0; h < H; h++)
            for (int64_t d = d0; d < d1; d++) {
                g_k_q[h * D + d] = g_u[h * D + d] * nk_w[d] * scale;
                g_nk_w[d] += g_u[h * D + d] * k_q[h * D + d];
            }
        for (int64_t d = d0; d < d1; d++) g_nk_w[d] *= scale;
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t a = 0; a < A; a++) {  /* k_w's gradient q[a] g_k_q[h], and g_q */
            const float *gk = g_k_q + (a / E) * D;
            float s = 0.0f;
            for (int64_t d = 0; d < D; d++) s += k_w[a * D + d] * gk[d];
            if (g_k_w)
                for (int64_t d = 0; d < D; d++) g_k_w[a * D + d] = q[a] * gk[d];
            g_q[a] = s;
        }
        for (int64_t d = d0; d < d1; d++) g_qn[d] = g_nv_w[d] = g_nv_b[d] = 0.0f;
        for (int64_t a = 0; a < A; a++)
            for (int64_t d = d0; d < d1; d++) {
                int64_t i = a * D + d;
                if (g_q_w) g_q_w[i] = g_q[a] * qn[d];
                g_qn[d] += q_w[i] * g_q[a];
                if (g_v_w) g_v_w[i] = g_w[i] * nv_w[d] + g_shift[a] * nv_b[d];
                g_nv_w[d] += g_w[i] * v_w[i];
                g_nv_b[d] += g_shift[a] * v_w[i];
            }
    }
    /* through LN_q: with g_n = g_qn nq_w, rstd (g_n - mean g_n - qhat mean(g_n qhat)) */
    float m = 0.0f, mq = 0.0f;
    for (int64_t d = 0; d < D; d++) {
        g_nq_w[d] = g_qn[d] * qhat[d];
        g_nq_b[d] = g_qn[d];
        m += g_qn[d] * nq_w[d];
        mq += g_qn[d] * nq_w[d] * qhat[d];
    }
    m /= (float)D;
    mq /= (float)D;
    for (int64_t d = 0; d < D; d++)
        g_query[d] = *rstd_q * (g_qn[d] * nq_w[d] - m - qhat[d] * mq);
    free(g_qn);
}
