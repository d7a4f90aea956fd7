"""Thin, typed wrappers over llama.cpp's C API (through llama-cpp-python's ctypes bindings):
one loaded model, one context with its KV cache, and facts about the llama.cpp build.

The high-level `Llama` class is deliberately not used: it owns one model per object and
its per-token Python logits-processor path is what dera-local replaces.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import llama_cpp

from ..errors import BadParameterError, ContextFullError, ModelFileError, RuntimeFailure
from ..rpc import faults as rpc_faults
from ..rpc import placement
from ..rpc.placement import LayerMap, Placement
from . import devices as ggml_devices
from . import log as llama_log


@cache
def _init_backend() -> None:
    llama_cpp.llama_backend_init()


def system_info() -> str:
    """llama.cpp's own feature line (CPU ISA, GPU backends, ...)."""
    _init_backend()
    return llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip()


def built_with_amx() -> bool:
    """True when the loaded ggml has AMX kernels, which crash on quantized batches
    (llama.cpp issue #20824) unless weights skip the extra (repacked) buffer types."""
    return "AMX_INT8 = 1" in system_info()


def supports_gpu_offload() -> bool:
    """Whether this machine has a GPU llama.cpp can offload layers to. (Not
    llama_supports_gpu_offload: that is also true for any build with the RPC backend.)"""
    _init_backend()
    return bool(ggml_devices.offload_devices())


MAX_THREADS = max(64, 4 * (os.cpu_count() or 1))


def return_freed_memory() -> None:
    """Asks glibc to hand freed heap pages back to the system. After a model is freed,
    glibc keeps them for reuse, so loading and closing pairs in one process raised RSS
    from 75 to 206 MB over 30 cycles (not a leak: it returned to ~63 MB after a trim)."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return
    trim(0)


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 16))


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model: layers offloaded (-1 = all; None = all where there is a
    GPU or an RPC worker to take them, else none) and buffer types."""

    n_gpu_layers: int | None = 0
    use_extra_bufts: bool = True
    # Only plan: llama.cpp places every layer and sizes every buffer, loads no weights.
    no_alloc: bool = False


