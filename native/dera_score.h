/* Teacher-forced DeRa scoring of a lam grid over logits rows.
 *
 * For each lam in lams[0..n_lams) and each row t in [0, n_rows), with
 *   h = lam * aligned[t] + (1 - lam) * reference[t]   (same -inf rules as dera_mix.h)
 *   p = softmax(h),  log pa = log_softmax(aligned[t]),  log pr = log_softmax(reference[t])
 * it writes three doubles at out[(l * n_rows + t) * 3]:
 *   [0] log p(targets[t])     [1] KL(p || pr)     [2] KL(p || pa)
 *
 * Memory layout: aligned and reference are row-major float32 [n_rows][n_vocab] (the
 * layout of llama_get_logits() for a batch's outputs); targets is int32 [n_rows].
 */
#ifndef DERA_SCORE_H
#define DERA_SCORE_H

#include <stddef.h>
#include <stdint.h>

void dera_score_rows(const float *aligned, const float *reference, size_t n_rows,
                     size_t n_vocab, const int32_t *targets, const double *lams,
                     size_t n_lams, double *out);

#endif
