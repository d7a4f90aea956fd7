"""OpenAI-style request bodies (/v1/chat/completions, /v1/completions) into a typed
`ParsedRequest` (a GenerationRequest and what the answer's shape needs), and the checks
both dialects share (numbers of any size, lam against the server's range, text). Every
problem is a RequestError naming its field, which the dialect writes as a 400."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ..engine.guidance import MAX_CFG_SCALE
from ..engine.logprobs import MAX_TOP_LOGPROBS
from ..engine.mixing import validate_lam
from ..engine.request import GenerationRequest
from ..errors import BadParameterError, DeraError
from ..sampling.chain import SamplingParams
from ..sampling.json_schema import JSON_OBJECT_GRAMMAR, json_schema_grammar
from .fields import check_fields
from .lam_range import LamRange

DEFAULT_MAX_TOKENS = 256

MODEL_ID = "dera-local"  # the server's one model; "dera-local@<lam>" picks a lam


class RequestError(BadParameterError):
    """A bad request body; `param` names the field, as OpenAI's error objects do."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ParsedRequest:
    """A body parsed by either dialect: the generation (its prompt still to come: the
    worker renders and tokenizes it off the event loop, then admits the request), and
    what only the answer's shape needs."""

    request: GenerationRequest
    stream: bool
    model: str
    include_usage: bool = False
    per_token: bool = False  # the client asked for per-token log-probabilities
    negative_prompt: str | None = None  # classifier-free guidance, with cfg_scale
    cfg_scale: float = 1.0
    exact: bool = False  # exact realignment (dera_exact; Ollama's options.exact)


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
    if not is_number(value):
        raise RequestError(f"'{name}' must be a number", name)
    if not low <= value <= high:  # exact for any int: 10**400 is compared, not converted
        raise RequestError(f"'{name}' must be between {low:g} and {high:g}", name)
    return float(value)


def true_or_false(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise RequestError(f"'{name}' must be true or false", name)
    return value


def object_field(body: dict, name: str) -> dict:
    """An optional JSON object field ({} when absent or null)."""
    value = body.get(name) or {}
    if not isinstance(value, dict):
        raise RequestError(f"'{name}' must be an object", name)
    return value


def shown_number(value: float) -> str:
    """A number for a message: %g, and a huge integer cut short rather than converted."""
    if isinstance(value, int) and abs(value) >= 10**15:
        return f"{str(value)[:8]}... ({len(str(abs(value)))} digits)"
    return f"{value:g}"


def is_number(value: Any) -> bool:
    """A JSON number that is finite (json.loads also reads NaN and Infinity), of any size:
    a 400-digit integer is a number, out of range, and must not overflow a float()."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def _integer(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"'{name}' must be an integer from {low} to {high}", name)
    return value


def unicode_text(value: str, param: str) -> str:
    """JSON may carry lone surrogates (\\ud800), which no tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"'{param}' is not valid Unicode (a lone surrogate)", param) from None
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise RequestError("'stop' must be a string or a list of up to 4 strings", "stop")
    return tuple(unicode_text(s, "stop") for s in stop if s)


def checked_lam(lam: float, lam_range: LamRange | None, param: str, what: str) -> float:
    """lam as a float, refused (naming `param`) when it is unusable or outside the
    server's range; checked before validate_lam, whose warnings (a negative lam) are
    for Python users and would only fill the server's log."""
    if lam_range is not None and not lam_range.holds(lam):
        raise RequestError(
            f"{what}: lam {shown_number(lam)} is outside this server's range {lam_range}", param
        )
    try:
        return validate_lam(lam, warn=False)
    except DeraError as exc:
        raise RequestError(f"{what}: {exc}", param) from None


def lam_of_model(model: str, default_lam: float) -> float:
    """The lam a model id asks for: "dera-local@0.7" -> 0.7 (a preset from /v1/models, or
    any other value); any other id, including plain "dera-local", -> the server's lam
    (desktop apps send whatever model name they were configured with)."""
    name, at, value = model.partition("@")
    if not at or name != MODEL_ID:
        return default_lam
    try:
        return validate_lam(float(value), warn=False)
    except (ValueError, DeraError):
        raise RequestError(
            f"model {model!r}: after '@' comes the lam to decode at, e.g. {MODEL_ID}@0.5",
            "model",
        ) from None


