"""Validation of OpenAI-style request bodies into generation settings; every problem is
a RequestError that the app turns into a 400 with an OpenAI-style error object."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import BadParameterError, DeraError
from ..guidance import MAX_CFG_SCALE
from ..mixing import validate_lam
from ..sampling import SamplingParams

DEFAULT_MAX_TOKENS = 256

MODEL_ID = "dera-local"  # the server's one model; "dera-local@<lam>" picks a lam


class RequestError(BadParameterError):
    """A bad request body; `param` names the field, as OpenAI's error objects do."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ParsedRequest:
    stream: bool
    include_usage: bool
    model: str
    settings: dict  # keyword arguments for DeraPair.stream()


def _number(
    body: dict,
    name: str,
    default: float | None,
    low: float,
    high: float,
) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"'{name}' must be a number", name)
    if not low <= value <= high:
        raise RequestError(f"'{name}' must be between {low:g} and {high:g}", name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"'{name}' must be an integer from {low} to {high}", name)
    return value


def _text(value: str, param: str) -> str:
    """JSON may carry lone surrogates (\\ud800), which no tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"'{param}' is not valid Unicode (a lone surrogate)", param) from None
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise RequestError("'stop' must be a string or a list of up to 4 strings", "stop")
    return [_text(s, "stop") for s in stop if s]


def lam_of_model(model: str, default_lam: float) -> float:
    """The lam a model id asks for: "dera-local@0.7" -> 0.7 (a preset from /v1/models, or
    any other value); any other id, including plain "dera-local", -> the server's lam
    (desktop apps send whatever model name they were configured with)."""
    name, at, value = model.partition("@")
    if not at or name != MODEL_ID:
        return default_lam
    try:
        return validate_lam(float(value))
    except (ValueError, DeraError):
        raise RequestError(
            f"model {model!r}: after '@' comes the lam to decode at, e.g. {MODEL_ID}@0.5",
            "model",
        ) from None


def parse_common(body: Any, default_lam: float) -> ParsedRequest:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if body.get("n", 1) != 1:
        raise RequestError("only n = 1 is supported", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", "stream_options")
    model = body.get("model", MODEL_ID)
    if not isinstance(model, str):
        raise RequestError("'model' must be a string", "model")
    lam = body.get("dera_lambda", lam_of_model(model, default_lam))
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise RequestError("'dera_lambda' must be a number", "dera_lambda")
    try:
        lam = validate_lam(lam)
    except DeraError as exc:
        raise RequestError(f"'dera_lambda': {exc}", "dera_lambda") from None
    max_tokens = _integer(body, "max_completion_tokens", 1, 1_000_000)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1, 1_000_000) or DEFAULT_MAX_TOKENS
    seed = _integer(body, "seed", -(2**63), 2**63 - 1)
    # Each field is range-checked above SamplingParams' own checks, so that the error
    # names the field (RequestError.param).
    sampling = SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        top_k=0,
        min_p=0.0,
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        seed=None if seed is None else seed & 0x7FFFFFFF,
    )
    settings = {"lam": lam, "sampling": sampling, "max_tokens": max_tokens, "stop": _stop(body)}
    settings.update(_guidance(body))
    return ParsedRequest(
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        model=model,
        settings=settings,
    )


def _guidance(body: dict) -> dict:
    """dera_negative_prompt (text; for chat, the negative sequence's system message) and
    dera_cfg_scale (default 1): classifier-free guidance for this request."""
    negative = body.get("dera_negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise RequestError("'dera_negative_prompt' must be a string", "dera_negative_prompt")
    scale = _number(body, "dera_cfg_scale", 1.0, -MAX_CFG_SCALE, MAX_CFG_SCALE)
    if negative is None:
        if scale != 1.0:
            raise RequestError(
                "'dera_cfg_scale' needs a 'dera_negative_prompt' to steer away from",
                "dera_negative_prompt",
            )
        return {}
    return {"negative_prompt": _text(negative, "dera_negative_prompt"), "cfg_scale": scale}


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"messages[{index}] needs a string 'role'", "messages")
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = [p.get("text") for p in content if isinstance(p, dict)]
            if not all(isinstance(p, str) for p in parts) or len(parts) != len(content):
                raise RequestError(f"messages[{index}]: only text content is supported", "messages")
            content = "".join(parts)
        if not isinstance(content, str):
            raise RequestError(f"messages[{index}] needs string 'content'", "messages")
        out.append(
            {"role": _text(message["role"], "messages"), "content": _text(content, "messages")}
        )
    return out


def completion_prompt(body: dict) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return _text(prompt, "prompt")
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return prompt
    raise RequestError("'prompt' must be a non-empty string or a list of token ids", "prompt")
