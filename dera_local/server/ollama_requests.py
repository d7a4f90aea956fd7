"""Ollama-style request bodies (/api/chat, /api/generate) into the same typed request
the OpenAI endpoints make (requests.ParsedRequest): model names as
`dera-local:<lam>`, `options` with Ollama's defaults and names, `format` as a grammar.
Every field is honoured, harmless, or refused with the reason; nothing is dropped
silently. Problems are RequestErrors (400)."""

from __future__ import annotations

import math
from typing import Any

from ..engine.guidance import MAX_CFG_SCALE
from ..engine.mixing import validate_lam
from ..engine.request import GenerationRequest
from ..errors import DeraError
from ..sampling.chain import SamplingParams
from ..sampling.json_schema import JSON_OBJECT_GRAMMAR, json_schema_grammar
from .lam_range import LamRange
from .requests import (
    MODEL_ID,
    ParsedRequest,
    RequestError,
    checked_lam,
    client_seed,
    is_number,
    logprob_fields,
    message_list,
    object_field,
    tool_call_list,
    true_or_false,
    unicode_text,
)

# Ollama's defaults for what a request leaves out (its Modelfile PARAMETER defaults),
# so an app gets what it gets from Ollama; num_predict -1: until the end or the context.
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.1}
DEFAULT_REPEAT_LAST_N = 64
EXACT_DEFAULTS = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}

# options: name -> (low, high, integer?) for the numbers honoured
NUMBERS = {
    "temperature": (0.0, 2.0, False),
    "top_p": (1e-9, 1.0, False),
    "top_k": (0, 1_000_000, True),
    "min_p": (0.0, 1.0, False),
    "repeat_penalty": (1e-3, 10.0, False),
    "repeat_last_n": (-1, 1_000_000, True),
    "presence_penalty": (-2.0, 2.0, False),
    "frequency_penalty": (-2.0, 2.0, False),
    "seed": (-(2**63), 2**63 - 1, True),
    "num_predict": (-2, 1_000_000, True),
    "lam": (-math.inf, math.inf, False),  # dera-local's own; checked by validate_lam
    "cfg_scale": (-MAX_CFG_SCALE, MAX_CFG_SCALE, False),
}
# How the model runs, not what it answers: accepted and not used (the models are loaded
# once by `dera-local serve`, with its flags).
HARMLESS_OPTIONS = {
    "num_thread", "num_gpu", "main_gpu", "use_mmap", "use_mlock", "num_batch", "low_vram",
    "numa", "vocab_only", "num_keep", "f16_kv", "logits_all",
}  # fmt: skip
REFUSED_OPTIONS = {
    "mirostat": "mirostat sampling is not supported (0 = off is)",
    "mirostat_eta": "mirostat sampling is not supported",
    "mirostat_tau": "mirostat sampling is not supported",
    "tfs_z": "tail-free sampling is not supported (1 = off is)",
    "typical_p": "typical sampling is not supported (1 = off is)",
    "penalize_newline": "penalize_newline is not supported",
}
_NEUTRAL_OPTIONS = {"mirostat": 0, "tfs_z": 1.0, "typical_p": 1.0}

# Top-level fields: shared, per endpoint, harmless, refused.
COMMON = {"model", "stream", "format", "options", "keep_alive", "logprobs", "top_logprobs"}
CHAT = {"messages", "tools"}
GENERATE = {"prompt", "system", "raw"}
HARMLESS = {"keep_alive"}
REFUSED = {
    "think": "this model has no thinking mode",
    "images": "images are not supported (text models only)",
    "suffix": "fill-in-the-middle (suffix) is not supported",
    "template": "prompt templates are the model's own; a custom 'template' is not supported",
    "context": "'context' (token ids of an earlier answer) is not supported: send the "
    "conversation as /api/chat messages",
}


def lam_of_name(name: Any, default_lam: float) -> float | None:
    """`dera-local` / `dera-local:latest` -> the server's lam; `dera-local:0.5` -> 0.5;
    anything else -> None (not a model this server has)."""
    if not isinstance(name, str):
        raise RequestError("'model' must be a string", "model")
    base, _, tag = name.partition(":")
    if base != MODEL_ID:
        return None
    if tag in ("", "latest"):
        return default_lam
    try:
        return validate_lam(float(tag), warn=False)
    except (ValueError, DeraError):
        return None


