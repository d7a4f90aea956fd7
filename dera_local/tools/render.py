"""The prompt of a conversation with tools: the model's own chat template where it has a
tools section (Qwen2.5, Hermes, Llama 3.x and Mistral templates read a `tools` variable
and render `tool_calls` and `tool` messages themselves), else a generic rendering in the
format the grammar writes (<tool_call> blocks, as Hermes and Qwen2.5 do): the tools
described in the system message, earlier calls and results written into the turns."""

from __future__ import annotations

import json

from .spec import Tool

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def marker_tokens(model) -> tuple[int, ...]:
    """The vocabulary's single tokens for the call markers (Qwen2.5 has <tool_call> and
    </tool_call> as control tokens): written into the text as their own, so that calls
    can be read back."""
    tokens = []
    for marker in (OPEN, CLOSE):
        ids = model.tokenize(marker, add_special=False, parse_special=True)
        if len(ids) == 1:
            tokens.append(ids[0])
    return tuple(tokens)


def native_tools(template_source: str) -> bool:
    """Whether a chat template renders tools itself (it reads a `tools` variable)."""
    return "tools" in template_source


def call_text(name: str, arguments) -> str:
    """One call as the model writes it (and the grammar allows)."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{OPEN}\n{body}\n{CLOSE}"


def _describe(tools: list[Tool]) -> str:
    lines = [
        "You can call these tools (JSON schemas of their arguments):",
        *(json.dumps(t.openai()["function"], ensure_ascii=False) for t in tools),
        "To call one, answer with exactly:",
        call_text("<tool name>", {"<argument>": "<value>"}),
        "one block per call; the results come back in <tool_response> blocks.",
    ]
    return "\n".join(lines)


def tool_messages(
    messages: list[dict], tools: list[Tool] | None, native: bool
) -> tuple[list[dict], dict]:
    """(messages, extra template variables) to render. Messages may carry OpenAI's
    assistant `tool_calls` (arguments parsed) and `tool` turns."""
    if native:
        extra = {"tools": [t.openai() for t in tools]} if tools else {}
        return messages, extra
    out: list[dict] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = [
                call_text(c["function"]["name"], c["function"]["arguments"])
                for c in message["tool_calls"]
            ]
            content = "\n".join(([content] if content else []) + calls)
            out.append({"role": "assistant", "content": content})
        elif role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append({"role": role, "content": content})
    if tools:
        description = _describe(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{description}"}
        else:
            out.insert(0, {"role": "system", "content": description})
    return out, {}
