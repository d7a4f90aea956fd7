"""The one run path both dialects (OpenAI's /v1 and Ollama's /api) share: what they
serve (`Served`), the body read under a size limit and a deadline, the typed request's
grammar checked off the decode thread, the job started (or refused: queue full, shutting
down, a bad prompt), then streamed by the dialect's encoder or finished as one object,
and every failure as one `Failure` (status, message, kind, field) that each dialect
writes in its own error shape (OpenAI's error object, Ollama's error string)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..chat import ChatTemplate
from ..engine.exact import ExactBudgetError, check_exact
from ..errors import ContextFullError, DeraError, PromptError, RuntimeFailure, WorkerError
from ..model_sets.pair import GenerationResult
from ..sampling.chain import GrammarError, SamplingParams, check_grammar
from .lam_range import LamRange
from .requests import ParsedRequest, RequestError
from .worker import GenerationWorker, Job, QueueFull, ShuttingDown

log = logging.getLogger("dera_local.server")


@dataclass(frozen=True)
class Served:
    """What both dialects serve and how: the model set, its batching worker and chat
    template, the server's lam (default, presets, range) and body limits."""

    pair: object  # a loaded model set (DeraPair, Mixture)
    worker: GenerationWorker
    template: ChatTemplate
    default_lam: float
    lam_presets: Sequence[float]
    lam_range: LamRange
    max_body_bytes: int
    body_timeout: float

    @property
    def lam_range_if_used(self) -> LamRange | None:
        """The range a request's lam must lie in; None for a set without a lam dial."""
        return self.lam_range if self.pair.depends_on_lam else None

    async def body(self, request: Request):
        return await read_json(request, self.max_body_bytes, self.body_timeout)


@dataclass(frozen=True)
class Encoder:
    """How a dialect writes an answer: as a stream (`stream(first, chunks)` yields the
    lines; closing it cancels the job) or as one object (`whole(result)`)."""

    stream: Callable[[object, AsyncIterator], AsyncIterator[str]]
    media_type: str
    whole: Callable[[GenerationResult], dict]


def check_exact_request(served: Served, parsed: ParsedRequest, field: str) -> None:
    """An exact request that exact realignment cannot sample is a 400 naming `field`."""
    if not parsed.exact:
        return
    guided = parsed.negative_prompt is not None
    target = None if guided else served.pair.exact_target(parsed.request.lam, None)
    try:
        check_exact(replace(parsed.request, target_lam=target))
    except DeraError as exc:
        raise RequestError(f"'{field}': {exc}", field) from None


def refuse_unguided(served: Served, parsed: ParsedRequest, field: str) -> None:
    if parsed.negative_prompt is not None and not served.worker.guided:
        raise RequestError("this server was started with --no-cfg: negative prompts are off", field)


async def run(
    request: Request, served: Served, job: Job, stream: bool, encoder: Encoder
) -> Response:
    """Runs a job to its answer: streamed by the encoder, or whole (499 when the client
    went away first). Refusals and failures are raised as Failures, for the dialect to
    write in its error shape."""
    first, chunks = await start(served.worker, job)
    if stream:
        return StreamingResponse(encoder.stream(first, chunks), media_type=encoder.media_type)
    result = await finish(request, first, chunks)
    if result is None:  # the client went away
        return Response(status_code=499)
    return JSONResponse(encoder.whole(result))


async def answered(
    attempt: Callable[[], Awaitable[Response]], write: Callable[[Failure], Response]
) -> Response:
    """The attempt's response, or its failure (a DeraError or a Failure) written in the
    dialect's error shape by `write`."""
    try:
        return await attempt()
    except DeraError as exc:
        return write(failure_of(exc))
    except Failure as failure:
        return write(failure)


