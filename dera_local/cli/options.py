"""Options shared by the commands, named as in llama.cpp's CLI, with DERA_* env defaults."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
import typing
from collections.abc import Callable

import click

from ..errors import DeraError
from ..rpc.placement import DEFAULT_RPC_TIMEOUT
from ..sampling.chain import SamplingParams
from ..sampling.json_schema import json_schema_grammar
from ..sources.catalog import DEFAULT_QUANT
from ..speculation.drafts import SpeculationParams


def _stack(*decorators: Callable) -> Callable:
    def apply(function: Callable) -> Callable:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


model_source_options = _stack(
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

rpc_options = _stack(
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

draft_options = _stack(
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

model_options = _stack(
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
    click.option(
        "-ngl",
        "--n-gpu-layers",
        "n_gpu_layers",
        type=int,
        default=None,
        envvar="DERA_N_GPU_LAYERS",
        help="Layers to offload to the GPU (-1 = all; default all when the build "
        "has a GPU backend).",
    ),
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


def lam_option(help_text: str) -> Callable:
    """--lam/--lambda (env DERA_LAMBDA), as llama.cpp-style flags go: a float, default 1."""
    return click.option(
        "--lam",
        "--lambda",
        "lam",
        type=float,
        default=1.0,
        show_default=True,
        envvar="DERA_LAMBDA",
        help=help_text,
    )


# Flag names and help for each SamplingParams field; types and defaults come from the
# dataclass itself, so a new sampling setting is one field there and one line here.
_SAMPLING_FLAGS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "temperature": (("--temp",), "Temperature (0 = greedy)."),
    "top_k": (("--top-k",), "0 = off."),
    "top_p": (("--top-p",), "1 = off."),
    "min_p": (("--min-p",), "0 = off."),
    "repeat_penalty": (("--repeat-penalty",), "1 = off."),
    "repeat_last_n": (("--repeat-last-n",), "Tokens the penalties look back over (-1 = context)."),
    "frequency_penalty": (("--frequency-penalty",), None),
    "presence_penalty": (("--presence-penalty",), None),
    "seed": (("-s", "--seed"), "Sampling seed (default: random; reported with --json)."),
    "grammar": (("--grammar",), "GBNF grammar constraining the output."),
}
_SAMPLING_ENV = {"seed": "DERA_SEED"}


def _sampling_field_option(field: dataclasses.Field) -> Callable:
    flags, help_text = _SAMPLING_FLAGS[field.name]
    hint = typing.get_type_hints(SamplingParams)[field.name]
    kind = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
    return click.option(
        *flags,
        field.name,
        type=kind,
        default=field.default,
        show_default=field.default is not None,
        envvar=_SAMPLING_ENV.get(field.name),
        help=help_text,
    )


# Flags generated from the dataclass; logit_bias has its own (llama.cpp's syntax).
GENERATED_FIELDS = tuple(
    f.name for f in dataclasses.fields(SamplingParams) if f.name in _SAMPLING_FLAGS
)
SAMPLING_FIELDS = (*GENERATED_FIELDS, "logit_bias")
SAMPLING_KEYS = (*SAMPLING_FIELDS, "grammar_file", "json_schema", "json_schema_file")
_BIAS = re.compile(r"^(\d+)([+-])(\d+(?:\.\d+)?|inf)$")


def parse_logit_bias(items: tuple[str, ...]) -> tuple[tuple[int, float], ...]:
    """llama.cpp's --logit-bias TOKEN_ID(+|-)BIAS, e.g. 15043+1 or 15043-inf (a ban)."""
    pairs = []
    for item in items:
        match = _BIAS.match(item.strip())
        if match is None:
            raise DeraError(f"--logit-bias {item!r}: write TOKEN_ID+BIAS or TOKEN_ID-BIAS")
        size = 100.0 if match[3] == "inf" else min(float(match[3]), 100.0)
        pairs.append((int(match[1]), size if match[2] == "+" else -size))
    return tuple(pairs)


