"""The limits on grammars (dera_local/grammar_bounds.py): at each limit llama.cpp still
accepts what the converter writes, one past it is refused in one line before llama.cpp
sees it; the GBNF scanner ignores parentheses inside literals, classes and comments."""

from __future__ import annotations

import pytest

from dera_local.errors import BadParameterError
from dera_local.sampling.chain import check_grammar
from dera_local.sampling.grammar_bounds import (
    MAX_ALTERNATIVES,
    MAX_GROUP_DEPTH,
    MAX_REPEAT,
    check_gbnf,
    check_schema,
)
from dera_local.sampling.json_schema import json_schema_grammar


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "maxLength": MAX_REPEAT},
        {"type": "string", "minLength": MAX_REPEAT},
        {"type": "array", "items": {"type": "integer"}, "maxItems": MAX_REPEAT},
        {"enum": list(range(MAX_ALTERNATIVES))},
        {"type": "object", "properties": {f"p{i}": {} for i in range(MAX_ALTERNATIVES - 1)}},
    ],
)
def test_at_each_limit_llama_cpp_accepts_the_grammar(schema, pair):
    check_grammar(json_schema_grammar(schema), pair.model.vocab)  # raises if refused


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ({"type": "string", "maxLength": MAX_REPEAT + 1}, "maxLength 1001 at # is over 1000"),
        ({"type": "string", "minLength": 10**9}, "minLength 1000000000"),
        ({"type": "array", "items": {}, "minItems": 10**400}, "minItems 1000"),
        ({"type": "string", "maxLength": 2.5}, "must be a whole number"),
        ({"type": "string", "minLength": 3, "maxLength": 2}, "minLength is above maxLength"),
        ({"enum": list(range(MAX_ALTERNATIVES + 1))}, "257 values"),
        ({"anyOf": [{"const": i} for i in range(MAX_ALTERNATIVES + 1)]}, "257 alternatives"),
        (
            {"$defs": {"E": {"enum": list(range(30))}}, "anyOf": [{"$ref": "#/$defs/E"}] * 9},
            "270 alternatives",  # a $ref counts as often as it is used side by side
        ),
        ({"type": "string", "pattern": "^a{0,1001}$"}, "repeats {0,1001}"),
        ({"$defs": {"N": {"items": {"$ref": "#/$defs/N"}}}, "$ref": "#/$defs/N"}, "itself"),
        ({"$ref": "#/$defs/nowhere"}, "does not define"),
        ({"properties": []}, "not supported"),
    ],
)
def test_past_a_limit_the_schema_is_refused_in_one_line(schema, says):
    with pytest.raises(BadParameterError) as caught:
        json_schema_grammar(schema)
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_a_deep_schema_is_refused_with_a_short_path():
    schema: dict = {"type": "string"}
    for _ in range(200):
        schema = {"type": "array", "items": schema}
    with pytest.raises(BadParameterError, match="nests deeper than 64") as caught:
        check_schema(schema)
    assert len(str(caught.value)) < 160


def test_gbnf_nesting_counts_only_real_groups():
    check_gbnf('root ::= "((((" [(((] ")" # ((((\n')
    check_gbnf("root ::= " + "(" * MAX_GROUP_DEPTH + '"a"' + ")" * MAX_GROUP_DEPTH)
    with pytest.raises(BadParameterError, match="nests groups 1001 deep"):
        check_gbnf("root ::= " + "(" * 1001 + '"a"' + ")" * 1001)
    check_gbnf('root ::= "\\"(" "a"{1000}')  # an escaped quote does not end the literal
    with pytest.raises(BadParameterError, match="repeats {0,30000}"):
        check_gbnf("root ::= [a-z]{0,30000}")
    with pytest.raises(BadParameterError, match="characters"):
        check_gbnf('root ::= "' + "a" * 300_000 + '"')


def test_a_grammar_past_the_limits_never_reaches_llama_cpp(pair):
    """Before the limits this grammar crashed the process (SIGSEGV in llama.cpp's
    parser); now it is a BadParameterError, and the decoder stays usable."""
    from dera_local.sampling.chain import SamplingParams

    deep = "root ::= " + "(" * 20_000 + '"a"' + ")" * 20_000
    with pytest.raises(BadParameterError, match="nests groups 20000 deep"):
        pair.generate("hi", sampling=SamplingParams(temperature=0, grammar=deep), max_tokens=2)
    assert pair.generate("hi", sampling=SamplingParams(temperature=0), max_tokens=2).tokens
