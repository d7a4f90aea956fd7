"""The lockstep DeRa engine: both models read the same tokens; at each step the aligned
context's logits are replaced in place by lam * aligned + (1 - lam) * reference and
llama.cpp's sampler chain picks the next token from them.

Both KV caches always hold the same token prefix, so a later call whose prompt starts
with what the caches hold (the next chat turn, the same prompt again) reads only the rest.
"""

from __future__ import annotations

import os
import time
from collections.abc import Generator, Sequence

from . import backend
from .backend import Context, ContextOptions, LoadedModel
from .batch import SlotRunner
from .errors import BadParameterError
from .guidance import guidance_for
from .loading import LoadedPair, PairOptions, load_models
from .lockstep import LockstepContexts
from .logprobs import SequenceLogprobs
from .mixing import LogitMixer
from .model_set import ModelSet
from .pair_guard import PairGuard
from .sampling import SamplerChain, SamplingParams
from .sequence import SequenceOutput
from .speculative import (
    AcceptRule,
    DraftCounts,
    Drafter,
    ModelDrafter,
    PromptLookup,
    SpeculationParams,
    sample_equals_draft,
    speculative_steps,
)
from .stream import GenerationResult, GenerationStream


class DeraPair(ModelSet):
    """An aligned and a reference model decoding in lockstep with DeRa mixing."""

    kind = "pair"

    def __init__(
        self,
        loaded: LoadedPair,
        mixer: LogitMixer,
        overlap_decodes: bool,
        speculation: SpeculationParams | None = None,
    ) -> None:
        self.loaded = loaded
        self.mixer = mixer
        self.n_ctx = loaded.aligned_ctx.n_ctx
        self.n_vocab = loaded.aligned_model.n_vocab
        self.lockstep = LockstepContexts(loaded, mixer, overlap_decodes)
        self.guard = PairGuard()  # one generation at a time; nothing after close()
        self.identical = self.lockstep.identical
        # Speculation for streams that do not choose their own (draft_max 0 = off).
        self.speculation = speculation or SpeculationParams(draft_max=self.lockstep.max_rows - 1)
        self._scoring: tuple[Context, Context] | None = None
        # One drafter per draft context, kept across generations with its cache.
        draft_ctx = loaded.draft_ctx
        self._model_drafter = ModelDrafter(draft_ctx) if draft_ctx is not None else None
        self._slots = SlotRunner(self)  # guided generations (negative prompts)

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        """Frees the models and contexts (after a step running in another thread ends);
        later calls raise PairClosedError. Closing twice is harmless."""
        if not self.guard.close():
            return
        self.lockstep.close()
        self._slots.close()
        for ctx in self._scoring or ():
            ctx.close()
        self.loaded.close()
        backend.return_freed_memory()

    def open_contexts(
        self, n_ctx: int, n_seq_max: int, n_outputs_max: int, n_batch: int | None = None
    ) -> tuple[Context, Context]:
        """A further (aligned, reference) pair of contexts over the same loaded weights,
        with the adapter attached to the aligned one, e.g. for batched sweeps or scoring.
        The caller closes them."""
        self._check_open()
        loaded = self.loaded
        base = loaded.aligned_ctx
        options = ContextOptions(
            n_ctx=n_ctx,
            n_batch=n_batch or base.n_batch,
            n_threads=base.n_threads,
            flash_attn=base.flash_attn,
            n_seq_max=n_seq_max,
            n_outputs_max=n_outputs_max,
        )
        aligned = Context(loaded.aligned_model, options)
        try:
            if base.adapter is not None:
                aligned.attach_lora(base.adapter, loaded.lora_scale)
            reference = Context(loaded.reference_model, options)
        except BaseException:
            aligned.close()
            raise
        return aligned, reference

    # -- the model-set interface BatchDecoder uses (shared with mixture.Mixture) ----------
    @property
    def model(self) -> LoadedModel:
        return self.loaded.aligned_model

    @property
    def n_batch(self) -> int:
        return self.loaded.aligned_ctx.n_batch

    @property
    def logprob_sources(self) -> tuple[int, int]:
        """Which source contexts logprobs call 'aligned' and 'reference'."""
        return (0, 0) if self.identical else (0, 1)

    def source_weights(self, lam: float) -> list[float]:
        """Each source context's weight in the mixture at `lam`."""
        return [1.0] if self.identical else [lam, 1.0 - lam]

    def open_source_contexts(
        self, n_ctx: int, n_seq_max: int, n_outputs_max: int, n_batch: int | None = None
    ) -> list[Context]:
        """One context per source, in source_weights order (one model alone: one)."""
        contexts = list(self.open_contexts(n_ctx, n_seq_max, n_outputs_max, n_batch))
        if self.identical:
            contexts.pop().close()
        return contexts

    def scoring_contexts(self) -> tuple[Context, Context]:
        """Contexts that return logits for every position of a batch (teacher forcing),
        opened on first use and kept; the generation contexts return one row per step."""
        if self._scoring is None:
            n_batch = self.loaded.aligned_ctx.n_batch
            self._scoring = self.open_contexts(self.n_ctx, n_seq_max=1, n_outputs_max=n_batch)
        return self._scoring

    def scoring_source_contexts(self) -> list[Context]:
        """scoring_contexts, one per source (one model alone: one)."""
        contexts = self.scoring_contexts()
        return [contexts[0]] if self.identical else list(contexts)

    def clear_cache(self) -> None:
        """Forgets the cached prefix: the next call re-reads its whole prompt."""
        self.lockstep.clear()
        self._slots.close()

    # -- generation -----------------------------------------------------------------------
    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        lam: float = 1.0,
        sampling: SamplingParams | None = None,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        logprobs: bool = False,
        speculation: SpeculationParams | None = None,
        drafter: Drafter | None = None,
        accept: AcceptRule = sample_equals_draft,
        logits_observer=None,
        negative_prompt: str | Sequence[int] | None = None,
        cfg_scale: float = 1.0,
    ) -> GenerationStream:
        """Starts a DeRa generation from a prompt (text, or token ids fed as they are).

        lam: 1 = aligned model, 0 = reference, between = weaker alignment, > 1 extrapolates.
        max_tokens: at most this many new tokens (-1: until the context is full).
        stop: strings that end generation; they are not part of the text.
        logprobs: record each sampled token's log-probability under the aligned model,
            the reference and the mixture (result.logprobs); costs a copy per step.
        speculation: how many tokens to draft and verify per step (default: the pair's,
            see load_pair; SpeculationParams(draft_max=0) turns it off). Speculation
            never changes what is sampled, only how many decodes it takes.
        drafter: a draft source instead of the pair's (prompt lookup, or the draft model
            given to load_pair); accept: the rule keeping a drafted token (tests).
        logits_observer: a llama_sampler put first in the chain (for tests and debugging).
        negative_prompt, cfg_scale: classifier-free guidance, h_neg + cfg_scale * (h_pos -
            h_neg) over the DeRa mixture of each prompt (see guidance.py); the negative
            prompt (text or ids) is read as a second sequence of the same batched
            contexts; drafts are verified in both sequences at once.
        """
        prompt_tokens, lam, sampling = self._prepare(prompt, lam, sampling, max_tokens)
        guidance = guidance_for(self, negative_prompt, cfg_scale)
        speculation = speculation or self.speculation
        if speculation.draft_max >= self.lockstep.max_rows:
            raise BadParameterError(
                f"draft_max {speculation.draft_max} is more than this pair was loaded for "
                f"({self.lockstep.max_rows - 1})",
                cli_hint="raise --draft-max",
            )
        if guidance is not None:
            return self._slot_stream(
                self._slots,
                prompt_tokens,
                guidance,
                speculation,
                lam=lam,
                sampling=sampling,
                max_tokens=max_tokens,
                stop=stop,
                logprobs=logprobs,
                logits_observer=logits_observer,
                drafter=drafter or self._model_drafter,  # None: the decoder's prompt lookup
                accept=accept,
            )
        return GenerationStream(
            self._lockstep(
                prompt_tokens,
                lam,
                sampling,
                max_tokens,
                stop,
                logits_observer,
                SequenceLogprobs() if logprobs else None,
                speculation,
                drafter,
                accept,
            ),
            self.guard,
        )

    def _lockstep(
        self,
        prompt_tokens: list[int],
        lam: float,
        sampling: SamplingParams,
        max_tokens: int,
        stop: Sequence[str],
        logits_observer,
        logprobs: SequenceLogprobs | None,
        speculation: SpeculationParams,
        drafter: Drafter | None,
        accept: AcceptRule,
    ) -> Generator[str, None, GenerationResult]:
        model = self.loaded.aligned_model
        contexts = self.lockstep
        output = SequenceOutput(
            model, n_prompt=len(prompt_tokens), n_ctx=self.n_ctx, max_tokens=max_tokens, stop=stop
        )
        counts = DraftCounts()
        owner = object()  # this generation, for the pair's guard
        self.guard.claim(owner)
        try:
            with SamplerChain(sampling, model.vocab, self.n_ctx, logits_observer) as chain:
                started = time.perf_counter()
                reused = contexts.prefill(prompt_tokens)
                if not speculation.enabled:
                    drafter = None
                elif drafter is None:
                    drafter = self._default_drafter(speculation)
                if drafter is not None:
                    drafter.reset(prompt_tokens)  # a draft model reads the prompt here
                prefilled = time.perf_counter()
                token = contexts.sample(-1, lam, chain, logprobs)
                finish = output.advance(token)
                if output.new_text:
                    yield output.new_text
                if finish is None and drafter is not None:
                    drafter.extend([token])
                    yield from speculative_steps(
                        contexts,
                        output,
                        drafter,
                        speculation,
                        accept,
                        counts,
                        token,
                        lam,
                        chain,
                        logprobs,
                        max_tokens,
                    )
                    finish = output.finish_reason
                while finish is None:
                    contexts.decode([token])
                    token = contexts.sample(-1, lam, chain, logprobs)
                    finish = output.advance(token)
                    if output.new_text:
                        yield output.new_text
                tail = output.flush()
                if tail:
                    yield tail
            return GenerationResult(
                text=output.text,
                tokens=output.tokens,
                prompt_tokens=prompt_tokens,
                finish_reason=finish,
                lam=lam,
                seed=sampling.seed,
                reused_prompt_tokens=reused,
                prompt_seconds=prefilled - started,
                generation_seconds=time.perf_counter() - prefilled,
                logprobs=logprobs,
                drafted=counts.drafted,
                accepted=counts.accepted,
                verify_steps=counts.verify_steps,
            )
        finally:
            self.guard.release(owner)

    def _default_drafter(self, speculation: SpeculationParams) -> Drafter:
        if self._model_drafter is not None:
            return self._model_drafter
        return PromptLookup(speculation.ngram_min, speculation.ngram_max)


