"""OpenAI's API: /v1/chat/completions, /v1/completions and /v1/models, beside Ollama's
(ollama.py) over the same run path (jobs.py). Per-request lam comes in the extra body
field `dera_lambda` (what the openai client's `extra_body` sends) or a model id
"dera-local@<lam>"; errors are OpenAI-style error objects with `param` naming the field.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import DeraError
from ..model_sets.pair import GenerationResult
from ..tools.render import native_tools, tool_messages
from .jobs import (
    Encoder,
    Failure,
    Served,
    answered,
    check_exact_request,
    check_schema_grammar,
    error_kind,
    refuse_unguided,
    run,
)
from .lam_range import describe_lam
from .requests import MODEL_ID, chat_messages, completion_prompt, parse_common
from .responses import ChatShape, CompletionShape, event
from .responses_api import responses_route
from .tool_requests import ToolRequest, parse_tool_fields, with_tools
from .worker import Job


def failure_response(failure: Failure) -> JSONResponse:
    """A Failure as OpenAI's error object."""
    error = {"message": failure.message, "type": failure.kind, "param": failure.param, "code": None}
    return JSONResponse({"error": error}, status_code=failure.status, headers=failure.headers)


async def chat_job(served: Served, body, chat: bool = True, fields: dict | None = None):
    """A /v1 body (chat or completions; the Responses API translates into chat) as its
    typed request, its tools and the job to run: checked, grammars compiled off the
    decode thread, prompts made on the worker."""
    pair = served.pair
    parsed = parse_common(
        body,
        served.default_lam,
        chat=chat,
        lam_range=served.lam_range_if_used,
        n_vocab=pair.n_vocab,
    )
    await check_schema_grammar(parsed.request.sampling, pair.model.vocab, "response_format")
    tools = parse_tool_fields(body, served.template.source) if chat else None
    parsed = await with_tools(parsed, tools, pair, "response_format")
    refuse_unguided(served, parsed, "dera_negative_prompt")
    check_exact_request(served, parsed, "dera_exact")
    prompt, negative_prompt = _prompts(served, body, chat, parsed.negative_prompt, tools)
    job = Job(
        prompt,
        parsed.request,
        negative_prompt,
        cfg_scale=parsed.cfg_scale,
        per_token=parsed.per_token,
        exact=parsed.exact,
        fields=fields
        or {"prompt": "messages" if chat else "prompt", "negative prompt": "dera_negative_prompt"},
    )
    return parsed, tools, job


def openai_routes(served: Served) -> list[Route]:
    pair = served.pair

    def token_bytes(token: int) -> bytes:
        return pair.model.token_bytes(token, special=True)

    async def respond(request: Request, chat: bool) -> Response:
        body = await served.body(request)
        parsed, tools, job = await chat_job(served, body, chat)
        shape = (
            ChatShape(parsed, token_bytes, tools) if chat else CompletionShape(parsed, token_bytes)
        )
        encoder = Encoder(
            lambda first, chunks: _sse(shape, first, chunks), "text/event-stream", shape.whole
        )
        return await run(request, served, job, parsed.stream, encoder)

    async def chat_completions(request: Request) -> Response:
        return await answered(lambda: respond(request, chat=True), failure_response)

    async def completions(request: Request) -> Response:
        return await answered(lambda: respond(request, chat=False), failure_response)

    async def models(request: Request) -> Response:
        presets = [(f"{MODEL_ID}@{lam:g}", lam) for lam in served.lam_presets]
        entries = [(MODEL_ID, served.default_lam), *presets]
        body = {
            "object": "list",
            "data": [
                {
                    "id": model_id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "dera-local",
                    "dera_lambda": lam,
                    "description": describe_lam(lam, default=model_id == MODEL_ID),
                }
                for model_id, lam in entries
            ],
        }
        if pair.depends_on_lam:
            body["dera_lam_range"] = [served.lam_range.low, served.lam_range.high]
        return JSONResponse(body)

    return [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route(
            "/v1/responses",
            responses_route(served, chat_job, failure_response),
            methods=["POST"],
        ),
    ]


def _prompts(
    served: Served, body: dict, chat: bool, negative: str | None, tools: ToolRequest | None = None
):
    """The job's prompt and negative prompt makers (run on the worker thread)."""
    pair, template = served.pair, served.template
    if chat:
        native = native_tools(template.source)
        messages, variables = tool_messages(
            chat_messages(body), None if tools is None else tools.tools, native
        )

        def prompt() -> list[int]:
            return template.tokens(pair, messages, **variables)

        def negative_prompt() -> list[int]:
            return template.negative_tokens(pair, messages, negative, **variables)
    else:
        text_or_ids = completion_prompt(body, pair.n_vocab)

        def prompt() -> list[int]:
            if isinstance(text_or_ids, str):
                return pair.tokenize(text_or_ids)
            return text_or_ids

        def negative_prompt() -> list[int]:
            return pair.tokenize(negative)

    return prompt, (None if negative is None else negative_prompt)


async def _sse(shape, first, chunks: AsyncIterator) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; closing it (client gone) cancels."""
    try:
        yield event(shape.opening())
        item = first
        while True:
            if isinstance(item, GenerationResult):
                for chunk in shape.held_back(item):  # text or tool calls held back
                    yield event(chunk)
                yield event(shape.closing(item))
                if shape.parsed.include_usage:
                    yield event(shape.usage_chunk(item))
                break
            yield event(shape.delta(item))
            try:
                item = await chunks.__anext__()
            except StopAsyncIteration:  # ended without a result: the server is stopping
                yield event(
                    {"error": {"message": "the server is shutting down", "type": "server_error"}}
                )
                break
            except DeraError as exc:  # failed mid-stream (an RPC worker lost): say so, end
                yield event({"error": {"message": str(exc), "type": error_kind(exc)}})
                break
        yield "data: [DONE]\n\n"
    finally:
        await chunks.aclose()
