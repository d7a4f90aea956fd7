"""The sampling flags every generating command shares (llama.cpp's names and
defaults), the lam flags, negative prompts and CFG, and SamplingParams built from them."""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable

import click

from ..engine.exact import DEFAULT_BUDGET
from ..engine.exact_attempts import DEFAULT_PARALLEL, MAX_PARALLEL
from ..errors import DeraError
from ..sampling.chain import SamplingParams
from ..sampling.json_schema import json_schema_grammar
from .files import read_text_file


def stacked(*decorators: Callable) -> Callable:
    """One decorator applying several click options in order."""

    def apply(function: Callable) -> Callable:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


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


# Flags generated from the dataclass; logit_bias (llama.cpp's syntax) and
# grammar_triggers (repeatable) have their own.
GENERATED_FIELDS = tuple(
    f.name for f in dataclasses.fields(SamplingParams) if f.name in _SAMPLING_FLAGS
)


SAMPLING_FIELDS = (*GENERATED_FIELDS, "logit_bias", "grammar_triggers")


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


sampling_options = stacked(
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
        "--grammar-trigger",
        "grammar_triggers",
        multiple=True,
        metavar="WORD",
        help="Apply the grammar only once WORD appears in the answer, from WORD on "
        "(llama.cpp's lazy grammar; repeatable).",
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


negative_prompt_options = stacked(
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


cfg_options = stacked(
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


exact_options = stacked(
    click.option(
        "--exact",
        is_flag=True,
        help="Draw the answer from the model retrained at beta/lam itself (on the aligned "
        "model's implicit reward), not DeRa's per-token mix: DeRa attempts killed token by "
        "token (0 <= lam <= 1, temperature <= 1; top-k, top-p and min-p default to off).",
    ),
    click.option(
        "--exact-budget",
        type=click.IntRange(1),
        default=DEFAULT_BUDGET,
        show_default=True,
        help="Tokens the attempts of one exact answer may spend (checked when an "
        "attempt would start).",
    ),
    click.option(
        "--exact-parallel",
        type=click.IntRange(1, MAX_PARALLEL),
        default=DEFAULT_PARALLEL,
        show_default=True,
        help="Attempts of an exact answer decoded at once (slots sharing the prompt).",
    ),
)


def exact_settings(exact: bool, exact_budget: int, exact_parallel: int) -> dict:
    """The stream() keywords of the --exact flags."""
    return {"exact": exact, "exact_budget": exact_budget, "exact_parallel": exact_parallel}


def exact_cost_line(exact: dict) -> str:
    """One line of what an exact answer cost (for stderr)."""
    return (
        f"exact: {exact['attempts']} attempts ({exact['killed']} killed), "
        f"{exact['tokens_spent']} tokens, Z estimate {exact['z_estimate']:.3g}"
    )


# With --exact, the truncation samplers are off unless the command line sets them:
# exact realignment samples the target itself.
EXACT_SAMPLING = {"top_k": 0, "top_p": 1.0, "min_p": 0.0}


def exact_sampling(sampling: dict) -> dict:
    """The sampling flags with the truncation that the user did not set turned off."""
    context = click.get_current_context()
    unset = {
        name: off
        for name, off in EXACT_SAMPLING.items()
        if context.get_parameter_source(name) == click.core.ParameterSource.DEFAULT
    }
    return {**sampling, **unset}


lambdas_option = click.option(
    "--lambdas",
    default=None,
    help="Comma-separated lam grid (default 0,0.5,1,1.5,2; 1 for a fixed --mix).",
)


def lam_grid(models, grid: list[float] | None) -> list[float]:
    """The --lambdas grid, or the default: 0..2 (lam 1 alone for a fixed-weight --mix)."""
    if grid is not None:
        return grid
    return list(DEFAULT_LAM_GRID) if models.depends_on_lam else [1.0]


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
    if fields.get("grammar_triggers") and not fields.get("grammar"):
        raise DeraError("--grammar-trigger needs a grammar (--grammar or --grammar-file)")
    fields["grammar_triggers"] = tuple(fields.get("grammar_triggers") or ())
    return SamplingParams(**fields, logit_bias=parse_logit_bias(logit_bias))
