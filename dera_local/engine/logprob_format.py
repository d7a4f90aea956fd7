"""Per-token log-probabilities in OpenAI's formats, shared by the server and
`generate --json --logprobs N`: chat's `logprobs.content[]` and the completions API's
`tokens` / `token_logprobs` / `top_logprobs` / `text_offset`. The values are the
mixture's (see logprobs.py for the one definition)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .logprobs import SequenceLogprobs

TokenBytes = Callable[[int], bytes]  # a token's bytes (special tokens as their text)


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def chat_content(
    tokens: Sequence[int], logprobs: SequenceLogprobs, token_bytes: TokenBytes, start: int = 0
) -> list[dict]:
    """Chat entries for tokens[start:] (the end-of-generation token is not one)."""
    entries = []
    for index in range(start, len(tokens)):
        piece = token_bytes(tokens[index])
        top = logprobs.top[index] if logprobs.top_n else []
        entries.append(
            {
                "token": _text(piece),
                "logprob": logprobs.mixture[index],
                "bytes": list(piece),
                "top_logprobs": [
                    {"token": _text(p), "logprob": value, "bytes": list(p)}
                    for p, value in ((token_bytes(t), value) for t, value in top)
                ],
            }
        )
    return entries


def completion_logprobs(
    tokens: Sequence[int],
    logprobs: SequenceLogprobs,
    token_bytes: TokenBytes,
    start: int = 0,
    text_offset: int = 0,
) -> dict:
    """The completions API's logprobs object for tokens[start:]; `text_offset`: where
    tokens[start] begins in the completion's text."""
    pieces = [_text(token_bytes(t)) for t in tokens[start:]]
    offsets = []
    for piece in pieces:
        offsets.append(text_offset)
        text_offset += len(piece)
    top = []
    if logprobs.top_n:
        for index in range(start, len(tokens)):
            ranked: dict[str, float] = {}
            for t, value in logprobs.top[index]:
                ranked.setdefault(_text(token_bytes(t)), value)  # two ids, one text: the first
            top.append(ranked)
    return {
        "tokens": pieces,
        "token_logprobs": logprobs.mixture[start : len(tokens)],
        "top_logprobs": top or None,
        "text_offset": offsets,
    }