def parse_ollama(
    body: Any,
    default_lam: float,
    *,
    chat: bool,
    lam_range: LamRange | None,
    n_ctx: int,
) -> ParsedRequest | None:
    """The typed request of an /api/chat or /api/generate body; None when its model
    names no model here (a 404, not a bad request)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    _check_fields(body, chat)
    if "model" not in body:
        raise RequestError("'model' is required (see /api/tags)", "model")
    lam = lam_of_name(body["model"], default_lam)
    stream = true_or_false(body, "stream", True)
    options = object_field(body, "options")
    values = _options(options, n_ctx)
    if lam is None:
        return None
    field = ("options", "option 'lam'") if "lam" in values else ("model", "'model'")
    lam = checked_lam(values.get("lam", lam), lam_range, *field)
    exact = values.get("exact", False)
    # exact realignment samples the target itself: Ollama's truncation and penalty
    # defaults are off for it (what a request sets is kept, and refused if it must be)
    defaults = {**DEFAULTS, **EXACT_DEFAULTS} if exact else DEFAULTS
    sampling = SamplingParams(
        temperature=values.get("temperature", defaults["temperature"]),
        top_k=int(values.get("top_k", defaults["top_k"])),
        top_p=values.get("top_p", defaults["top_p"]),
        min_p=values.get("min_p", defaults["min_p"]),
        repeat_penalty=values.get("repeat_penalty", defaults["repeat_penalty"]),
        repeat_last_n=_repeat_last_n(values.get("repeat_last_n"), n_ctx),
        presence_penalty=values.get("presence_penalty", 0.0),
        frequency_penalty=values.get("frequency_penalty", 0.0),
        seed=client_seed(None if values.get("seed") is None else int(values["seed"])),
        grammar=_format(body.get("format")),
    )
    num_predict = int(values.get("num_predict", -1))
    negative, cfg_scale = _guidance(options, values)
    # Ollama (>= 0.12.11): top-level logprobs (true/false) and top_logprobs (0-20)
    per_token, top_logprobs = logprob_fields(body, chat=True)
    return ParsedRequest(
        request=GenerationRequest(
            lam=lam,
            sampling=sampling.with_seed(),
            # Ollama: -1 = until the end, -2 = until the context is full; both end there
            max_tokens=-1 if num_predict < 0 else num_predict,
            stop=_stop(options.get("stop")),
            logprobs=True,  # always: every answer carries its `dera` object
            top_logprobs=top_logprobs,
        ),
        stream=stream,
        model=body["model"],
        per_token=per_token,
        negative_prompt=negative,
        cfg_scale=cfg_scale,
        exact=exact,
    )


def chat_messages(body: dict) -> list[dict]:
    """The conversation: system, user, assistant (with `tool_calls`, arguments as
    objects) and `tool` turns (a tool's result, with its `tool_name`)."""
    out = []
    for index, message in enumerate(message_list(body)):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object", "messages")
        role, content = message.get("role"), message.get("content", "")
        allowed = {"role", "content"} | ({"tool_calls"} if role == "assistant" else set())
        allowed |= {"tool_name", "tool_call_id"} if role == "tool" else set()
        for name, value in message.items():
            if name in allowed or value in (None, [], "", {}):
                continue
            if name in ("images", "thinking"):
                reason = "images" if name == "images" else "thinking"
                raise RequestError(f"{where}: {reason} are not supported", "messages")
            raise RequestError(f"{where}: unknown field '{name}'", "messages")
        if role not in ("system", "user", "assistant", "tool"):
            raise RequestError(f"{where}: role must be system, user, assistant or tool", "messages")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise RequestError(f"{where} needs string 'content'", "messages")
        turn = {"role": role, "content": unicode_text(content, "messages")}
        if role == "assistant" and message.get("tool_calls"):
            turn["tool_calls"] = tool_call_list(message["tool_calls"], where)
        if role == "tool" and isinstance(message.get("tool_name"), str):
            turn["name"] = message["tool_name"]
        out.append(turn)
    return out


def generate_prompt(body: dict) -> tuple[str, str | None, bool]:
    """(prompt, system, raw) of an /api/generate body; an empty prompt only loads."""
    prompt = body.get("prompt", "")
    system = body.get("system")
    raw = body.get("raw", False)
    if not isinstance(prompt, str):
        raise RequestError("'prompt' must be a string", "prompt")
    if system is not None and not isinstance(system, str):
        raise RequestError("'system' must be a string", "system")
    if not isinstance(raw, bool):
        raise RequestError("'raw' must be true or false", "raw")
    return unicode_text(prompt, "prompt"), system and unicode_text(system, "system"), raw


def _check_fields(body: dict, chat: bool) -> None:
    known = COMMON | (CHAT if chat else GENERATE) | HARMLESS
    for name, value in body.items():
        if value is None or value == [] or value == {} or value is False or value == "":
            continue  # "tools": [] / "think": false / "suffix": "" ask for nothing
        if name in REFUSED:
            raise RequestError(f"'{name}': {REFUSED[name]}", name)
        if name not in known:
            other = "/api/generate" if chat else "/api/chat"
            where = f" (it belongs to {other})" if name in (GENERATE if chat else CHAT) else ""
            raise RequestError(f"'{name}': unknown field{where}", name)


def _options(options: dict, n_ctx: int) -> dict:
    values = {}
    for name, value in options.items():
        if name in NUMBERS:
            low, high, integer = NUMBERS[name]
            if value is None:
                continue
            if (
                not is_number(value)
                or (integer and isinstance(value, float) and not value.is_integer())
                or not low <= value <= high  # exact for any int: never converted first
            ):
                kind = "an integer" if integer else "a number"
                bounds = "" if math.isinf(low) else f" from {low:g} to {high:g}"
                raise RequestError(f"option '{name}' must be {kind}{bounds}", "options")
            values[name] = value
        elif name == "exact":  # dera-local's own: exact realignment (engine/exact.py)
            if value is not None and not isinstance(value, bool):
                raise RequestError("option 'exact' must be true or false", "options")
            values[name] = bool(value)
        elif name == "tool_choice":  # dera-local's own: with tools, "required" forces a call
            if value not in (None, "auto", "required", "none"):
                raise RequestError(
                    'option \'tool_choice\' must be "auto", "required" or "none"', "options"
                )
        elif name == "parallel_tool_calls":  # dera-local's own, as on /v1
            if value is not None and not isinstance(value, bool):
                raise RequestError("option 'parallel_tool_calls' must be true or false", "options")
        elif name == "num_ctx":
            if value is not None and (not is_number(value) or value > n_ctx):
                raise RequestError(
                    f"option 'num_ctx': this server's context is {n_ctx} tokens per request "
                    "(start it with a larger -c)",
                    "options",
                )
        elif name in ("stop", "negative_prompt") or name in HARMLESS_OPTIONS:
            continue
        elif name in REFUSED_OPTIONS:
            if value not in (None, _NEUTRAL_OPTIONS.get(name)):
                raise RequestError(f"option '{name}': {REFUSED_OPTIONS[name]}", "options")
        else:
            raise RequestError(f"option '{name}' is unknown", "options")
    return values


def _repeat_last_n(value: float | None, n_ctx: int) -> int:
    if value is None:
        return DEFAULT_REPEAT_LAST_N
    return n_ctx if value == -1 else int(value)


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError("option 'stop' must be a string or a list of strings", "options")
    return tuple(unicode_text(s, "options") for s in stop if s)


def _format(spec: Any) -> str | None:
    """format: "json" (any JSON object) or a JSON schema object."""
    if spec in (None, ""):
        return None
    if spec == "json":
        return JSON_OBJECT_GRAMMAR
    if isinstance(spec, dict):
        try:
            return json_schema_grammar(spec)
        except DeraError as exc:
            raise RequestError(f"'format': {exc}", "format") from None
    raise RequestError("'format' must be \"json\" or a JSON schema object", "format")


def _guidance(options: dict, values: dict) -> tuple[str | None, float]:
    """options.negative_prompt (text; for chat, the negative sequence's system message)
    and options.cfg_scale (default 1): classifier-free guidance, as dera_negative_prompt
    and dera_cfg_scale on /v1."""
    negative = options.get("negative_prompt")
    scale = values.get("cfg_scale", 1.0)
    if negative is None:
        if scale != 1.0:
            raise RequestError("option 'cfg_scale' needs a 'negative_prompt'", "options")
        return None, 1.0
    if not isinstance(negative, str):
        raise RequestError("option 'negative_prompt' must be a string", "options")
    return unicode_text(negative, "options"), float(scale)