def parse_common(
    body: Any,
    default_lam: float,
    *,
    chat: bool = True,
    lam_range: LamRange | None = None,
    n_vocab: int = 2**31,
) -> ParsedRequest:
    """The request's settings; `n_vocab` bounds the token ids it may name (logit_bias)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    refused = check_fields(body, chat)
    if refused is not None:
        name, reason = refused
        raise RequestError(f"'{name}': {reason}", name)
    stream = true_or_false(body, "stream", False)
    options = object_field(body, "stream_options")
    model = body.get("model", MODEL_ID)
    if not isinstance(model, str):
        raise RequestError("'model' must be a string", "model")
    lam = body.get("dera_lambda", lam_of_model(model, default_lam))
    if not is_number(lam):
        raise RequestError("'dera_lambda' must be a number", "dera_lambda")
    param = "dera_lambda" if "dera_lambda" in body else "model"
    lam = checked_lam(lam, lam_range, param, f"'{param}'")
    max_tokens = _integer(body, "max_completion_tokens", 1, 1_000_000)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1, 1_000_000) or DEFAULT_MAX_TOKENS
    seed = _integer(body, "seed", -(2**63), 2**63 - 1)
    # Each field is range-checked above SamplingParams' own checks, so that the error
    # names the field (RequestError.param).
    sampling = SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        top_k=_integer(body, "top_k", 0, 1_000_000) or 0,
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        repeat_penalty=_number(body, "repeat_penalty", 1.0, 1e-3, 10.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        seed=client_seed(seed),
        grammar=_response_format(body) if chat else None,
        logit_bias=_logit_bias(body, n_vocab),
    )
    per_token, top_logprobs = logprob_fields(body, chat)
    negative, cfg_scale = _guidance(body)
    return ParsedRequest(
        request=GenerationRequest(
            lam=lam,
            sampling=sampling.with_seed(),
            max_tokens=max_tokens,
            stop=_stop(body),
            logprobs=True,  # always: every answer carries its `dera` object
            top_logprobs=top_logprobs,
        ),
        stream=stream,
        model=model,
        include_usage=bool(options.get("include_usage", False)),
        per_token=per_token,
        negative_prompt=negative,
        cfg_scale=cfg_scale,
        exact=true_or_false(body, "dera_exact", False),
    )


def client_seed(seed: int | None) -> int | None:
    """A client's seed (any 64-bit integer, OpenAI's and Ollama's range) as the 31 bits
    a sampler is seeded with and the answer reports."""
    return None if seed is None else seed & 0x7FFFFFFF


def logprob_fields(body: dict, chat: bool) -> tuple[bool, int]:
    """Per-token log-probabilities asked for: chat's logprobs (true/false) and
    top_logprobs (0-20), or the completions API's logprobs (0-20 alternatives)."""
    if chat:
        wanted = body.get("logprobs") or False
        if not isinstance(wanted, bool):
            raise RequestError("'logprobs' must be true or false", "logprobs")
        top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if top is not None and not wanted:
            raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return wanted, top or 0
    top = _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    return top is not None, top or 0


def _logit_bias(body: dict, n_vocab: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} map (bias -100..100; -100 bans the token)."""
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict) or len(bias) > 1024:
        raise RequestError("'logit_bias' must map token ids to numbers", "logit_bias")
    pairs = []
    for key, value in bias.items():
        # ASCII digits only: "²".isdigit() is true and int("²") fails
        if not (key.isascii() and key.isdigit()):
            raise RequestError(f"'logit_bias': {key!r} is not a token id", "logit_bias")
        if len(key) > 9 or int(key) >= n_vocab:
            raise RequestError(
                f"'logit_bias': token {key[:12]} is outside the vocabulary (0..{n_vocab - 1})",
                "logit_bias",
            )
        if not is_number(value) or not (-100 <= value <= 100):
            raise RequestError(
                f"'logit_bias' of token {key}: a number from -100 to 100", "logit_bias"
            )
        pairs.append((int(key), float(value)))
    return tuple(pairs)


def _response_format(body: dict) -> str | None:
    """response_format as a grammar: text (none), json_object, or json_schema."""
    spec = body.get("response_format")
    if spec is None:
        return None
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_GRAMMAR
    if kind == "json_schema":
        inner = spec.get("json_schema")
        schema = inner.get("schema", {}) if isinstance(inner, dict) else None
        if not isinstance(schema, dict):
            raise RequestError(
                '\'response_format\': json_schema needs {"json_schema": {"schema": {...}}}',
                "response_format",
            )
        try:
            return json_schema_grammar(schema)
        except DeraError as exc:
            raise RequestError(f"'response_format': {exc}", "response_format") from None
    raise RequestError(
        "'response_format' type must be text, json_object or json_schema", "response_format"
    )


def _guidance(body: dict) -> tuple[str | None, float]:
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
        return None, 1.0
    return unicode_text(negative, "dera_negative_prompt"), scale


# The roles a chat may have, as the chat template names them: OpenAI's "developer" is
# the system message of newer models.
ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}


def message_list(body: dict) -> list:
    """The body's `messages`: a non-empty list (each item checked by the dialect)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    return messages