class LoadedModel:
    """One llama.cpp model and its vocabulary, on this machine or on RPC workers."""

    def __init__(self, path: Path, options: LoadOptions, where: Placement | None = None) -> None:
        _init_backend()
        where = where or Placement()
        if where.remote and options.n_gpu_layers == 0:
            raise BadParameterError(
                "no layers are offloaded, so the RPC workers would hold none of the model",
                cli_hint="drop -ngl 0 or --rpc",
            )
        offload = placement.prepare(where)
        self.placement = where
        self.calls = offload.calls  # None: this machine only, plain calls
        params = llama_cpp.llama_model_default_params()
        n_gpu_layers = options.n_gpu_layers
        if n_gpu_layers is None:
            n_gpu_layers = -1 if where.remote or supports_gpu_offload() else 0
        params.n_gpu_layers = n_gpu_layers if n_gpu_layers >= 0 else 999
        params.use_extra_bufts = options.use_extra_bufts
        params.no_alloc = options.no_alloc
        if options.no_alloc:
            params.load_mode = 0  # LLAMA_LOAD_MODE_NONE: llama.cpp plans only without mmap
        if offload.devices is not None:
            params.devices = offload.devices_pointer()
        if self.calls is not None:
            # Uploading weights to a worker can take minutes: each tensor loaded moves
            # the deadline of the remote call, so only a stalled upload times out.
            calls = self.calls
            self._on_progress = llama_cpp.llama_progress_callback(
                lambda fraction, data: calls.progress() or True
            )
            params.progress_callback = self._on_progress
        llama_log.recent_problem()  # forget older lines: only this load's matter below
        llama_log.start_load_capture()
        try:
            model = self._call(
                llama_cpp.llama_model_load_from_file, str(path).encode("utf-8"), params
            )
        finally:
            lines = llama_log.load_lines()
        if not model:
            reason = llama_log.recent_problem() or "llama.cpp could not load it"
            raise ModelFileError(f"{path}: {reason}")
        self.layers: LayerMap = placement.layer_map_from(lines)
        self.devices = offload.devices or []
        self.worker_devices = offload.worker_devices
        placement.connected(where)
        self.path = path
        self.ptr = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self._piece_buffer = ctypes.create_string_buffer(256)
        # Per-token answers memoized: the hot loop asks them once per generated token.
        self._pieces: dict[int, bytes] = {}
        self._end_of_generation: dict[int, bool] = {}

    def _call(self, function, *args):
        """A llama.cpp call that may talk to this model's workers (see rpc_faults)."""
        return function(*args) if self.calls is None else self.calls(function, *args)

    def close(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, None
            if _remote_lost(self.calls):
                return  # freeing would wait on a lost worker: the memory stays held
            self._call(llama_cpp.llama_model_free, ptr)
            placement.disconnected(self.placement)
            if self.calls is not None:
                self.calls.close()

    @property
    def can_drop_tail(self) -> bool:
        """Whether a sequence's last positions can be dropped from its cache (rolling back
        rejected drafts); recurrent and hybrid models keep only a running state."""
        return not (
            llama_cpp.llama_model_is_recurrent(self.ptr)
            or llama_cpp.llama_model_is_hybrid(self.ptr)
        )

    def train_context_length(self) -> int:
        return int(llama_cpp.llama_model_n_ctx_train(self.ptr))

    def chat_template(self) -> str | None:
        template = llama_cpp.llama_model_chat_template(self.ptr, None)
        return template.decode("utf-8") if template else None

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates, e.g. undecodable bytes Python kept
            raise BadParameterError(
                "the text is not valid UTF-8 (it has lone surrogates)"
            ) from None
        capacity = len(data) + 8
        while True:
            tokens = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(
                self.vocab, data, len(data), tokens, capacity, add_special, parse_special
            )
            if n >= 0:
                return list(tokens[:n])
            capacity = -n

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        """The bytes a token stands for; control tokens are empty unless `special`."""
        if not special:
            piece = self._pieces.get(token)
            if piece is None:
                piece = self._pieces[token] = self._token_to_piece(token, False)
            return piece
        return self._token_to_piece(token, True)

    def _token_to_piece(self, token: int, special: bool) -> bytes:
        n = llama_cpp.llama_token_to_piece(
            self.vocab, token, self._piece_buffer, len(self._piece_buffer), 0, special
        )
        if n < 0:
            self._piece_buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(
                self.vocab, token, self._piece_buffer, len(self._piece_buffer), 0, special
            )
        return self._piece_buffer.raw[:n]

    def is_end_of_generation(self, token: int) -> bool:
        known = self._end_of_generation.get(token)
        if known is None:
            known = self._end_of_generation[token] = bool(
                llama_cpp.llama_vocab_is_eog(self.vocab, token)
            )
        return known

    def special_token(self, name: str) -> int | None:
        """bos, eos or eot id, or None when the vocabulary has none."""
        token = getattr(llama_cpp, f"llama_vocab_{name}")(self.vocab)
        return None if token == llama_cpp.LLAMA_TOKEN_NULL else int(token)

    def token_text(self, token: int) -> str:
        return llama_cpp.llama_vocab_get_text(self.vocab, token).decode("utf-8", errors="replace")


FLASH_ATTN_TYPES = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


class TokenBatch:
    """A reusable llama_batch: one (token, position, sequence, wants logits) per entry."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.struct = llama_cpp.llama_batch_init(capacity, 0, 1)

    def fill(self, entries: list[tuple[int, int, int, bool]]) -> None:
        if len(entries) > self.capacity:
            raise RuntimeFailure(
                f"batch of {len(entries)} tokens exceeds its capacity {self.capacity}"
            )
        batch = self.struct
        for i, (token, position, sequence, wants_logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = position
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = sequence
            batch.logits[i] = wants_logits
        batch.n_tokens = len(entries)

    def close(self) -> None:
        if self.struct is not None:
            llama_cpp.llama_batch_free(self.struct)
            self.struct = None


def _decode_and_wait(ctx, batch) -> int:
    """llama_decode, then the wait for its results. With RPC devices llama_decode may
    return before the workers answer; the wait would otherwise happen in whatever reads
    the logits next, outside the deadline of the remote call."""
    status = llama_cpp.llama_decode(ctx, batch)
    llama_cpp.llama_synchronize(ctx)
    return status


def _remote_lost(calls: rpc_faults.RemoteCalls | None) -> bool:
    return calls is not None and rpc_faults.fault() is not None


class LoraAdapter:
    """A LoRA adapter loaded for one model (on the model's devices); llama.cpp frees it
    with the model."""

    def __init__(self, model: LoadedModel, path: Path) -> None:
        llama_log.recent_problem()
        adapter = model._call(
            llama_cpp.llama_adapter_lora_init, model.ptr, str(path).encode("utf-8")
        )
        if not adapter:
            reason = llama_log.recent_problem() or "llama.cpp could not load it"
            raise ModelFileError(f"{path}: {reason}")
        self.path = path
        self.ptr = adapter


@dataclass(frozen=True)
class ContextOptions:
    n_ctx: int = 4096
    n_batch: int = 512
    n_threads: int = 0  # 0 = default_threads()
    # Off by default, like llama-cpp-python's Llama: flash attention changes logits by
    # ~1e-3, enough to flip greedy near-ties against the single-model runs users compare to.
    flash_attn: str = "off"
    # Parallel sequences (lam sweeps). They share one unified KV buffer, so a prompt
    # copied to every sequence with copy_sequence() is stored once.
    n_seq_max: int = 1
    # Logits rows one decode may return (0 = n_batch). Generation needs 1 per sequence;
    # llama.cpp sizes its compute buffer by it (99 -> 46 MiB for SmolLM2 at n_batch 512).
    n_outputs_max: int = 0


class Context:
    """One llama.cpp context of a loaded model: its KV cache holds sequence 0 (and, for
    n_seq_max > 1, further sequences decoded together with decode_batch)."""

    def __init__(self, model: LoadedModel, options: ContextOptions) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = options.n_ctx
        params.n_batch = options.n_batch
        params.n_ubatch = options.n_batch
        params.n_seq_max = options.n_seq_max
        params.n_outputs_max = options.n_outputs_max
        params.kv_unified = True
        # llama.cpp crashes far above any real core count (load_models warns about it).
        threads = min(options.n_threads or default_threads(), MAX_THREADS)
        params.n_threads = threads
        params.n_threads_batch = threads
        params.no_perf = True
        params.flash_attn_type = FLASH_ATTN_TYPES[options.flash_attn]
        # A context of a model on RPC workers makes its remote calls in a thread of its
        # own, so that two contexts' decodes overlap (see source_decodes).
        self.calls = None
        if model.calls is not None:
            self.calls = rpc_faults.RemoteCalls(model.placement.endpoints, model.calls.timeout)
        ctx = self._call(llama_cpp.llama_init_from_model, model.ptr, params)
        if not ctx:
            reason = llama_log.recent_problem() or "out of memory?"
            raise RuntimeFailure(
                f"{model.path}: could not create a context of {options.n_ctx} tokens ({reason})",
                cli_hint="try a smaller -c",
            )
        self.ptr = ctx
        self.model = model
        self.n_ctx = int(llama_cpp.llama_n_ctx(ctx))
        self.n_batch = int(llama_cpp.llama_n_batch(ctx))  # llama.cpp caps it at n_ctx
        self.n_outputs_max = options.n_outputs_max or self.n_batch
        self.n_seq_max = options.n_seq_max
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.n_threads = threads
        self.flash_attn = options.flash_attn
        self.adapter: LoraAdapter | None = None

    def _call(self, function, *args):
        """A llama.cpp call that may talk to the model's workers (see rpc_faults)."""
        return function(*args) if self.calls is None else self.calls(function, *args)

    def close(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, None
            if not _remote_lost(self.calls):
                self._call(llama_cpp.llama_free, ptr)
                if self.calls is not None:
                    self.calls.close()

    def attach_lora(self, adapter: LoraAdapter, scale: float) -> None:
        """Applies the adapter in this context only (other contexts of the model keep the
        plain weights)."""
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter.ptr)
        scales = (ctypes.c_float * 1)(scale)
        if llama_cpp.llama_set_adapters_lora(self.ptr, adapters, 1, scales) != 0:
            raise ModelFileError(f"{adapter.path}: llama.cpp could not attach the adapter")
        self.adapter = adapter  # keep it referenced as long as the context uses it

    def n_cached(self) -> int:
        """How many positions of sequence 0 the KV cache really holds."""
        return int(llama_cpp.llama_memory_seq_pos_max(self.memory, 0)) + 1

    def truncate(self, n_keep: int) -> None:
        """Drops every cached position from n_keep on; clears all if the model cannot."""
        if not llama_cpp.llama_memory_seq_rm(self.memory, 0, n_keep, -1):
            self.clear()

    def decode(self, tokens: list[int]) -> None:
        """Feeds tokens after the cached ones, in n_batch chunks; logits of the last remain."""
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            array = (llama_cpp.llama_token * len(chunk))(*chunk)
            # `array` stays referenced until llama_decode returns: the batch only points at it.
            status = self._decode(llama_cpp.llama_batch_get_one(array, len(chunk)))
            self._check_decode(status)

    def decode_batch(self, batch: TokenBatch) -> None:
        """Decodes a prepared multi-sequence batch (see TokenBatch)."""
        self._check_decode(self._decode(batch.struct))

    def _decode(self, batch) -> int:
        if self.calls is None:
            return llama_cpp.llama_decode(self.ptr, batch)
        return self.calls(_decode_and_wait, self.ptr, batch)

    def _check_decode(self, status: int) -> None:
        # llama_decode: 0 = done, 1 = no KV slot for the batch, 2 = aborted, < 0 = error.
        if status == 1:
            raise ContextFullError(
                f"{self.model.path.name}: the context's KV cache is full", cli_hint="raise -c"
            )
        if status != 0:
            raise RuntimeFailure(
                f"{self.model.path.name}: llama_decode failed with status {status}"
            )

    def logits_address(self, index: int) -> int:
        """Address of the float32[n_vocab] logits of output `index` of the last batch."""
        pointer = llama_cpp.llama_get_logits_ith(self.ptr, index)
        return ctypes.cast(pointer, ctypes.c_void_p).value

    def remove_positions(self, seq_id: int, start: int) -> bool:
        """Drops sequence `seq_id`'s cached positions from `start` on; False when the
        model cannot drop a partial tail (then nothing was removed)."""
        return bool(llama_cpp.llama_memory_seq_rm(self.memory, seq_id, start, -1))

    def copy_sequence(self, source: int, target: int, start: int = -1, end: int = -1) -> None:
        """Makes `target` share `source`'s cached positions [start, end) (default: all);
        no copy in a unified KV cache."""
        llama_cpp.llama_memory_seq_cp(self.memory, source, target, start, end)

    def clear(self) -> None:
        # Zeroing the cache's buffers is a remote call when they live on a worker.
        self._call(llama_cpp.llama_memory_clear, self.memory, True)
