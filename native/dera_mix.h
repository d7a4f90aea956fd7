/* DeRa logit mixing kernel: the one formula dera-local runs per generated token.
 *
 *   out[i] = wa * aligned[i] + wr * reference[i],   wa = lam, wr = 1 - lam
 *
 * Memory layout: three contiguous float32 arrays of n_vocab entries, indexed by token id,
 * exactly as llama_get_logits_ith() returns them. `out` may alias `aligned` (the runtime
 * mixes in place, inside the aligned context's logits buffer, so llama.cpp's sampler chain
 * reads the mixture through its ordinary llama_sampler_sample() path).
 *
 * -inf handling: a term with weight 0 is left out (never 0 * -inf = NaN), and a token that
 * is -inf in a model with non-zero weight stays -inf (impossible in one model, impossible in
 * the mix; with lam > 1 the reference weight is negative and would otherwise turn -inf into
 * +inf). No struct of llama.cpp's is used, so no header of llama.cpp is needed to build it.
 */
#ifndef DERA_MIX_H
#define DERA_MIX_H

#include <stddef.h>

#define DERA_MAX_TERMS 16 /* terms one mixture may have */

/* K-term mixture (CFG, proxy-tuning, N-model mixtures; DeRa is K = 2 with weights
 * (lam, 1 - lam)):
 *
 *   out[i] = sum over j with weights[j] != 0 of weights[j] * rows[j][i]
 *
 * summed in term order in float32, so that K = 2 with (lam, 1 - lam) gives the formula
 * above bit for bit. The same
 * -inf rules: weight-0 terms are left out, and a token that is -inf in any weighted term
 * is -inf in the mix. No weighted term: out is 0. `out` may alias any row. */
void dera_mix_terms(float *out, const float *const *rows, const float *weights, size_t k,
                    size_t n_vocab);

#endif
