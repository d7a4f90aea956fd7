"""Thin, typed wrappers over llama.cpp's C API (through llama-cpp-python's ctypes bindings):
one loaded model, its LoRA adapters, and facts about the llama.cpp build (its
contexts: context.py).

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

from ..errors import BadParameterError, ModelFileError
from ..rpc import faults as rpc_faults
from ..rpc import placement
from ..rpc.placement import LayerMap, Placement
from . import devices as ggml_devices
from . import log as llama_log


@cache
def _init_backend() -> None:
    llama_log.take_over()
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
            if remote_lost(self.calls):
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

    def kv_width(self) -> int:
        """Elements of one token's keys in one layer's KV cache (n_head_kv x key length)."""
        heads = int(llama_cpp.llama_model_n_head_kv(self.ptr))
        arch = self.metadata("general.architecture")
        key_length = self.metadata(f"{arch}.attention.key_length") if arch else None
        if key_length:
            return heads * int(key_length)
        return heads * (
            int(llama_cpp.llama_model_n_embd(self.ptr))
            // int(llama_cpp.llama_model_n_head(self.ptr))
        )

    def metadata(self, key: str) -> str | None:
        buffer = ctypes.create_string_buffer(128)
        n = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buffer, len(buffer))
        return buffer.value.decode("utf-8", errors="replace") if n >= 0 else None

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


def remote_lost(calls: rpc_faults.RemoteCalls | None) -> bool:
    """Whether calls through these RPC workers can no longer be answered."""
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
