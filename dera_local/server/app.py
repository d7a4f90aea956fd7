"""The Starlette app: the two API dialects (OpenAI's /v1 in openai.py, Ollama's /api in
ollama.py) over one run path (jobs.py), the guard every request passes (API key, body
size, no traceback ever), the chat page at /, /health, and the worker's lifespan.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import secrets
import sys
import traceback
from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..chat import ChatTemplate
from ..engine.exact import DEFAULT_BUDGET
from ..engine.exact_attempts import DEFAULT_PARALLEL
from ..errors import BadParameterError
from ..model_sets.pair import DeraPair
from ..rpc import faults as rpc_faults
from .jobs import Failure, Served, log
from .lam_range import LamRange
from .ollama import failure_response as ollama_failure
from .ollama import ollama_routes
from .openai import failure_response as openai_failure
from .openai import openai_routes
from .worker import GenerationWorker

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


def _writer(path: str):
    """How errors on this path are written: Ollama's endpoints in Ollama's shape."""
    return ollama_failure if path.startswith("/api/") else openai_failure


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
        write = _writer(path)
        if self.api_key and path.startswith(("/v1/", "/api/")):
            given = headers.get(b"authorization", b"").decode("latin-1")
            expected = f"Bearer {self.api_key}"
            if not secrets.compare_digest(given.encode(), expected.encode()):
                wrong_key = "missing or wrong API key (Authorization: Bearer ...)"
                await write(Failure(401, wrong_key, "authentication_error"))(scope, receive, send)
                return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            too_big = Failure(413, f"request body over {self.max_body_bytes} bytes")
            await write(too_big)(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        except ClientDisconnect:  # a hang-up no handler caught: nobody to answer
            log.debug("%s: the client hung up", path)
        except Exception:
            traceback.print_exc(file=sys.stderr)
            await write(Failure(500, "internal server error", "server_error"))(scope, receive, send)


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
    exact_budget: int = DEFAULT_BUDGET,
    exact_parallel: int = DEFAULT_PARALLEL,
    lam_range: LamRange | None = None,
) -> Starlette:
    """The ASGI app serving `pair`; run it with uvicorn (see cli/serve.py).

    parallel: requests decoded together (continuous batching), each in a slot of
    pair.n_ctx tokens. lam_presets: the lams /v1/models offers as "dera-local@<lam>".
    guided: accept negative prompts (dera_negative_prompt); each slot then has room
    for a second sequence (the KV cache is twice as large). exact_budget: the
    sequence-tokens one exact answer's attempts may spend (then a 503); exact_parallel:
    the most slots its attempts take at once (more than one only while no other request
    waits).
    """
    lam_range = lam_range or LamRange()
    outside = [lam for lam in (default_lam, *lam_presets) if not lam_range.holds(lam)]
    if outside and pair.depends_on_lam:
        raise BadParameterError(
            f"lam {outside[0]:g} is outside the server's lam range {lam_range}",
            cli_hint="widen --lam-range or change --lam/--lam-presets",
        )
    worker = GenerationWorker(
        pair,
        max_queue,
        parallel=parallel,
        guided=guided,
        exact_budget=exact_budget,
        exact_parallel=exact_parallel,
    )
    served = Served(
        pair=pair,
        worker=worker,
        template=ChatTemplate.for_pair(pair, chat_template),
        default_lam=default_lam,
        lam_presets=lam_presets,
        lam_range=lam_range,
        max_body_bytes=max_body_bytes,
        body_timeout=body_timeout,
    )
    pair_is_remote = pair.is_remote

    async def page(request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        return Response(_STATIC[name], media_type=_MEDIA_TYPES[name.rsplit(".", 1)[1]])

    async def root(request: Request) -> Response:
        """The chat page for browsers; for anything else (an Ollama client's or a
        script's health probe of the base URL it calls) Ollama's own answer."""
        if "text/html" in request.headers.get("accept", ""):
            return await page(request)
        return PlainTextResponse("Ollama is running")

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
        failure = Failure(404, f"no route {request.url.path}", "not_found_error")
        return _writer(request.url.path)(failure)

    async def wrong_method(request: Request, exc) -> Response:
        failure = Failure(405, f"{request.method} is not allowed here")
        return _writer(request.url.path)(failure)

    app = Starlette(
        routes=[
            *openai_routes(served),
            *ollama_routes(served),
            Route("/health", health, methods=["GET"]),
            Route("/", root, methods=["GET", "HEAD"]),
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
