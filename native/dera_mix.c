/* See dera_mix.h for the formula and the memory layout. Built with -ffp-contract=off so
 * that no fused multiply-add changes the rounding: the numpy fallback in
 * dera_local/engine/mixing.py must give bit-identical results. */
#include <math.h>

#include "dera_mix.h"

#define DERA_MIX_CHUNK 256 /* floats per chunk of dera_mix_terms: 2 KiB of stack */

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
    if (n == 2) { /* DeRa, or one model with a negative prompt: one pass */
        const float *a = active_rows[0], *b = active_rows[1];
        const float wa = active_weights[0], wb = active_weights[1];
        for (size_t i = 0; i < n_vocab; i++) {
            const float x = a[i];
            const float y = b[i];
            const float h = wa * x + wb * y;
            out[i] = (x == -INFINITY || y == -INFINITY) ? -INFINITY : h;
        }
        return;
    }
    /* A chunk at a time, one term after another over the chunk: the same operations in
     * the same order for every element as summing each element's terms in turn (so the
     * same bits), but each inner loop is a plain stream the compiler vectorizes. The
     * chunk is read from every row before it is written, so `out` may alias a row. */
    float sum[DERA_MIX_CHUNK];
    float impossible[DERA_MIX_CHUNK]; /* 1 where some weighted term is -inf */
    for (size_t base = 0; base < n_vocab; base += DERA_MIX_CHUNK) {
        const size_t len = n_vocab - base < DERA_MIX_CHUNK ? n_vocab - base : DERA_MIX_CHUNK;
        const float *first = active_rows[0] + base;
        const float w0 = active_weights[0];
        for (size_t i = 0; i < len; i++) {
            sum[i] = w0 * first[i];
            impossible[i] = first[i] == -INFINITY ? 1.0f : 0.0f;
        }
        for (size_t j = 1; j < n; j++) {
            const float *x = active_rows[j] + base;
            const float w = active_weights[j];
            for (size_t i = 0; i < len; i++) {
                sum[i] = sum[i] + w * x[i];
                impossible[i] = x[i] == -INFINITY ? 1.0f : impossible[i];
            }
        }
        float *o = out + base;
        for (size_t i = 0; i < len; i++) {
            o[i] = impossible[i] != 0.0f ? -INFINITY : sum[i];
        }
    }
}
