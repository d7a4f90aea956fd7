"""Part 1's importance-sampling arithmetic (experiments/lam_meaning/weights.py) on a
finite answer space where every quantity is known exactly by enumeration: a reference
and an aligned distribution over 40 answers, proposals that are not the target, and
draws from them."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "lam_meaning"))
from weights import (  # noqa: E402
    PromptDraws,
    argmin_parabola,
    bootstrap,
    crossing,
    effective_sample_size,
    estimate,
    proposal_means,
)

PROPOSAL_LAMS = np.array([0.0, 0.5, 1.0, 1.5, 2.5])


def _normalise(log_p: np.ndarray) -> np.ndarray:
    return log_p - np.log(np.exp(log_p - log_p.max()).sum()) - log_p.max()


def _space(seed: int = 0, size: int = 40):
    """log pi_ref, log pi_1, each proposal's log density [size, J] (a per-answer mixture
    with noise, so no proposal is the target), and a value (words) per answer."""
    rng = np.random.default_rng(seed)
    ref = _normalise(rng.normal(0, 1.5, size))
    aligned = _normalise(ref + rng.normal(0, 1.0, size))
    proposals = np.stack(
        [_normalise(lam * aligned + (1 - lam) * ref + rng.normal(0, 0.3, size))
         for lam in PROPOSAL_LAMS],
        axis=1,
    )  # fmt: skip
    return ref, aligned, proposals, rng.integers(5, 80, size).astype(float)


def _exact(ref, aligned, proposals, value, lam):
    target = lam * aligned + (1 - lam) * ref
    log_z = np.log(np.exp(target).sum())
    pi = np.exp(target - log_z)
    kl_from = [(np.exp(q) * (q - (target - log_z))).sum() for q in proposals.T]
    return log_z, pi @ value, pi @ (target - log_z - ref), np.array(kl_from)


def _draws(ref, aligned, proposals, value, n_each, seed=1):
    rng = np.random.default_rng(seed)
    picks, sources = [], []
    for j in range(proposals.shape[1]):
        picks += list(rng.choice(len(ref), size=n_each, p=np.exp(proposals[:, j])))
        sources += [j] * n_each
    picks = np.array(picks)
    sources = np.array(sources)
    return PromptDraws(aligned[picks], ref[picks], proposals[picks], sources, value[picks])


@pytest.mark.parametrize("lam", [0.5, 0.75, 1.5, 2.0])
def test_estimates_converge_to_the_enumerated_target(lam):
    space = _space()
    log_z, words, kl_ref, kl_from = _exact(*space, lam)
    got = estimate(_draws(*space, n_each=4000), lam)
    assert got.log_z == pytest.approx(log_z, abs=0.03)
    assert got.words == pytest.approx(words, rel=0.02)
    assert got.kl_to_reference == pytest.approx(kl_ref, abs=0.03)
    assert got.kl_from_proposal == pytest.approx(kl_from, abs=0.05)
    assert 1000 < got.ess <= 20000


def test_weights_of_exact_proposals_are_equal():
    """Proposals all equal to the target: every pooled weight is Z exactly, so the
    estimates are exact for any draws and the effective sample size is the count."""
    ref, aligned, _, value = _space(seed=2)
    lam = 0.6
    target = _normalise(lam * aligned + (1 - lam) * ref)
    proposals = np.repeat(target[:, None], 3, axis=1)
    log_z = np.log(np.exp(lam * aligned + (1 - lam) * ref).sum())
    draws = _draws(ref, aligned, proposals, value, n_each=7)
    got = estimate(draws, lam)
    assert got.log_z == pytest.approx(log_z, abs=1e-12)
    assert got.ess == pytest.approx(21)
    assert got.kl_from_proposal == pytest.approx([0, 0, 0], abs=1e-12)
    assert got.words == pytest.approx(draws.value.mean())


def test_proposal_means_and_small_helpers():
    space = _space(seed=3)
    draws = _draws(*space, n_each=3000)
    words, kl = proposal_means(draws)
    for j, q in enumerate(space[2].T):
        p = np.exp(q)
        assert words[j] == pytest.approx(p @ space[3], rel=0.03)
        assert kl[j] == pytest.approx(p @ (q - space[0]), abs=0.05)
    assert effective_sample_size(np.log([1.0, 1.0, 1.0, 1.0])) == pytest.approx(4)
    assert effective_sample_size(np.array([0.0, -50.0, -50.0])) == pytest.approx(1)
    xs = np.array([0.5, 1.0, 1.5, 2.0])
    assert argmin_parabola(xs, (xs - 1.2) ** 2) == pytest.approx(1.2)
    assert argmin_parabola(xs, xs) == 0.5  # the grid's edge
    assert crossing(xs, xs * 2, 2.5) == pytest.approx(1.25)
    assert crossing(xs, xs * 2, 9.0) is None
    constant = np.full((20, 2), 3.0)
    point, low, high = bootstrap(constant, lambda m: m[0] - m[1])
    assert point == low == high == 0.0
    spread = np.arange(20.0)[:, None]
    point, low, high = bootstrap(spread, lambda m: m[0])
    assert low < point == 9.5 < high


def _fake_runs(rng, shift: float, prompts=(0, 1, 2, 3), seeds=8):
    runs = []
    for prompt in prompts:
        for seed in range(seeds):
            answers = []
            for lam in (0.5, 1.0):
                a, r = rng.normal(-60, 5), rng.normal(-60, 5)
                answers.append(
                    {
                        "lam": lam,
                        "words": float(rng.normal(40 + 10 * prompt + shift * (lam == 1.0), 4)),
                        "sampled": [a, r, lam * a + (1 - lam) * r + rng.normal(0, 1)],
                    }
                )
            runs.append({"prompt": prompt, "seed": seed, "answers": answers})
    return runs


def test_check_flags_a_shifted_statistic_and_passes_a_fresh_draw():
    from check import compare, statistics_of

    rng = np.random.default_rng(0)
    stored = statistics_of(_fake_runs(rng, 0.0))
    same = compare(stored, statistics_of(_fake_runs(rng, 0.0, seeds=4)))
    assert len(same) == 5 and all(row[4] for row in same)  # words, KL x 2 lams; mismatch at 0.5
    shifted = compare(stored, statistics_of(_fake_runs(rng, 15.0, seeds=4)))
    assert [row[0] for row in shifted if not row[4]] == ["words at lam' 1"]


def test_pareto_k_hat_finds_the_tail_it_is_given():
    """Weights with a generalized Pareto tail of shape k: the estimate lands near k;
    light-tailed (normal log-weights) ones stay well under 0.5."""
    from scipy.stats import genpareto
    from weights import pareto_k_hat

    rng = np.random.default_rng(0)
    n = 20000
    tail = int(min(n / 5, 3 * np.sqrt(n)))  # the draws the fit sees
    for k in (0.3, 0.8, 1.2):
        w = genpareto.rvs(k, size=n, random_state=rng) + 1.0
        # within 3 standard errors of the maximum-likelihood shape, (1 + k) / sqrt(M)
        assert abs(pareto_k_hat(np.log(w)) - k) < 3 * (1 + k) / np.sqrt(tail), k
    assert pareto_k_hat(rng.normal(size=20000) * 0.3) < 0.3
