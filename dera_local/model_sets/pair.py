"""A DeRa pair: an aligned and a reference model whose logits are mixed at every step,
h = lam * aligned + (1 - lam) * reference, before llama.cpp's sampler chain picks the next
token from h.

Every generation is the one slot of a batched decoder (batch.BatchDecoder, the step that
sweeps, the server, guided generations and mixtures share). A plain generation runs on
the generation contexts opened at load, whose caches hold the last prompt and answer, so
a later call whose prompt starts with them (the next chat turn, the same prompt again)
reads only the rest.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from ..engine.mixing import LogitMixer
from ..engine.stream import GenerationResult, GenerationStream
from ..errors import BadParameterError
from ..llama import backend
from ..llama.backend import LoadedModel
from ..llama.context import Context, ContextOptions
from ..rpc.placement import DEFAULT_RPC_TIMEOUT, RpcPlacement
from ..speculation.drafts import ModelDrafter, SpeculationParams
from .base import ModelSet, SlotRunner
from .guard import ModelSetGuard
from .loading import (
    LoadedPair,
    ModelSetOptions,
    check_overlap,
    load_models,
    overlap_by_default,
)

__all__ = ["DeraPair", "GenerationResult", "GenerationStream", "load_pair"]


class HeldPrefix(NamedTuple):
    """The tokens a pair's generation contexts hold, and those contexts (they always
    hold the same tokens, in lockstep)."""

    cached: list[int]
    contexts: list[Context]


class DeraPair(ModelSet):
    """An aligned and a reference model decoded together, their logits mixed by DeRa."""

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
        self.overlap_decodes = overlap_decodes
        self.guard = ModelSetGuard()  # one generation at a time; nothing after close()
        # One model file and no adapter: the mixture equals that model for every lam, so
        # there is one source context and nothing is mixed.
        self.identical = loaded.aligned_model is loaded.reference_model and (
            loaded.adapter_info is None
        )
        # Rows one decode may return: 1 + the most tokens one verification can draft.
        self.max_rows = loaded.aligned_ctx.n_outputs_max
        # Speculation for streams that do not choose their own (draft_max 0 = off).
        self.speculation = speculation or SpeculationParams(draft_max=self.max_rows - 1)
        self._scoring: tuple[Context, Context] | None = None
        # One drafter per draft context, kept across generations with its cache.
        draft_ctx = loaded.draft_ctx
        self.default_drafter = ModelDrafter(draft_ctx) if draft_ctx is not None else None
        generation_contexts = [loaded.aligned_ctx, loaded.reference_ctx]
        if self.identical:
            generation_contexts.pop()
        self._slots = SlotRunner(self, generation_contexts, self.max_rows - 1)

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        """Frees the models and contexts (after a step running in another thread ends);
        later calls raise PairClosedError. Closing twice is harmless."""
        if not self.guard.close():
            return
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
        self._slots.forget()

    def loaded_models(self) -> list[LoadedModel]:
        loaded = self.loaded
        models = (loaded.aligned_model, loaded.reference_model, loaded.draft_model)
        return list({id(m): m for m in models if m is not None}.values())

    @property
    def lockstep(self) -> HeldPrefix:
        """What the generation contexts hold (after a plain generation: its prompt and
        answer but the last token)."""
        home = self._slots.home
        return HeldPrefix(list(home.cached[0]), home.contexts)

    # -- generation (stream, generate: ModelSet's) --------------------------------------
    def exact_target(self, lam: float, guidance) -> float | None:
        """A pair's plain DeRa at lam has an exact target, Pi_lam ~ pi_ref^(1-lam) pi_1^lam
        (on the aligned model's implicit reward); a negative prompt changes the mixture,
        so a guided answer has none."""
        return lam if guidance is None else None

    def check_speculation(self, speculation: SpeculationParams) -> SpeculationParams:
        if speculation.draft_max >= self.max_rows:
            raise BadParameterError(
                f"draft_max {speculation.draft_max} is more than this pair was loaded for "
                f"({self.max_rows - 1})",
                cli_hint="raise --draft-max",
            )
        return speculation


def load_pair(
    aligned: str | os.PathLike[str] | None,
    reference: str | os.PathLike[str],
    *,
    lora: str | os.PathLike[str] | None = None,
    lora_scale: float = 1.0,
    n_ctx: int = ModelSetOptions.n_ctx,
    n_batch: int = ModelSetOptions.n_batch,
    n_threads: int = ModelSetOptions.n_threads,
    n_gpu_layers: int | None = None,
    n_gpu_layers_reference: int | None = None,
    flash_attn: str = "off",
    hook: str | None = None,
    overlap_decodes: bool | None = None,
    draft_model: str | os.PathLike[str] | None = None,
    speculation: SpeculationParams | None = None,
    verbose: bool = False,
    rpc: str | list[str] | None = None,
    rpc_aligned: str | list[str] | None = None,
    rpc_reference: str | list[str] | None = None,
    rpc_draft: str | list[str] | None = None,
    rpc_timeout: float = DEFAULT_RPC_TIMEOUT,
) -> DeraPair:
    """Loads an aligned and a reference GGUF model for DeRa decoding.

    lora: instead of an aligned model file (pass aligned=None), the reference plus this
    LoRA adapter GGUF; the base weights are loaded once and shared by both contexts.
    n_gpu_layers: layers offloaded to the GPU (-1 = all; default all where there is one);
    n_gpu_layers_reference: the reference's own count instead (e.g. 0: the aligned model
    on the GPU, the reference on the CPU, their decodes overlapped); a LoRA pair placed
    so is two copies of the base, one per side.
    flash_attn: "off" (default, as llama-cpp-python's Llama), "on" or "auto".
    hook: "native" or "numpy" (default: native when compiled, else numpy; env DERA_HOOK).
    overlap_decodes: run the two models' decodes in two threads (default: on when layers
    are offloaded to a GPU, where the two decodes can overlap; off on CPU, where both
    would compete for the same cores).
    draft_model: a small GGUF sharing the pair's tokenizer that drafts tokens for
    speculative decoding (default: drafts come from prompt lookup, which needs no model).
    speculation: the default for every stream (SpeculationParams(); draft_max=0: off);
    its draft_max also sizes the contexts' output rows.
    rpc: llama.cpp RPC workers ('HOST:PORT,HOST:PORT' or a list; start them with
    `dera-local worker`) that hold the layers of every model, split as llama.cpp splits
    them; rpc_aligned / rpc_reference / rpc_draft: one model's own workers instead
    ('local' or [] = this machine). With the models on different workers their decodes
    overlap. A LoRA pair is one copy of the base on the reference's workers, unless
    rpc_aligned places the aligned side elsewhere: then each side has its own copy.
    rpc_timeout: seconds a call to a worker may go without an answer before the worker
    counts as lost (WorkerError).
    """
    if flash_attn not in ("on", "off", "auto"):
        raise BadParameterError(f"flash_attn must be 'on', 'off' or 'auto', got {flash_attn!r}")
    speculation = speculation or SpeculationParams()
    options = ModelSetOptions(
        n_ctx,
        n_batch,
        n_threads,
        n_gpu_layers,
        flash_attn,
        verbose,
        max_rows=speculation.draft_max + 1,
        rpc=RpcPlacement.parse(rpc, rpc_aligned, rpc_reference, rpc_draft, rpc_timeout),
        n_gpu_layers_reference=n_gpu_layers_reference,
    )
    mixer = LogitMixer(hook)
    loaded = load_models(
        aligned, reference, options, lora=lora, lora_scale=lora_scale, draft=draft_model
    )
    sources = [loaded.aligned_model, loaded.reference_model]
    try:
        if overlap_decodes is None:
            overlap_decodes = overlap_by_default(options, sources)
        elif overlap_decodes:
            check_overlap(sources)
        return DeraPair(loaded, mixer, overlap_decodes, speculation)
    except BaseException:
        loaded.close()  # a refused pair holds nothing (on a worker, nothing remote either)
        raise
