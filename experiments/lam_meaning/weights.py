"""The importance-sampling arithmetic of part 1, on plain arrays (tested against exact
enumeration in tests/test_importance_weights.py).

One prompt's answers are draws from J proposals (DeRa at lam'_j), n_j each. For every
answer: A and R (its log-probability under the aligned model and the reference) and G_j
(under every proposal j). The target at lam is Pi_lam ∝ exp(lam A + (1 - lam) R) over
the same answers. Pooled weights use the balance heuristic: the answers together are
one draw from the mixture of the proposals, of density sum_j (n_j / n) exp(G_j).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def logsumexp(x: np.ndarray, axis: int | None = None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    peak = np.max(x, axis=axis, keepdims=True)
    out = peak + np.log(np.sum(np.exp(x - peak), axis=axis, keepdims=True))
    return out.squeeze() if axis is None else np.squeeze(out, axis=axis)


def logmeanexp(x: np.ndarray, axis: int | None = None) -> np.ndarray:
    n = np.size(x) if axis is None else np.shape(x)[axis]
    return logsumexp(x, axis) - np.log(n)


def effective_sample_size(log_weights: np.ndarray) -> float:
    """(sum w)^2 / sum w^2: how many equally weighted draws the weights are worth."""
    w = np.exp(np.asarray(log_weights, np.float64) - np.max(log_weights))
    return float(w.sum() ** 2 / (w**2).sum())


def pareto_k_hat(log_weights: np.ndarray) -> float:
    """The shape k of a generalized Pareto fitted to the largest weights (the PSIS
    diagnostic of Vehtari et al.: the M = min(n / 5, 3 sqrt(n)) largest, as exceedances
    over the next one; fitted by scipy's maximum likelihood, not Zhang and Stephens'
    estimator). k > 0.7: the weights' mean is not to be trusted at this sample size;
    k > 1: their variance is infinite. NaN with fewer than 5 tail draws."""
    from scipy.stats import genpareto

    w = np.sort(np.exp(np.asarray(log_weights, np.float64) - np.max(log_weights)))
    m = int(min(len(w) / 5, 3 * np.sqrt(len(w))))
    if m < 5:
        return float("nan")
    tail, threshold = w[-m:], w[-m - 1]
    exceed = tail - threshold
    if not np.any(exceed > 0):
        return 0.0
    k, _, _ = genpareto.fit(exceed, floc=0.0)
    return float(k)


@dataclass(frozen=True)
class PromptDraws:
    """One prompt's answers: A, R [n], G [n, J] (log-probability under each proposal),
    source [n] (the proposal each was drawn from), and a value per answer to average
    (words)."""

    aligned: np.ndarray
    reference: np.ndarray
    proposals: np.ndarray
    source: np.ndarray
    value: np.ndarray

    def pooled_log_density(self) -> np.ndarray:
        """log of the mixture of the proposals, in the proportions the answers came in."""
        counts = np.bincount(self.source, minlength=self.proposals.shape[1])
        shares = np.log(counts / counts.sum(), where=counts > 0, out=np.full(len(counts), -np.inf))
        return logsumexp(self.proposals + shares, axis=1)

    def target_log_density(self, lam: float) -> np.ndarray:
        """log Pi~_lam: the target's unnormalised log density at each answer."""
        return lam * self.aligned + (1.0 - lam) * self.reference


@dataclass(frozen=True)
class TargetEstimate:
    """One prompt's estimates for the target at lam."""

    log_z: float
    words: float  # the target's expected value (words)
    kl_to_reference: float  # KL(Pi_lam || pi_ref)
    ess: float  # of the pooled weights
    k_hat: float  # the Pareto shape of the pooled weights' tail (pareto_k_hat)
    kl_from_proposal: np.ndarray  # [J] KL(DeRa_lam'_j || Pi_lam)
    ess_of_proposal: np.ndarray  # [J] of proposal j's own draws weighed for Pi_lam


def estimate(draws: PromptDraws, lam: float) -> TargetEstimate:
    target = draws.target_log_density(lam)
    log_w = target - draws.pooled_log_density()
    log_z = float(logmeanexp(log_w))
    normalised = np.exp(log_w - log_w.max())
    normalised /= normalised.sum()
    words = float(normalised @ draws.value)
    kl_ref = float(normalised @ (lam * (draws.aligned - draws.reference))) - log_z
    n_proposals = draws.proposals.shape[1]
    kl_from = np.full(n_proposals, np.nan)
    ess_of = np.full(n_proposals, np.nan)
    for j in range(n_proposals):
        mine = draws.source == j
        if mine.any():
            own = target[mine] - draws.proposals[mine, j]  # W = log Pi~ - log DeRa_lam'
            kl_from[j] = log_z - own.mean()
            ess_of[j] = effective_sample_size(own)
    return TargetEstimate(
        log_z, words, kl_ref, effective_sample_size(log_w), pareto_k_hat(log_w), kl_from, ess_of
    )


def proposal_means(draws: PromptDraws) -> tuple[np.ndarray, np.ndarray]:
    """[J] each proposal's mean value (words) and one-sample KL to the reference (G_j - R)
    over its own draws."""
    n_proposals = draws.proposals.shape[1]
    words, kl = np.full(n_proposals, np.nan), np.full(n_proposals, np.nan)
    for j in range(n_proposals):
        mine = draws.source == j
        if mine.any():
            words[j] = draws.value[mine].mean()
            kl[j] = (draws.proposals[mine, j] - draws.reference[mine]).mean()
    return words, kl


def argmin_parabola(xs: np.ndarray, ys: np.ndarray) -> float:
    """Where ys is smallest along xs, refined by a parabola through the best grid point
    and its neighbours (the grid point itself at an edge or without curvature)."""
    xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    best = int(np.nanargmin(ys))
    if best == 0 or best == len(xs) - 1:
        return float(xs[best])
    x, y = xs[best - 1 : best + 2], ys[best - 1 : best + 2]
    a, b, _ = np.polyfit(x, y, 2)
    if a <= 0:
        return float(xs[best])
    return float(np.clip(-b / (2 * a), x[0], x[2]))


def crossing(xs: np.ndarray, ys: np.ndarray, level: float) -> float | None:
    """The x where increasing-ish ys first reaches `level` (linear between grid points);
    None if it never does on the grid."""
    for i in range(len(xs) - 1):
        lo, hi = ys[i], ys[i + 1]
        if (lo - level) * (hi - level) <= 0 and lo != hi:
            return float(xs[i] + (level - lo) / (hi - lo) * (xs[i + 1] - xs[i]))
    return None


def bootstrap(per_prompt: np.ndarray, statistic, resamples: int = 2000, seed: int = 0):
    """Percentile 95% interval of statistic(mean over resampled prompts of per_prompt)
    (per_prompt: [prompts, ...]); returns (point, low, high)."""
    rng = np.random.default_rng(seed)
    n = len(per_prompt)
    point = statistic(np.nanmean(per_prompt, axis=0))
    values = [
        statistic(np.nanmean(per_prompt[rng.integers(0, n, n)], axis=0)) for _ in range(resamples)
    ]
    low, high = np.nanpercentile(np.asarray(values, np.float64), [2.5, 97.5], axis=0)
    return point, low, high
