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

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tomllib

from . import backend, llama_log
from .backend import Context, ContextOptions, LoadedModel, LoraAdapter
from .errors import BadParameterError
from .gguf_inspect import GGUFInfo, check_same_tokenizer, read_gguf
from .guidance import guidance_for, warn_if_weights_cancel
from .loading import (
    PairOptions,
    check_vocab_sizes,
    load_options_for,
    overlap_by_default,
    read_lora,
)
from .mixing import LogitMixer
from .model_set import ModelSet
from .pair_guard import PairGuard
from .sampling import SamplingParams
from .slot_runner import SlotRunner
from .speculative import AcceptRule, Drafter, SpeculationParams, sample_equals_draft
from .stream import GenerationStream

MAX_SOURCES = 8  # the kernel mixes up to 16 rows: 8 models, each with a negative prompt


@dataclass(frozen=True)
class Source:
    """A model file, optionally with a LoRA adapter applied in its context."""

    model: str
    lora: str | None = None
    lora_scale: float = 1.0

    @property
    def label(self) -> str:
        name = Path(self.model).name
        return name if self.lora is None else f"{name}+{Path(self.lora).name}"


@dataclass(frozen=True)
class MixTerm:
    """One source of a mixture; its weight is `weight + lam_weight * lam`."""

    source: Source
    weight: float = 0.0
    lam_weight: float = 0.0


# -- the --mix spec ---------------------------------------------------------------------
_OPERATOR = re.compile(r"\s+([+-])\s+")  # operators need spaces: file names hold - and +
_TERM = re.compile(r"^(?:(?P<weight>[^*]+?)\s*\*\s*)?(?P<source>[^*\s][^*]*)$")


def parse_mix(spec: str) -> list[MixTerm]:
    """A mixture spec: '1.5*aligned.gguf - 0.5*reference.gguf' (weights default to 1;
    operators between terms need spaces around them; BASE.gguf+ADAPTER.gguf is a base
    with a LoRA adapter), or the path of a .json/.toml file:
    {"terms": [{"model": "a.gguf", "weight": 1.5, "lora": "x.gguf", "lora_scale": 1.0}]}
    (paths relative to the file). Raises BadParameterError with one line."""
    text = spec.strip()
    if text.endswith((".json", ".toml")) and not _OPERATOR.search(text):
        return _parse_mix_file(Path(text).expanduser())
    if not text:
        raise BadParameterError("the mixture spec is empty; give e.g. '1.5*a.gguf - 0.5*b.gguf'")
    parts = _OPERATOR.split(text)
    signs = ["+"] + parts[1::2]
    terms = []
    for sign, part in zip(signs, parts[0::2], strict=True):
        negative = sign == "-"
        if part.startswith("-") and not Path(part).exists():  # a leading '-0.5*a.gguf'
            negative, part = not negative, part[1:].lstrip()
        match = _TERM.match(part)
        if match is None:
            raise BadParameterError(f"mixture term {part!r} names no model")
        weight = _weight(match["weight"] or "1", part)
        model, lora = _split_lora(match["source"].strip())
        terms.append(MixTerm(Source(model, lora), -weight if negative else weight))
    return terms


