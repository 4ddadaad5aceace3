/* Feature jitter on the CPU, one pass over a batch: each sample read from its source row,
 * Gaussian noise from Philox added where chosen, then (optionally) the tokens' LayerNorm
 * without affine (jitter.h). Rows are independent, so the result does not depend on the
 * thread count. */
#include "jitter.h"

/* x: B samples of n floats (tokens of width D, n = T * D), written from src's samples:
 * x[s] = src[index[s]] (index NULL: src[s]; src may be x itself, in place), with the noise
 * where rows[s], the global row of sample s, is >= 0 (-1: none). eps < 0: no LayerNorm.
 * Reading each sample from src as it is jittered spares the batch's gather a pass. */
void jitter_tokens(float *x, const float *src, const int64_t *index, int64_t B, int64_t n,
                   int64_t D, const int64_t *rows, uint64_t key, float sigma, float eps,
                   int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t s = 0; s < B; s++)
        jitter_sample(x + s * n, src + (index ? index[s] : s) * n, rows[s], key, sigma, eps, n, D);
}
