"""Speculative DeRa: draft a few tokens cheaply, then check them against the mixture with
ONE batched decode per model instead of one decode pair per token.

Verification is exact. The last kept token and k drafted ones are decoded as one batch
with logits at every position; row i is mixed by the hook and llama.cpp's sampler chain
samples from it exactly as it would without speculation. The drafted token is kept when
the sample equals it; the first sample that differs is kept instead and ends the run.
For a deterministic draft (prompt lookup, a greedy draft model) this is the standard
speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023): the draft is
accepted with probability p(token), and otherwise the output is a sample from p with
that token removed. Because every kept token is one draw of the chain, in order, the
chain's random state and its stateful samplers (penalties, grammar) see exactly what
they see without speculation: a seeded run gives the same tokens either way, up to the
rounding differences of batched decoding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .errors import BadParameterError
from .logprobs import float_view

# Rule deciding whether a drafted token is kept, given the token the chain sampled for
# that position. Tests swap in a wrong rule to show the distribution test can fail.
AcceptRule = Callable[[int, int], bool]


def sample_equals_draft(sampled: int, drafted: int) -> bool:
    return sampled == drafted


@dataclass(frozen=True)
class SpeculationParams:
    """How many tokens to draft per verification step (llama.cpp's --draft-max and
    --draft-min; draft_max 0 turns speculation off), the n-gram sizes prompt lookup
    matches, and whether to adapt k and switch speculation off when it does not pay."""

    draft_max: int = 16
    draft_min: int = 0
    ngram_max: int = 4
    ngram_min: int = 2
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.draft_max < 0:
            raise BadParameterError("draft_max must be >= 0 (0 = no speculation)")
        if not 0 <= self.draft_min <= max(self.draft_max, 0):
            raise BadParameterError("draft_min must be between 0 and draft_max")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise BadParameterError("n-gram sizes must satisfy 1 <= ngram_min <= ngram_max")

    @property
    def enabled(self) -> bool:
        return self.draft_max > 0


class PromptLookup:
    """Drafts by n-gram matching (as llama.cpp's lookup example and transformers'
    prompt_lookup_num_tokens): find the most recent earlier occurrence of the last n
    tokens (n from ngram_max down to ngram_min) and propose what followed it there.
    Free to run, and strong wherever the answer copies from the input."""

    cheap = True

    def __init__(self, ngram_min: int = 2, ngram_max: int = 3) -> None:
        self.source: object = None  # the n of the last match
        self.ngram_min = ngram_min
        self.ngram_max = ngram_max
        self.history: list[int] = []
        # For each n: n-gram -> the index of its last token, at its latest occurrence.
        self._latest: list[dict[tuple[int, ...], int]] = [{} for _ in range(ngram_max + 1)]
        # For each n: where the current suffix n-gram occurred before (or -1).
        self._previous = [-1] * (ngram_max + 1)

    def reset(self, tokens: Sequence[int]) -> None:
        self.history = []
        self._latest = [{} for _ in range(self.ngram_max + 1)]
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.history.append(token)
            end = len(self.history) - 1
            for n in range(1, self.ngram_max + 1):
                if end + 1 < n:
                    self._previous[n] = -1
                    continue
                gram = tuple(self.history[end + 1 - n : end + 1])
                self._previous[n] = self._latest[n].get(gram, -1)
                self._latest[n][gram] = end

    def draft(self, k: int) -> list[int]:
        for n in range(self.ngram_max, self.ngram_min - 1, -1):
            previous = self._previous[n]
            if previous >= 0:
                self.source = ("lookup", n)
                return self.history[previous + 1 : previous + 1 + k]
        self.source = None
        return []


class ModelDrafter:
    """Drafts greedily with a small model sharing the pair's tokenizer, in its own context.
    Its KV cache follows the text (prompt and kept tokens) and outlives one generation:
    each call reuses the common prefix, so rejected drafts are rolled back by the next
    call and a follow-up turn only reads what is new."""

    cheap = False
    source = "draft model"

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.n_vocab = ctx.model.n_vocab
        self._cached: list[int] = []
        self.history: list[int] = []

    def reset(self, tokens: Sequence[int]) -> None:
        """Starts following a new text and reads it now (prompt processing)."""
        self.history = list(tokens)
        self._catch_up()

    def extend(self, tokens: Sequence[int]) -> None:
        self.history.extend(tokens)

    def draft(self, k: int) -> list[int]:
        k = min(k, self.ctx.n_ctx - len(self.history))  # room for k more tokens
        if k <= 0:
            return []
        self._catch_up()
        drafted: list[int] = []
        for i in range(k):
            if i:
                self.ctx.decode(drafted[-1:])
                self._cached.append(drafted[-1])
            drafted.append(int(np.argmax(float_view(self.ctx.logits_address(-1), self.n_vocab))))
        return drafted

    def _catch_up(self) -> None:
        """Brings the draft cache to the text, keeping the common prefix; the logits of
        the text's last token are left for drafting."""
        limit = min(len(self._cached), len(self.history) - 1)
        # Called every step: the usual case (the cache is a prefix of the text) is one
        # list comparison in C, not a Python loop over the whole context.
        keep = limit if self._cached[:limit] == self.history[:limit] else 0
        while keep < limit and self._cached[keep] == self.history[keep]:
            keep += 1
        self.ctx.truncate(keep)
        self._cached = self._cached[:keep]
        self.ctx.decode(self.history[keep:])
        self._cached.extend(self.history[keep:])


