"""Loads a DeRa pair: validates both GGUF files, checks they share a tokenizer, then loads
each model with its own llama.cpp context."""

from __future__ import annotations

import gc
import math
import os
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import BadParameterError, IncompatibleModelsError, ModelFileError
from ..llama import backend
from ..llama import log as llama_log
from ..llama.backend import LoadedModel, LoadOptions, LoraAdapter
from ..llama.context import Context, ContextOptions
from ..llama.gguf_inspect import GGUFInfo, check_same_tokenizer, read_gguf
from ..rpc.placement import RpcPlacement

DEFAULT_N_CTX = 4096


@dataclass(frozen=True)
class ModelSetOptions:
    """Resource settings shared by every model of a set (llama.cpp's -c, -b, -t, -ngl)."""

    n_ctx: int = DEFAULT_N_CTX  # 0 = the models' training context
    n_batch: int = 512
    n_threads: int = 0  # 0 = all cores (up to 16)
    n_gpu_layers: int | None = None  # None = all layers where a GPU or worker takes them
    flash_attn: str = "off"  # "on", "off" or "auto" (see backend.ContextOptions)
    verbose: bool = False
    # Logits rows one generation decode may return: 1 + the most drafted tokens verified
    # at once (llama.cpp sizes each context's output buffer by it).
    max_rows: int = 17
    # Which llama.cpp RPC workers hold each model's layers (default: none, this machine).
    rpc: RpcPlacement = RpcPlacement()
    # A pair's reference model's own n_gpu_layers (None: n_gpu_layers).
    n_gpu_layers_reference: int | None = None

    @property
    def reference_gpu_layers(self) -> int | None:
        if self.n_gpu_layers_reference is None:
            return self.n_gpu_layers
        return self.n_gpu_layers_reference


@dataclass
class LoadedPair:
    aligned_info: GGUFInfo
    reference_info: GGUFInfo
    aligned_model: LoadedModel
    reference_model: LoadedModel
    aligned_ctx: Context
    reference_ctx: Context
    load_options: LoadOptions
    adapter_info: GGUFInfo | None = None  # set when the aligned side is reference + LoRA
    lora_scale: float | None = None
    draft_model: LoadedModel | None = None  # drafts tokens for speculative decoding
    draft_ctx: Context | None = None

    def close(self) -> None:
        # Contexts first; a shared model is closed once (close() is idempotent). The
        # adapter is freed with its model.
        for resource in (
            self.draft_ctx,
            self.aligned_ctx,
            self.reference_ctx,
            self.draft_model,
            self.aligned_model,
            self.reference_model,
        ):
            if resource is not None:
                resource.close()


def load_options_for(options: ModelSetOptions, notes: list[str]) -> LoadOptions:
    use_extra_bufts = True
    if backend.built_with_amx():
        use_extra_bufts = False
        notes.append(
            "ggml was built with AMX: weights load without extra buffer types "
            "(use_extra_bufts=False) to avoid the AMX crash on quantized batches; "
            "see the README for faster build flags"
        )
    return LoadOptions(n_gpu_layers=options.n_gpu_layers, use_extra_bufts=use_extra_bufts)


def check_gpu_layers(options: ModelSetOptions, infos: list[GGUFInfo], remote: bool) -> None:
    """-ngl as llama.cpp reads it (-1 all, 0 none, n the last n layers, the output layer
    counting as one more), refused in one line where it could only be a mistake: on a
    build with no GPU (llama.cpp would silently keep every layer on the CPU), below -1,
    or above what the largest model of the set has (a set's models share one -ngl, so a
    smaller draft model may take all of its layers at a count meant for the others)."""
    for n in {options.n_gpu_layers, options.reference_gpu_layers}:
        _check_gpu_layer_count(n, infos, remote)


def _check_gpu_layer_count(n: int | None, infos: list[GGUFInfo], remote: bool) -> None:
    if n is None or n == 0:
        return
    if n < -1:
        raise BadParameterError(
            f"-ngl {n}: use -1 (all layers), 0 (none) or a number of layers",
            cli_hint="-ngl/--n-gpu-layers",
        )
    if not remote and not backend.supports_gpu_offload():
        raise BadParameterError(
            f"-ngl {n}: this llama.cpp build has no GPU to offload to (a CPU build); drop "
            "-ngl, or install a GPU build of llama-cpp-python (docs/install.md)",
            cli_hint="-ngl/--n-gpu-layers",
        )
    counts = [c for c in (layer_count(info) for info in infos) if c is not None]
    most = max(counts, default=None)
    if n > 0 and most is not None and n > most + 1:
        raise BadParameterError(
            f"-ngl {n}: the largest model here has {most} layers ({most + 1} with its "
            "output layer); use -ngl -1 for all of them",
            cli_hint="-ngl/--n-gpu-layers",
        )


