"""Mixture generations decoded together: the one batched step every way of generating
shares (a single generation is one slot; a lam sweep, N; the server's continuous
batching admits and retires slots between steps).

A `BatchDecoder` owns one batched context per source model of a model set (a DeRa pair:
aligned and reference; a proxy-tuned model: three; one model: one) with KV sequences
for its slots. A `Slot` is one generation in flight: its own lam and guidance (the
mixture's weights, see guidance.py), sampler chain (sampling settings, grammar, seed)
and stop rules (`SequenceOutput`). It reads one prompt, or two with classifier-free
guidance (its positive and its negative prompt, one KV sequence each, in every source
context: the weights are read once per step for both).

Each `step()` builds one batch from every live slot's pending input (the next chunk of a
prompt, its last sampled token, or that token and k drafted ones in each of its
sequences), decodes every source context once (overlapped in threads where the models
sit on different devices: source_decodes.py), then per slot mixes its K rows with the
native hook, samples and advances (mixing_step.py). A speculating slot walks its rows
(speculation/slot_drafts.py) and drops the rejected positions from every sequence of
every context. Slots join between steps
(`admit`) and leave as soon as they end or are cancelled (`retire`), so the batch changes
shape every step.

Prompt chunks share a per-step token budget (the batch size) with the decoding slots, so
a long prompt is read over several steps while the others keep producing tokens. A
slot's prompts all yield their last logits row in the same step (the last token of each
is held back until every one of them can go), since llama.cpp keeps only the last
batch's logits.

Each sequence remembers the tokens its KV cache holds; `admit` gives each prompt the
free sequence with the longest common prefix (a conversation's next turn lands where its
last turn is cached) and reads only the rest (kv_sequences.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from ..errors import BadParameterError, PromptError
from ..llama.context import Context, TokenBatch
from ..sampling.chain import SamplerChain
from ..speculation.slot_drafts import drafting_for, plan_drafts
from ..speculation.step_costs import StepCosts
from .guidance import mixture_terms
from .kv_sequences import KVSequences
from .logprobs import SequenceLogprobs
from .mixing_step import take_tokens
from .outputs import SequenceOutput
from .request import GenerationRequest
from .slots import Lane, Slot
from .source_decodes import SourceDecodes


class BatchDecoder:
    """Decodes up to `n_slots` generations together over one loaded model set (a
    DeraPair or a Mixture: anything with source contexts and source weights).

    `n_ctx_per_slot` bounds each prompt and its answer, as llama.cpp's server divides
    its context among its parallel slots. `prompts_per_slot` is 2 to allow negative
    prompts (each slot may then hold two sequences). The KV cache holds `n_ctx_total`
    cells (default: every sequence its share; less where slots share a prefix, as a
    sweep's do).

    `contexts`: source contexts opened by the caller (a pair's generation contexts,
    opened at load), used instead of opening new ones and left open by close(). The
    sources' decodes overlap in threads when the model set says so (`overlap_decodes`:
    models on different devices).
    """

    def __init__(
        self,
        models,
        n_slots: int,
        n_ctx_per_slot: int,
        *,
        n_ctx_total: int | None = None,
        n_batch: int | None = None,
        prompts_per_slot: int = 1,
        max_drafts: int = 0,
        contexts: list[Context] | None = None,
    ):
        if n_slots < 1:
            raise BadParameterError(
                f"the number of parallel slots must be at least 1, got {n_slots}"
            )
        if prompts_per_slot not in (1, 2):
            raise BadParameterError(f"prompts_per_slot must be 1 or 2, got {prompts_per_slot}")
        if max_drafts < 0:
            raise BadParameterError(f"max_drafts must be >= 0, got {max_drafts}")
        self.models = models
        self.n_slots = n_slots
        self.n_ctx_per_slot = n_ctx_per_slot
        self.prompts_per_slot = prompts_per_slot
        n_sequences = n_slots * prompts_per_slot
        # A speculating slot asks for logits at its last token and each draft, per lane.
        rows = n_sequences * (1 + max_drafts)
        self.n_batch = max(n_batch or models.n_batch, rows)
        n_ctx = n_ctx_total or n_sequences * n_ctx_per_slot
        self._owns_contexts = contexts is None
        if contexts is None:
            contexts = models.open_source_contexts(
                n_ctx=n_ctx, n_seq_max=n_sequences, n_outputs_max=rows, n_batch=self.n_batch
            )
        else:  # their batch size bounds ours: drafts are cut to what fits a batch
            self.n_batch = min(ctx.n_batch for ctx in contexts)
            _check_borrowed(contexts, n_ctx, n_sequences, min(rows, self.n_batch))
        self.contexts = contexts
        self.decodes = SourceDecodes(contexts, models.overlap_decodes)
        # Rejected drafts are dropped from the caches: not possible for recurrent models.
        can_drop_tail = all(ctx.model.can_drop_tail for ctx in self.contexts)
        self.opened_for_drafts = max_drafts
        self.max_drafts = max_drafts if can_drop_tail else 0
        self.batch = TokenBatch(self.n_batch)
        self.sequences = KVSequences(contexts, n_sequences)
        self.live: list[Slot] = []
        # What a decode step costs by its rows, for every speculating slot's draft length.
        self.step_costs = StepCosts()

    def close(self) -> None:
        for slot in list(self.live):
            self.retire(slot)
        self.batch.close()
        self.decodes.close()
        if self._owns_contexts:
            for ctx in self.contexts:
                ctx.close()
        else:  # borrowed: left as a fresh context for the next user
            self.forget_cached()

    def forget_cached(self) -> None:
        """Drops what every free sequence's cache holds: the next prompts read in full."""
        self.sequences.forget_free()

    @property
    def cached(self) -> list[list[int]]:
        """The tokens each sequence's KV cache holds."""
        return self.sequences.cached

    def __enter__(self) -> BatchDecoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def free_sequences(self) -> list[int]:
        return sorted(self.sequences.free)

    @property
    def free_slots(self) -> int:
        return self.n_slots - len(self.live)

    def check_fits(self, prompt_tokens: Sequence[int], what: str = "prompt") -> None:
        """A one-line error unless the prompt is valid and fits (a prompt that fills the
        slot exactly still gets one token: the last row's logits need no new position)."""
        if len(prompt_tokens) > self.n_ctx_per_slot and self.n_slots == 1:
            raise PromptError(
                f"the {what} has {len(prompt_tokens)} tokens but the context holds "
                f"{self.n_ctx_per_slot} (prompt and answer); shorten the {what}",
                cli_hint="or raise -c",
                which=what,
            )
        if len(prompt_tokens) > self.n_ctx_per_slot:
            raise PromptError(
                f"the {what} has {len(prompt_tokens)} tokens but each of the {self.n_slots} "
                f"parallel slots holds {self.n_ctx_per_slot} (prompt and answer); "
                f"shorten the {what}",
                cli_hint="or raise -c, or lower --parallel",
                which=what,
            )
        self.models.check_prompt(prompt_tokens, which=what)

    def admit(self, request: GenerationRequest, tag: object = None) -> Slot:
        """Starts the request's generation in a free slot; its prompts are read from the
        next step on. `tag`: the caller's own, kept on the slot (the server's job).
        Speculation (request.speculation, up to the decoder's max_drafts) never changes
        what is sampled, only how many steps it takes."""
        if not self.free_slots:
            raise RuntimeError("no free slot: admit only while free_slots > 0")
        guidance = request.guidance
        prompts = [list(request.prompt)]
        self.check_fits(prompts[0])
        if guidance is not None:
            if self.prompts_per_slot < 2:
                raise BadParameterError(
                    "this decoder was opened for one prompt per slot; open it with "
                    "prompts_per_slot=2 to use a negative prompt"
                )
            prompts.append(list(guidance.negative_tokens))
            self.check_fits(prompts[1], "negative prompt")
        # Everything that can refuse the request (a bad grammar, too many drafts) comes
        # before its sequences are taken, so a refusal leaves the decoder as it was.
        started = time.perf_counter()  # a draft model reads the prompt now: count it
        drafting = drafting_for(
            request.speculation,
            request.drafter,
            request.accept,
            prompts[0],
            self.max_drafts,
            self.step_costs,
            lanes=len(prompts),
        )
        model = self.models.model
        terms = mixture_terms(
            self.models.source_weights(request.lam),
            None if guidance is None else guidance.scale,
        )
        output = SequenceOutput(
            model,
            # the context check must hold for the longer prompt: both grow by each token
            n_prompt=max(map(len, prompts)),
            n_ctx=self.n_ctx_per_slot,
            max_tokens=request.max_tokens,
            stop=request.stop,
            shown_special=request.shown_special,
        )
        chain = SamplerChain(
            request.sampling, model.vocab, self.n_ctx_per_slot, request.logits_observer
        )
        lanes = []
        try:
            for prompt in prompts:
                seq_id, keep = self.sequences.take(prompt)
                lanes.append(Lane(seq_id, prompt[keep:], keep))
        except BaseException:
            chain.close()
            for lane in lanes:
                self.sequences.release(lane.seq_id)
            raise
        slot = Slot(
            lam=request.lam,
            guidance=guidance,
            terms=terms,
            prompt_tokens=prompts[0],
            chain=chain,
            output=output,
            sampling=request.sampling,
            logprobs=SequenceLogprobs(
                top_n=request.top_logprobs,
                grid=request.logprob_lams,
                target_lam=request.target_lam,
            )
            if request.records_logprobs
            else None,
            lanes=lanes,
            reused_prompt_tokens=lanes[0].position,
            reused_negative_prompt_tokens=lanes[1].position if guidance else None,
            tag=tag,
            drafting=drafting,
            started=started,
            kill_test=request.kill_test,
        )
        self.live.append(slot)
        return slot

    def share_prefix(self, tokens: Sequence[int], sequences: Sequence[int] | None = None) -> None:
        """Reads `tokens` once into the first of `sequences` (default: every free one)
        and shares them with the rest (a unified KV cache stores them once): prompts
        that start with them then read only the rest (a lam sweep over one prompt, and
        over its negative prompt in other sequences)."""
        tokens = list(tokens)
        targets = self.free_sequences if sequences is None else list(sequences)
        if tokens and targets:
            self.sequences.share_prefix(tokens, targets, self.batch, self.decodes)

    def retire(self, slot: Slot, *, forget: bool = False) -> None:
        """Ends a slot (finished or cancelled) and frees its sequences for the next one;
        `forget` also drops what their caches hold (after a failed decode, which may have
        left them half written)."""
        if slot in self.live:
            self.live.remove(slot)
            slot.chain.close()
            for lane in slot.lanes:
                self.sequences.release(lane.seq_id, forget=forget)

    def step(self) -> list[Slot]:
        """One batched decode of every live slot; returns the slots that sampled (their
        `new_text` and `finish_reason` are fresh; a speculating slot may have kept several
        tokens). Finished slots stay live until the caller retires them."""
        started = time.perf_counter()
        entries: list[tuple[int, int, int, bool]] = []
        fed: dict[Lane, int] = {}  # lane -> how many of its pending tokens this batch reads
        # slot, and per lane the batch index of each row to sample (1 + its drafts)
        sampled: list[tuple[Slot, list[list[int]]]] = []
        running = [s for s in self.live if s.finish_reason is None]
        decoding = [s for s in running if not s.prefilling]
        # one token per lane first: running streams never wait; drafts share what is left
        decoding_rows = sum(len(s.lanes) for s in decoding)
        budget = self.n_batch - decoding_rows
        drafting_seconds = 0.0
        reads_prompts = False  # prompt rows make a step's time no guide to a draft's cost

        def feed(lane: Lane, count: int, logits: str) -> list[int]:
            """Adds `count` more of the lane's pending tokens, with logits at the "last"
            one, at "all" or at "none"; returns the batch indices of those rows."""
            start = fed.get(lane, 0)
            rows = []
            for i in range(start, start + count):
                wants = logits == "all" or (logits == "last" and i == start + count - 1)
                entries.append((lane.pending[i], lane.position + i, lane.seq_id, wants))
                if wants:
                    rows.append(len(entries) - 1)
            fed[lane] = start + count
            return rows

        for slot in decoding:
            rows_so_far = self.n_batch - budget  # this step's rows before the slot's drafts
            drafts, seconds = self._drafts(
                slot, budget // len(slot.lanes), rows_so_far, len(decoding)
            )
            drafting_seconds += seconds
            budget -= len(drafts) * len(slot.lanes)
            for lane in slot.lanes:
                lane.pending = lane.pending[:1] + drafts
            sampled.append((slot, [feed(lane, 1 + len(drafts), "all") for lane in slot.lanes]))
        for slot in running:  # then prompt chunks, in arrival order, as room allows
            if not slot.prefilling:
                continue
            if budget <= 0:
                break
            reads_prompts = True
            for lane in slot.lanes:  # all but each prompt's last token
                take = min(budget, len(lane.pending) - 1)
                if take > 0:
                    feed(lane, take, "none")
                    budget -= take
            unread = [len(lane.pending) - fed.get(lane, 0) for lane in slot.lanes]
            if all(n == 1 for n in unread) and budget >= len(slot.lanes):
                sampled.append((slot, [feed(lane, 1, "last") for lane in slot.lanes]))
                budget -= len(slot.lanes)
        if not entries:
            return []
        self.batch.fill(entries)
        self.decodes.run(self.batch)
        cached = self.sequences.cached
        for lane, n in fed.items():  # what the caches now hold
            cached[lane.seq_id].extend(lane.pending[:n])
            lane.pending = lane.pending[n:]
            lane.position += n
        for slot, rows in sampled:
            take_tokens(self, slot, rows)
        if not reads_prompts:
            seconds = time.perf_counter() - started - drafting_seconds
            self.step_costs.record(len(entries), seconds)
        return [slot for slot, _ in sampled]

    def _drafts(
        self, slot: Slot, spare_rows: int, base_rows: int, sharing: int
    ) -> tuple[list[int], float]:
        """The drafts a decoding slot verifies this step (none: one plain token), and the
        seconds drafting took. spare_rows: batch rows per lane left after every decoding
        lane's own token; base_rows: the step's rows before these drafts; sharing: the
        slots decoding in the step."""
        if slot.drafting is None:
            return [], 0.0
        # room: the batch and the slot's context (drafts follow the last token in every lane)
        longest = max(lane.position for lane in slot.lanes)
        room = min(self.max_drafts, spare_rows, self.n_ctx_per_slot - 1 - longest)
        return plan_drafts(slot, room, base_rows, sharing)


def _check_borrowed(contexts: list[Context], n_ctx: int, n_sequences: int, rows: int) -> None:
    """Contexts handed to a decoder must have room for what it was asked to hold."""
    for ctx in contexts:
        if ctx.n_ctx < n_ctx or ctx.n_seq_max < n_sequences or ctx.n_outputs_max < rows:
            raise ValueError(
                f"a context of {ctx.n_ctx} cells, {ctx.n_seq_max} sequences and "
                f"{ctx.n_outputs_max} output rows cannot hold {n_ctx}, {n_sequences} and {rows}"
            )
