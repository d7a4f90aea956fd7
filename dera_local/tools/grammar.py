"""The grammar of tool calls: one <tool_call> block (or several, with parallel calls)
whose JSON names one of the tools and gives arguments matching its schema. Built with
the JSON-schema converter structured output uses (sampling/json_schema.py); each tool's
schema is converted alone first, so one the converter cannot handle is named."""

from __future__ import annotations

import re

from ..errors import BadParameterError
from ..sampling.json_schema import json_schema_grammar
from .render import CLOSE, OPEN
from .spec import Tool, ToolError

_ROOT = re.compile(r"^root ::=", re.MULTILINE)
# Calls in one answer, at most: past them the grammar is complete and only the end may
# come (a model that keeps opening calls would otherwise run to max_tokens, cut mid-call).
MAX_PARALLEL_CALLS = 8


def _literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def calls_grammar(tools: list[Tool], parallel: bool, field: str = "tools") -> str:
    """GBNF (root rule "root") for the calls of `tools`."""
    for index, tool in enumerate(tools):
        try:
            json_schema_grammar(tool.parameters)
        except BadParameterError as exc:
            raise ToolError(f"{field}[{index}] ({tool.name}): {exc}", field) from None
    objects = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = objects[0] if len(objects) == 1 else {"oneOf": objects}
    try:
        inner = json_schema_grammar(schema)
    except BadParameterError as exc:
        raise ToolError(f"'{field}': {exc}", field) from None
    inner = _ROOT.sub("tool-call-json ::=", inner, count=1)
    call = f"tool-call ::= {_literal(OPEN + chr(10))} tool-call-json {_literal(chr(10) + CLOSE)}"
    more = MAX_PARALLEL_CALLS - 1
    root = f'root ::= tool-call ("\\n" tool-call){{0,{more}}}' if parallel else "root ::= tool-call"
    return f"{root}\n{call}\n{inner}"