def layer_count(info: GGUFInfo) -> int | None:
    blocks = info.metadata.get(f"{info.architecture}.block_count")
    return None if blocks is None else int(blocks)


def overlap_by_default(options: ModelSetOptions, source_models: list[LoadedModel]) -> bool:
    """Whether different models' decodes run in threads at the same time: where layers
    are offloaded to a GPU or to RPC workers they can overlap; on this machine's CPU
    they would compete for the same cores. Never where two sources share an RPC worker
    (see check_overlap). `source_models`: the model of each source context."""
    if options.n_gpu_layers == options.reference_gpu_layers == 0 or shared_worker_device(
        source_models
    ):
        return False
    remote = any(m.placement.remote for m in source_models)
    return remote or backend.supports_gpu_offload()


def shared_worker_device(source_models: list[LoadedModel]) -> str | None:
    """An RPC worker device that two source contexts would both compute on, if any.
    llama.cpp's RPC client keeps per-device state (the id of the last graph sent, to
    resend only "recompute") that two threads race on: overlapped, one context can
    recompute the other's graph. Measured here: a pair split over two shared workers
    gave other tokens than on this machine when overlapped, the same ones when not."""
    seen: dict[int, int] = {}
    for index, model in enumerate(source_models):
        for device in model.worker_devices:
            first = seen.setdefault(device.handle, index)
            if first != index:
                return f"{device.name} ({device.description})"
    return None


def check_overlap(source_models: list[LoadedModel]) -> None:
    """Raises BadParameterError when overlapping these sources' decodes would race."""
    shared = shared_worker_device(source_models)
    if shared:
        raise BadParameterError(
            f"two models share the RPC worker device {shared}: llama.cpp's RPC client "
            "cannot run two decodes on one worker device at once; leave overlap_decodes "
            "at its default or give each model its own workers"
        )


def check_vocab_sizes(model: LoadedModel, reference: LoadedModel) -> None:
    """What llama.cpp loaded must agree too (the headers were compared already)."""
    if model.n_vocab != reference.n_vocab:
        raise IncompatibleModelsError(
            f"llama.cpp sees {model.n_vocab} tokens in {model.path.name} "
            f"but {reference.n_vocab} in {reference.path.name}"
        )


def _context_size(requested: int, aligned: LoadedModel, reference: LoadedModel) -> int:
    limit = min(aligned.train_context_length(), reference.train_context_length())
    return limit if requested <= 0 else min(requested, limit)


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    return Path(a).is_file() and Path(b).is_file() and os.path.samefile(a, b)


def _read_pair_headers(
    aligned: str | os.PathLike[str] | None,
    reference: str | os.PathLike[str],
    lora: str | os.PathLike[str] | None,
) -> tuple[GGUFInfo, GGUFInfo, GGUFInfo | None]:
    if (aligned is None) == (lora is None):
        raise BadParameterError(
            "give the aligned side either as a model file or as a LoRA adapter of the "
            "reference, not both and not neither",
            cli_hint="-m/--aligned or --lora",
        )
    reference_info = read_gguf(reference)
    if lora is not None:
        return reference_info, reference_info, read_lora(lora, reference_info)
    aligned_info = reference_info if _same_file(aligned, reference) else read_gguf(aligned)
    check_same_tokenizer(aligned_info, reference_info)
    return aligned_info, reference_info, None


def read_lora(path: str | os.PathLike[str], base: GGUFInfo) -> GGUFInfo:
    """The header of a LoRA adapter GGUF, checked to be a LoRA for the base's architecture."""
    adapter_info = read_gguf(path, expect="adapter")
    adapter_type = adapter_info.metadata.get("adapter.type")
    if adapter_type != "lora":
        raise ModelFileError(f"{adapter_info.path}: adapter type {adapter_type!r}, not 'lora'")
    if adapter_info.architecture != base.architecture:
        raise IncompatibleModelsError(
            f"{adapter_info.path.name} is a LoRA for {adapter_info.architecture!r} models but "
            f"{base.path.name} is {base.architecture!r}"
        )
    return adapter_info