def _weight(text: str, term: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadParameterError(
            f"mixture term {term!r}: {text!r} is not a number (write WEIGHT*MODEL.gguf)"
        ) from None
    if not math.isfinite(value) or abs(value) > 1000:
        raise BadParameterError(f"mixture term {term!r}: the weight must be finite and <= 1000")
    return value


def _split_lora(source: str) -> tuple[str, str | None]:
    if "+" in source and not Path(source).exists():
        model, lora = source.split("+", 1)
        return model, lora
    return source, None


def _parse_mix_file(path: Path) -> list[MixTerm]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BadParameterError(f"cannot read the mixture file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode()) if path.suffix == ".toml" else json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadParameterError(f"the mixture file {path} does not parse: {detail}") from None
    entries = data.get("terms") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise BadParameterError(f"the mixture file {path} has no list of terms")
    terms = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise BadParameterError(f'term {index} of {path} needs a "model" path')
        unknown = set(entry) - {"model", "weight", "lora", "lora_scale"}
        if unknown:
            raise BadParameterError(f"term {index} of {path}: unknown key {sorted(unknown)[0]!r}")
        label = f"term {index} of {path.name}"
        weight = _weight(str(entry.get("weight", 1)), label)
        lora = entry.get("lora")
        if lora is not None and not isinstance(lora, str):
            raise BadParameterError(f'{label}: "lora" must be a path')
        source = Source(
            str(path.parent / entry["model"]),
            None if lora is None else str(path.parent / lora),
            _weight(str(entry.get("lora_scale", 1)), label),
        )
        terms.append(MixTerm(source, weight))
    return terms


# -- loading ----------------------------------------------------------------------------
@dataclass
class LoadedSource:
    source: Source
    info: GGUFInfo
    model: LoadedModel
    adapter: LoraAdapter | None


def _as_terms(spec) -> list[MixTerm]:
    if isinstance(spec, str):
        return parse_mix(spec)
    terms = []
    for item in spec:
        if isinstance(item, MixTerm):
            terms.append(item)
        else:
            weight, model = item
            terms.append(MixTerm(Source(str(model)), float(weight)))
    if not terms:
        raise BadParameterError("the mixture has no terms")
    return terms


def _merge_repeats(terms: list[MixTerm]) -> list[MixTerm]:
    """A source named twice is one context with the summed weight."""
    merged: dict[Source, MixTerm] = {}
    for term in terms:
        seen = merged.get(term.source)
        if seen is None:
            merged[term.source] = term
        else:
            merged[term.source] = MixTerm(
                term.source, seen.weight + term.weight, seen.lam_weight + term.lam_weight
            )
    return list(merged.values())


def _load_sources(terms: list[MixTerm], options: PairOptions) -> list[LoadedSource]:
    """Checks every header (shared tokenizer: the first differing id is named), then
    loads each distinct model file once and each adapter on its model."""
    llama_log.install(options.verbose)
    infos: dict[str, GGUFInfo] = {}
    headers = []
    for term in terms:
        key = os.path.realpath(term.source.model)
        info = infos.get(key) or read_gguf(term.source.model)
        infos[key] = info
        adapter = None if term.source.lora is None else read_lora(term.source.lora, info)
        headers.append((key, info, adapter))
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
    load_options = load_options_for(options, [])
    models: dict[str, LoadedModel] = {}
    loaded: list[LoadedSource] = []
    try:
        for term, (key, info, adapter_info) in zip(terms, headers, strict=True):
            if key not in models:
                models[key] = LoadedModel(Path(info.path), load_options)
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
    n_ctx: int = PairOptions.n_ctx,
    n_batch: int = PairOptions.n_batch,
    n_threads: int = PairOptions.n_threads,
    n_gpu_layers: int | None = None,
    flash_attn: str = "off",
    hook: str | None = None,
    verbose: bool = False,
    speculation: SpeculationParams | None = None,
) -> Mixture:
    """Loads a mixture with fixed weights: a spec string or file (see parse_mix), or a
    list of (weight, model path) / MixTerm. Warns when the weights sum to 0 (a contrast,
    not a distribution-preserving mixture)."""
    terms = _merge_repeats(_as_terms(spec))
    warn_if_weights_cancel([t.weight for t in terms], "mixture")
    options = PairOptions(n_ctx, n_batch, n_threads, n_gpu_layers, flash_attn, verbose)
    return Mixture(terms, options, LogitMixer(hook), speculation=speculation)


def load_proxy(
    large: str | os.PathLike[str],
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
    verbose: bool = False,
    speculation: SpeculationParams | None = None,
) -> Mixture:
    """Proxy-tuning: `large` steered by the small (aligned, reference) pair, or by the
    reference plus `lora` (pass aligned=None): h = h_large + lam * (h_tuned - h_base), so
    lam is the paper's alpha (0: the large model alone, 1: the full offset)."""
    if (aligned is None) == (lora is None):
        raise BadParameterError(
            "give the small tuned model either as a model file or as a LoRA adapter of "
            "the small base model, not both and not neither",
            cli_hint="-m/--aligned or --lora",
        )
    tuned = Source(str(reference), str(lora), lora_scale) if lora else Source(str(aligned))
    terms = [
        MixTerm(Source(str(large)), weight=1.0),
        MixTerm(tuned, lam_weight=1.0),
        MixTerm(Source(str(reference)), lam_weight=-1.0),
    ]
    options = PairOptions(n_ctx, n_batch, n_threads, n_gpu_layers, flash_attn, verbose)
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
        options: PairOptions,
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
        self.guard = PairGuard()
        self.overlap_decodes = overlap_by_default(options)
        # Prompt lookup drafts, verified in one batched step (see speculative.py).
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
        negative_prompt: str | Sequence[int] | None = None,
        cfg_scale: float = 1.0,
        logits_observer=None,
        speculation: SpeculationParams | None = None,
        drafter: Drafter | None = None,
        accept: AcceptRule = sample_equals_draft,
    ) -> GenerationStream:
        """Starts a generation; keywords as DeraPair.stream (lam is alpha for a proxy-tuned
        model; a fixed-weight mixture takes only lam=1). Drafts come from prompt lookup
        unless a `drafter` is given."""
        prompt_tokens, lam, sampling = self._prepare(prompt, lam, sampling, max_tokens)
        return self._slot_stream(
            self._slots,
            prompt_tokens,
            guidance_for(self, negative_prompt, cfg_scale),
            speculation or self.speculation,
            drafter=drafter,
            accept=accept,
            lam=lam,
            sampling=sampling,
            max_tokens=max_tokens,
            stop=stop,
            logprobs=logprobs,
            logits_observer=logits_observer,
        )

    def check_lam(self, lam: float) -> float:
        lam = super().check_lam(lam)
        if not self.depends_on_lam and lam != 1.0:
            raise BadParameterError(
                "this mixture's weights are fixed by its spec; lam does not apply "
                "(change the weights instead)",
                cli_hint="drop --lam",
            )
        return lam