@dataclass
class _Acceptance:
    """Decayed counts of accepted and judged drafted tokens of one draft source."""

    accepted: float = 0.0
    judged: float = 0.0

    @property
    def rate(self) -> float:
        # Laplace's rule: 1/2 with no evidence, then the observed rate.
        return (self.accepted + 1.0) / (self.judged + 2.0)


class DraftLength:
    """Chooses how many drafted tokens to verify, from a cost model measured as it goes.

    A verification of k drafts keeps 1 + a + a^2 + ... + a^k tokens on average, where a
    is the chance that a drafted token is accepted (tracked per draft source: prompt
    lookup by match length, or the draft model), and costs 1 + c*k plain steps, where c
    is the measured cost of one more drafted token (one more batch row, about 0.45 of a
    plain step on a 2-core CPU and near 0 on a GPU, plus its drafting for a draft
    model). The k with the best tokens per cost wins if it beats a plain step by a
    margin (a source not seen yet starts from all sources' record; the very first draft
    is always tried); when nothing pays, speculation pauses (8
    tokens, doubling up to 256) and then probes with one draft, so text with nothing to
    copy costs little more than plain decoding."""

    DECAY = 0.8  # weight of the evidence so far at each new verification
    SMOOTHING = 0.3
    PRIOR_ROW_COST = 0.5  # plain steps per drafted token, until measured
    REQUIRED_GAIN = 1.05  # expected tokens per unit cost that drafting must beat
    FIRST_PAUSE = 8
    MAX_PAUSE = 256

    def __init__(self, params: SpeculationParams, drafter: Drafter) -> None:
        self.params = params
        self.drafter = drafter
        self.plain_seconds: float | None = None
        self.row_cost: float | None = None  # measured, in plain steps per drafted token
        self._acceptance: dict[object, _Acceptance] = {}
        self._pooled = _Acceptance()  # all sources together
        self._pause_left = 1 if params.adaptive else 0  # measure one plain step first
        self._pause = self.FIRST_PAUSE
        self._probe = False  # the next draft is a probe after a pause

    def draft_limit(self, room: int) -> int:
        """How many tokens to ask the drafter for now (0: decode one token plainly)."""
        if not self.params.enabled or room <= 0:
            return 0
        limit = min(self.params.draft_max, room)
        if not self.params.adaptive:
            return limit
        if self._pause_left > 0:
            self._pause_left -= 1
            self._probe = self._pause_left == 0
            return 0
        if self.drafter.cheap:  # draft as much as fits; choose() keeps what pays
            return limit
        # Drafting costs decodes here: decide before drafting.
        return self._verdict(self.drafter.source, limit)

    def choose(self, proposed: int) -> int:
        """How many of the proposed drafts to verify (0: none; decode one plainly)."""
        if proposed < max(self.params.draft_min, 1):
            return 0
        if not self.params.adaptive:
            return proposed
        return self._verdict(self.drafter.source, proposed)

    def _verdict(self, source: object, limit: int) -> int:
        k = self.best_k(source, limit)
        if self._probe or not self._pooled.judged:
            self._probe = False
            return k or 1  # a probe, or a first look at drafting at all
        if k == 0:
            self._pause_left = self._pause
            self._pause = min(self._pause * 2, self.MAX_PAUSE)
        return k

    def best_k(self, source: object, limit: int) -> int:
        # A source not seen yet (a longer n-gram match, say) starts from what all
        # sources have shown so far.
        a = min((self._acceptance.get(source) or self._pooled).rate, 0.999)
        cost = self.row_cost if self.row_cost is not None else self.PRIOR_ROW_COST
        # A plain step gives one token per unit cost; drafting must promise clearly more,
        # because the estimates are noisy and a wrong "yes" costs real time.
        best, best_value = 0, self.REQUIRED_GAIN
        for k in range(1, limit + 1):
            value = (1 - a ** (k + 1)) / (1 - a) / (1 + cost * k)
            if value > best_value:
                best, best_value = k, value
        return best

    def after_plain(self, seconds: float) -> None:
        self.plain_seconds = _smooth(self.plain_seconds, seconds, self.SMOOTHING)

    def after_verify(
        self, drafted: int, accepted: int, rejected: bool, seconds: float, sharing: int = 1
    ) -> None:
        """rejected: the walk ended on a drafted token that was not kept (not at the
        bonus row or a stop); seconds: drafting and verifying together. sharing: how many
        generations decoded in the step (a batched decoder's slots): the drafts' extra
        time delays every one of them, so it counts that many times. (Drafting pays for
        the batch when the tokens it adds, E - 1, beat the tokens the others lose,
        (sharing - 1) * c * k, plus its own c * k.)"""
        source = self.drafter.source
        for counts in (self._acceptance.setdefault(source, _Acceptance()), self._pooled):
            counts.accepted = counts.accepted * self.DECAY + accepted
            counts.judged = counts.judged * self.DECAY + accepted + rejected
        if self.plain_seconds:
            extra = sharing * max(seconds / self.plain_seconds - 1.0, 0.0) / drafted
            self.row_cost = _smooth(self.row_cost, extra, self.SMOOTHING)
        if self.best_k(source, self.params.draft_max) > 0:  # it pays (again)
            self._pause = self.FIRST_PAUSE


