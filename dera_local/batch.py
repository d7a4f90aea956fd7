"""Many DeRa generations decoded together: the one batched step that the lam sweep and
the server's continuous batching share.

A `BatchDecoder` owns a batched (aligned, reference) pair of contexts with one KV
sequence per slot. A `Slot` is one generation in flight: its own lam, sampler chain
(sampling settings, grammar, seed) and stop rules (`SequenceOutput`). Each `step()`
builds one batch from every live slot's pending input (the next chunk of its prompt, or
its last sampled token), decodes both contexts once, then mixes, samples and advances
every slot that produced logits. Slots join between steps (`admit`) and leave as soon as
they end or are cancelled (`retire`), so the batch changes shape every step.

Prompt chunks share a per-step token budget (the batch size) with the decoding slots, so
a long prompt is read over several steps while the others keep producing tokens.

Each sequence remembers the tokens its KV cache holds; `admit` gives a new prompt the
free sequence with the longest common prefix (a conversation's next turn lands where its
last turn is cached) and reads only the rest.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .backend import TokenBatch
from .errors import BadParameterError
from .lockstep import sample_mixture
from .logprobs import SequenceLogprobs
from .sampling import SamplerChain, SamplingParams
from .sequence import SequenceOutput


@dataclass(eq=False)
class Slot:
    """One generation in the batch. `new_text` holds what its last step made safe to
    show; `finish_reason` is set when it ended."""

    seq_id: int
    lam: float
    prompt_tokens: list[int]
    chain: SamplerChain
    output: SequenceOutput
    sampling: SamplingParams
    logprobs: SequenceLogprobs | None
    pending: list[int]  # prompt tokens still to read, or [last sampled token]
    position: int  # position of pending[0]
    reused_prompt_tokens: int
    tag: object = None  # the caller's handle (e.g. the server's job)
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    @property
    def prefilling(self) -> bool:
        """Still reading its prompt (nothing sampled yet)."""
        return self.first_token_at is None

    @property
    def finish_reason(self) -> str | None:
        return self.output.finish_reason

    @property
    def new_text(self) -> str:
        return self.output.new_text


class BatchDecoder:
    """Decodes up to `n_slots` DeRa generations together over one loaded pair.

    `n_ctx_per_slot` bounds each generation (prompt and answer), as llama.cpp's server
    divides its context among its parallel slots. The KV cache holds `n_ctx_total` cells
    (default n_slots times that; less where slots share a prefix, as a sweep's do).
    """

    def __init__(
        self,
        pair,
        n_slots: int,
        n_ctx_per_slot: int,
        *,
        n_ctx_total: int | None = None,
        n_batch: int | None = None,
    ):
        if n_slots < 1:
            raise BadParameterError(
                f"the number of parallel slots must be at least 1, got {n_slots}"
            )
        self.pair = pair
        self.n_slots = n_slots
        self.n_ctx_per_slot = n_ctx_per_slot
        self.n_batch = max(n_batch or pair.loaded.aligned_ctx.n_batch, n_slots)
        self.aligned_ctx, self.reference_ctx = pair.open_contexts(
            n_ctx=n_ctx_total or n_slots * n_ctx_per_slot,
            n_seq_max=n_slots,
            n_outputs_max=n_slots,
            n_batch=self.n_batch,
        )
        self._contexts = (self.aligned_ctx, self.reference_ctx)
        self.batch = TokenBatch(self.n_batch)
        self.cached: list[list[int]] = [[] for _ in range(n_slots)]  # what each sequence holds
        self.live: list[Slot] = []
        self._free = set(range(n_slots))

    def close(self) -> None:
        for slot in list(self.live):
            self.retire(slot)
        self.batch.close()
        self.aligned_ctx.close()
        self.reference_ctx.close()

    def __enter__(self) -> BatchDecoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def check_fits(self, prompt_tokens: Sequence[int]) -> None:
        """A one-line error unless the prompt is valid and leaves room to answer."""
        if len(prompt_tokens) >= self.n_ctx_per_slot:
            raise BadParameterError(
                f"the prompt has {len(prompt_tokens)} tokens but each of the {self.n_slots} "
                f"parallel slots holds {self.n_ctx_per_slot} (prompt and answer); "
                "shorten the prompt",
                cli_hint="or raise -c, or lower --parallel",
            )
        self.pair.check_prompt(prompt_tokens)

    def admit(
        self,
        prompt_tokens: Sequence[int],
        *,
        lam: float,
        sampling: SamplingParams,
        max_tokens: int,
        stop: Sequence[str] = (),
        logprobs: bool = False,
        tag: object = None,
    ) -> Slot:
        """Starts a generation in a free slot; its prompt is read from the next step on."""
        if not self._free:
            raise RuntimeError("no free slot: admit only while free_slots > 0")
        prompt = list(prompt_tokens)
        self.check_fits(prompt)
        common = [_common_prefix(cached, prompt) for cached in self.cached]
        seq_id = max(self._free, key=lambda s: (common[s], -s))
        # Keep the cached prefix, but always read at least the last prompt token: its
        # logits are what the first answer token is sampled from.
        keep = min(common[seq_id], len(prompt) - 1)
        if not all(ctx.remove_positions(seq_id, keep) for ctx in self._contexts):
            keep = 0  # a model that cannot drop a tail (recurrent): start the sequence over
            for ctx in self._contexts:
                ctx.remove_positions(seq_id, 0)
        self.cached[seq_id] = prompt[:keep]
        keep = self._borrow_prefix(seq_id, prompt, keep, common)
        self._free.discard(seq_id)
        model = self.pair.loaded.aligned_model
        chain = SamplerChain(sampling, model.vocab, self.n_ctx_per_slot)
        output = SequenceOutput(
            model,
            n_prompt=len(prompt),
            n_ctx=self.n_ctx_per_slot,
            max_tokens=max_tokens,
            stop=stop,
        )
        slot = Slot(
            seq_id=seq_id,
            lam=lam,
            prompt_tokens=prompt,
            chain=chain,
            output=output,
            sampling=sampling,
            logprobs=SequenceLogprobs() if logprobs else None,
            pending=prompt[keep:],
            position=keep,
            reused_prompt_tokens=keep,
            tag=tag,
        )
        self.live.append(slot)
        return slot

    def _borrow_prefix(self, seq_id: int, prompt: list[int], keep: int, common: list[int]) -> int:
        """Where another sequence (free or running) holds a longer start of `prompt` (a
        chat template's system prompt, a shared document), shares those positions into
        `seq_id` (already cut to `keep`) instead of reading them again: in a unified KV
        cache the cells are tagged with both sequences, nothing is computed or copied.
        `common`: each sequence's cached prefix length in common with the prompt.
        Returns the new keep."""
        donor = max(range(self.n_slots), key=common.__getitem__)
        shared = min(common[donor], len(prompt) - 1)  # the last prompt token is always read
        if donor == seq_id or shared <= keep:
            return keep
        for ctx in self._contexts:
            ctx.copy_sequence(donor, seq_id, keep, shared)
        self.cached[seq_id] = prompt[:shared]
        return shared

    def share_prefix(self, tokens: Sequence[int]) -> None:
        """Reads `tokens` once into the first free sequence and shares them with every
        free sequence (a unified KV cache stores them once): prompts that start with
        them then read only the rest (a lam sweep over one prompt)."""
        tokens = list(tokens)
        if not tokens or not self._free:
            return
        first = min(self._free)
        for ctx in self._contexts:
            ctx.remove_positions(first, 0)
        chunk_size = self.n_batch
        for start in range(0, len(tokens), chunk_size):
            chunk = tokens[start : start + chunk_size]
            self.batch.fill([(t, start + i, first, False) for i, t in enumerate(chunk)])
            self.aligned_ctx.decode_batch(self.batch)
            self.reference_ctx.decode_batch(self.batch)
        self.cached[first] = tokens
        for seq_id in self._free - {first}:
            for ctx in self._contexts:
                ctx.remove_positions(seq_id, 0)
                ctx.copy_sequence(first, seq_id)
            self.cached[seq_id] = list(tokens)

    def retire(self, slot: Slot, *, forget: bool = False) -> None:
        """Ends a slot (finished or cancelled) and frees its sequence for the next one;
        `forget` also drops what its cache holds (after a failed decode, which may have
        left it half written)."""
        if slot in self.live:
            self.live.remove(slot)
            slot.chain.close()
            if forget:
                for ctx in self._contexts:
                    ctx.remove_positions(slot.seq_id, 0)
                self.cached[slot.seq_id] = []
            self._free.add(slot.seq_id)

    def step(self) -> list[Slot]:
        """One batched decode of every live slot; returns the slots that sampled a token
        (their `new_text` and `finish_reason` are fresh). Finished slots stay live until
        the caller retires them."""
        entries: list[tuple[int, int, int, bool]] = []
        fed: list[tuple[Slot, int]] = []  # slot, how many of its pending tokens
        sampled: list[tuple[Slot, int]] = []  # slot, batch index of its logits row
        budget = self.n_batch
        running = [s for s in self.live if s.finish_reason is None]
        decoding = [s for s in running if not s.prefilling]
        prefilling = [s for s in running if s.prefilling]
        for slot in decoding:  # one token each, first: running streams never wait
            entries.append((slot.pending[0], slot.position, slot.seq_id, True))
            fed.append((slot, 1))
            sampled.append((slot, len(entries) - 1))
            budget -= 1
        for slot in prefilling:  # then prompt chunks, in arrival order, as room allows
            if budget <= 0:
                break
            take = slot.pending[:budget]
            done = len(take) == len(slot.pending)
            for i, token in enumerate(take):
                entries.append((token, slot.position + i, slot.seq_id, done and i == len(take) - 1))
            fed.append((slot, len(take)))
            if done:
                sampled.append((slot, len(entries) - 1))
            budget -= len(take)
        if not entries:
            return []
        self.batch.fill(entries)
        self.aligned_ctx.decode_batch(self.batch)
        self.reference_ctx.decode_batch(self.batch)
        for slot, n in fed:  # what the caches now hold
            self.cached[slot.seq_id].extend(slot.pending[:n])
            slot.pending = slot.pending[n:]
            slot.position += n
        n_vocab = self.pair.n_vocab
        for slot, index in sampled:
            token = sample_mixture(
                self.pair.mixer,
                self.aligned_ctx,
                self.reference_ctx,
                index,
                n_vocab,
                slot.lam,
                slot.chain,
                slot.logprobs,
            )
            if slot.first_token_at is None:
                slot.first_token_at = time.perf_counter()
            slot.pending = [token]
            if slot.output.advance(token) is not None:
                tail = slot.output.flush()  # the held-back end of the text
                slot.output.new_text += tail
        return [slot for slot, _ in sampled]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):  # noqa: B905 - lengths differ on purpose
        if x != y:
            break
        n += 1
    return n
