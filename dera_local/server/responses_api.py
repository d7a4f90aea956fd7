"""OpenAI's Responses API, stateless (as Ollama serves it): POST /v1/responses.

A body is translated into the chat-completions body it means (input items into
messages, `instructions` into the system message, flat function tools into nested ones,
`text.format` into `response_format`, `max_output_tokens` into `max_tokens`) and runs the
/v1 chat path (openai.chat_job: one typed request); the answer is written as a Response
object, or as the Responses stream of typed events. Nothing is stored: a body that asks
for an earlier response (`previous_response_id`) or for storage (`store: true`), or for
a built-in tool, is a 400 naming the field.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ..errors import DeraError
from ..model_sets.pair import GenerationResult
from ..tools.parse import ToolTextFilter, parse_calls
from .jobs import Encoder, Failure, Served, answered, failure_of, run
from .requests import RequestError
from .responses import dera

ACCEPTED = {
    "model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "text",
    "max_output_tokens", "temperature", "top_p", "stream", "store", "metadata", "user",
    "seed", "dera_lambda", "dera_negative_prompt", "dera_cfg_scale", "dera_exact",
    "truncation", "service_tier", "include",
}  # fmt: skip
REFUSED = {
    "previous_response_id": "this server is stateless: send the whole conversation as 'input'",
    "conversation": "this server is stateless: send the whole conversation as 'input'",
    "background": "background responses are not supported",
    "prompt": "stored prompts are not supported",
    "reasoning": "this model has no reasoning settings",
    "max_tool_calls": "max_tool_calls is not supported",
}
# Where the chat path's field names came from (its errors name the client's fields).
FIELD_OF = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "response_format": "text",
    "prompt": "input",
}


def chat_body(body: Any) -> dict:
    """The chat-completions body a Responses body means."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for name, value in body.items():
        if name in REFUSED and value not in (None, False):
            raise RequestError(f"'{name}': {REFUSED[name]}", name)
        if name not in ACCEPTED and name not in REFUSED:
            raise RequestError(f"'{name}': unknown field", name)
    if body.get("store") is True:
        raise RequestError(
            "'store': this server keeps no responses; send store: false (or leave it out) "
            "and the whole conversation as 'input'",
            "store",
        )
    if body.get("truncation") not in (None, "disabled"):
        raise RequestError("'truncation': only \"disabled\" is supported", "truncation")
    chat: dict = {"model": body.get("model", "dera-local"), "stream": body.get("stream", False)}
    messages = _messages(body.get("input"))
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise RequestError("'instructions' must be a string", "instructions")
        messages.insert(0, {"role": "system", "content": instructions})
    chat["messages"] = messages
    for ours, theirs in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"),
                         ("top_p", "top_p"), ("seed", "seed"),
                         ("parallel_tool_calls", "parallel_tool_calls")):  # fmt: skip
        if body.get(ours) is not None:
            chat[theirs] = body[ours]
    for name in ("dera_lambda", "dera_negative_prompt", "dera_cfg_scale", "dera_exact"):
        if name in body:
            chat[name] = body[name]
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    text = body.get("text")
    if text is not None and not isinstance(text, dict):
        raise RequestError("'text' must be an object", "text")
    if text and text.get("format") is not None:
        chat["response_format"] = _format(text["format"])
    return chat


def _text_of(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("input_text", "output_text", "text") or not isinstance(
                part.get("text"), str
            ):
                raise RequestError(f"{where}: only text content is supported", "input")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"{where}: 'content' must be text or a list of text parts", "input")


def _messages(items) -> list[dict]:
    if isinstance(items, str) and items:
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise RequestError("'input' must be text or a non-empty list of items", "input")
    messages: list[dict] = []
    for index, item in enumerate(items):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise RequestError(f"{where} must be an object", "input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise RequestError(
                    f"{where}: role must be user, system, developer or assistant", "input"
                )
            messages.append({"role": role, "content": _text_of(item.get("content"), where)})
        elif kind == "function_call":
            if not isinstance(item.get("name"), str):
                raise RequestError(f"{where}: a function_call needs a string 'name'", "input")
            call = {
                "id": item.get("call_id") or item.get("id") or f"call_{index}",
                "type": "function",
                "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str):
                output = json.dumps(output)
            messages.append(
                {"role": "tool", "tool_call_id": item.get("call_id", ""), "content": output}
            )
        else:
            raise RequestError(
                f"{where}: items of type {str(kind)[:40]!r} are not supported", "input"
            )
    return messages


def _tools(tools) -> list:
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list", "tools")
    out = []
    for index, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise RequestError(
                f"'tools[{index}]': built-in tools ({str(kind)[:40]!r}) are not supported, "
                "only functions",
                "tools",
            )
        function = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice):
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _format(text_format) -> dict:
    kind = text_format.get("type") if isinstance(text_format, dict) else None
    if kind == "text":
        return {"type": "text"}
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = {k: text_format[k] for k in ("name", "schema", "strict") if k in text_format}
        return {"type": "json_schema", "json_schema": schema}
    raise RequestError("'text.format' must be of type text, json_object or json_schema", "text")


def renamed(failure: Failure) -> Failure:
    """A chat-path failure in the Responses API's own field names."""
    param = FIELD_OF.get(failure.param, failure.param)
    message = failure.message
    for chat_name, ours in FIELD_OF.items():
        message = message.replace(f"'{chat_name}'", f"'{ours}'").replace(
            f"{chat_name}[", f"{ours}["
        )
    return Failure(failure.status, message, failure.kind, param, failure.headers)