sampling_options = _stack(
    lam_option("DeRa strength: 1 = aligned, 0 = reference, >1 extrapolates. Env: DERA_LAMBDA."),
    click.option(
        "-n",
        "--n-predict",
        "max_tokens",
        type=int,
        default=256,
        show_default=True,
        help="Maximum new tokens (-1 = until the context is full).",
    ),
    *(
        _sampling_field_option(f)
        for f in dataclasses.fields(SamplingParams)
        if f.name in _SAMPLING_FLAGS
    ),
    click.option(
        "--logit-bias",
        "logit_bias",
        multiple=True,
        metavar="ID(+|-)BIAS",
        help="Add BIAS to token ID's logit, e.g. 15043+1; 15043-inf bans it (repeatable).",
    ),
    click.option(
        "--grammar-file",
        type=click.Path(dir_okay=False),
        default=None,
        help="Read the GBNF grammar from a file.",
    ),
    click.option(
        "-j",
        "--json-schema",
        metavar="SCHEMA",
        default=None,
        help="Constrain the output to JSON matching this JSON schema (e.g. '{}' for any "
        "JSON object); turned into a grammar.",
    ),
    click.option(
        "--json-schema-file",
        type=click.Path(dir_okay=False),
        default=None,
        help="Read the JSON schema from a file.",
    ),
    click.option("--stop", multiple=True, help="Stop string (repeatable)."),
)


negative_prompt_options = _stack(
    click.option(
        "--cfg-negative-prompt",
        "negative_prompt",
        metavar="TEXT",
        default=None,
        help="Classifier-free guidance: steer away from this prompt (read as a second "
        "sequence of the same contexts; with --chat, as the system message).",
    ),
    click.option(
        "--cfg-negative-prompt-file",
        "negative_prompt_file",
        metavar="FILE",
        default=None,
        help="Read the negative prompt from a file.",
    ),
)

cfg_options = _stack(
    negative_prompt_options,
    click.option(
        "--cfg-scale",
        type=float,
        default=1.0,
        show_default=True,
        help="Guidance strength: h_neg + S * (h_pos - h_neg); 1 = no guidance, >1 steers "
        "away from the negative prompt.",
    ),
)


def negative_prompt_from(negative_prompt: str | None, negative_prompt_file: str | None):
    """The negative prompt from --cfg-negative-prompt or its -file (not both)."""
    if negative_prompt is not None and negative_prompt_file is not None:
        raise DeraError("give the negative prompt as text or as a file, not both")
    if negative_prompt_file is not None:
        return read_text_file(negative_prompt_file, "negative prompt file")
    return negative_prompt


DEFAULT_LAM_GRID = (0.0, 0.5, 1.0, 1.5, 2.0)


def lam_grid(models, grid: list[float] | None) -> list[float]:
    """The --lambdas grid, or the default: 0..2 (lam 1 alone for a fixed-weight --mix)."""
    if grid is not None:
        return grid
    return list(DEFAULT_LAM_GRID) if models.depends_on_lam else [1.0]


def open_output(path: str | None):
    """The file to write rows to (stdout when no path is given)."""
    if path is None:
        return contextlib.nullcontext(sys.stdout)
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise DeraError(f"cannot write {path}: {exc.strerror}") from None


def read_text_file(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError as exc:
        raise DeraError(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise DeraError(f"{what} {path} is not UTF-8 text") from None


def sampling_from(
    grammar_file: str | None = None,
    json_schema: str | None = None,
    json_schema_file: str | None = None,
    logit_bias: tuple[str, ...] = (),
    **fields,
) -> SamplingParams:
    """SamplingParams from the sampling flags (--grammar-file read into grammar; a JSON
    schema, given or read from its file, turned into the grammar)."""
    if grammar_file:
        fields["grammar"] = read_text_file(grammar_file, "grammar file")
    if json_schema_file:
        if json_schema is not None:
            raise DeraError("give the JSON schema as text or as a file, not both")
        json_schema = read_text_file(json_schema_file, "JSON schema file")
    if json_schema is not None:
        if fields.get("grammar"):
            raise DeraError("give a grammar or a JSON schema, not both")
        fields["grammar"] = json_schema_grammar(json_schema)
    return SamplingParams(**fields, logit_bias=parse_logit_bias(logit_bias))


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


__all__ = [
    "cfg_options",
    "lam_grid",
    "draft_options",
    "negative_prompt_from",
    "negative_prompt_options",
    "hook_option",
    "model_options",
    "model_source_options",
    "sampling_options",
    "read_text_file",
    "rpc_options",
    "sampling_from",
    "split_options",
]
