"""Exact realignment (issue 35): answers drawn from the model retrained at beta/lam
itself, not from DeRa's per-token approximation of it, for 0 <= lam <= 1.

On the aligned model's implicit reward, the model retrained at beta/lam is
`Pi_lam(y) ∝ q_ref(y)^(1-lam) q_1(y)^lam` over whole answers (here q are the two models
as sampled, at temperature T: each token's softmax(logits / T)). DeRa samples each
token from `d(v|s) = q_ref(v|s)^(1-lam) q_1(v|s)^lam / z(s)`, with
`z(s) = sum_v q_ref(v|s)^(1-lam) q_1(v|s)^lam`, so `Pi_lam(y) = DeRa(y) prod_t z(s_t) / Z`.
For lam in [0, 1], z <= 1 (Hoelder's inequality). So an attempt decodes plain DeRa and,
at every token, survives with probability z(s_t) (a coin of its own, independent of
the token drawn): an attempt that survives to its end is an exact draw from Pi_lam, and
the share of attempts that survive estimates Z. Attempts are numbered in the order they
start, and the answer is the surviving attempt with the smallest number (several run at
once as parallel slots: engine/exact_attempts.py; returning whichever finishes first
would favour short answers, which finish first).

Masks that only remove tokens (a grammar or JSON schema, logit-bias bans) apply to both
models: the target is the exact realignment of the two masked, renormalised models, and
z is computed from them (Hoelder again: z <= 1). DeRa's draw is unchanged by this (the
mix of the masked models is the masked mix), so only the kill test sees the mask, and at
lam 0 and 1 nothing is killed, as grammar-constrained decoding of one model behaves.
What is not a fixed mask (top-k, top-p, min-p, penalties, a finite bias), lam outside
[0, 1], guidance and mixtures are refused (check_exact).

Speculation stays on: drafts are verified against the attempt's DeRa rows, and each row
the walk samples is one position of the answer, in order, so it gets its kill test there
(engine/mixing_step.py) with the next coin of the attempt's stream. An attempt's tokens,
kills and cost in tokens are then what they are without speculation; only the number of
decodes changes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import numpy as np

from ..errors import BadParameterError, DeraError

FINISH_KILLED = "killed"  # an attempt that did not survive its kill test
DEFAULT_BUDGET = 20_000  # sequence-tokens per exact answer (about 4x the worst measured need)


class ExactBudgetError(DeraError):
    """Exact realignment spent its token budget without a surviving attempt."""


def log_overlap(
    aligned: np.ndarray,
    reference: np.ndarray,
    lam: float,
    temperature: float,
    allowed: np.ndarray | None = None,
) -> float:
    """log z(s) = log sum_v q_ref(v)^(1-lam) q_1(v)^lam, q = softmax(logits / T), in
    float64 (a -inf logit is a token its model cannot draw: it adds nothing). `allowed`
    (a boolean mask: a grammar's, bans) masks both models first, so q are the masked,
    renormalised models and z <= 1 still."""
    aligned = aligned.astype(np.float64) / temperature
    reference = reference.astype(np.float64) / temperature
    if allowed is not None:
        aligned[~allowed] = -np.inf
        reference[~allowed] = -np.inf
    log_q1 = _log_softmax(aligned)
    log_qr = _log_softmax(reference)
    terms = lam * log_q1 + (1.0 - lam) * log_qr
    top = terms.max()
    return float(top + math.log(np.exp(terms - top).sum()))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    top = x.max()
    return x - (top + math.log(np.exp(x - top).sum()))


@dataclass
class KillTest:
    """One attempt's kill test: `step(aligned_row, reference_row, allowed)` at every
    token, before it is drawn (`allowed`: the chain's mask at that point, if any)."""

    lam: float
    temperature: float
    coins: np.random.Generator
    killed: bool = False

    def step(
        self, aligned: np.ndarray, reference: np.ndarray, allowed: np.ndarray | None = None
    ) -> None:
        if self.killed or self.lam in (0.0, 1.0):  # z = 1 exactly: nothing to test
            return
        log_z = log_overlap(aligned, reference, self.lam, self.temperature, allowed)
        if self.coins.random() >= math.exp(min(log_z, 0.0)):
            self.killed = True


def decoded_tokens(sampled: int, finish_reason: str | None) -> int:
    """Sequence-tokens an attempt decoded: its sampled tokens, and the one that ended it
    when it ended on an end token or was killed (None: still running)."""
    return sampled + (finish_reason is not None and finish_reason != "length")


@dataclass
class ExactRun:
    """What an exact answer cost: attempts up to the accepted one (it included), the
    killed ones among them, sequence-tokens decoded by every attempt (discarded ones
    too), attempts started after the accepted one and dropped, and the running estimate
    of Z (survivors / attempts). One answer's estimate is 1 / attempts; pooled over
    many answers (sum of answers / sum of attempts) it converges to Z."""

    attempts: int = 0
    killed: int = 0
    tokens_spent: int = 0
    discarded: int = 0

    def record(self, tokens: int, finish_reason: str) -> bool:
        """Counts one ended attempt (`tokens` sampled); True if it survived."""
        self.attempts += 1
        self.tokens_spent += decoded_tokens(tokens, finish_reason)
        killed = finish_reason == FINISH_KILLED
        self.killed += killed
        return not killed

    @property
    def z_estimate(self) -> float:
        return (self.attempts - self.killed) / self.attempts if self.attempts else 0.0

    def to_dict(self) -> dict:
        return {
            "attempts": self.attempts,
            "killed": self.killed,
            "tokens_spent": self.tokens_spent,
            "discarded": self.discarded,
            "z_estimate": self.z_estimate,
        }


def check_exact(request) -> None:
    """Refuses, in one line naming the reason, what exact realignment cannot sample."""
    sampling = request.sampling
    if request.target_lam is None:
        raise BadParameterError(
            "exact realignment needs a pair's plain DeRa (no negative prompt, mixture or "
            "proxy-tuning): only there is the retrained target defined"
        )
    if not 0.0 <= request.lam <= 1.0:
        raise BadParameterError(
            f"exact realignment needs 0 <= lam <= 1 (lam {request.lam:g}): beyond 1 the "
            "target rewards disagreement and has no normaliser without a length cap"
        )
    if not 0.0 < sampling.temperature <= 1.0:
        raise BadParameterError("exact realignment needs a temperature in (0, 1]")
    refused = [
        (sampling.top_k != 0, "top-k"),
        (sampling.top_p != 1.0, "top-p"),
        (sampling.min_p != 0.0, "min-p"),
        (sampling.repeat_penalty != 1.0, "a repeat penalty"),
        (sampling.frequency_penalty != 0.0 or sampling.presence_penalty != 0.0, "penalties"),
        (any(bias > -100 for _, bias in sampling.logit_bias), "a logit bias other than -100"),
    ]
    for present, what in refused:
        if present:
            raise BadParameterError(
                f"exact realignment samples the target itself: turn off {what} "
                "(top_k 0, top_p 1, min_p 0, no penalties; a grammar, a JSON schema and "
                "bans by a bias of -100 are fine)"
            )


def attempt_requests(request):
    """The attempts of one exact answer, in the order they start: attempt 0 samples
    with the request's own seed (so that at lam 0 and 1, where nothing is killed, the
    answer is plain DeRa's with that seed); later ones with seeds drawn from a stream of
    their own. Each attempt's kill coins come from a stream seeded by the request's seed
    and the attempt's number, so what an attempt does does not depend on how many run
    beside it. A cheap drafter (prompt lookup, a script) follows one text: each attempt
    gets a copy of its own (a draft model is shared: its attempts run one at a time)."""
    seed = request.sampling.seed
    seeds = np.random.default_rng([seed, 1])
    drafter = request.drafter
    attempt = 0
    while True:
        sampler_seed = seed if attempt == 0 else int(seeds.integers(2**31))
        coins = np.random.default_rng([seed, 2, attempt])
        kill = KillTest(request.lam, request.sampling.temperature, coins)
        yield replace(
            request,
            sampling=replace(request.sampling, seed=sampler_seed),
            kill_test=kill,
            drafter=copy.deepcopy(drafter) if getattr(drafter, "cheap", False) else drafter,
        )
        attempt += 1


def out_of_budget(run: ExactRun, budget: int) -> str:
    seen = run.attempts - run.killed
    cost = (
        f"about {run.tokens_spent / seen:,.0f} tokens an answer"
        if seen
        else (f"over {budget:,} tokens an answer")
    )
    return (
        f"exact realignment spent its budget of {budget:,} tokens: {seen} of "
        f"{run.attempts} attempts survived, so expect {cost}; raise the budget, or use "
        "a lam nearer 0 or 1"
    )