def load_models(
    aligned: str | os.PathLike[str] | None,
    reference: str | os.PathLike[str],
    options: ModelSetOptions,
    *,
    lora: str | os.PathLike[str] | None = None,
    lora_scale: float = 1.0,
    draft: str | os.PathLike[str] | None = None,
) -> LoadedPair:
    """Validates, compares and loads both models; raises DeraError with one line on failure.

    With `lora`, the aligned model is the reference plus that adapter: the weights are
    loaded once and the adapter is attached only to the aligned context. With `draft`,
    a third model (checked to share the tokenizer) is loaded with its own context.
    """
    llama_log.install(options.verbose)
    if options.n_threads > backend.MAX_THREADS:
        warnings.warn(
            f"{options.n_threads} threads is far more than this machine has; "
            f"using {backend.MAX_THREADS}",
            stacklevel=3,
        )
    if not math.isfinite(lora_scale):
        raise BadParameterError(f"the LoRA scale must be finite, got {lora_scale!r}")
    aligned_info, reference_info, adapter_info = _read_pair_headers(aligned, reference, lora)
    draft_info = None
    if draft is not None:
        draft_info = read_gguf(draft)
        check_same_tokenizer(draft_info, reference_info)
    # The token lists served the comparison; freeing them (and the parser's garbage)
    # before the weights load keeps ~15 MiB per 50k-token vocabulary out of peak RSS.
    for info in (aligned_info, reference_info, draft_info):
        if info is not None:
            info.tokens, info.token_types = [], None
    gc.collect()
    infos = [i for i in (aligned_info, reference_info, draft_info) if i is not None]
    check_gpu_layers(options, infos, options.rpc.any_remote)
    notes: list[str] = []
    load_options = load_options_for(options, notes)
    if llama_log.is_verbose():
        for note in notes:
            print(f"dera-local: {note}", file=sys.stderr)

    where = options.rpc
    opened: list = []
    reference_options = replace(load_options, n_gpu_layers=options.reference_gpu_layers)
    try:
        reference_model = LoadedModel(
            Path(reference_info.path), reference_options, where.of("reference")
        )
        opened.append(reference_model)
        if (
            aligned_info is reference_info
            and where.of("aligned") == where.of("reference")
            and reference_options == load_options
        ):
            # One copy of the weights serves both contexts (a LoRA pair: the adapter
            # applies in the aligned context only). Placed apart, each side gets a copy.
            aligned_model = reference_model
        else:
            aligned_model = LoadedModel(Path(aligned_info.path), load_options, where.of("aligned"))
            opened.append(aligned_model)
        check_vocab_sizes(aligned_model, reference_model)
        n_ctx = _context_size(options.n_ctx, aligned_model, reference_model)
        context_options = ContextOptions(
            n_ctx,
            options.n_batch,
            options.n_threads,
            options.flash_attn,
            n_outputs_max=options.max_rows,
        )
        aligned_ctx = Context(aligned_model, context_options)
        opened.append(aligned_ctx)
        reference_ctx = Context(reference_model, context_options)
        opened.append(reference_ctx)
        if adapter_info is not None:
            adapter = LoraAdapter(aligned_model, adapter_info.path)
            aligned_ctx.attach_lora(adapter, lora_scale)
        draft_model = draft_ctx = None
        if draft_info is not None:
            draft_model = LoadedModel(Path(draft_info.path), load_options, where.of("draft"))
            opened.append(draft_model)
            check_vocab_sizes(draft_model, reference_model)
            draft_options = ContextOptions(
                n_ctx, options.n_batch, options.n_threads, options.flash_attn, n_outputs_max=1
            )
            draft_ctx = Context(draft_model, draft_options)
            opened.append(draft_ctx)
    except BaseException:
        for resource in reversed(opened):
            resource.close()
        raise
    return LoadedPair(
        aligned_info,
        reference_info,
        aligned_model,
        reference_model,
        aligned_ctx,
        reference_ctx,
        load_options,
        adapter_info,
        lora_scale if adapter_info is not None else None,
        draft_model,
        draft_ctx,
    )