def chat_messages(body: dict) -> list[dict]:
    """The conversation: system/developer, user, assistant (with `tool_calls`, its
    arguments parsed) and `tool` turns (a tool's result)."""
    out = []
    for index, message in enumerate(message_list(body)):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"{where} needs a string 'role'", "messages")
        role = message["role"]
        allowed = {"role", "content", "name"}  # "name" (a participant's) changes nothing
        if role == "assistant":
            allowed |= {"tool_calls", "refusal"}
        if role == "tool":
            allowed |= {"tool_call_id", "tool_name"}
        for name, value in message.items():
            if name in allowed or value in (None, [], ""):
                continue
            owner = "assistant" if name == "tool_calls" else "tool"
            reason = (
                f"'{name[:40]}' belongs to {owner} messages"
                if name in ("tool_calls", "tool_call_id", "tool_name")
                else f"unknown field '{name[:40]}'"
            )
            raise RequestError(f"{where}: {reason}", "messages")
        calls = None
        if role == "assistant" and message.get("tool_calls"):
            calls = tool_call_list(message["tool_calls"], where)
        content = message.get("content")
        if content is None and calls:
            content = ""
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = [p.get("text") for p in content if isinstance(p, dict)]
            if not all(isinstance(p, str) for p in parts) or len(parts) != len(content):
                raise RequestError(f"messages[{index}]: only text content is supported", "messages")
            content = "".join(parts)
        if not isinstance(content, str):
            raise RequestError(f"messages[{index}] needs string 'content'", "messages")
        role = ROLES.get(role)
        if role is None:
            raise RequestError(
                f"{where}: role {message['role'][:40]!r} is not one of "
                "system, developer, user, assistant, tool",
                "messages",
            )
        turn = {"role": role, "content": unicode_text(content, "messages")}
        if calls:
            turn["tool_calls"] = calls
        for name in ("tool_call_id", "name", "tool_name"):
            if role == "tool" and isinstance(message.get(name), str):
                turn[name] = message[name]
        out.append(turn)
    return out


def tool_call_list(value, where: str) -> list[dict]:
    """An assistant message's `tool_calls`, checked, arguments parsed (OpenAI sends them
    as JSON text, Ollama as an object)."""
    if not isinstance(value, list):
        raise RequestError(f"{where}: 'tool_calls' must be a list", "messages")
    calls = []
    for j, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError(
                f"{where}: tool_calls[{j}] needs a 'function' with a string 'name'", "messages"
            )
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise RequestError(
                    f"{where}: tool_calls[{j}] arguments are not JSON", "messages"
                ) from None
        if not isinstance(arguments, dict):
            raise RequestError(f"{where}: tool_calls[{j}] arguments must be an object", "messages")
        entry = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        calls.append(entry)
    return calls


def completion_prompt(body: dict, n_vocab: int = 2**31) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return unicode_text(prompt, "prompt")
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        bad = next((t for t in prompt if not 0 <= t < n_vocab), None)
        if bad is not None:
            shown = str(bad) if abs(bad) < 10**12 else f"{str(bad)[:12]}..."
            raise RequestError(
                f"'prompt': token id {shown} is outside the vocabulary (0..{n_vocab - 1})",
                "prompt",
            )
        return prompt
    raise RequestError("'prompt' must be a non-empty string or a list of token ids", "prompt")
