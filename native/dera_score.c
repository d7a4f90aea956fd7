/* See dera_score.h. The hot loop is one pass to find max(h) and one to accumulate
 * sum exp(h - max) and the expectations E[h], E[a], E[r] under p, per (lam, row); both are
 * written without branches and with lane-wise reductions so compilers vectorize them, and
 * on x86-64 GCC/Clang build AVX-512 and AVX2 clones chosen at run time. exp uses a polynomial (relative error
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

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* exp(x) for x <= 0 (x = -inf gives 0): 2^n * p(r), |r| <= ln2/2, degree-6 polynomial. */
ALWAYS_INLINE float exp_nonpositive(float x) {
    const float clamped = x < -87.0f ? -87.0f : x;
    /* round to nearest: adding 1.5 * 2^23 leaves round(v) in the low mantissa bits. Read
     * as bits (not by subtracting the constant again, which reassociation would cancel),
     * and unlike nearbyintf it vectorizes. */
    const float shifted = clamped * 1.44269504089f + 12582912.0f;
    int32_t shifted_bits;
    memcpy(&shifted_bits, &shifted, sizeof shifted_bits);
    const int32_t whole = shifted_bits - 0x4B400000;
    const float n = (float)whole;
    const float r = clamped - n * 0.693145751953f - n * 1.42860682030e-6f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = (whole + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.0f ? 0.0f : p * scale;
}

/* The mix of dera_mix.h, specialised by mode so that each loop is branch-free and
 * vectorizes: REFERENCE_ONLY (lam 0: h = r), ALIGNED_ONLY (lam 1: h = a), or BOTH (h =
 * wa*a + wr*r, and -inf where either is -inf). */
enum mix_mode { REFERENCE_ONLY, ALIGNED_ONLY, BOTH };

ALWAYS_INLINE float mixed(float a, float r, float wa, float wr, enum mix_mode mode) {
    if (mode == REFERENCE_ONLY) return r;
    if (mode == ALIGNED_ONLY) return a;
    const float h = wa * a + wr * r;
    return (a == -INFINITY) | (r == -INFINITY) ? -INFINITY : h;
}

/* Reductions run in LANES independent partial results, combined at the end: strict IEEE
 * semantics forbid compilers from reassociating one running sum, but lanes need none, so
 * the loops vectorize without -ffast-math. Blocks are short enough for float lanes; the
 * blocks add up in double. */
#define LANES 16
#define BLOCK 2048

ALWAYS_INLINE float max_mixed(const float *a, const float *r, size_t n, float wa, float wr,
                              enum mix_mode mode) {
    float lane[LANES];
    for (int k = 0; k < LANES; k++) lane[k] = -INFINITY;
    size_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        for (int k = 0; k < LANES; k++) {
            const float h = mixed(a[i + k], r[i + k], wa, wr, mode);
            lane[k] = h > lane[k] ? h : lane[k];
        }
    }
    for (; i < n; i++) {
        const float h = mixed(a[i], r[i], wa, wr, mode);
        lane[0] = h > lane[0] ? h : lane[0];
    }
    float peak = -INFINITY;
    for (int k = 0; k < LANES; k++) peak = lane[k] > peak ? lane[k] : peak;
    return peak;
}

/* Adds to sums[0..3] the sums over [begin, end) of e = exp(h - peak) and of e times
 * (h, a, r) - peak. Where h = -inf (p = 0) the selects put the peak in, so 0 * -inf
 * never happens. */
ALWAYS_INLINE void block_sums(const float *a, const float *r, size_t begin, size_t end,
                              float wa, float wr, float peak, enum mix_mode mode,
                              double sums[4]) {
    float total[LANES] = {0}, sum_h[LANES] = {0}, sum_a[LANES] = {0}, sum_r[LANES] = {0};
    size_t i = begin;
    for (; i + LANES <= end; i += LANES) {
        for (int k = 0; k < LANES; k++) {
            const float av = a[i + k], rv = r[i + k];
            const float h = mixed(av, rv, wa, wr, mode);
            const float e = exp_nonpositive(h - peak);
            total[k] += e;
            sum_h[k] += e * ((h == -INFINITY ? peak : h) - peak);
            sum_a[k] += e * ((h == -INFINITY ? peak : av) - peak);
            sum_r[k] += e * ((h == -INFINITY ? peak : rv) - peak);
        }
    }
    for (; i < end; i++) {
        const float av = a[i], rv = r[i];
        const float h = mixed(av, rv, wa, wr, mode);
        const float e = exp_nonpositive(h - peak);
        total[0] += e;
        sum_h[0] += e * ((h == -INFINITY ? peak : h) - peak);
        sum_a[0] += e * ((h == -INFINITY ? peak : av) - peak);
        sum_r[0] += e * ((h == -INFINITY ? peak : rv) - peak);
    }
    for (int k = 0; k < LANES; k++) {
        sums[0] += total[k];
        sums[1] += sum_h[k];
        sums[2] += sum_a[k];
        sums[3] += sum_r[k];
    }
}

