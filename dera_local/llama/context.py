"""One llama.cpp context: a KV cache with its sequences, decoding batches of tokens
(`TokenBatch`) and giving each output row's logits by address, with a lost RPC worker
or a full cache as one clear error."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import llama_cpp

from ..errors import BadParameterError, ContextFullError, ModelFileError, RuntimeFailure
from ..rpc import faults as rpc_faults
from . import devices as ggml_devices
from . import log as llama_log
from .backend import MAX_THREADS, LoadedModel, LoraAdapter, default_threads, remote_lost

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


KV_PADDING = 256  # llama.cpp rounds a context's cache up to a multiple of this


def check_kv_fits_devices(model: LoadedModel, n_ctx: int) -> None:
    """Refuses, in one line, a context whose KV cache llama.cpp would put on a local
    device that cannot hold one layer of it in a buffer: llama.cpp aborts the process
    there (GGML_ABORT "pre-allocated tensor ... cannot run the operation", found on
    Vulkan with a large -c). Each layer's keys and values sit on that layer's device."""
    names = {name for name in model.layers.devices[:-1] if name != "CPU"}  # [-1]: output
    if not names or not n_ctx:
        return
    elements = -(-n_ctx // KV_PADDING) * KV_PADDING * model.kv_width()
    for device in ggml_devices.local_devices():
        if device.name in names and not ggml_devices.holds_tensor(device, elements):
            mib = elements * 2 / 2**20  # f16 keys
            raise BadParameterError(
                f"a context of {n_ctx} tokens needs {mib:.0f} MiB of keys per layer in one "
                f"buffer, more than {device.name} ({device.description}) can hold; lower "
                "-c (a server's -c is shared by its --parallel slots) or offload fewer "
                "layers (-ngl)",
                cli_hint="-c",
            )


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
        # Never llama.cpp's experimental backend sampling: a sampler chain given here
        # (or by llama_set_sampler, which dera-local never calls) samples inside the
        # decode, on the device, and the host-side hook that mixes the two models'
        # logits would never run. The defaults are already none; set so a changed
        # default cannot turn it on.
        params.samplers = None
        params.n_samplers = 0
        # A context of a model on RPC workers makes its remote calls in a thread of its
        # own, so that two contexts' decodes overlap (see source_decodes).
        self.calls = None
        if model.calls is not None:
            self.calls = rpc_faults.RemoteCalls(model.placement.endpoints, model.calls.timeout)
        check_kv_fits_devices(model, options.n_ctx)
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
            if not remote_lost(self.calls):
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
