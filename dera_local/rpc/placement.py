"""Where a model's layers go: this machine, or llama.cpp RPC workers (plus this machine's
GPUs, as llama.cpp's own --rpc does), and what llama.cpp then did with them."""

from __future__ import annotations

import collections
import ctypes
import re
from dataclasses import dataclass, field

from ..errors import BadParameterError
from ..llama import devices as ggml_devices
from . import endpoints as rpc_endpoints
from .faults import RemoteCalls

DEFAULT_RPC_TIMEOUT = 120.0  # seconds one remote call may go without an answer
HELLO_TIMEOUT = 10.0

# Workers this process holds a connection to (models loaded on them). A worker serves
# one host at a time, so it cannot answer a second handshake from us while we hold it.
_connected: collections.Counter[str] = collections.Counter()


@dataclass(frozen=True)
class Placement:
    """One model's RPC workers (empty: this machine only) and how long a remote call
    may go without an answer."""

    endpoints: tuple[str, ...] = ()
    timeout: float = DEFAULT_RPC_TIMEOUT

    @property
    def remote(self) -> bool:
        return bool(self.endpoints)

    def describe(self) -> str:
        return ", ".join(self.endpoints) if self.endpoints else "this machine"


@dataclass(frozen=True)
class RpcPlacement:
    """The workers of each model of a pair: `every` for each model without its own list
    (None = `every`; an empty tuple = this machine)."""

    every: tuple[str, ...] = ()
    aligned: tuple[str, ...] | None = None
    reference: tuple[str, ...] | None = None
    draft: tuple[str, ...] | None = None
    timeout: float = DEFAULT_RPC_TIMEOUT

    @classmethod
    def parse(
        cls,
        rpc=None,
        aligned=None,
        reference=None,
        draft=None,
        timeout: float = DEFAULT_RPC_TIMEOUT,
    ) -> RpcPlacement:
        """From endpoint strings or lists (see rpc_endpoints.parse_endpoints)."""
        if not timeout > 0:
            raise BadParameterError(f"the RPC timeout must be positive, got {timeout!r}")

        def one(value, what):
            return None if value is None else rpc_endpoints.parse_endpoints(value, what)

        return cls(
            rpc_endpoints.parse_endpoints(rpc, "--rpc"),
            one(aligned, "--rpc-aligned"),
            one(reference, "--rpc-reference"),
            one(draft, "--rpc-draft"),
            timeout,
        )

    def of(self, role: str) -> Placement:
        """A model's placement by role: aligned, reference or draft."""
        own = getattr(self, role)
        return Placement(self.every if own is None else own, self.timeout)

    @property
    def any_remote(self) -> bool:
        return any(self.of(r).remote for r in ("aligned", "reference", "draft"))


@dataclass
class Offload:
    """What a model load hands llama.cpp: the device list (None: llama.cpp's default)
    and the calls wrapper for remote models (None: plain calls on this thread)."""

    placement: Placement
    devices: list[ggml_devices.Device] | None = None
    calls: RemoteCalls | None = None
    worker_devices: list[ggml_devices.Device] = field(default_factory=list)
    _array: object = field(default=None, repr=False)

    def devices_pointer(self):
        """A NULL-terminated ggml_backend_dev_t array for llama_model_params.devices."""
        if self.devices is None:
            return None
        handles = [d.handle for d in self.devices] + [None]
        self._array = (ctypes.c_void_p * len(handles))(*handles)
        return ctypes.cast(self._array, ctypes.c_void_p)


def prepare(placement: Placement) -> Offload:
    """Checks every worker of `placement` answers in a protocol this llama.cpp speaks
    (WorkerError naming it otherwise), then registers them with ggml: their devices
    first, then this machine's GPUs, as llama.cpp orders them."""
    if not placement.remote:
        return Offload(placement)
    for endpoint in placement.endpoints:
        if not _connected[endpoint]:
            rpc_endpoints.check_worker(endpoint, min(HELLO_TIMEOUT, placement.timeout))
    calls = RemoteCalls(placement.endpoints, placement.timeout)
    workers: list[ggml_devices.Device] = []
    for endpoint in placement.endpoints:
        workers += calls(ggml_devices.rpc_devices, endpoint)
    return Offload(placement, workers + list(ggml_devices.offload_devices()), calls, workers)


def connected(placement: Placement) -> None:
    for endpoint in placement.endpoints:
        _connected[endpoint] += 1


def disconnected(placement: Placement) -> None:
    for endpoint in placement.endpoints:
        _connected[endpoint] -= 1


# llama.cpp's load log: "load_tensors: layer  12 assigned to device RPC0, is_swa = 0"
# (debug level) and "load_tensors: RPC0[127.0.0.1:50052] model buffer size = 42.0 MiB".
_LAYER_LINE = re.compile(r"layer\s+(\d+) assigned to device (\S+?),")
_BUFFER_LINE = re.compile(r"load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB")


@dataclass
class LayerMap:
    """Which device llama.cpp put each layer on (the last entry is the output layer) and
    the MiB of weights in each buffer it made."""

    devices: list[str] = field(default_factory=list)
    buffers_mib: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        """e.g. 'RPC0 16 layers, RPC1 15 + output; RPC0[...] 120.3 MiB, CPU 24.0 MiB'."""
        if not self.devices:
            return "no layer map (llama.cpp did not log one)"
        repeating = collections.Counter(self.devices[:-1])
        output = self.devices[-1]
        parts = [
            f"{name} {n} layers" + (" + output" if name == output else "")
            for name, n in repeating.items()
        ]
        if output not in repeating:
            parts.append(f"{output} output")
        sizes = ", ".join(
            f"{name} {mib:.1f} MiB" for name, mib in self.buffers_mib.items() if mib > 0
        )  # a plan (no_alloc) makes empty buffers
        return "; ".join(filter(None, (", ".join(parts), sizes)))


def layer_map_from(lines: list[str]) -> LayerMap:
    found: dict[int, str] = {}
    buffers: dict[str, float] = {}
    for line in lines:
        match = _LAYER_LINE.search(line)
        if match:
            found[int(match[1])] = match[2]
        match = _BUFFER_LINE.search(line)
        if match:
            buffers[match[1]] = buffers.get(match[1], 0.0) + float(match[2])
    return LayerMap([found[i] for i in sorted(found)], buffers)


__all__ = [
    "DEFAULT_RPC_TIMEOUT",
    "LayerMap",
    "Offload",
    "Placement",
    "RpcPlacement",
    "connected",
    "disconnected",
    "layer_map_from",
    "prepare",
]