#if defined(__GNUC__) && !defined(__clang__)
#define REASSOCIATE \
    __attribute__((optimize("associative-math", "no-signed-zeros", "no-trapping-math")))
#else
#define REASSOCIATE
#endif

/* The same sums for rows without any -inf (what llama.cpp's logits nearly always are):
 * no selects are needed, and letting the compiler reorder these float sums (tree
 * reductions instead of one running sum) is what lets the loop vectorize. */
REASSOCIATE ALWAYS_INLINE void block_sums_finite(const float *a, const float *r,
                                                 size_t begin, size_t end, float wa,
                                                 float wr, float peak, enum mix_mode mode,
                                                 double sums[4]) {
#if defined(__clang__)
#pragma clang fp reassociate(on)
#endif
    float total = 0.0f, sum_h = 0.0f, sum_a = 0.0f, sum_r = 0.0f;
    for (size_t i = begin; i < end; i++) {
        const float av = a[i], rv = r[i];
        const float h = mode == REFERENCE_ONLY ? rv : mode == ALIGNED_ONLY ? av
                                                                           : wa * av + wr * rv;
        const float e = exp_nonpositive(h - peak);
        total += e;
        sum_h += e * (h - peak);
        sum_a += e * (av - peak);
        sum_r += e * (rv - peak);
    }
    sums[0] += total;
    sums[1] += sum_h;
    sums[2] += sum_a;
    sums[3] += sum_r;
}

ALWAYS_INLINE int has_minus_infinity(const float *x, size_t n) {
    int found = 0;
    for (size_t i = 0; i < n; i++) found |= x[i] == -INFINITY;
    return found;
}

/* peak, then per-block sums, for one mode: log-sum-exp of h and E[h], E[a], E[r]. */
ALWAYS_INLINE void moments(const float *a, const float *r, size_t n, float wa, float wr,
                           enum mix_mode mode, double out[4]) {
    const float peak = max_mixed(a, r, n, wa, wr, mode);
    double sums[4] = {0.0, 0.0, 0.0, 0.0};
    if (peak == -INFINITY) {
        out[0] = out[1] = out[2] = out[3] = -INFINITY;
        return;
    }
    const int finite = !has_minus_infinity(a, n) && !has_minus_infinity(r, n);
    for (size_t begin = 0; begin < n; begin += BLOCK) {
        const size_t end = begin + BLOCK < n ? begin + BLOCK : n;
        if (finite) {
            block_sums_finite(a, r, begin, end, wa, wr, peak, mode, sums);
        } else {
            block_sums(a, r, begin, end, wa, wr, peak, mode, sums);
        }
    }
    out[0] = (double)peak + log(sums[0]);
    out[1] = sums[1] / sums[0] + peak;
    out[2] = sums[2] / sums[0] + peak;
    out[3] = sums[3] / sums[0] + peak;
}

/* out = {log-sum-exp(h), E_p[h], E_p[a], E_p[r]} with p = softmax(h). */
DERA_CLONES
static void mixture_moments(const float *a, const float *r, size_t n, float wa, float wr,
                            double out[4]) {
    if (wa == 0.0f) {
        moments(a, r, n, wa, wr, REFERENCE_ONLY, out);
    } else if (wr == 0.0f) {
        moments(a, r, n, wa, wr, ALIGNED_ONLY, out);
    } else {
        moments(a, r, n, wa, wr, BOTH, out);
    }
}

static float mixed_at(float a, float r, float wa, float wr) {
    if (wa == 0.0f) return r;
    if (wr == 0.0f) return a;
    return mixed(a, r, wa, wr, BOTH);
}

void dera_score_rows(const float *aligned, const float *reference, size_t n_rows,
                     size_t n_vocab, const int32_t *targets, const double *lams,
                     size_t n_lams, double *out) {
    for (size_t t = 0; t < n_rows; t++) {
        const float *a = aligned + t * n_vocab;
        const float *r = reference + t * n_vocab;
        double of_a[4], of_r[4];
        mixture_moments(a, r, n_vocab, 1.0f, 0.0f, of_a); /* log-sum-exp of a */
        mixture_moments(a, r, n_vocab, 0.0f, 1.0f, of_r); /* log-sum-exp of r */
        for (size_t l = 0; l < n_lams; l++) {
            const float wa = (float)lams[l];
            const float wr = (float)(1.0 - lams[l]);
            double m[4]; /* log-sum-exp of h, E[h], E[a], E[r] */
            mixture_moments(a, r, n_vocab, wa, wr, m);
            double *row = out + (l * n_rows + t) * 3;
            const int32_t y = targets[t];
            row[0] = (double)mixed_at(a[y], r[y], wa, wr) - m[0];
            row[1] = (m[1] - m[0]) - (m[3] - of_r[0]);
            row[2] = (m[1] - m[0]) - (m[2] - of_a[0]);
        }
    }
}
