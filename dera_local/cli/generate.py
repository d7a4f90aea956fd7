"""`dera-local generate`: one prompt in, DeRa text out (or one JSON object)."""

from __future__ import annotations

import json
import sys

import click

from ..engine.logprob_format import chat_content
from ..errors import DeraError
from ..speculation.draft_length import report_lines
from .files import read_text_file
from .open_models import open_model_set
from .options import model_options, split_options
from .prompts import (
    chat_options,
    hint_if_raw_prompts_ended_at_once,
    negative_for,
    prompt_encoder,
)
from .sampling_options import (
    cfg_options,
    exact_cost_line,
    exact_options,
    exact_sampling,
    exact_settings,
    negative_prompt_from,
    sampling_from,
    sampling_options,
)


def _read_prompt(prompt: str | None, file: str | None) -> str:
    if prompt is not None and file is not None:
        raise DeraError("give the prompt as an argument or with -f, not both")
    if file is not None:
        return read_text_file(file, "prompt file")
    if prompt is not None:
        return prompt
    if sys.stdin is None or sys.stdin.isatty():
        raise DeraError("no prompt: give it as an argument, with -f FILE, or on stdin")
    try:
        return sys.stdin.read()
    except UnicodeDecodeError:
        raise DeraError("the prompt on stdin is not UTF-8 text") from None


@click.command()
@click.argument("prompt", required=False)
@click.option("-f", "--file", type=str, default=None, help="Read the prompt from a file.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object: text, tokens, prompt_tokens, finish_reason, lam, "
    "tokens_per_second, ..., and `dera`: the answer's log-probability under each model "
    "and the mixture, and its KL estimate to the reference.",
)
@click.option(
    "--logprobs",
    "top_logprobs",
    type=click.IntRange(0, 20),
    default=None,
    metavar="N",
    help="With --json: each token's log-probability under the mixture and its N most "
    "likely alternatives, in OpenAI's chat format (`logprobs.content`).",
)
@chat_options
@cfg_options
@exact_options
@model_options
@sampling_options
def generate(
    prompt: str | None,
    file: str | None,
    as_json: bool,
    top_logprobs: int | None,
    chat: bool | None,
    system: str | None,
    negative_prompt: str | None,
    negative_prompt_file: str | None,
    cfg_scale: float,
    exact: bool,
    exact_budget: int,
    exact_parallel: int,
    **kwargs,
) -> None:
    """Continue PROMPT with the DeRa mixture of the aligned and reference models
    (with --chat: answer it as a user turn). With --cfg-negative-prompt, -m alone is
    enough: that model steered away from its own negative prompt."""
    model, sampling, rest = split_options(kwargs)
    negative = negative_prompt_from(negative_prompt, negative_prompt_file)
    text = _read_prompt(prompt, file)
    if not text.strip():
        raise DeraError("the prompt is empty: give text as an argument, with -f FILE, or on stdin")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # argv bytes that were not UTF-8 (surrogate escapes)
        raise DeraError("the prompt is not UTF-8 text") from None
    if top_logprobs is not None and not as_json:
        raise DeraError("--logprobs goes with --json (it adds to the JSON object)")
    params = sampling_from(**(exact_sampling(sampling) if exact else sampling))
    with open_model_set(**model, one_model_ok=negative is not None) as pair:
        encode = prompt_encoder(pair, chat, system, [text])
        encoded = encode(text)
        stream = pair.stream(
            encoded,
            lam=rest["lam"],
            sampling=params,
            max_tokens=rest["max_tokens"],
            stop=rest["stop"],
            negative_prompt=negative_for(encode, chat, text, negative),
            cfg_scale=cfg_scale,
            logprobs=as_json,
            top_logprobs=top_logprobs or 0,
            **exact_settings(exact, exact_budget, exact_parallel),
        )
        if as_json:
            for _ in stream:
                pass
            result = stream.result
            data = result.to_dict()
            if top_logprobs is not None:
                pieces = lambda token: pair.model.token_bytes(token, special=True)  # noqa: E731
                data["logprobs"] = {"content": chat_content(result.tokens, result.logprobs, pieces)}
            click.echo(json.dumps(data, ensure_ascii=False))
        else:
            for chunk in stream:
                click.echo(chunk, nl=False)
            click.echo()
            if stream.result.exact is not None:
                click.echo(exact_cost_line(stream.result.exact), err=True)
        if model["verbose"] and stream.result.speculation is not None:
            click.echo("\n".join(report_lines(stream.result.speculation)), err=True)
        hint_if_raw_prompts_ended_at_once(pair, chat, int(not stream.result.tokens))
