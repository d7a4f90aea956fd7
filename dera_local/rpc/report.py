"""What `info` says about RPC placement: each worker's protocol and free memory, and the
layers llama.cpp would put on each device, planned without loading any weights."""

from __future__ import annotations

from pathlib import Path

from ..llama import log as llama_log
from ..llama.backend import LoadedModel, LoadOptions
from .endpoints import hello
from .placement import LayerMap, Placement, prepare

MIB = 2**20


def worker_lines(endpoints: list[str], timeout: float) -> list[str]:
    """One line per worker: its protocol version and each device's free/total memory."""
    lines = []
    for endpoint in endpoints:
        version = ".".join(map(str, hello(endpoint, timeout)))
        offload = prepare(Placement((endpoint,), timeout))
        memory = [
            f"{d.name} {free // MIB} MiB free of {total // MIB} MiB"
            for d in offload.worker_devices
            for free, total in [offload.calls(d.memory)]
        ]
        offload.calls.close()
        lines.append(f"worker {endpoint}: protocol {version}; " + ", ".join(memory))
    return lines


def layer_plan(path: str | Path, where: Placement, n_gpu_layers: int | None = None) -> LayerMap:
    """Where llama.cpp puts each layer of the model at `path` (and the MiB per buffer),
    from a load that reads only the metadata (llama.cpp's no_alloc)."""
    model = LoadedModel(Path(path), LoadOptions(n_gpu_layers, no_alloc=True), where)
    try:
        return model.layers
    finally:
        model.close()


def placement_lines(models: list[tuple[str, str, Placement]]) -> list[str]:
    """For (role, model path, placement) triples: the workers, then each model's plan."""
    llama_log.install()
    endpoints = list(dict.fromkeys(e for _, _, where in models for e in where.endpoints))
    if not endpoints:
        return []
    timeout = min(where.timeout for _, _, where in models)
    lines = ["RPC workers:"] + [f"  {line}" for line in worker_lines(endpoints, timeout)]
    lines.append("placement (llama.cpp's split, planned from the metadata alone):")
    for role, path, where in models:
        if where.remote:
            lines.append(f"  {role}: {layer_plan(path, where).describe()}")
        else:
            lines.append(f"  {role}: this machine")
    return lines