class ResponseShape:
    """A Response object and its stream of events."""

    def __init__(self, parsed, tools, body: dict) -> None:
        self.parsed, self.body = parsed, body
        self.tools = tools if tools is not None and tools.calls_expected else None
        self.id = f"resp_{uuid.uuid4().hex[:24]}"
        self.message_id = f"msg_{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.sequence = 0

    def response(self, status: str, output: list, result: GenerationResult | None) -> dict:
        body = self.body
        response = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.parsed.model,
            "output": output,
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": None,
            "store": False,
            "temperature": body.get("temperature", 1.0),
            "top_p": body.get("top_p", 1.0),
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [],
            "text": body.get("text") or {"format": {"type": "text"}},
            "metadata": body.get("metadata") or {},
        }
        if result is not None:
            n_prompt = len(result.prompt_tokens)
            response["usage"] = {
                "input_tokens": n_prompt,
                "input_tokens_details": {"cached_tokens": result.reused_prompt_tokens},
                "output_tokens": len(result.tokens),
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": n_prompt + len(result.tokens),
            }
            response["dera"] = dera(result)
            if result.finish_reason == "length":
                response["status"] = "incomplete"
                response["incomplete_details"] = {"reason": "max_output_tokens"}
        return response

    def _message(self, text: str) -> dict:
        content = [{"type": "output_text", "text": text, "annotations": []}]
        return {"type": "message", "id": self.message_id, "status": "completed",
                "role": "assistant", "content": content}  # fmt: skip

    @staticmethod
    def _call(call) -> dict:
        return {
            "type": "function_call",
            "id": f"fc_{call.id.removeprefix('call_')}",
            "call_id": call.id,
            "name": call.name,
            "arguments": json.dumps(call.arguments, ensure_ascii=False),
            "status": "completed",
        }

    def output(self, text: str) -> list[dict]:
        content, calls = (text, []) if self.tools is None else parse_calls(text, self.tools.names)
        items = [self._message(content)] if content or not calls else []
        return items + [self._call(c) for c in calls]

    def whole(self, result: GenerationResult) -> dict:
        return self.response("completed", self.output(result.text), result)

    def event(self, kind: str, **fields) -> str:
        self.sequence += 1
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    async def stream(self, first, chunks: AsyncIterator) -> AsyncIterator[str]:
        """The events: created, in progress, the message's text deltas (held back from a
        possible call opener on, with tools), the calls, completed."""
        held = ToolTextFilter() if self.tools is not None else None
        opened, shown = False, []
        try:
            yield self.event("response.created", response=self.response("in_progress", [], None))
            yield self.event(
                "response.in_progress", response=self.response("in_progress", [], None)
            )
            item = first
            while not isinstance(item, GenerationResult):
                text = item.text if held is None else held.feed(item.text)
                if text:
                    if not opened:
                        opened = True
                        for line in self._open_message():
                            yield line
                    shown.append(text)
                    yield self.event("response.output_text.delta", item_id=self.message_id,
                                     output_index=0, content_index=0, delta=text)  # fmt: skip
                try:
                    item = await chunks.__anext__()
                except StopAsyncIteration:
                    yield self.event("error", message="the server is shutting down")
                    return
                except DeraError as exc:
                    yield self.event("error", message=str(exc))
                    return
            result = item
            calls = []
            if held is not None and held.held:
                _, calls = parse_calls(held.held, self.tools.names)
                if not calls:  # not a clean call after all: it is text
                    if not opened:
                        opened = True
                        for line in self._open_message():
                            yield line
                    shown.append(held.held)
                    yield self.event("response.output_text.delta", item_id=self.message_id,
                                     output_index=0, content_index=0, delta=held.held)  # fmt: skip
            output = []
            if opened:
                message = self._message("".join(shown))
                output.append(message)
                part = message["content"][0]
                yield self.event("response.output_text.done", item_id=self.message_id,
                                 output_index=0, content_index=0, text=part["text"])  # fmt: skip
                yield self.event("response.content_part.done", item_id=self.message_id,
                                 output_index=0, content_index=0, part=part)  # fmt: skip
                yield self.event("response.output_item.done", output_index=0, item=message)
            for call in calls:
                index, done = len(output), self._call(call)
                added = {**done, "arguments": "", "status": "in_progress"}
                yield self.event("response.output_item.added", output_index=index, item=added)
                yield self.event("response.function_call_arguments.delta", item_id=done["id"],
                                 output_index=index, delta=done["arguments"])  # fmt: skip
                yield self.event("response.function_call_arguments.done", item_id=done["id"],
                                 output_index=index, arguments=done["arguments"])  # fmt: skip
                yield self.event("response.output_item.done", output_index=index, item=done)
                output.append(done)
            yield self.event(
                "response.completed", response=self.response("completed", output, result)
            )
        finally:
            await chunks.aclose()

    def _open_message(self):
        item = {"type": "message", "id": self.message_id, "status": "in_progress",
                "role": "assistant", "content": []}  # fmt: skip
        yield self.event("response.output_item.added", output_index=0, item=item)
        part = {"type": "output_text", "text": "", "annotations": []}
        yield self.event("response.content_part.added", item_id=self.message_id,
                         output_index=0, content_index=0, part=part)  # fmt: skip


def responses_route(served: Served, chat_job, failure_response):
    async def respond(request: Request) -> Response:
        body = await served.body(request)
        try:
            chat = chat_body(body)
            fields = {"prompt": "input", "negative prompt": "dera_negative_prompt"}
            parsed, tools, job = await chat_job(served, chat, True, fields)
        except DeraError as exc:
            raise renamed(failure_of(exc)) from None
        except Failure as failure:
            raise renamed(failure) from None
        shape = ResponseShape(parsed, tools, body)
        encoder = Encoder(shape.stream, "text/event-stream", shape.whole)
        return await run(request, served, job, parsed.stream, encoder)

    async def endpoint(request: Request) -> Response:
        return await answered(lambda: respond(request), failure_response)

    return endpoint
