/* See dera_mix.h for the formula and the memory layout. Built with -ffp-contract=off so
 * that no fused multiply-add changes the rounding: the numpy fallback in
 * dera_local/mixing.py must give bit-identical results. */
#include <math.h>

#include "dera_mix.h"

static void scale_into(float *out, const float *x, size_t n, float w) {
    for (size_t i = 0; i < n; i++) {
        out[i] = w * x[i];
    }
}

void dera_mix_logits(float *out, const float *aligned, const float *reference,
                     size_t n_vocab, double lam) {
    const float wa = (float)lam;
    const float wr = (float)(1.0 - lam);
    if (wr == 0.0f) {                  /* lam == 1: the aligned model alone */
        if (out != aligned) scale_into(out, aligned, n_vocab, 1.0f);
        return;
    }
    if (wa == 0.0f) {                  /* lam == 0: the reference alone */
        scale_into(out, reference, n_vocab, 1.0f);
        return;
    }
    for (size_t i = 0; i < n_vocab; i++) {
        const float a = aligned[i];
        const float r = reference[i];
        const float h = wa * a + wr * r;
        out[i] = (a == -INFINITY || r == -INFINITY) ? -INFINITY : h;
    }
}

void dera_mix_terms(float *out, const float *const *rows, const float *weights, size_t k,
                    size_t n_vocab) {
    const float *active_rows[DERA_MAX_TERMS];
    float active_weights[DERA_MAX_TERMS];
    size_t n = 0;
    for (size_t j = 0; j < k && n < DERA_MAX_TERMS; j++) {
        if (weights[j] != 0.0f) {
            active_rows[n] = rows[j];
            active_weights[n] = weights[j];
            n++;
        }
    }
    if (n == 0) {
        for (size_t i = 0; i < n_vocab; i++) out[i] = 0.0f;
        return;
    }
    for (size_t i = 0; i < n_vocab; i++) {
        const float first = active_rows[0][i];
        float h = active_weights[0] * first;
        int impossible = first == -INFINITY;
        for (size_t j = 1; j < n; j++) {
            const float x = active_rows[j][i];
            h = h + active_weights[j] * x;
            impossible |= x == -INFINITY;
        }
        out[i] = impossible ? -INFINITY : h;
    }
}