def load_pair(
    aligned: str | os.PathLike[str] | None,
    reference: str | os.PathLike[str],
    *,
    lora: str | os.PathLike[str] | None = None,
    lora_scale: float = 1.0,
    n_ctx: int = PairOptions.n_ctx,
    n_batch: int = PairOptions.n_batch,
    n_threads: int = PairOptions.n_threads,
    n_gpu_layers: int | None = None,
    flash_attn: str = "off",
    hook: str | None = None,
    overlap_decodes: bool | None = None,
    draft_model: str | os.PathLike[str] | None = None,
    speculation: SpeculationParams | None = None,
    verbose: bool = False,
) -> DeraPair:
    """Loads an aligned and a reference GGUF model for DeRa decoding.

    lora: instead of an aligned model file (pass aligned=None), the reference plus this
    LoRA adapter GGUF; the base weights are loaded once and shared by both contexts.
    flash_attn: "off" (default, as llama-cpp-python's Llama), "on" or "auto".
    hook: "native" or "numpy" (default: native when compiled, else numpy; env DERA_HOOK).
    overlap_decodes: run the two models' decodes in two threads (default: on when layers
    are offloaded to a GPU, where the two decodes can overlap; off on CPU, where both
    would compete for the same cores).
    draft_model: a small GGUF sharing the pair's tokenizer that drafts tokens for
    speculative decoding (default: drafts come from prompt lookup, which needs no model).
    speculation: the default for every stream (SpeculationParams(); draft_max=0: off);
    its draft_max also sizes the contexts' output rows.
    """
    if flash_attn not in ("on", "off", "auto"):
        raise BadParameterError(f"flash_attn must be 'on', 'off' or 'auto', got {flash_attn!r}")
    speculation = speculation or SpeculationParams()
    options = PairOptions(
        n_ctx,
        n_batch,
        n_threads,
        n_gpu_layers,
        flash_attn,
        verbose,
        max_rows=speculation.draft_max + 1,
    )
    mixer = LogitMixer(hook)
    loaded = load_models(
        aligned, reference, options, lora=lora, lora_scale=lora_scale, draft=draft_model
    )
    if overlap_decodes is None:
        overlap_decodes = loaded.load_options.n_gpu_layers != 0 and backend.supports_gpu_offload()
    return DeraPair(loaded, mixer, overlap_decodes, speculation)
