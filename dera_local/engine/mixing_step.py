"""The mixing step of one slot: its terms' logits rows (one per source and prompt) summed
with their weights by the native hook into the first row (source 0, positive prompt),
where llama.cpp's sampler chain then samples. DeRa is two terms (lam, 1 - lam); CFG adds
the negative prompt's rows; proxy-tuning and --mix specs are K sources."""

from __future__ import annotations

from ..llama.backend import Context
from .logprobs import float_view
from .slots import Slot


def sample_slot(models, contexts: list[Context], slot: Slot, rows: list[int]) -> int:
    """Mixes the slot's terms at batch rows `rows` (one per prompt) and samples the chain
    there; records the token's log-probabilities (aligned, reference, mixture) when the
    slot asked for them."""
    n_vocab = models.n_vocab
    out_address = contexts[0].logits_address(rows[0])
    terms = slot.terms
    before = None
    if slot.logprobs is not None:  # copies: the mix overwrites the first row
        aligned, reference = models.logprob_sources
        before = (
            float_view(contexts[aligned].logits_address(rows[0]), n_vocab).copy(),
            float_view(contexts[reference].logits_address(rows[0]), n_vocab).copy(),
        )
    if len(terms) > 1 or terms[0].weight != 1.0:  # one model alone: nothing to mix
        addresses = [contexts[t.source].logits_address(rows[t.prompt]) for t in terms]
        models.mixer.mix_terms_in_place(out_address, addresses, slot.weights, n_vocab)
    token = slot.chain.sample_at(contexts[0].ptr, rows[0])
    if before is not None:
        slot.logprobs.add(token, before[0], before[1], float_view(out_address, n_vocab))
    return token