def verify_drafts(
    sample_row: Callable[[int], int],
    drafts: Sequence[int],
    advance: Callable[[int], str | None],
    accept: AcceptRule = sample_equals_draft,
) -> tuple[list[int], int, str | None]:
    """Walks the rows of a verification batch (row i follows the i-th input token, the
    first being the last kept one): samples row i, keeps the draft when `accept` says
    so, and stops at the first token that is not the draft, after the bonus row, or
    when `advance` (the stop rules) ends the sequence. Returns the kept tokens, how many
    of them were drafts, and the finish reason (None while the sequence goes on)."""
    kept: list[int] = []
    for i in range(len(drafts) + 1):
        token = sample_row(i)
        matched = i < len(drafts) and accept(token, drafts[i])
        if matched:
            token = drafts[i]
        kept.append(token)
        finish = advance(token)
        if finish is not None or not matched:
            return kept, i + matched, finish
    raise AssertionError("the bonus row always ends the walk")


@dataclass
class DraftCounts:
    drafted: int = 0  # tokens proposed by the drafter
    accepted: int = 0  # of those, kept in the output
    verify_steps: int = 0  # batched verifications (each also adds one token of its own)

    def add(self, other: DraftCounts) -> None:
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.verify_steps += other.verify_steps


class Drafter(Protocol):
    """A draft source: it follows the text (prompt, then each kept token) and proposes
    up to k next tokens. `cheap`: drafting costs next to nothing (ask for many, verify
    what pays); `source`: what the last draft came from, for acceptance statistics."""

    cheap: bool
    source: object

    def reset(self, tokens: Sequence[int]) -> None: ...

    def extend(self, tokens: Sequence[int]) -> None: ...

    def draft(self, k: int) -> list[int]: ...


def _smooth(old: float | None, new: float, weight: float) -> float:
    if old is None or not math.isfinite(old):
        return new
    return (1 - weight) * old + weight * new
