"""Mixtures of K models in logit space, beyond the DeRa pair:
h = sum_i w_i(lam) * h_i, one llama.cpp context per source (a model, or a base plus a
LoRA adapter; a file named twice is loaded once).

- `load_mixture("1.5*aligned.gguf - 0.5*reference.gguf")`: fixed weights from a spec
  (text, or a JSON/TOML file; see parse_mix).
- `load_proxy(large, aligned, reference)`: proxy-tuning (Liu et al. 2024), a large model
  steered by a small tuned/untuned pair, h = h_large + lam * (h_tuned - h_base).

A Mixture generates like a DeraPair (stream/generate, negative prompts, chat), as the
single slot of a batched decoder (batch.BatchDecoder): every source's context decodes
the same batch, and the native hook mixes the K rows before llama.cpp's sampler chain.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..engine.guidance import warn_if_weights_cancel
from ..engine.mixing import LogitMixer
from ..errors import BadParameterError
from ..llama import backend
from ..llama import log as llama_log
from ..llama.backend import LoadedModel, LoraAdapter
from ..llama.context import Context, ContextOptions
from ..llama.gguf_inspect import GGUFInfo, check_same_tokenizer, read_gguf
from ..rpc.placement import DEFAULT_RPC_TIMEOUT, Placement, RpcPlacement
from ..speculation.drafts import SpeculationParams
from .base import ModelSet, SlotRunner
from .guard import ModelSetGuard
from .loading import (
    ModelSetOptions,
    check_gpu_layers,
    check_vocab_sizes,
    load_options_for,
    overlap_by_default,
    read_lora,
)
from .mix_spec import MixTerm, Source, as_terms, merge_repeats, parse_mix

__all__ = ["MixTerm", "Mixture", "Source", "load_mixture", "load_proxy", "parse_mix"]

MAX_SOURCES = 8  # the kernel mixes up to 16 rows: 8 models, each with a negative prompt


# -- loading ----------------------------------------------------------------------------
@dataclass
class LoadedSource:
    source: Source
    info: GGUFInfo
    model: LoadedModel
    adapter: LoraAdapter | None


def _load_sources(terms: list[MixTerm], options: ModelSetOptions) -> list[LoadedSource]:
    """Checks every header (shared tokenizer: the first differing id is named), then
    loads each distinct model file once and each adapter on its model."""
    llama_log.install(options.verbose)
    infos: dict[str, GGUFInfo] = {}
    headers = []
    for term in terms:
        path = os.path.realpath(term.source.model)
        info = infos.get(path) or read_gguf(term.source.model)
        infos[path] = info
        adapter = None if term.source.lora is None else read_lora(term.source.lora, info)
        # A file is loaded once per placement: on other workers it is another copy.
        where = Placement(
            options.rpc.every if term.source.rpc is None else term.source.rpc,
            options.rpc.timeout,
        )
        headers.append(((path, where), info, adapter))
    first = headers[0][1]
    for _, info, _ in headers[1:]:
        if info is not first:
            check_same_tokenizer(
                first,
                info,
                (f"{first.path.name}", f"{info.path.name}"),
                "the models of a mixture must share one tokenizer",
            )
    for info in infos.values():
        info.tokens, info.token_types = [], None  # as in load_models: out of peak RSS
    remote = options.rpc.any_remote or any(term.source.rpc for term in terms)
    check_gpu_layers(options, list(infos.values()), remote)
    load_options = load_options_for(options, [])
    models: dict[tuple[str, Placement], LoadedModel] = {}
    loaded: list[LoadedSource] = []
    try:
        for term, (key, info, adapter_info) in zip(terms, headers, strict=True):
            if key not in models:
                models[key] = LoadedModel(Path(info.path), load_options, key[1])
            model = models[key]
            if loaded:
                check_vocab_sizes(model, loaded[0].model)
            adapter = None
            if adapter_info is not None:
                adapter = LoraAdapter(model, adapter_info.path)
            loaded.append(LoadedSource(term.source, info, model, adapter))
    except BaseException:
        for model in models.values():
            model.close()
        raise
    return loaded


def load_mixture(
    spec,
    *,
    n_ctx: int = ModelSetOptions.n_ctx,
    n_batch: int = ModelSetOptions.n_batch,
    n_threads: int = ModelSetOptions.n_threads,
    n_gpu_layers: int | None = None,
    flash_attn: str = "off",
    hook: str | None = None,
    verbose: bool = False,
    speculation: SpeculationParams | None = None,
    rpc: str | list[str] | None = None,
    rpc_timeout: float = DEFAULT_RPC_TIMEOUT,
) -> Mixture:
    """Loads a mixture with fixed weights: a spec string or file (see parse_mix), or a
    list of (weight, model path) / MixTerm. Warns when the weights sum to 0 (a contrast,
    not a distribution-preserving mixture). rpc: the llama.cpp RPC workers of every term
    without its own (see load_pair)."""
    terms = merge_repeats(as_terms(spec))
    warn_if_weights_cancel([t.weight for t in terms], "mixture")
    options = ModelSetOptions(
        n_ctx,
        n_batch,
        n_threads,
        n_gpu_layers,
        flash_attn,
        verbose,
        rpc=RpcPlacement.parse(rpc, timeout=rpc_timeout),
    )
    return Mixture(terms, options, LogitMixer(hook), speculation=speculation)


def load_proxy(
    large: str | os.PathLike[str],
    aligned: str | os.PathLike[str] | None,
    reference: str | os.PathLike[str],
    *,
    lora: str | os.PathLike[str] | None = None,
    lora_scale: float = 1.0,
    n_ctx: int = ModelSetOptions.n_ctx,
    n_batch: int = ModelSetOptions.n_batch,
    n_threads: int = ModelSetOptions.n_threads,
    n_gpu_layers: int | None = None,
    flash_attn: str = "off",
    hook: str | None = None,
    verbose: bool = False,
    speculation: SpeculationParams | None = None,
    rpc: str | list[str] | None = None,
    rpc_aligned: str | list[str] | None = None,
    rpc_reference: str | list[str] | None = None,
    rpc_timeout: float = DEFAULT_RPC_TIMEOUT,
) -> Mixture:
    """Proxy-tuning: `large` steered by the small (aligned, reference) pair, or by the
    reference plus `lora` (pass aligned=None): h = h_large + lam * (h_tuned - h_base), so
    lam is the paper's alpha (0: the large model alone, 1: the full offset). RPC workers
    as in load_pair: `rpc` for every model (the large one takes only it), rpc_aligned
    for the small tuned model, rpc_reference for the small base."""
    if (aligned is None) == (lora is None):
        raise BadParameterError(
            "give the small tuned model either as a model file or as a LoRA adapter of "
            "the small base model, not both and not neither",
            cli_hint="-m/--aligned or --lora",
        )
    where = RpcPlacement.parse(rpc, rpc_aligned, rpc_reference, timeout=rpc_timeout)
    tuned_rpc = where.of("aligned").endpoints
    tuned = (
        Source(str(reference), str(lora), lora_scale, tuned_rpc)
        if lora
        else Source(str(aligned), rpc=tuned_rpc)
    )
    terms = [
        MixTerm(Source(str(large)), weight=1.0),
        MixTerm(tuned, lam_weight=1.0),
        MixTerm(Source(str(reference), rpc=where.of("reference").endpoints), lam_weight=-1.0),
    ]
    options = ModelSetOptions(
        n_ctx, n_batch, n_threads, n_gpu_layers, flash_attn, verbose, rpc=where
    )
    return Mixture(
        terms, options, LogitMixer(hook), logprob_sources=(1, 2), speculation=speculation
    )


def _weight_text(weight: float, lam_weight: float) -> str:
    if not lam_weight:
        return f"{weight:g}"
    lam = {1.0: "lam", -1.0: "-lam"}.get(lam_weight, f"{lam_weight:g}*lam")
    return f"({weight:g} + {lam})" if weight else lam


class Mixture(ModelSet):
    """K models mixed in logit space at every step (see the module docstring)."""

    kind = "mixture"

    def __init__(
        self,
        terms: list[MixTerm],
        options: ModelSetOptions,
        mixer: LogitMixer,
        *,
        logprob_sources: tuple[int, int] | None = None,
        speculation: SpeculationParams | None = None,
    ) -> None:
        if len(terms) > MAX_SOURCES:
            raise BadParameterError(
                f"a mixture holds at most {MAX_SOURCES} models, got {len(terms)}"
            )
        self.terms = terms
        self.mixer = mixer
        self.options = options
        self.sources = _load_sources(terms, options)
        self.model = self.sources[0].model
        self.n_vocab = self.model.n_vocab
        limit = min(s.model.train_context_length() for s in self.sources)
        self.n_ctx = limit if options.n_ctx <= 0 else min(options.n_ctx, limit)
        self.n_batch = min(options.n_batch, self.n_ctx)
        self.logprob_sources = logprob_sources or (0, 1 if len(terms) > 1 else 0)
        self.depends_on_lam = any(t.lam_weight for t in terms)
        self.guard = ModelSetGuard()
        self.overlap_decodes = overlap_by_default(options, [s.model for s in self.sources])
        # Prompt lookup drafts, verified in one batched step (see speculation/drafts.py).
        self.speculation = speculation or SpeculationParams()
        self._slots = SlotRunner(self)
        self._scoring: list[Context] | None = None

    def describe(self) -> str:
        """The mixture as a formula, e.g. '1*large.gguf + lam*tuned.gguf - lam*base.gguf'."""
        return " + ".join(
            f"{_weight_text(t.weight, t.lam_weight)}*{t.source.label}" for t in self.terms
        ).replace("+ -", "- ")

    def close(self) -> None:
        if not self.guard.close():
            return
        self._slots.close()
        for ctx in self._scoring or ():
            ctx.close()
        for model in {id(s.model): s.model for s in self.sources}.values():
            model.close()
        backend.return_freed_memory()

    def clear_cache(self) -> None:
        """Forgets the cached prompts: the next call reads its whole prompt."""
        self._slots.forget()

    def loaded_models(self) -> list[LoadedModel]:
        return list({id(s.model): s.model for s in self.sources}.values())

    # -- the model-set interface BatchDecoder uses ----------------------------------------
    def source_weights(self, lam: float) -> list[float]:
        return [t.weight + t.lam_weight * lam for t in self.terms]

    def open_source_contexts(
        self, n_ctx: int, n_seq_max: int, n_outputs_max: int, n_batch: int | None = None
    ) -> list[Context]:
        self._check_open()
        options = ContextOptions(
            n_ctx=n_ctx,
            n_batch=n_batch or self.n_batch,
            n_threads=self.options.n_threads,
            flash_attn=self.options.flash_attn,
            n_seq_max=n_seq_max,
            n_outputs_max=n_outputs_max,
        )
        contexts: list[Context] = []
        try:
            for source in self.sources:
                ctx = Context(source.model, options)
                contexts.append(ctx)
                if source.adapter is not None:
                    ctx.attach_lora(source.adapter, source.source.lora_scale)
        except BaseException:
            for ctx in contexts:
                ctx.close()
            raise
        return contexts

    def scoring_source_contexts(self) -> list[Context]:
        """Contexts returning logits at every position (teacher forcing), kept."""
        if self._scoring is None:
            self._scoring = self.open_source_contexts(self.n_ctx, 1, self.n_batch)
        return self._scoring

    def check_lam(self, lam: float) -> float:
        lam = super().check_lam(lam)
        if not self.depends_on_lam and lam != 1.0:
            raise BadParameterError(
                "this mixture's weights are fixed by its spec; lam does not apply "
                "(change the weights instead)",
                cli_hint="drop --lam",
            )
        return lam
