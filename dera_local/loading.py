"""Loads a DeRa pair: validates both GGUF files, checks they share a tokenizer, then loads
each model with its own llama.cpp context."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import backend, llama_log
from .backend import Context, ContextOptions, LoadedModel, LoadOptions
from .errors import IncompatibleModelsError
from .gguf_inspect import GGUFInfo, check_same_tokenizer, read_gguf

DEFAULT_N_CTX = 4096


@dataclass(frozen=True)
class PairOptions:
    """Resource settings shared by both models (llama.cpp's -c, -b, -t, -ngl)."""

    n_ctx: int = DEFAULT_N_CTX  # 0 = the models' training context
    n_batch: int = 512
    n_threads: int = 0  # 0 = all cores (up to 16)
    n_gpu_layers: int | None = None  # None = all layers when the build can offload, else 0
    flash_attn: str = "off"  # "on", "off" or "auto" (see backend.ContextOptions)
    verbose: bool = False


@dataclass
class LoadedPair:
    aligned_info: GGUFInfo
    reference_info: GGUFInfo
    aligned_model: LoadedModel
    reference_model: LoadedModel
    aligned_ctx: Context
    reference_ctx: Context
    load_options: LoadOptions
    notes: list[str] = field(default_factory=list)

    def close(self) -> None:
        for resource in (
            self.aligned_ctx,
            self.reference_ctx,
            self.aligned_model,
            self.reference_model,
        ):
            resource.close()


def _load_options(options: PairOptions, notes: list[str]) -> LoadOptions:
    n_gpu_layers = options.n_gpu_layers
    if n_gpu_layers is None:
        n_gpu_layers = -1 if backend.supports_gpu_offload() else 0
    use_extra_bufts = True
    if backend.built_with_amx():
        use_extra_bufts = False
        notes.append(
            "ggml was built with AMX: weights load without extra buffer types "
            "(use_extra_bufts=False) to avoid the AMX crash on quantized batches; "
            "see the README for faster build flags"
        )
    return LoadOptions(n_gpu_layers=n_gpu_layers, use_extra_bufts=use_extra_bufts)


def _context_size(requested: int, aligned: LoadedModel, reference: LoadedModel) -> int:
    limit = min(aligned.train_context_length(), reference.train_context_length())
    return limit if requested <= 0 else min(requested, limit)


def load_models(
    aligned: str | os.PathLike[str], reference: str | os.PathLike[str], options: PairOptions
) -> LoadedPair:
    """Validates, compares and loads both models; raises DeraError with one line on failure."""
    llama_log.install(options.verbose)
    aligned_info = read_gguf(aligned)
    same_file = Path(reference).exists() and Path(aligned).exists() and \
        os.path.samefile(aligned, reference)
    reference_info = aligned_info if same_file else read_gguf(reference)
    check_same_tokenizer(aligned_info, reference_info)
    notes: list[str] = []
    load_options = _load_options(options, notes)
    if llama_log.is_verbose():
        for note in notes:
            print(f"dera-local: {note}", file=sys.stderr)

    opened: list = []
    try:
        aligned_model = LoadedModel(Path(aligned_info.path), load_options)
        opened.append(aligned_model)
        reference_model = LoadedModel(Path(reference_info.path), load_options)
        opened.append(reference_model)
        if aligned_model.n_vocab != reference_model.n_vocab:
            raise IncompatibleModelsError(
                f"llama.cpp sees {aligned_model.n_vocab} tokens in {aligned_info.path.name} "
                f"but {reference_model.n_vocab} in {reference_info.path.name}"
            )
        n_ctx = _context_size(options.n_ctx, aligned_model, reference_model)
        context_options = ContextOptions(
            n_ctx, options.n_batch, options.n_threads, options.flash_attn
        )
        aligned_ctx = Context(aligned_model, context_options)
        opened.append(aligned_ctx)
        reference_ctx = Context(reference_model, context_options)
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
        notes,
    )
