"""Reading tool calls back out of an answer, and holding a streamed answer's text back
from the moment a call may be opening (so a client never sees half a <tool_call>)."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from .render import CLOSE, OPEN

_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self) -> dict:
        """OpenAI's form: the arguments as a JSON string."""
        arguments = json.dumps(self.arguments, ensure_ascii=False)
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": arguments},
        }


def parse_calls(text: str, names: set[str]) -> tuple[str, list[ToolCall]]:
    """(the text before the first call, the calls) when every <tool_call> block of the
    answer parses as {"name": one of `names`, "arguments": {...}} and nothing but space
    follows the last; otherwise (text, []): an answer that is not a clean call is text."""
    start = text.find(OPEN)
    if start < 0:
        bare = _bare_calls(text, names)
        return ("", bare) if bare else (text, [])
    calls, end = [], start
    for match in _BLOCK.finditer(text, start):
        if text[end : match.start()].strip():
            return text, []  # words between calls: not a clean list of calls
        try:
            data = json.loads(match.group(1))
        except ValueError:
            return text, []
        if not isinstance(data, dict) or data.get("name") not in names:
            return text, []
        arguments = data.get("arguments", data.get("parameters"))
        if not isinstance(arguments, dict):
            return text, []
        calls.append(ToolCall(data["name"], arguments))
        end = match.end()
    if not calls or text[end:].strip():
        return text, []
    return text[:start].rstrip(), calls


def _bare_calls(text: str, names: set[str]) -> list[ToolCall]:
    """Calls written without the markers, the whole answer one JSON object per line
    naming a tool (as small models and Llama 3.x's format do, `parameters` for
    `arguments`): these are read too. Anything else is text. (With tool_choice auto such
    calls are not held to the tool's schema: the grammar starts at the opener.)"""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines or not text.lstrip().startswith("{"):
        return []
    calls = []
    for line in lines:
        try:
            data = json.loads(line)
        except ValueError:
            return []
        if not isinstance(data, dict) or data.get("name") not in names:
            return []
        arguments = data.get("arguments", data.get("parameters"))
        if not isinstance(arguments, dict):
            return []
        calls.append(ToolCall(data["name"], arguments))
    return calls


class ToolTextFilter:
    """Streamed text with everything from a possible call opener on held back: feed()
    returns what is safe to show now; `held` is the rest (parsed at the end)."""

    def __init__(self) -> None:
        self.held = ""
        self.opened = False
        self.shown = False  # some text was shown: a bare JSON call can no longer start

    def feed(self, text: str) -> str:
        if self.opened:
            self.held += text
            return ""
        pending = self.held + text
        if not self.shown and pending.lstrip().startswith("{"):  # maybe a bare call
            self.opened = True
            self.held = pending
            return ""
        start = pending.find(OPEN)
        if start >= 0:
            self.opened = True
            self.held = pending[start:]
            return pending[:start]
        # a tail that could still grow into the opener stays back
        keep = next(
            (
                n
                for n in range(min(len(OPEN) - 1, len(pending)), 0, -1)
                if OPEN.startswith(pending[-n:])
            ),
            0,
        )
        self.held = pending[len(pending) - keep :] if keep else ""
        shown = pending[: len(pending) - keep]
        self.shown = self.shown or bool(shown.strip())
        return shown
