"""Options shared by the commands, named as in llama.cpp's CLI, with DERA_* env defaults."""

from __future__ import annotations

from collections.abc import Callable

import click

from ..rpc.placement import DEFAULT_RPC_TIMEOUT
from ..sources.catalog import DEFAULT_QUANT
from ..speculation.drafts import SpeculationParams
from .sampling_options import SAMPLING_KEYS, stacked

model_source_options = stacked(
    click.option(
        "-m",
        "--aligned",
        envvar="DERA_ALIGNED",
        metavar="GGUF",
        help="Aligned model: a path or owner/repo:file.gguf (e.g. the DPO model). "
        "Env: DERA_ALIGNED.",
    ),
    click.option(
        "-mr",
        "--reference",
        envvar="DERA_REFERENCE",
        metavar="GGUF",
        help="Reference model: a path or owner/repo:file.gguf (e.g. the SFT model the "
        "aligned one was trained from). Env: DERA_REFERENCE.",
    ),
    click.option(
        "--pair",
        envvar="DERA_PAIR",
        metavar="NAME",
        help="A catalog pair already pulled (dera-local list). Env: DERA_PAIR.",
    ),
    click.option(
        "--quant", default=DEFAULT_QUANT, show_default=True, help="Quantization of --pair."
    ),
    click.option(
        "--lora",
        envvar="DERA_LORA",
        metavar="GGUF",
        help="LoRA adapter: the aligned model is the reference plus this adapter "
        "(instead of -m). Env: DERA_LORA.",
    ),
    click.option(
        "--proxy-base",
        metavar="GGUF",
        help="Proxy-tuning: steer this (larger) model with the small pair given by "
        "-m/-mr/--lora (default: the built-in pair): h = large + lam * (tuned - base).",
    ),
    click.option(
        "--mix",
        metavar="SPEC",
        help="A mixture of any models instead of a pair: '1.5*a.gguf - 0.5*b.gguf' "
        "(spaces around + and -; BASE.gguf+LORA.gguf for an adapter) or a .json/.toml file.",
    ),
)

hook_option = click.option(
    "--hook",
    type=click.Choice(["native", "numpy"]),
    default=None,
    envvar="DERA_HOOK",
    help="Force the mixing path (default: native if built).",
)

rpc_options = stacked(
    click.option(
        "--rpc",
        metavar="HOST:PORT[,...]",
        envvar="DERA_RPC",
        default=None,
        help="llama.cpp RPC workers (dera-local worker) holding every model's layers, "
        "split as llama.cpp splits them. Env: DERA_RPC.",
    ),
    click.option(
        "--rpc-aligned",
        metavar="HOST:PORT[,...]",
        default=None,
        help="The aligned model's own workers ('local' = this machine); with "
        "--proxy-base, the small tuned model's.",
    ),
    click.option(
        "--rpc-reference",
        metavar="HOST:PORT[,...]",
        default=None,
        help="The reference model's own workers ('local' = this machine).",
    ),
    click.option(
        "--rpc-draft",
        metavar="HOST:PORT[,...]",
        default=None,
        help="The draft model's own workers ('local' = this machine).",
    ),
    click.option(
        "--rpc-timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=DEFAULT_RPC_TIMEOUT,
        show_default=True,
        help="Seconds a worker may take to answer before it counts as lost.",
    ),
)

draft_options = stacked(
    click.option(
        "-md",
        "--draft-model",
        envvar="DERA_DRAFT_MODEL",
        metavar="GGUF",
        help="Small model with the same tokenizer that drafts tokens for speculative "
        "decoding (default: prompt lookup drafts, no model needed). Env: DERA_DRAFT_MODEL.",
    ),
    click.option(
        "--draft-max",
        type=click.IntRange(0, 64),
        default=SpeculationParams.draft_max,
        show_default=True,
        envvar="DERA_DRAFT_MAX",
        help="Most drafted tokens verified per step (0 = no speculation). Env: DERA_DRAFT_MAX.",
    ),
    click.option(
        "--draft-min",
        type=click.IntRange(0, 64),
        default=SpeculationParams.draft_min,
        show_default=True,
        help="Fewest drafted tokens per verification step.",
    ),
    click.option(
        "--draft-fixed",
        is_flag=True,
        help="Verify every draft up to --draft-max instead of choosing the draft length "
        "from measured step costs and acceptance (to compare draft lengths).",
    ),
)

n_gpu_layers_option = click.option(
    "-ngl",
    "--n-gpu-layers",
    "n_gpu_layers",
    type=int,
    default=None,
    envvar="DERA_N_GPU_LAYERS",
    help="Layers to offload to the GPU (-1 = all; default all when the build has a GPU backend).",
)

model_options = stacked(
    model_source_options,
    draft_options,
    click.option("--lora-scale", type=float, default=1.0, show_default=True, help="Adapter scale."),
    click.option(
        "-c",
        "--ctx-size",
        "n_ctx",
        type=click.IntRange(0),
        default=4096,
        show_default=True,
        envvar="DERA_CTX_SIZE",
        help="Context size in tokens (0 = the models').",
    ),
    click.option(
        "-b",
        "--batch-size",
        "n_batch",
        type=click.IntRange(1),
        default=512,
        show_default=True,
        help="Prompt tokens per llama_decode call.",
    ),
    click.option(
        "-t",
        "--threads",
        "n_threads",
        type=click.IntRange(0),
        default=0,
        envvar="DERA_THREADS",
        help="CPU threads per model (0 = all cores).",
    ),
    n_gpu_layers_option,
    click.option(
        "-fa",
        "--flash-attn",
        type=click.Choice(["on", "off", "auto"]),
        default="off",
        show_default=True,
        envvar="DERA_FLASH_ATTN",
        help="Flash attention (off matches llama-cpp-python's Llama numerics).",
    ),
    hook_option,
    click.option(
        "-v",
        "--verbose",
        is_flag=True,
        help="Show llama.cpp's log on stderr (generate: then what speculation measured "
        "and decided).",
    ),
    rpc_options,
)


def _option_names(decorator: Callable) -> tuple[str, ...]:
    """The parameter names a stack of click options declares, read from click itself."""

    def probe() -> None: ...

    decorator(probe)
    return tuple(param.name for param in probe.__click_params__)


MODEL_KEYS = _option_names(model_options)


def split_options(kwargs: dict) -> tuple[dict, dict, dict]:
    """Splits a command's keyword arguments into model, sampling and remaining options
    (commands without sampling flags get an empty sampling dict)."""
    model = {k: kwargs.pop(k) for k in MODEL_KEYS}
    sampling = {k: kwargs.pop(k) for k in SAMPLING_KEYS if k in kwargs}
    return model, sampling, kwargs
