"""--chat and --system for the scripting commands (generate, sweep, score): whether a
prompt is fed raw or rendered as a user turn through the aligned model's chat template.

Instruct models answer a raw prompt badly (the aligned side often ends at once): when
that happens on a model with a chat template and --chat was not given, the command
says so in one line. Chat messages from a JSONL file are always rendered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import click

from ..chat import ChatTemplate, as_messages
from ..errors import BadParameterError
from ..model_sets.pair import DeraPair


def chat_options(function: Callable) -> Callable:
    function = click.option(
        "--system", default=None, help="System prompt for --chat (and for JSONL messages)."
    )(function)
    return click.option(
        "--chat/--no-chat",
        "chat",
        default=None,
        help="Render each prompt as a user turn through the aligned model's chat template. "
        "Use it with instruct/chat models (dera-local info shows whether a model has a "
        "template); without it the prompt is fed raw.",
    )(function)


def prompt_encoder(
    pair: DeraPair, chat: bool | None, system: str | None, prompts: Sequence[object]
) -> Callable[[str | list[dict]], str | list[int]]:
    """A function turning a prompt (text or chat messages) into what the model set is fed: the
    text as it is, or the chat-rendered token ids."""
    if system is not None and not chat and any(isinstance(p, str) for p in prompts):
        raise BadParameterError("--system applies to chat prompts: add --chat")
    template: ChatTemplate | None = None

    def encode(prompt: str | list[dict]) -> str | list[int]:
        nonlocal template
        if isinstance(prompt, str) and not chat:
            return prompt
        template = template or ChatTemplate.for_pair(pair)
        return template.tokens(pair, as_messages(prompt, system))

    return encode


def hint_if_raw_prompts_ended_at_once(pair: DeraPair, chat: bool | None, n_empty: int) -> None:
    """One line on stderr when answers to raw prompts were empty on a chat model."""
    if n_empty and chat is None and pair.model.chat_template():
        click.echo(
            f"note: {n_empty} answer(s) ended at once; this model has a chat template, "
            "so --chat (prompts as user turns) is probably what you want",
            err=True,
        )


def negative_for(encode, chat: bool | None, prompt, negative: str | None):
    """The negative prompt as the model set is fed it: raw text as it is; with --chat, the
    same conversation with the negative prompt as its system message (so the two
    sequences differ only there)."""
    if negative is None or not chat:
        return negative
    messages = [m for m in as_messages(prompt) if m.get("role") != "system"]
    return encode([{"role": "system", "content": negative}, *messages])
