"""What a tool is (OpenAI's `{"type": "function", "function": {...}}`), and which tools
an answer may call (`tool_choice`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import BadParameterError

NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_TOOLS = 128


class ToolError(BadParameterError):
    """A tool definition or tool choice that cannot be used; `field` names where."""

    def __init__(self, message: str, field: str = "tools") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # the JSON schema of its arguments (an object)

    def openai(self) -> dict:
        """As chat templates (and OpenAI's API) expect it."""
        function = {"name": self.name, "description": self.description}
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    """none: the tools are described, never called; auto: the answer may call them (a
    grammar once a call opens); required: it calls at least one, from its first token;
    a name: it calls that one."""

    mode: str  # "none" | "auto" | "required" | "named"
    name: str | None = None

    def tools(self, tools: list[Tool]) -> list[Tool]:
        """The tools a call may name."""
        return [t for t in tools if t.name == self.name] if self.mode == "named" else tools


def parse_tools(value: Any, field: str = "tools") -> list[Tool]:
    """OpenAI's `tools` (also Ollama's: the same shape) as Tools; a ToolError naming the
    tool otherwise."""
    if not isinstance(value, list) or not value:
        raise ToolError(f"'{field}' must be a non-empty list of tools", field)
    if len(value) > MAX_TOOLS:
        raise ToolError(f"'{field}': at most {MAX_TOOLS} tools", field)
    tools, seen = [], set()
    for index, item in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(item, dict) or item.get("type", "function") != "function":
            raise ToolError(f"{where}: only tools of type 'function' are supported", field)
        function = item.get("function")
        if not isinstance(function, dict):
            raise ToolError(f"{where} needs a 'function' object", field)
        name = function.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ToolError(
                f"{where}: the function name must be 1-64 letters, digits, '_', '.' or '-'",
                field,
            )
        if name in seen:
            raise ToolError(f"{where}: two tools are named {name!r}", field)
        seen.add(name)
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise ToolError(f"{where} ({name}): 'description' must be a string", field)
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise ToolError(f"{where} ({name}): 'parameters' must be a JSON schema object", field)
        tools.append(Tool(name, description, parameters))
    return tools


def parse_tool_choice(value: Any, tools: list[Tool], field: str = "tool_choice") -> ToolChoice:
    """OpenAI's `tool_choice`: "none", "auto" (the default), "required", or
    {"type": "function", "function": {"name": ...}} naming one of the tools."""
    if value is None:
        return ToolChoice("auto")
    if value in ("none", "auto", "required"):
        return ToolChoice(value)
    if isinstance(value, dict) and isinstance(value.get("function"), dict):
        name = value["function"].get("name")
        if not any(t.name == name for t in tools):
            names = ", ".join(t.name for t in tools)
            raise ToolError(
                f"'{field}' names {name!r}, which is not one of the tools ({names})", field
            )
        return ToolChoice("named", name)
    raise ToolError(
        f'\'{field}\' must be "none", "auto", "required" or '
        '{"type": "function", "function": {"name": ...}}',
        field,
    )
