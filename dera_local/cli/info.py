"""`dera-local info`: what each model is, whether they can pair, and how dera-local will
run them (mixing path, llama.cpp build features)."""

from __future__ import annotations

from pathlib import Path

import click

from ..engine.mixing import LogitMixer
from ..errors import DeraError
from ..llama import backend
from ..llama import devices as ggml_devices
from ..llama import log as llama_log
from ..llama.backend import LoadedModel, LoadOptions
from ..llama.gguf_inspect import GGUFInfo, check_same_tokenizer, read_gguf
from ..model_sets.mixture import parse_mix
from ..rpc.endpoints import hello
from ..rpc.placement import LayerMap, Placement, RpcPlacement, prepare
from ..sources.catalog import find_pair
from ..sources.default_pair import built_in_calibration, calibration_lines, is_built_in_adapter
from ..sources.resolve import model_path, resolve_models
from ..speculation.probe import measure_draft_costs
from .open_models import open_model_set, speculation_from
from .options import (
    draft_options,
    hook_option,
    model_source_options,
    n_gpu_layers_option,
    rpc_options,
)


def _describe(role: str, info: GGUFInfo) -> list[str]:
    return [
        f"{role}: {info.path}",
        f"  name: {info.name}",
        f"  architecture: {info.architecture}",
        f"  quantization: {info.quantization}",
        f"  file size: {info.file_size / 2**20:.1f} MiB, {info.n_tensors} tensors",
        f"  vocabulary: {info.n_vocab} tokens, special ids {info.special_ids}",
        f"  training context: {info.context_length}",
        f"  chat template: {'yes' if info.chat_template else 'none (ChatML is used)'}",
    ]


def _info_sources(
    aligned: str | None, reference: str | None, lora: str | None, pair: str | None, quant: str
) -> tuple[str | None, str | None, str | None]:
    """Like the other commands (paths, owner/repo:file specs, --pair, the demo pair), but
    half a pair is fine: info describes whatever it is given."""
    if pair:
        return resolve_models(None, None, None, pair, quant)
    if not (aligned or reference or lora):
        try:
            return resolve_models(None, None, None)
        except DeraError:  # no demo pair installed: show the build facts only
            return None, None, None
    return tuple(model_path(spec) if spec else None for spec in (aligned, reference, lora))


def _mixture_lines(mix: str | None, proxy_base: str | None, reference) -> tuple[list, object]:
    """Lines for the models of --mix or --proxy-base, and the first incompatibility."""
    lines: list[str] = []
    sources = []
    if mix is not None:
        for index, term in enumerate(parse_mix(mix)):
            sources.append((f"term {index} (weight {term.weight:g})", term.source.model))
            if term.source.lora:
                sources.append(("  its LoRA adapter", term.source.lora))
    if proxy_base is not None:
        sources.append(("proxy base (the model steered)", proxy_base))
    first = reference
    for role, spec in sources:
        expect = "adapter" if role.strip().startswith("its LoRA") else "model"
        info = read_gguf(model_path(spec), expect=expect)
        lines += _describe(role, info) if expect == "model" else [f"{role}: {info.path}"]
        if expect != "model":
            continue
        if first is None:
            first = info
            continue
        try:
            check_same_tokenizer(
                first,
                info,
                (first.path.name, info.path.name),
                "mixed models must share one tokenizer",
            )
        except DeraError as exc:
            lines.append("compatibility: INCOMPATIBLE")
            return lines, exc
    if sources:
        lines.append("compatibility: OK, one tokenizer across the mixture")
    return lines, None


def _placed_models(
    aligned, reference, lora, draft_model, mix, proxy_base, where: RpcPlacement
) -> list[tuple[str, str, Placement]]:
    """(role, model path, placement) for every model the flags name."""
    if mix is not None:
        return [
            (
                f"term {index} ({term.source.label})",
                model_path(term.source.model),
                Placement(
                    where.every if term.source.rpc is None else term.source.rpc, where.timeout
                ),
            )
            for index, term in enumerate(parse_mix(mix))
        ]
    models = []
    if proxy_base is not None:
        models.append(("proxy base", model_path(proxy_base), Placement(where.every, where.timeout)))
    if aligned and not lora:
        models.append(("aligned", aligned, where.of("aligned")))
    if reference:
        role = "reference (with the LoRA: the aligned model too)" if lora else "reference"
        models.append((role, reference, where.of("reference")))
    if draft_model:
        models.append(("draft", model_path(draft_model), where.of("draft")))
    return models


