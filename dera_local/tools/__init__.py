"""Tool calls (function calling) for a DeRa pair: what a tool is and which one may be
called (spec), the prompt that describes them (render: the model's own chat template
where it has a tools section, else a generic system message), the grammar that keeps a
call well-formed (grammar), and reading the calls back out of the answer (parse). The
calls are sampled from the DeRa mixture like any text: lam, presets and CFG apply."""

from .parse import ToolCall, ToolTextFilter, parse_calls
from .render import native_tools, tool_messages
from .spec import Tool, ToolChoice, ToolError, parse_tool_choice, parse_tools

__all__ = [
    "Tool",
    "ToolCall",
    "ToolChoice",
    "ToolError",
    "ToolTextFilter",
    "native_tools",
    "parse_calls",
    "parse_tool_choice",
    "parse_tools",
    "tool_messages",
]
