"""`dera-local generate`: one prompt in, DeRa text out (or one JSON object)."""

from __future__ import annotations

import json
import sys

import click

from ..errors import DeraError
from .options import (
    model_options,
    open_pair,
    read_text_file,
    sampling_from,
    sampling_options,
    split_options,
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
    return sys.stdin.read()


@click.command()
@click.argument("prompt", required=False)
@click.option("-f", "--file", type=str, default=None, help="Read the prompt from a file.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object: text, tokens, prompt_tokens, finish_reason, lam, "
    "tokens_per_second, ...",
)
@model_options
@sampling_options
def generate(prompt: str | None, file: str | None, as_json: bool, **kwargs) -> None:
    """Continue PROMPT with the DeRa mixture of the aligned and reference models."""
    model, sampling, rest = split_options(kwargs)
    text = _read_prompt(prompt, file)
    if not text.strip():
        raise DeraError("the prompt is empty: give text as an argument, with -f FILE, or on stdin")
    params = sampling_from(**sampling)
    with open_pair(**model) as pair:
        stream = pair.stream(
            text, lam=rest["lam"], sampling=params, max_tokens=rest["max_tokens"], stop=rest["stop"]
        )
        if as_json:
            for _ in stream:
                pass
            click.echo(json.dumps(stream.result.to_dict(), ensure_ascii=False))
            return
        for chunk in stream:
            click.echo(chunk, nl=False)
        click.echo()
