/* The attentive probe's last layers on the CPU (probes/attentive_grads.py): BatchNorm of the
 * pooled features with the batch's statistics, the linear classifier, the class-weighted
 * cross-entropy, and back to the pooled features' gradient, in one call. Shapes: B samples,
 * D features, C classes.
 *
 * Sums over the batch are taken per feature (a thread's range of features, samples in order),
 * sums over features or classes per sample, the loss's sum over samples in order: the result
 * does not depend on the thread count. */
#include <math.h>
#include <stdlib.h>

#include "common.h"

/* pooled (B, D); gamma, beta (D) BatchNorm's affine; W (C, D), bias (C) the classifier;
 * y (B) labels; w_y (B) each sample's class weight; eps BatchNorm's. Out: mean, var (D) the
 * batch's mean and biased variance; loss (1) = -sum_b w_y log p[b, y_b] / sum_b w_y;
 * g_pooled (B, D), g_gamma, g_beta (D), g_W (C, D), g_bias (C): the loss's gradients. */
void batch_norm_head(const float *pooled, const float *gamma, const float *beta, const float *W,
                     const float *bias, const int64_t *y, const float *w_y, float eps,
                     float *mean, float *var, float *loss, float *g_pooled, float *g_gamma,
                     float *g_beta, float *g_W, float *g_bias, int64_t B, int64_t D, int64_t C,
                     int threads) {
    float *normed = malloc(sizeof(float) * (size_t)(2 * B * D + B * C + B + 3 * D));
    float *g_h = normed + B * D, *g = g_h + B * D, *each = g + B * C;
    float *rstd = each + B, *g_mean = rstd + D, *g_mean_n = g_mean + D;
    float total = 0.0f;
    for (int64_t b = 0; b < B; b++) total += w_y[b];
#pragma omp parallel num_threads(threads)
    {
        int64_t d0, d1;
        share(D, &d0, &d1);
        /* the batch's statistics and the normalised features, per feature */
        for (int64_t d = d0; d < d1; d++) mean[d] = var[d] = 0.0f;
        for (int64_t b = 0; b < B; b++)
            for (int64_t d = d0; d < d1; d++) mean[d] += pooled[b * D + d];
        for (int64_t d = d0; d < d1; d++) mean[d] /= (float)B;
        for (int64_t b = 0; b < B; b++)
            for (int64_t d = d0; d < d1; d++) {
                float v = pooled[b * D + d] - mean[d];
                normed[b * D + d] = v;
                var[d] += v * v;
            }
#pragma omp barrier
#pragma omp single
        /* one thread for every feature: compiled as vector code, 1 / sqrt is approximated
         * differently than in scalar code, so a range's split there must not vary */
        for (int64_t d = 0; d < D; d++) {
            var[d] /= (float)B;
            rstd[d] = 1.0f / sqrtf(var[d] + eps);
        }
        for (int64_t b = 0; b < B; b++)
            for (int64_t d = d0; d < d1; d++) normed[b * D + d] *= rstd[d];
#pragma omp barrier
        /* per sample: logits, the loss's term, the logits' and BatchNorm's output's gradients */
        float *hb = malloc(sizeof(float) * (size_t)D);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            float *gb = g + b * C, *gh = g_h + b * D, top = -INFINITY, z = 0.0f;
            for (int64_t d = 0; d < D; d++) hb[d] = normed[b * D + d] * gamma[d] + beta[d];
            for (int64_t c = 0; c < C; c++) {
                float s = 0.0f;
                for (int64_t d = 0; d < D; d++) s += hb[d] * W[c * D + d];
                gb[c] = s + bias[c];
                top = fmaxf(top, gb[c]);
            }
            for (int64_t c = 0; c < C; c++) z += expf(gb[c] - top);
            float log_z = top + logf(z), scale = w_y[b] / total;
            each[b] = w_y[b] * (gb[y[b]] - log_z);
            for (int64_t c = 0; c < C; c++) gb[c] = (expf(gb[c] - log_z) - (c == y[b])) * scale;
            for (int64_t d = 0; d < D; d++) gh[d] = 0.0f;
            for (int64_t c = 0; c < C; c++)
                for (int64_t d = 0; d < D; d++) gh[d] += gb[c] * W[c * D + d];
        }
        free(hb);
        /* per feature: the parameters' gradients, then the pooled features': with
         * g_n = g_h gamma, rstd (g_n - mean_b g_n - normed mean_b (g_n normed)) */
        for (int64_t d = d0; d < d1; d++) g_gamma[d] = g_beta[d] = 0.0f;
        for (int64_t b = 0; b < B; b++)
            for (int64_t d = d0; d < d1; d++) g_beta[d] += g_h[b * D + d];
        for (int64_t b = 0; b < B; b++)
            for (int64_t d = d0; d < d1; d++) g_gamma[d] += g_h[b * D + d] * normed[b * D + d];
        /* g_W[c] = sum_b g[b, c] (normed[b] gamma + beta) = gamma sum_b g[b, c] normed[b]
         * + beta g_bias[c] */
        for (int64_t c = 0; c < C; c++)
            for (int64_t d = d0; d < d1; d++) g_W[c * D + d] = 0.0f;
        for (int64_t b = 0; b < B; b++)
            for (int64_t c = 0; c < C; c++)
                for (int64_t d = d0; d < d1; d++) g_W[c * D + d] += g[b * C + c] * normed[b * D + d];
        for (int64_t d = d0; d < d1; d++) g_mean[d] = g_beta[d] * gamma[d] / (float)B;
        for (int64_t d = d0; d < d1; d++) g_mean_n[d] = g_gamma[d] * gamma[d] / (float)B;
        for (int64_t b = 0; b < B; b++)
            for (int64_t d = d0; d < d1; d++)
                g_pooled[b * D + d] = rstd[d] * (g_h[b * D + d] * gamma[d] - g_mean[d]
                                                 - normed[b * D + d] * g_mean_n[d]);
    }
    float sum = 0.0f;
    for (int64_t b = 0; b < B; b++) sum += each[b];
    *loss = -sum / total;
    for (int64_t c = 0; c < C; c++) {
        float s = 0.0f;
        for (int64_t b = 0; b < B; b++) s += g[b * C + c];
        g_bias[c] = s;
        for (int64_t d = 0; d < D; d++) g_W[c * D + d] = g_W[c * D + d] * gamma[d] + beta[d] * s;
    }
    free(normed);
}
