"""The generation contexts of a pair, kept in lockstep: both KV caches always hold the same
token prefix, tokens are decoded into both together (one at a time, or as a verification
batch with logits at every row), and a logits row is mixed in place and sampled.

Because the caches hold a known prefix, a later prompt that starts with it (the next
chat turn, the same prompt again) only reads the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from .backend import Context, TokenBatch
from .loading import LoadedPair
from .logprobs import SequenceLogprobs, float_view
from .mixing import LogitMixer
from .sampling import SamplerChain


class LockstepContexts:
    """The aligned and reference generation contexts and the prefix they both hold."""

    def __init__(self, loaded: LoadedPair, mixer: LogitMixer, overlap_decodes: bool) -> None:
        self.loaded = loaded
        self.mixer = mixer
        self.n_vocab = loaded.aligned_model.n_vocab
        self.cached: list[int] = []  # tokens both KV caches hold, in order
        # One model file and no adapter: the mixture equals that model for every lam, so
        # the reference context is never decoded and nothing is mixed.
        self.identical = loaded.aligned_model is loaded.reference_model and (
            loaded.adapter_info is None
        )
        self._overlap = ThreadPoolExecutor(1, "dera-reference") if overlap_decodes else None
        # Rows one decode may return: 1 + the most tokens one verification can draft.
        self.max_rows = loaded.aligned_ctx.n_outputs_max
        self._batch = TokenBatch(self.max_rows)

    @property
    def contexts(self) -> list[Context]:
        if self.identical:
            return [self.loaded.aligned_ctx]
        return [self.loaded.aligned_ctx, self.loaded.reference_ctx]

    def close(self) -> None:
        if self._overlap is not None:
            self._overlap.shutdown()
        self._batch.close()

    def clear(self) -> None:
        self.cached = []
        for ctx in self.contexts:
            ctx.truncate(0)

    def prefill(self, tokens: list[int]) -> int:
        """Brings both KV caches to `tokens`, reusing the common cached prefix; returns how
        many tokens were reused. Always decodes at least the last token, for fresh logits."""
        keep = 0
        limit = min(len(self.cached), len(tokens) - 1)
        while keep < limit and self.cached[keep] == tokens[keep]:
            keep += 1
        # What the caches really hold wins over our bookkeeping (an interrupt may have
        # landed between the two decodes of one step).
        contexts = self.contexts
        keep = min(keep, *(ctx.n_cached() for ctx in contexts))
        self.truncate(keep)
        if any(ctx.n_cached() != keep for ctx in contexts):
            keep = 0  # a model that cannot drop a tail (recurrent) was cleared instead
            self.truncate(0)
        self.decode(tokens[keep:])
        return keep

    def truncate(self, n_keep: int) -> None:
        self.cached = self.cached[:n_keep]
        for ctx in self.contexts:
            ctx.truncate(n_keep)

    def decode(self, tokens: list[int]) -> None:
        """Appends tokens to both caches; the logits of the last one are left (row -1)."""
        self._run_both(lambda ctx: ctx.decode(tokens))
        self.cached.extend(tokens)

    def decode_rows(self, tokens: Sequence[int]) -> None:
        """Decodes tokens after the cached ones as one batch with logits at every row
        (row i follows tokens[i]). They stay in the caches only through keep_rows()."""
        start = len(self.cached)
        self._batch.fill([(t, start + i, 0, True) for i, t in enumerate(tokens)])
        self._run_both(lambda ctx: ctx.decode_batch(self._batch))
        self.cached.extend(tokens)

    def keep_rows(self, n_cached: int) -> None:
        """After decode_rows: keeps the first n_cached tokens in the caches, dropping the
        positions of rejected drafts from both."""
        if n_cached < len(self.cached):
            self.truncate(n_cached)

    def sample(
        self,
        row: int,
        lam: float,
        chain: SamplerChain,
        logprobs: SequenceLogprobs | None = None,
    ) -> int:
        """Mixes logits row `row` of the last decode (-1: the last row) and samples it."""
        if self.identical:  # the aligned logits mixed with themselves at lam 1: a no-op
            partner, lam = self.loaded.aligned_ctx, 1.0
        else:
            partner = self.loaded.reference_ctx
        return sample_mixture(
            self.mixer, self.loaded.aligned_ctx, partner, row, self.n_vocab, lam, chain, logprobs
        )

    def _run_both(self, work) -> None:
        if self.identical:
            work(self.loaded.aligned_ctx)
        elif self._overlap is not None:
            pending = self._overlap.submit(work, self.loaded.reference_ctx)
            work(self.loaded.aligned_ctx)
            pending.result()
        else:
            work(self.loaded.aligned_ctx)
            work(self.loaded.reference_ctx)


def sample_mixture(
    mixer: LogitMixer,
    aligned_ctx: Context,
    reference_ctx: Context,
    index: int,
    n_vocab: int,
    lam: float,
    chain: SamplerChain,
    logprobs: SequenceLogprobs | None = None,
) -> int:
    """One DeRa step on output `index` of the last batch: mixes the reference logits into
    the aligned ones in place, samples with the chain, and (if asked) records the token's
    log-probabilities, from a copy of the aligned logits taken before the mix."""
    aligned_address = aligned_ctx.logits_address(index)
    reference_address = reference_ctx.logits_address(index)
    before = float_view(aligned_address, n_vocab).copy() if logprobs is not None else None
    mixer.mix_in_place(aligned_address, reference_address, n_vocab, lam)
    token = chain.sample_at(aligned_ctx.ptr, index)
    if logprobs is not None:
        logprobs.add(
            token,
            before,
            float_view(reference_address, n_vocab),
            float_view(aligned_address, n_vocab),
        )
    return token
