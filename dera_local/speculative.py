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
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .errors import BadParameterError
from .lockstep import LockstepContexts
from .logprobs import SequenceLogprobs, float_view
from .sampling import SamplerChain
from .sequence import SequenceOutput

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
    ngram_max: int = 3
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

    def __init__(self, ngram_min: int = 2, ngram_max: int = 3) -> None:
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
                return self.history[previous + 1 : previous + 1 + k]
        return []


class ModelDrafter:
    """Drafts greedily with a small model sharing the pair's tokenizer, in its own context.
    Its KV cache follows the text (prompt and kept tokens): each call reuses the common
    prefix, so rejected drafts are rolled back by the next call."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.n_vocab = ctx.model.n_vocab
        self._cached: list[int] = []
        self.history: list[int] = []

    def reset(self, tokens: Sequence[int]) -> None:
        self.history = list(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        self.history.extend(tokens)

    def draft(self, k: int) -> list[int]:
        # Leave room in the draft context for k more tokens.
        k = min(k, self.ctx.n_ctx - len(self.history))
        if k <= 0:
            return []
        keep = 0
        limit = min(len(self._cached), len(self.history) - 1)
        while keep < limit and self._cached[keep] == self.history[keep]:
            keep += 1
        self.ctx.truncate(keep)
        self._cached = self._cached[:keep]
        pending = self.history[keep:]
        drafted: list[int] = []
        for _ in range(k):
            self.ctx.decode(pending)
            self._cached.extend(pending)
            token = int(np.argmax(float_view(self.ctx.logits_address(-1), self.n_vocab)))
            drafted.append(token)
            pending = [token]
        return drafted


class DraftLength:
    """Chooses k for the next verification and switches speculation off when it does
    not pay, from measured time per kept token: speculative steps against plain steps.

    k grows while whole drafts are accepted and shrinks to just past the last accepted
    token otherwise. After a speculative stretch that produced tokens more slowly than
    plain decoding, speculation pauses for a while (longer each time) and is tried
    again, so text with nothing to copy costs little more than plain decoding."""

    SMOOTHING = 0.3
    JUDGE_AFTER = 3  # speculative steps in a stretch before it is compared with plain
    FIRST_PAUSE = 16  # plain tokens after speculation did not pay
    MAX_PAUSE = 256

    def __init__(self, params: SpeculationParams) -> None:
        self.params = params
        self.k = max(params.draft_min, min(4, params.draft_max))
        self.plain_seconds: float | None = None  # per token
        self._stretch_seconds = 0.0
        self._stretch_tokens = 0
        self._stretch_steps = 0
        self._pause_left = 1 if params.adaptive else 0  # measure one plain step first
        self._pause = self.FIRST_PAUSE

    def wants_draft(self) -> bool:
        if not self.params.enabled:
            return False
        if self._pause_left > 0:
            self._pause_left -= 1
            return False
        return True

    def after_plain(self, seconds: float) -> None:
        self.plain_seconds = _smooth(self.plain_seconds, seconds, self.SMOOTHING)

    def after_verify(self, drafted: int, accepted: int, kept: int, seconds: float) -> None:
        """drafted: tokens proposed; accepted: of those kept; kept: tokens this step added
        (accepted plus the mixture's own); seconds: drafting and verifying."""
        params = self.params
        if not params.adaptive:
            return
        if accepted == drafted:
            self.k = min(params.draft_max, max(self.k * 2, params.draft_min, 1))
        else:
            self.k = min(params.draft_max, max(params.draft_min, accepted + 1))
        self._stretch_seconds += seconds
        self._stretch_tokens += kept
        self._stretch_steps += 1
        if self._stretch_steps < self.JUDGE_AFTER or self.plain_seconds is None:
            return
        per_token = self._stretch_seconds / self._stretch_tokens
        self._stretch_seconds, self._stretch_tokens, self._stretch_steps = 0.0, 0, 0
        if per_token > self.plain_seconds:
            self._pause_left = self._pause
            self._pause = min(self._pause * 2, self.MAX_PAUSE)
        else:
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


class Drafter(Protocol):
    """A draft source: it follows the text (prompt, then each kept token) and proposes
    up to k next tokens."""

    def reset(self, tokens: Sequence[int]) -> None: ...

    def extend(self, tokens: Sequence[int]) -> None: ...

    def draft(self, k: int) -> list[int]: ...


def speculative_steps(
    contexts: LockstepContexts,
    output: SequenceOutput,
    drafter: Drafter,
    params: SpeculationParams,
    accept: AcceptRule,
    counts: DraftCounts,
    token: int,
    lam: float,
    chain: SamplerChain,
    logprobs: SequenceLogprobs | None,
    max_tokens: int,
) -> Iterator[str]:
    """Generates from `token` (sampled, not yet decoded) until `output` finishes,
    verifying drafts where there are any and decoding one token where there are none;
    yields the text as it becomes safe to show."""
    controller = DraftLength(params)
    n_ctx = contexts.loaded.aligned_ctx.n_ctx
    texts: list[str] = []

    def advance(kept: int) -> str | None:
        finish = output.advance(kept)
        if output.new_text:
            texts.append(output.new_text)
        return finish

    def sample_row(row: int) -> int:
        return contexts.sample(row, lam, chain, logprobs)

    while True:
        n_cached = len(contexts.cached)
        k = min(controller.k, contexts.max_rows - 1, n_ctx - 1 - n_cached)
        if max_tokens > 0:  # a step keeps at most k + 1 tokens
            k = min(k, max_tokens - len(output.tokens) - 1)
        started = time.perf_counter()
        drafts = drafter.draft(k) if k > 0 and controller.wants_draft() else []
        if drafts:
            contexts.decode_rows([token, *drafts])
            kept, accepted, finish = verify_drafts(sample_row, drafts, advance, accept)
            contexts.keep_rows(n_cached + len(kept))
            counts.drafted += len(drafts)
            counts.accepted += accepted
            controller.after_verify(len(drafts), accepted, len(kept), time.perf_counter() - started)
        else:
            contexts.decode([token])
            kept = [sample_row(-1)]
            finish = advance(kept[0])
            controller.after_plain(time.perf_counter() - started)
        yield from texts
        texts.clear()
        if finish is not None:
            return
        drafter.extend(kept)
        token = kept[-1]


def _smooth(old: float | None, new: float, weight: float) -> float:
    if old is None or not math.isfinite(old):
        return new
    return (1 - weight) * old + weight * new
