"""A request's tools (both dialects): parsed, turned into the grammar that keeps calls
well-formed, and the messages of a conversation that has called tools before."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..sampling.chain import SamplingParams
from ..tools.grammar import calls_grammar
from ..tools.render import OPEN, marker_tokens, native_tools
from ..tools.spec import Tool, ToolChoice, ToolError, parse_tool_choice, parse_tools
from .jobs import check_schema_grammar
from .requests import RequestError, true_or_false


@dataclass(frozen=True)
class ToolRequest:
    tools: list[Tool]
    choice: ToolChoice
    parallel: bool
    native: bool  # the chat template renders tools itself

    @property
    def names(self) -> set[str]:
        return {t.name for t in self.choice.tools(self.tools)}

    @property
    def calls_expected(self) -> bool:
        return self.choice.mode != "none"


def parse_tool_fields(body: dict, template_source: str) -> ToolRequest | None:
    """`tools`, `tool_choice`, `parallel_tool_calls` (None without tools)."""
    if not body.get("tools"):
        if body.get("tool_choice") not in (None, "none", "auto"):
            raise RequestError("'tool_choice' needs 'tools'", "tool_choice")
        return None
    try:
        tools = parse_tools(body["tools"])
        choice = parse_tool_choice(body.get("tool_choice"), tools)
    except ToolError as exc:
        raise RequestError(str(exc), exc.field) from None
    parallel = true_or_false(body, "parallel_tool_calls", True)
    return ToolRequest(tools, choice, parallel, native_tools(template_source))


async def with_tools(parsed, tools: ToolRequest | None, pair, other_grammar_field: str):
    """The parsed request with its tools applied: the calls' grammar (compiled off the
    decode thread: a refusal is a 400 naming `tools`) and the vocabulary's call markers
    written into the text, so the calls can be read back."""
    if tools is None or not tools.calls_expected:
        return parsed
    sampling = with_tool_grammar(parsed.request.sampling, tools, other_grammar_field)
    request = replace(parsed.request, sampling=sampling, shown_special=marker_tokens(pair.model))
    await check_schema_grammar(sampling, pair.model.vocab, "tools")
    return replace(parsed, request=request)


def with_tool_grammar(
    sampling: SamplingParams, tools: ToolRequest | None, other_grammar_field: str
) -> SamplingParams:
    """The sampling with the calls' grammar: from the first token for `required` or a
    named tool, from the call's opener on for `auto` (a lazy grammar)."""
    if tools is None or not tools.calls_expected:
        return sampling
    if sampling.grammar is not None:
        raise RequestError(
            f"'tools' with '{other_grammar_field}' is not supported: a call has its own "
            "grammar (ask for tools or for structured output)",
            "tools",
        )
    try:
        grammar = calls_grammar(tools.choice.tools(tools.tools), tools.parallel)
    except ToolError as exc:
        raise RequestError(str(exc), exc.field) from None
    triggers = (OPEN,) if tools.choice.mode == "auto" else ()
    return replace(sampling, grammar=grammar, grammar_triggers=triggers)
