"""Seeded hostile request bodies for the server's two dialects (/v1 and Ollama's /api),
by class: JSON schemas with large bounds and deep nesting, numbers of every size and
script, token ids out of range, malformed messages, fields that are not ours. A case
number always gives the same body."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

# What every body asks for besides its hostile part: a short answer, so that the cases
# that are allowed (a schema within the limits) finish in milliseconds on tiny models.
SHORT = 4

HUGE = 10**400  # 401 digits: a float() of it overflows
NUMBERS = [
    HUGE, -HUGE, 2**63, 2**64, -(2**63) - 1, 2**70, 10**15, 1e308, -1e308, 1e-320, -0.0,
    "1", "²", "١", "1e3", " 1", True, False, [], {}, [1], {"a": 1},
]  # fmt: skip
COUNTS = [0, 1, 999, 1000, 1001, 5000, 20000, 10**9, HUGE, -1, 1.5, "100", True, None]
OPENAI_NUMBER_FIELDS = [
    "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty",
    "frequency_penalty", "seed", "max_tokens", "max_completion_tokens", "dera_lambda",
    "dera_cfg_scale", "top_logprobs", "n",
]  # fmt: skip
OLLAMA_OPTIONS = [
    "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n", "seed",
    "num_predict", "lam", "cfg_scale", "num_ctx", "presence_penalty", "frequency_penalty",
]  # fmt: skip


@dataclass
class Case:
    number: int
    family: str
    path: str
    body: Any  # a JSON value, or bytes sent as they are (non-standard JSON)

    @property
    def ollama(self) -> bool:
        return self.path.startswith("/api/")


def _nested_schema(rng: random.Random, depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = rng.choice(
            [
                {"type": "array", "items": schema},
                {"type": "object", "properties": {"x": schema}, "required": ["x"]},
                {"anyOf": [schema, {"type": "null"}]},
            ]
        )
    return schema


def _schema(rng: random.Random) -> dict:
    kind = rng.randrange(12)
    count = rng.choice(COUNTS)
    if kind == 0:
        return {"type": "string", "maxLength": count}
    if kind == 1:
        return {"type": "string", "minLength": count}
    if kind == 2:
        return {"type": "array", "items": {"type": "integer"}, "maxItems": count}
    if kind == 3:
        return {"type": "array", "items": {"type": "string"}, "minItems": count}
    if kind == 4:
        return _nested_schema(rng, rng.choice([5, 40, 64, 65, 200]))
    if kind == 5:
        size = rng.choice([10, 256, 257, 5000, 40000])
        return {"enum": [f"value-shared-by-all-{i}" for i in range(size)]}
    if kind == 6:
        size = rng.choice([2, 100, 300, 3000])
        return {"anyOf": [{"const": i} for i in range(size)]}
    if kind == 7:
        bound = rng.choice([3, 1000, 1001, 30000, 10**12])
        return {"type": "string", "pattern": f"^(ab|c){{0,{bound}}}$"}
    if kind == 8:  # recursion, dangling and remote references
        return rng.choice(
            [
                {
                    "$defs": {"N": {"type": "object", "properties": {"n": {"$ref": "#/$defs/N"}}}},
                    "$ref": "#/$defs/N",
                },  # fmt: skip
                {"$ref": "#/$defs/missing"},
                {"$ref": "https://example.com/schema.json"},
                {"$ref": "#"},
                {"type": "object", "properties": {"a": {"$ref": "#/properties/a"}}},
            ]
        )
    if kind == 9:
        size = rng.choice([10, 255, 300, 2000])
        return {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(size)}}
    if kind == 10:  # the same bounded enum referred to from many branches
        return {
            "$defs": {"E": {"enum": list(range(rng.choice([10, 50])))}},
            "anyOf": [{"$ref": "#/$defs/E"}] * rng.choice([2, 10]),
        }
    return rng.choice(
        [
            {"type": 7},
            {"type": ["string", "integer", "banana"]},
            {"properties": []},
            {"required": "x", "properties": {"x": {}}},
            {"type": "string", "minLength": 5, "maxLength": 2},
            {"enum": []},
            {"enum": "abc"},
            {"type": "string", "pattern": "(((("},
            {"type": "string", "pattern": "^a{99999999999999999999}$"},
            {"items": {"type": "string"}, "prefixItems": 3},
        ]
    )


def _deep_schema_text(depth: int) -> str:
    """A schema nested deeper than json.dumps (or the server's json.loads) recurses."""
    return '{"type": "array", "items": ' * depth + '{"type": "string"}' + "}" * depth


def _schema_case(rng: random.Random, number: int) -> Case:
    if rng.random() < 0.08:
        schema = _deep_schema_text(rng.choice([400, 1000, 3000]))
        if rng.random() < 0.5:
            head = json.dumps(_openai_chat())[:-1]
            text = head + ', "response_format": {"type": "json_schema", "json_schema": {"schema": '
            return Case(number, "schema", "/v1/chat/completions", (text + schema + "}}}").encode())
        head = json.dumps(_ollama_chat())[:-1]
        return Case(number, "schema", "/api/chat", (head + ', "format": ' + schema + "}").encode())
    schema = _schema(rng)
    if rng.random() < 0.5:
        body = _openai_chat()
        body["response_format"] = {"type": "json_schema", "json_schema": {"schema": schema}}
        return Case(number, "schema", "/v1/chat/completions", body)
    body = _ollama_chat()
    body["format"] = schema
    return Case(number, "schema", "/api/chat", body)


def _number_case(rng: random.Random, number: int) -> Case:
    value = rng.choice(NUMBERS)
    if rng.random() < 0.5:
        body = _openai_chat()
        field = rng.choice(OPENAI_NUMBER_FIELDS)
        if field == "top_logprobs":
            body["logprobs"] = True
        if field == "dera_cfg_scale":
            body["dera_negative_prompt"] = "be rude"
        body[field] = value
        if rng.random() < 0.2:  # a bias value rather than a field
            body.pop(field)
            body["logit_bias"] = {"5": value}
        return Case(number, "number", "/v1/chat/completions", body)
    body = _ollama_chat()
    field = rng.choice(OLLAMA_OPTIONS)
    body["options"][field] = value
    if field == "cfg_scale":
        body["options"]["negative_prompt"] = "be rude"
    return Case(number, "number", "/api/chat", body)


def _raw_number_case(rng: random.Random, number: int) -> Case:
    """JSON that Python reads but the standard does not have: NaN, Infinity."""
    literal = rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
    if rng.random() < 0.5:
        field = rng.choice(["temperature", "dera_lambda", "top_p", "seed"])
        text = json.dumps(_openai_chat())[:-1] + f', "{field}": {literal}}}'
        return Case(number, "number", "/v1/chat/completions", text.encode())
    field = rng.choice(["temperature", "lam", "num_predict", "seed"])
    text = json.dumps(_ollama_chat())[:-2] + f', "{field}": {literal}}}}}'  # into options
    return Case(number, "number", "/api/chat", text.encode())  # a repeated key: the last wins


def _id_case(rng: random.Random, number: int, n_vocab: int) -> Case:
    if rng.random() < 0.5:
        ids = rng.choice([[-1], [10**9], [n_vocab], [2**70], [HUGE], [1, -5, 2], [n_vocab - 1]])
        body = {"prompt": ids, "max_tokens": SHORT}
        return Case(number, "token ids", "/v1/completions", body)
    key = rng.choice(
        ["-1", "999999999", str(n_vocab), str(10**30), "²", "١٢", "1e3", " 1", "", "0x10"]
    )
    body = _openai_chat()
    body["logit_bias"] = {key: rng.choice([-100, 5, 100])}
    return Case(number, "token ids", "/v1/chat/completions", body)


def _message_case(rng: random.Random, number: int) -> Case:
    message = rng.choice(
        [
            {"role": "banana", "content": "hi"},
            {"role": "tool", "content": "hi"},
            {"content": "hi"},
            {"role": 5, "content": "hi"},
            {"role": "user", "content": 5},
            {"role": "user", "content": None},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
            {"role": "user", "content": [{"type": "text"}]},
            {"role": "user", "content": "\ud800"},
            {"role": "user", "content": "hi", "tool_calls": [{"id": 1}]},
            {"role": "user", "content": "hi", "images": ["aGk="]},
            "just a string",
            ["a", "list"],
            {"role": "user", "content": "x" * 200_000},
        ]
    )
    messages = rng.choice(
        [[message], [{"role": "system", "content": "s"}, message], message, [], None]
    )
    if rng.random() < 0.5:
        body = _openai_chat()
        body["messages"] = messages
        return Case(number, "messages", "/v1/chat/completions", body)
    body = _ollama_chat()
    body["messages"] = messages
    return Case(number, "messages", "/api/chat", body)


def _field_case(rng: random.Random, number: int) -> Case:
    if rng.random() < 0.5:
        body = _openai_chat()
        name, value = rng.choice(
            [
                ("n", 2), ("stream", "yes"), ("stream_options", 5), ("model", 5),
                ("model", "dera-local@abc"), ("model", "dera-local@5"), ("stop", [1]),
                ("stop", ["a"] * 5), ("response_format", {"type": "xml"}),
                ("response_format", "json"), ("tools", [{"type": "function"}]),
                ("wibble", 1), ("prompt", "x"), ("logprobs", "yes"),
                ("top_logprobs", 3), ("dera_cfg_scale", 2.0), ("dera_negative_prompt", 5),
                ("dera_lambda", -1), ("dera_lambda", 1e6),
            ]
        )  # fmt: skip
        body[name] = value
        return Case(number, "fields", "/v1/chat/completions", body)
    if rng.random() < 0.3:
        body = {
            "prompt": "hi",
            "max_tokens": SHORT,
            rng.choice(["suffix", "echo", "best_of"]): rng.choice(["x", True, 3]),
        }
        return Case(number, "fields", "/v1/completions", body)
    body = _ollama_chat()
    name, value = rng.choice(
        [
            ("model", "dera-local:5"), ("model", "dera-local:-1"), ("model", 7),
            ("model", "other"), ("stream", "no"), ("options", []), ("format", "xml"),
            ("think", True), ("context", [1, 2]), ("wibble", 1), ("prompt", 5),
        ]
    )  # fmt: skip
    if name == "options":
        body["options"] = value
    else:
        body[name] = value
    return Case(number, "fields", "/api/chat", body)


def _openai_chat() -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": SHORT}


def _ollama_chat() -> dict:
    return {
        "model": "dera-local",
        "stream": False,
        "messages": [{"role": "user", "content": "hi"}],
        "options": {"num_predict": SHORT},
    }


FAMILIES = ("schema", "number", "token ids", "messages", "fields")


def make_case(number: int, n_vocab: int) -> Case:
    """Case `number`: its family by number (so every group mixes them), its body by a
    generator seeded with the number."""
    rng = random.Random(number)
    family = FAMILIES[number % len(FAMILIES)]
    if family == "schema":
        return _schema_case(rng, number)
    if family == "number":
        return _raw_number_case(rng, number) if rng.random() < 0.2 else _number_case(rng, number)
    if family == "token ids":
        return _id_case(rng, number, n_vocab)
    if family == "messages":
        return _message_case(rng, number)
    return _field_case(rng, number)
