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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..engine.mixing import float_view
from ..errors import BadParameterError

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