@click.command()
@model_source_options
@draft_options
@hook_option
@rpc_options
@n_gpu_layers_option
@click.option(
    "--measure-speculation",
    is_flag=True,
    help="Load the models and time decode steps of 1 to 9 rows here (a few seconds), "
    "then say whether speculative decoding can pay on this machine, and from what "
    "acceptance.",
)
def info(
    aligned: str | None,
    reference: str | None,
    lora: str | None,
    pair: str | None,
    quant: str,
    draft_model: str | None,
    draft_max: int,
    draft_min: int,
    draft_fixed: bool,
    hook: str | None,
    proxy_base: str | None,
    mix: str | None,
    rpc: str | None,
    rpc_aligned: str | None,
    rpc_reference: str | None,
    rpc_draft: str | None,
    rpc_timeout: float,
    n_gpu_layers: int | None,
    measure_speculation: bool,
) -> None:
    """Show both models, the compatibility verdict, the mixing path and llama.cpp's build.

    With no model flags, shows the built-in demo pair when it is installed; with --mix,
    every model of the mixture; with --proxy-base, the steered model too. With --rpc
    (or the per-model --rpc-* flags): each worker's protocol and free memory, and the
    layers llama.cpp would put on each device; likewise on a GPU build, with each local
    device's free memory. With --measure-speculation: what a
    verification of k drafts costs here, and what it can gain."""
    import llama_cpp

    flags = dict(aligned=aligned, reference=reference, lora=lora, pair=pair, quant=quant)
    if mix is not None:
        aligned = reference = lora = None
    else:
        aligned, reference, lora = _info_sources(aligned, reference, lora, pair, quant)
    catalog_lines = []
    if pair:
        entry = find_pair(pair)
        kind = "exact" if entry.exact else "approximate"
        catalog_lines = [
            f"catalog pair {pair}: {kind}; {entry.strength_note()}",
            f"  {entry.checked_note()}",
        ]
    mixer = LogitMixer(hook)
    lines = [
        f"mixing hook: {mixer.describe()}",
        f"llama-cpp-python: {llama_cpp.__version__}",
        f"llama.cpp build: {backend.system_info()}",
        f"GPU offload: {'yes' if backend.supports_gpu_offload() else 'no (CPU build)'}",
    ]
    if backend.built_with_amx():
        lines.append(
            "AMX: built in; weights load without extra buffer types "
            "(use_extra_bufts=False) to avoid the AMX crash"
        )
    else:
        lines.append("AMX: not built in; weights use llama.cpp's extra (repacked) buffer types")
    lines += catalog_lines
    verdict_error: DeraError | None = None
    infos = {}
    for role, path in (("aligned", aligned), ("reference", reference)):
        if path:
            infos[role] = read_gguf(path)
            lines += _describe(role, infos[role])
    if lora:
        adapter = read_gguf(lora, expect="adapter")
        lines += [
            f"aligned: {adapter.path} (LoRA adapter on the reference; one copy of the weights)",
            f"  name: {adapter.name}",
            f"  alpha: {adapter.metadata.get('adapter.lora.alpha')}, "
            f"{adapter.n_tensors} tensors, {adapter.file_size / 2**20:.1f} MiB",
        ]
        lines += [
            f"  {key}: {value}"
            for key, value in adapter.metadata.items()
            if key.startswith("dera.")
        ]
        if is_built_in_adapter(adapter.path):
            lines += calibration_lines(built_in_calibration())
        if "reference" in infos and adapter.architecture != infos["reference"].architecture:
            verdict_error = DeraError("the adapter's architecture differs from the reference's")
            lines.append("compatibility: INCOMPATIBLE")
        else:
            lines.append("compatibility: OK, one base model and its adapter")
    if len(infos) == 2:
        try:
            check_same_tokenizer(infos["aligned"], infos["reference"])
        except DeraError as exc:
            verdict_error = exc
            lines.append("compatibility: INCOMPATIBLE")
        else:
            lines.append("compatibility: OK, one tokenizer (ids, texts, types, BOS/EOS/EOT)")
    extra_lines, extra_error = _mixture_lines(mix, proxy_base, infos.get("reference"))
    lines += extra_lines
    verdict_error = verdict_error or extra_error
    speculation = speculation_from(draft_max, draft_min, draft_fixed)
    mode = "adaptive" if speculation.adaptive else "fixed (--draft-fixed)"
    if not speculation.enabled:
        lines.append("speculation: off (--draft-max 0)")
    elif draft_model and (mix is not None or proxy_base is not None):
        verdict_error = verdict_error or DeraError("mixtures draft by prompt lookup only: drop -md")
        lines.append("speculation: draft model NOT USED (mixtures draft by prompt lookup)")
    elif draft_model:
        draft = read_gguf(model_path(draft_model))
        lines.append(
            f"speculation: draft model {draft.path.name} ({draft.name}), "
            f"{speculation.draft_min}-{speculation.draft_max} tokens per step, {mode}"
        )
        if "reference" in infos:
            try:
                check_same_tokenizer(draft, infos["reference"])
            except DeraError as exc:
                verdict_error = exc
                lines.append("  draft model: INCOMPATIBLE")
            else:
                lines.append("  draft model: OK, same tokenizer")
    else:
        lines.append(
            f"speculation: prompt lookup ({speculation.ngram_min}-{speculation.ngram_max}-grams), "
            f"{speculation.draft_min}-{speculation.draft_max} tokens per step, {mode}"
        )
        lines.append("  (info --measure-speculation: whether it can pay on this machine)")
    where = RpcPlacement.parse(rpc, rpc_aligned, rpc_reference, rpc_draft, rpc_timeout)
    placed = _placed_models(aligned, reference, lora, draft_model, mix, proxy_base, where)
    if where.any_remote or any(
        term.source.rpc for term in (parse_mix(mix) if mix is not None else ())
    ):
        lines += placement_lines(placed, n_gpu_layers)
    elif backend.supports_gpu_offload():
        lines += local_device_lines(placed, n_gpu_layers)
    click.echo("\n".join(lines))
    if verdict_error is not None:
        raise verdict_error
    if measure_speculation:
        rpc_settings = dict(
            rpc=rpc,
            rpc_aligned=rpc_aligned,
            rpc_reference=rpc_reference,
            rpc_draft=rpc_draft,
            rpc_timeout=rpc_timeout,
        )
        with open_model_set(
            **flags,
            lora_scale=1.0,
            draft_model=None,
            draft_max=draft_max,
            draft_min=draft_min,
            proxy_base=proxy_base,
            mix=mix,
            hook=hook,
            **rpc_settings,
        ) as models:
            report = measure_draft_costs(models)
        click.echo("speculation measured on this machine:\n" + "\n".join(report.lines()))


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


def local_device_lines(
    models: list[tuple[str, str, Placement]], n_gpu_layers: int | None
) -> list[str]:
    """This machine's devices with their free memory, then where each model's layers
    would go at -ngl n_gpu_layers (planned from the metadata alone)."""
    llama_log.install()
    lines = ["devices:"]
    for device in ggml_devices.local_devices():
        free, total = device.memory()
        lines.append(
            f"  {device.name} ({device.description}): {free // MIB} MiB free of {total // MIB} MiB"
        )
    shown = "all" if n_gpu_layers is None or n_gpu_layers < 0 else str(n_gpu_layers)
    lines.append(f"placement at -ngl {shown} (llama.cpp's split, planned from the metadata alone):")
    lines += [
        f"  {role}: {layer_plan(path, where, n_gpu_layers).describe()}"
        for role, path, where in models
    ]
    return lines


def placement_lines(
    models: list[tuple[str, str, Placement]], n_gpu_layers: int | None = None
) -> list[str]:
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
            lines.append(f"  {role}: {layer_plan(path, where, n_gpu_layers).describe()}")
        else:
            lines.append(f"  {role}: this machine")
    return lines
