"""Per-token log-probabilities of sampled tokens under the aligned model, the reference
and the DeRa mixture: what KL(pi_lam || pi_ref) estimates and reward/KL sweeps need.

The mixture is softmax(lam * a + (1 - lam) * r) before temperature and truncation, i.e.
the distribution DeRa defines (with a negative prompt or a --mix spec: the row the
sampler chain receives, before its logit bias, grammar, penalties, temperature and
truncation). That one definition is what results, the API's `logprobs` and `score`
report. Sample at temperature 1 with no top-k/top-p/min-p to make the sampled sequences
draws from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import BadParameterError
from .mixing import mix_numpy


def log_softmax_at(logits: np.ndarray, token: int) -> float:
    """log softmax(logits)[token]; exp in float32 (numpy's SIMD path), the sum in float64."""
    peak = logits.max()
    total = np.exp(logits - peak).sum(dtype=np.float64)
    return float(logits[token]) - float(peak) - float(np.log(total))


def mismatch(lam: float, aligned: float, reference: float, mixture: float) -> float:
    """W = lam * A + (1 - lam) * R - M for an answer's summed log-probabilities under the
    aligned model (A), the reference (R) and DeRa's per-token mixture at lam (M).

    The model "retrained at beta / lam" is exactly Pi_lam(y) ∝ pi_ref(y)^(1-lam)
    pi_1(y)^lam over whole answers (experiments/lam_meaning); DeRa mixes per token
    instead. W is log Pi_lam(y) - log DeRa_lam(y) up to the prompt's constant log Z_lam:
    0 at lam 0 and 1 (DeRa is then exact); between answers of one prompt and lam, a
    higher W means the exact target favours this answer more than DeRa did, and its
    mean over DeRa's answers is log Z_lam - KL(DeRa_lam || Pi_lam)."""
    return lam * aligned + (1.0 - lam) * reference - mixture


MAX_TOP_LOGPROBS = 20  # OpenAI's limit


def check_top_logprobs(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_TOP_LOGPROBS:
        raise BadParameterError(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}")
    return n


def top_logprobs(logits: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The n most likely tokens under softmax(logits), most likely first, with their
    log-probabilities (the normalizer as in log_softmax_at)."""
    peak = logits.max()
    log_total = float(np.log(np.exp(logits - peak).sum(dtype=np.float64)))
    best = np.argpartition(-logits, n - 1)[:n] if n < len(logits) else np.arange(len(logits))
    best = best[np.argsort(-logits[best], kind="stable")]
    # The same expression as log_softmax_at, so the chosen token's values agree exactly.
    return [(int(t), float(logits[t]) - float(peak) - log_total) for t in best]


@dataclass
class SequenceLogprobs:
    """Log-probabilities of each sampled token, including a final end-of-generation token;
    with `top_n`, also the top_n most likely tokens of the mixture at each step."""

    aligned: list[float] = field(default_factory=list)
    reference: list[float] = field(default_factory=list)
    mixture: list[float] = field(default_factory=list)
    top_n: int = 0
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    # With `grid`: each token's log-probability under plain DeRa at every lam of the grid
    # (aligned and reference rows mixed as the hook mixes them). What importance sampling
    # across lam needs: the answer's density under proposals it was not drawn from.
    grid: tuple[float, ...] = ()
    at_grid: list[list[float]] = field(default_factory=list)
    # The lam of a plain pair's DeRa (the mixture is lam * aligned + (1 - lam) * reference):
    # then summary() reports the answer's mismatch to the exact target at lam. None for
    # guidance, mixtures and proxy-tuning, whose mixture is not of these two models alone.
    target_lam: float | None = None

    def add(
        self, token: int, aligned: np.ndarray, reference: np.ndarray, mixed: np.ndarray
    ) -> None:
        self.aligned.append(log_softmax_at(aligned, token))
        self.reference.append(log_softmax_at(reference, token))
        self.mixture.append(log_softmax_at(mixed, token))
        if self.top_n:
            self.top.append(top_logprobs(mixed, self.top_n))
        if self.grid:
            row = np.empty_like(aligned)
            values = []
            for lam in self.grid:
                mix_numpy(row, aligned, reference, lam)
                values.append(log_softmax_at(row, token))
            self.at_grid.append(values)

    def slice(self, start: int, end: int) -> SequenceLogprobs:
        """The entries of tokens start..end-1 (a streamed chunk's)."""
        return SequenceLogprobs(
            self.aligned[start:end],
            self.reference[start:end],
            self.mixture[start:end],
            self.top_n,
            self.top[start:end],
            self.grid,
            self.at_grid[start:end],
            self.target_lam,
        )

    def kl_to_reference(self) -> float:
        """One-sample estimate of KL(pi_lam || pi_ref) for this answer: log pi_lam(y) -
        log pi_ref(y), summed over its tokens (the end-of-generation token included)."""
        return float(sum(self.mixture)) - float(sum(self.reference))

    def summary(self) -> dict[str, float]:
        """What DeRa knows about the answer: its summed log-probability under each
        model and the mixture, and the KL estimate (as a sweep row has them); for a
        plain pair's DeRa, also its mismatch (see `mismatch`)."""
        sums = self.sums()
        summary = {
            "logprob_aligned": sums["aligned"],
            "logprob_reference": sums["reference"],
            "logprob_mixture": sums["mixture"],
            "kl_to_reference": self.kl_to_reference(),
        }
        if (answer_mismatch := self.mismatch()) is not None:
            summary["mismatch"] = answer_mismatch
            summary["mismatch_per_token"] = answer_mismatch / max(len(self.mixture), 1)
        return summary

    def mismatch(self) -> float | None:
        """The answer's mismatch to the exact target at `target_lam` (logprobs.mismatch);
        None where there is no such target."""
        if self.target_lam is None:
            return None
        sums = self.sums()
        return mismatch(self.target_lam, sums["aligned"], sums["reference"], sums["mixture"])

    def mismatch_steps(self) -> list[float] | None:
        """Each token's term of `mismatch` (log z(s_t) at temperature 1 without
        truncation), in order; None where there is no exact target."""
        if self.target_lam is None:
            return None
        lam = self.target_lam
        return [
            mismatch(lam, a, r, m)
            for a, r, m in zip(self.aligned, self.reference, self.mixture, strict=True)
        ]

    def sums(self) -> dict[str, float]:
        return {
            "aligned": float(sum(self.aligned)),
            "reference": float(sum(self.reference)),
            "mixture": float(sum(self.mixture)),
        }

    def grid_sums(self) -> list[float]:
        """The answer's summed log-probability under DeRa at each lam of `grid`."""
        return [float(sum(row[i] for row in self.at_grid)) for i in range(len(self.grid))]
