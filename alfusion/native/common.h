/* What the kernels share: a float vector as wide as the CPU's (AVX-512: 16, else 8) with
 * unaligned loads and stores and its lanes' sum, and a thread's share of a range. Built into
 * each kernel (build.py hashes this header with every source). */
#ifndef ALFUSION_COMMON_H
#define ALFUSION_COMMON_H
#include <omp.h>
#include <stdint.h>
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

/* Items [*first, *last) of the calling thread's equal share of n. */
static inline void share(int64_t n, int64_t *first, int64_t *last) {
    int t = omp_get_thread_num(), threads = omp_get_num_threads();
    *first = n * t / threads;
    *last = n * (t + 1) / threads;
}
#endif
