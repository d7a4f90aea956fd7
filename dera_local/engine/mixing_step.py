"""After a step's decode, each slot that sampled: its terms' logits rows (one per source
and prompt) summed with their weights by the native hook into the first row (source 0,
positive prompt), where llama.cpp's sampler chain samples; then the token (or the walk
over verified drafts) advances the slot. DeRa is two terms (lam, 1 - lam); CFG adds the
negative prompt's rows; proxy-tuning and --mix specs are K sources."""

from __future__ import annotations

import time

from ..llama.context import Context
from ..speculation.slot_drafts import walk_drafts
from .exact import FINISH_KILLED
from .mixing import float_view
from .slots import Slot


def sample_slot(models, contexts: list[Context], slot: Slot, rows: list[int]) -> int:
    """Mixes the slot's terms at batch rows `rows` (one per prompt) and samples the chain
    there; records the token's log-probabilities (aligned, reference, mixture) when the
    slot asked for them."""
    n_vocab = models.n_vocab
    out_address = contexts[0].logits_address(rows[0])
    terms = slot.terms
    before = allowed = None
    if slot.kill_test is not None and slot.chain.masks:  # the mask the chain will apply
        allowed = slot.chain.allowed_tokens()
    if slot.logprobs is not None or slot.kill_test is not None:  # the mix overwrites row 0
        aligned, reference = models.logprob_sources
        before = (
            float_view(contexts[aligned].logits_address(rows[0]), n_vocab).copy(),
            float_view(contexts[reference].logits_address(rows[0]), n_vocab).copy(),
        )
    if len(terms) > 1 or terms[0].weight != 1.0:  # one model alone: nothing to mix
        addresses = [contexts[t.source].logits_address(rows[t.prompt]) for t in terms]
        models.mixer.mix_terms_in_place(out_address, addresses, slot.weights, n_vocab)
    token = slot.chain.sample_at(contexts[0].ptr, rows[0])
    if slot.logprobs is not None:
        slot.logprobs.add(token, before[0], before[1], float_view(out_address, n_vocab))
    if slot.kill_test is not None:  # its coin is independent of the token drawn
        slot.kill_test.step(before[0], before[1], allowed)
    return token


def take_tokens(decoder, slot: Slot, rows: list[list[int]]) -> None:
    """Samples the slot's rows of `decoder`'s last batch: one token, or a walk over
    its verified drafts (the caches then drop the positions after the last kept
    token, in every lane)."""
    texts: list[str] = []

    def advance(token: int) -> str | None:
        finish = slot.output.advance(token)
        texts.append(slot.output.new_text)
        # An exact attempt killed at this position ends here, the token drawn there
        # included (its coin came before the draw): in a walk over verified drafts too,
        # since each row sampled is one position of the answer, tested in order.
        if slot.kill_test is not None and slot.kill_test.killed:
            finish = slot.output.end(FINISH_KILLED)
        return finish

    drafting = slot.drafting
    if drafting is not None and drafting.drafts:
        n_rows = len(drafting.drafts) + 1
        kept, finish = walk_drafts(
            slot,
            lambda i: sample_slot(
                decoder.models, decoder.contexts, slot, [lane_rows[i] for lane_rows in rows]
            ),
            advance,
        )
        for lane in slot.lanes:  # the last token and the kept drafts stay cached
            lane.position -= n_rows - len(kept)
            decoder.sequences.cut(lane.seq_id, lane.position)
    else:
        kept = [sample_slot(decoder.models, decoder.contexts, slot, [r[-1] for r in rows])]
        finish = advance(kept[0])
    if slot.first_token_at is None:
        slot.first_token_at = time.perf_counter()
    for lane in slot.lanes:
        lane.pending = [kept[-1]]
    if finish is not None:
        texts.append(slot.output.flush())  # the held-back end of the text
    elif drafting is not None:
        drafting.drafter.extend(kept)
    slot.output.new_text = "".join(texts)