class Failure(Exception):
    """A request that cannot be answered: HTTP status, message, OpenAI-style kind, the
    field at fault, extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        headers: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.headers = param, headers


def error_kind(exc: DeraError) -> str:
    if isinstance(exc, WorkerError):
        return "worker_unavailable"
    return "server_error" if isinstance(exc, RuntimeFailure) else "invalid_request_error"


def failure_of(exc: DeraError) -> Failure:
    """The caller's fault is 400; a full KV cache 503 (retry later); a lost RPC worker
    503 (nothing works until it is back and the server restarted); any other runtime
    failure 500."""
    if isinstance(exc, ExactBudgetError):  # the attempts cost more than allowed
        return Failure(503, str(exc), "exact_budget_spent")
    if isinstance(exc, ContextFullError):
        return Failure(503, str(exc), "server_busy", headers={"Retry-After": "1"})
    if isinstance(exc, WorkerError):
        return Failure(503, str(exc), error_kind(exc))
    if isinstance(exc, RuntimeFailure):
        return Failure(500, str(exc), "server_error")
    return Failure(400, str(exc), param=getattr(exc, "param", None))


def shutting_down() -> Failure:
    return Failure(503, "the server is shutting down", "server_shutting_down")


async def read_json(request: Request, max_bytes: int, timeout: float):
    """The request body as JSON. Counted while it arrives (a chunked body has no
    Content-Length to check first), under one deadline for all of it: a client
    trickling (or never finishing) its body would otherwise hold the connection forever
    (uvicorn times out idle connections between requests, not a stalled body)."""
    chunks = []

    async def collect() -> None:
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes:
                raise Failure(413, f"request body over {max_bytes} bytes")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(collect(), timeout)
    except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
        raise Failure(
            408, f"request body not received within {timeout:g} s", headers={"Connection": "close"}
        ) from None
    except ClientDisconnect:  # hung up mid-body: nobody to answer, nothing to report
        log.debug(
            "%s %s: the client hung up while sending its body", request.method, request.url.path
        )
        raise Failure(499, "the client closed the connection") from None
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, huge ints, deep nesting
        reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise Failure(400, f"malformed JSON: {reason}") from None


async def start(worker: GenerationWorker, job: Job) -> tuple[object, AsyncIterator]:
    """Queues the job and waits for its first item (a text chunk, or the result); the
    rest follow from the returned iterator. Refusals are Failures."""
    chunks = worker.run(job)
    try:
        return await chunks.__anext__(), chunks
    except QueueFull:
        raise Failure(
            503, "the server is busy; retry shortly", "server_busy", headers={"Retry-After": "1"}
        ) from None
    except ShuttingDown:
        raise shutting_down() from None
    except StopAsyncIteration:
        if worker.stopping:
            raise shutting_down() from None
        raise Failure(500, "generation ended without a result", "server_error") from None
    except PromptError as exc:
        field = job.fields.get(exc.which)
        message = f"'{field}': {exc}" if field else str(exc)
        raise Failure(400, message, param=field) from None
    except DeraError as exc:
        raise failure_of(exc) from None


async def finish(request: Request, first, chunks: AsyncIterator) -> GenerationResult | None:
    """Follows a started job to its result; None when the client went away (it is
    stopped at that token). A failure after the start (an RPC worker lost) or a
    shutdown is a Failure."""
    result = first
    try:
        async for item in chunks:
            result = item  # text chunks, then the GenerationResult
            if await request.is_disconnected():  # nobody to answer: stop at this token
                await chunks.aclose()
                return None
    except DeraError as exc:
        raise failure_of(exc) from None
    if not isinstance(result, GenerationResult):  # stopped by a shutdown
        raise shutting_down()
    return result


async def check_schema_grammar(sampling: SamplingParams, vocab, field: str) -> None:
    """Compiles the grammar made from a request's JSON schema once, in a thread of its
    own (neither the event loop nor the decode thread that every request shares), so
    that what llama.cpp refuses is a 400 naming the field before the job is queued."""
    if sampling.grammar is None:
        return
    try:
        await asyncio.to_thread(check_grammar, sampling.grammar, vocab)
    except GrammarError as exc:
        because = f" ({exc.reason})" if exc.reason else ""
        raise RequestError(
            f"'{field}': llama.cpp cannot use the grammar made from this JSON schema{because}",
            field,
        ) from None
    except DeraError as exc:
        raise RequestError(f"'{field}': {exc}", field) from None
