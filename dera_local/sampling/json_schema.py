"""Structured output: a JSON schema (or "any JSON object") as a GBNF grammar for
llama.cpp's sampler chain.

The converter is llama-cpp-python's `llama_grammar.json_schema_to_gbnf`, its port of
llama.cpp's json_schema_to_grammar (the converter llama.cpp's server uses for
`response_format`): already installed with llama.cpp, kept in step with the grammar
engine that runs its output (same GBNF dialect, same built-in rules). Writing another
would only add a second set of bugs.
"""

from __future__ import annotations

import json
from dataclasses import replace

from llama_cpp import llama_grammar

from ..errors import BadParameterError
from .grammar_bounds import check_gbnf, check_schema

# The converter's string character rule lets control characters (a raw newline) into
# strings, which JSON forbids (json.loads refuses them); llama.cpp's current converter
# excludes them. The one rule is replaced by llama.cpp's.
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


_MAX_DETAIL = 200


def _strict(grammar: str) -> str:
    return grammar.replace(_LOOSE_CHAR, _STRICT_CHAR)


# Any JSON object: what {"type": "json_object"} (and the schema {}) asks for.
JSON_OBJECT_GRAMMAR = _strict(llama_grammar.json_schema_to_gbnf(json.dumps({"type": "object"})))


def json_schema_grammar(schema: str | dict | bool) -> str:
    """The GBNF grammar of a JSON schema (text or parsed). Raises BadParameterError
    with one line naming what the converter could not handle."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise BadParameterError(f"the JSON schema is not JSON: {exc}") from None
    if schema is True or schema == {}:
        return JSON_OBJECT_GRAMMAR
    if not isinstance(schema, dict):
        raise BadParameterError('a JSON schema is an object, e.g. {"type": "object"}')
    check_schema(schema)  # before the converter: some of its output grows with counts
    try:
        grammar = _strict(llama_grammar.json_schema_to_gbnf(json.dumps(schema)))
    except RecursionError:
        raise BadParameterError("this JSON schema is not supported: it nests too deeply") from None
    except Exception as exc:  # noqa: BLE001 - third-party code fed a client's schema
        # Any failure of the converter means "cannot convert this schema": it asserts,
        # and a malformed schema ("properties": []) reaches attribute errors.
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if len(detail) > _MAX_DETAIL:  # the converter quotes whole sub-schemas
            detail = detail[:_MAX_DETAIL] + "..."
        raise BadParameterError(f"this JSON schema is not supported: {detail}") from None
    try:
        check_gbnf(grammar)
    except BadParameterError as exc:
        raise BadParameterError(f"this JSON schema is too large: {exc}") from None
    return grammar


def with_json_schema(sampling, schema: str | dict | None):
    """`sampling` with the schema's grammar (unchanged when there is no schema)."""
    if schema is None:
        return sampling
    if sampling.grammar is not None:
        raise BadParameterError("give a grammar or a JSON schema, not both")
    return replace(sampling, grammar=json_schema_grammar(schema))
