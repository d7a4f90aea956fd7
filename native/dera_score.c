/* See dera_score.h. The hot loop is one pass to find max(h) and one to accumulate
 * sum exp(h - max) and the expectations E[h], E[a], E[r] under p, per (lam, row); both are
 * written without branches so compilers vectorize them, and on x86-64 GCC/Clang build
 * AVX-512 and AVX2 clones chosen at run time. exp uses a polynomial (relative error
 * ~2e-7), so scores agree with a float64 reference to about 1e-6. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "dera_score.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__APPLE__)
#define DERA_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define DERA_CLONES
#endif

/* exp(x) for x <= 0 (x = -inf gives 0): 2^n * p(r), |r| <= ln2/2, degree-6 polynomial. */
static inline float exp_nonpositive(float x) {
    const float clamped = x < -87.0f ? -87.0f : x;
    const float n = nearbyintf(clamped * 1.44269504089f);
    const float r = clamped - n * 0.693145751953f - n * 1.42860682030e-6f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.0f ? 0.0f : p * scale;
}

static inline float mixed(float a, float r, float wa, float wr) {
    /* Weight-0 terms are left out; -inf in a weighted model stays -inf. */
    const float h = (wa == 0.0f ? 0.0f : wa * a) + (wr == 0.0f ? 0.0f : wr * r);
    const int impossible = (wa != 0.0f && a == -INFINITY) || (wr != 0.0f && r == -INFINITY);
    return impossible ? -INFINITY : h;
}

DERA_CLONES
static double log_sum_exp(const float *x, size_t n) {
    float peak = -INFINITY;
    for (size_t i = 0; i < n; i++) peak = x[i] > peak ? x[i] : peak;
    if (peak == -INFINITY) return -INFINITY;
    double total = 0.0;
    for (size_t i = 0; i < n; i++) total += exp_nonpositive(x[i] - peak);
    return (double)peak + log(total);
}

DERA_CLONES
static void score_one(const float *a, const float *r, size_t n, float wa, float wr,
                      double *lse_h, double *mean_h, double *mean_a, double *mean_r) {
    float peak = -INFINITY;
    for (size_t i = 0; i < n; i++) {
        const float h = mixed(a[i], r[i], wa, wr);
        peak = h > peak ? h : peak;
    }
    /* double sums: a 152k-entry float sum would lose ~1e-4 of relative precision */
    double total = 0.0, sum_h = 0.0, sum_a = 0.0, sum_r = 0.0;
    for (size_t i = 0; i < n; i++) {
        const float h = mixed(a[i], r[i], wa, wr);
        const float e = exp_nonpositive(h - peak);
        const int live = h != -INFINITY;  /* p = 0 there: contributes nothing */
        total += e;
        sum_h += live ? e * (h - peak) : 0.0f;
        sum_a += live ? e * (a[i] - peak) : 0.0f;
        sum_r += live ? e * (r[i] - peak) : 0.0f;
    }
    *lse_h = (double)peak + log(total);
    *mean_h = sum_h / total + peak;
    *mean_a = sum_a / total + peak;
    *mean_r = sum_r / total + peak;
}

void dera_score_rows(const float *aligned, const float *reference, size_t n_rows,
                     size_t n_vocab, const int32_t *targets, const double *lams,
                     size_t n_lams, double *out) {
    for (size_t t = 0; t < n_rows; t++) {
        const float *a = aligned + t * n_vocab;
        const float *r = reference + t * n_vocab;
        const double lse_a = log_sum_exp(a, n_vocab);
        const double lse_r = log_sum_exp(r, n_vocab);
        for (size_t l = 0; l < n_lams; l++) {
            const float wa = (float)lams[l];
            const float wr = (float)(1.0 - lams[l]);
            double lse_h, mean_h, mean_a, mean_r;
            score_one(a, r, n_vocab, wa, wr, &lse_h, &mean_h, &mean_a, &mean_r);
            double *row = out + (l * n_rows + t) * 3;
            const int32_t y = targets[t];
            row[0] = (double)mixed(a[y], r[y], wa, wr) - lse_h;
            row[1] = (mean_h - lse_h) - (mean_r - lse_r);
            row[2] = (mean_h - lse_h) - (mean_a - lse_a);
        }
    }
}
