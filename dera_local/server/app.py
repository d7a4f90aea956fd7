"""The Starlette app: /v1/chat/completions, /v1/completions, /v1/models, /health, and
Ollama's API under /api/ (see ollama.py).

Per-request lam comes in the extra body field `dera_lambda` (what the openai client's
`extra_body` sends). Errors are OpenAI-style JSON objects; nothing answers with a
traceback.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import secrets
import sys
import traceback
from collections.abc import AsyncIterator, Sequence

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..chat import ChatTemplate
from ..errors import BadParameterError, DeraError
from ..model_sets.pair import DeraPair, GenerationResult
from ..rpc import faults as rpc_faults
from .jobs import (
    Failure,
    check_schema_grammar,
    error_kind,
    failure_of,
    finish,
    log,
    read_json,
    start,
)
from .lam_range import LamRange, describe_lam
from .ollama import ollama_error, ollama_routes
from .requests import (
    MODEL_ID,
    RequestError,
    chat_messages,
    completion_prompt,
    parse_common,
)
from .responses import ChatShape, CompletionShape, event
from .worker import GenerationWorker, Job

DEFAULT_LAM_PRESETS = (0.0, 0.5, 1.0, 1.5, 2.0)
# The chat page at /: three small files shipped in the package, read once.
_STATIC = {
    name: (importlib.resources.files(__package__) / "static" / name).read_bytes()
    for name in ("index.html", "chat.js", "chat.css")
}
_MEDIA_TYPES = {
    "html": "text/html; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "css": "text/css; charset=utf-8",
}


def error_response(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def _ollama_error(status: int, message: str, kind: str = "", headers=None) -> JSONResponse:
    return ollama_error(status, message, headers)


def failure_response(failure: Failure) -> JSONResponse:
    return error_response(
        failure.status, failure.message, failure.kind, failure.param, failure.headers
    )


class _Guard:
    """ASGI middleware: bearer-token auth, a request body size limit, and a JSON 500
    (never a traceback) for anything unexpected."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        path = scope["path"]
        # Ollama's endpoints answer errors in Ollama's shape: {"error": "..."}
        error = _ollama_error if path.startswith("/api/") else error_response
        if self.api_key and path.startswith(("/v1/", "/api/")):
            given = headers.get(b"authorization", b"").decode("latin-1")
            expected = f"Bearer {self.api_key}"
            if not secrets.compare_digest(given.encode(), expected.encode()):
                await error(
                    401,
                    "missing or wrong API key (Authorization: Bearer ...)",
                    "authentication_error",
                )(scope, receive, send)
                return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await error(413, f"request body over {self.max_body_bytes} bytes")(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        except ClientDisconnect:  # a hang-up no handler caught: nobody to answer
            log.debug("%s: the client hung up", path)
        except Exception:
            traceback.print_exc(file=sys.stderr)
            await error(500, "internal server error", "server_error")(scope, receive, send)


def create_app(
    pair: DeraPair,
    *,
    default_lam: float = 1.0,
    api_key: str | None = None,
    max_queue: int = 64,
    max_body_bytes: int = 1 << 20,
    chat_template: str | None = None,
    body_timeout: float = 30.0,
    parallel: int = 4,
    lam_presets: Sequence[float] = DEFAULT_LAM_PRESETS,
    guided: bool = True,
    lam_range: LamRange | None = None,
) -> Starlette:
    """The ASGI app serving `pair`; run it with uvicorn (see cli/serve.py).

    parallel: requests decoded together (continuous batching), each in a slot of
    pair.n_ctx tokens. lam_presets: the lams /v1/models offers as "dera-local@<lam>".
    guided: accept negative prompts (dera_negative_prompt); each slot then has room
    for a second sequence (the KV cache is twice as large).
    """
    lam_range = lam_range or LamRange()
    outside = [lam for lam in (default_lam, *lam_presets) if not lam_range.holds(lam)]
    if outside and pair.depends_on_lam:
        raise BadParameterError(
            f"lam {outside[0]:g} is outside the server's lam range {lam_range}",
            cli_hint="widen --lam-range or change --lam/--lam-presets",
        )
    worker = GenerationWorker(pair, max_queue, parallel=parallel, guided=guided)
    pair_is_remote = pair.is_remote

    def token_bytes(token: int) -> bytes:
        return pair.model.token_bytes(token, special=True)

    template = ChatTemplate.for_pair(pair, chat_template)
    vocab = pair.model.vocab

    async def respond(request: Request, chat: bool) -> Response:
        try:
            body = await read_json(request, max_body_bytes, body_timeout)
            parsed = parse_common(
                body,
                default_lam,
                chat=chat,
                lam_range=lam_range if pair.depends_on_lam else None,
                n_vocab=pair.n_vocab,
            )
            await check_schema_grammar(parsed.request.sampling, vocab, "response_format")
            negative = parsed.negative_prompt
            if negative is not None and not worker.guided:
                raise RequestError(
                    "this server was started with --no-cfg: negative prompts are off",
                    "dera_negative_prompt",
                )
            if chat:
                messages = chat_messages(body)

                def prompt() -> list[int]:
                    return template.tokens(pair, messages)

                def negative_prompt() -> list[int]:  # the same turns under its system message
                    turns = [m for m in messages if m["role"] != "system"]
                    head = [{"role": "system", "content": negative}]
                    return template.tokens(pair, head + turns)
            else:
                text_or_ids = completion_prompt(body, pair.n_vocab)

                def prompt() -> list[int]:
                    if isinstance(text_or_ids, str):
                        return pair.tokenize(text_or_ids)
                    return text_or_ids

                def negative_prompt() -> list[int]:
                    return pair.tokenize(negative)

            job = Job(
                prompt,
                parsed.request,
                negative_prompt if negative is not None else None,
                cfg_scale=parsed.cfg_scale,
                per_token=parsed.per_token,
                fields={
                    "prompt": "messages" if chat else "prompt",
                    "negative prompt": "dera_negative_prompt",
                },
            )
            shape = (ChatShape if chat else CompletionShape)(parsed, token_bytes)
            first, chunks = await start(worker, job)
            if parsed.stream:
                return StreamingResponse(_sse(shape, first, chunks), media_type="text/event-stream")
            result = await finish(request, first, chunks)
        except DeraError as exc:
            return failure_response(failure_of(exc))
        except Failure as failure:
            return failure_response(failure)
        if result is None:  # the client went away
            return Response(status_code=499)
        return JSONResponse(shape.whole(result))

    async def chat_completions(request: Request) -> Response:
        return await respond(request, chat=True)

    async def completions(request: Request) -> Response:
        return await respond(request, chat=False)

    async def models(request: Request) -> Response:
        entries = [(MODEL_ID, default_lam)] + [(f"{MODEL_ID}@{lam:g}", lam) for lam in lam_presets]
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
            body["dera_lam_range"] = [lam_range.low, lam_range.high]
        return JSONResponse(body)

    async def page(request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        return Response(_STATIC[name], media_type=_MEDIA_TYPES[name.rsplit(".", 1)[1]])

    async def page_or_404(request: Request) -> Response:
        if request.path_params["name"] not in _STATIC:
            return await not_found(request, None)
        return await page(request)

    async def health(request: Request) -> Response:
        counters = worker.counters
        lost = rpc_faults.fault() if pair_is_remote else None
        return JSONResponse(
            {
                # A lost RPC worker: every new request would fail, so health says so.
                **({"status": "ok"} if lost is None else {"status": "unavailable", "reason": lost}),
                "in_flight": worker.in_flight,
                "completed": counters.completed,
                "cancelled": counters.cancelled,
                "failed": counters.failed,
                "rejected": counters.rejected,
            },
            status_code=200 if lost is None else 503,
        )

    async def not_found(request: Request, exc) -> Response:
        if request.url.path.startswith("/api/"):
            return ollama_error(404, f"no route {request.url.path}")
        return error_response(404, f"no route {request.url.path}", "not_found_error")

    async def wrong_method(request: Request, exc) -> Response:
        if request.url.path.startswith("/api/"):
            return ollama_error(405, f"{request.method} is not allowed here")
        return error_response(405, f"{request.method} is not allowed here")

    ollama = ollama_routes(
        pair,
        worker,
        template,
        default_lam=default_lam,
        lam_presets=lam_presets,
        lam_range=lam_range,
        max_body_bytes=max_body_bytes,
        body_timeout=body_timeout,
    )

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            *ollama,
            Route("/", page, methods=["GET"]),
            Route("/{name:str}", page_or_404, methods=["GET"]),
        ],
        middleware=[Middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)],
        exception_handlers={404: not_found, 405: wrong_method},
        lifespan=_closing(worker),
    )
    app.state.worker = worker
    return app


def _closing(worker: GenerationWorker):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.close()

    return lifespan


async def _sse(shape, first, chunks: AsyncIterator) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; closing it (client gone) cancels."""
    try:
        yield event(shape.opening())
        item = first
        while True:
            if isinstance(item, GenerationResult):
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
