"""Every request field the server knows, and what it does with it: honoured, refused
(400 naming it), or ignored because it changes nothing here. A field in none of these
is refused too: nothing a client sends is silently dropped. docs/server.md has the table.
"""

from __future__ import annotations

import json
from typing import Any

# Honoured by both endpoints (the dera_* fields are this server's own).
COMMON = {
    "model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k",
    "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty", "seed", "stop",
    "logit_bias", "logprobs", "n", "dera_lambda", "dera_negative_prompt", "dera_cfg_scale",
    "dera_exact",
}  # fmt: skip
CHAT = {
    "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
    "tool_choice", "parallel_tool_calls",
}  # fmt: skip
COMPLETION = {"prompt", "echo", "best_of", "suffix"}

# Changes nothing about the answer: accepted and not used.
HARMLESS = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"}

# Refused, with the reason (values that ask for nothing, such as "tools": [], pass).
REFUSED = {
    "functions": "the legacy 'functions' are not supported: use 'tools'",
    "function_call": "the legacy 'function_call' is not supported: use 'tool_choice'",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported (speculative decoding drafts itself)",
    "web_search_options": "web search is not supported",
    "reasoning_effort": "this model has no reasoning-effort setting",
    "verbosity": "this model has no verbosity setting",
}

# Refused unless they have the value that asks for nothing special.
_NEUTRAL = {"n": (1,), "best_of": (1,), "echo": (False,), "suffix": ("",)}


def check_fields(body: dict[str, Any], chat: bool) -> tuple[str, str] | None:
    """The first field to refuse and why; None when every field is fine."""
    known = COMMON | (CHAT if chat else COMPLETION) | HARMLESS
    for name, value in body.items():
        if value is None or value == [] or value == {}:
            continue  # "tools": null / [] asks for nothing
        if name in REFUSED:
            return name, REFUSED[name]
        # by type too: True == 1 and 0 == False in Python, not in JSON
        if name in _NEUTRAL and not any(
            type(value) is type(neutral) and value == neutral for neutral in _NEUTRAL[name]
        ):
            allowed = _NEUTRAL[name][0]
            return name, f"only {name} = {json.dumps(allowed)} is supported"
        if name not in known:
            other = "completions" if chat else "chat completions"
            where = f" (it belongs to {other})" if name in (COMPLETION if chat else CHAT) else ""
            return name, f"unknown field{where}"
    return None
