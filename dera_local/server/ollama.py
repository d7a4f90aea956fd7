"""Ollama's API beside /v1, for desktop apps and editor extensions that speak only
Ollama: GET /api/tags, /api/ps and /api/version, POST /api/show, /api/chat and
/api/generate (NDJSON streaming by default, `stream: false` for one object). The lam
presets are Ollama model names (`dera-local:0.5`; `dera-local` or `dera-local:latest`
is the server's lam); `options.lam` picks any other. Requests run on the same batching
worker as /v1, under the same limits and API key; errors are Ollama's `{"error": ...}`."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..engine.logprob_format import chat_content
from ..errors import DeraError
from ..llama.gguf_inspect import read_gguf
from ..model_sets.pair import GenerationResult
from ..tools.parse import ToolTextFilter, parse_calls
from ..tools.render import native_tools, tool_messages
from .jobs import (
    Encoder,
    Failure,
    Served,
    answered,
    check_exact_request,
    check_schema_grammar,
    refuse_unguided,
    run,
)
from .lam_range import describe_lam
from .ollama_requests import DEFAULTS, chat_messages, generate_prompt, lam_of_name, parse_ollama
from .requests import MODEL_ID, RequestError, checked_lam
from .responses import dera
from .tool_requests import ToolRequest, parse_tool_fields, with_tools
from .worker import Job

# The Ollama API level these endpoints mirror (structured outputs, `format` as a schema,
# came with Ollama 0.5); clients that check a minimum version read this.
OLLAMA_API_VERSION = "0.5.0"


def ollama_error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with a Z, as Ollama writes its times."""
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class ModelCard:
    """What /api/tags, /api/show and /api/ps say about the loaded models."""

    size: int
    digest: str
    modified_at: str
    details: dict
    info: dict

    @classmethod
    def of(cls, pair) -> ModelCard:
        paths = [model.path for model in pair.loaded_models()]
        infos = [read_gguf(path) for path in paths]
        main = infos[0]
        stats = [path.stat() for path in paths]
        # A digest of the files' names, sizes and times, not of their contents (hashing
        # gigabytes at every start would delay the server for nothing an app needs).
        files = zip(paths, stats, strict=True)
        fingerprint = json.dumps([[str(p), s.st_size, s.st_mtime_ns] for p, s in files])
        modified = datetime.fromtimestamp(max(s.st_mtime for s in stats), timezone.utc)
        return cls(
            size=sum(s.st_size for s in stats),
            digest=hashlib.sha256(fingerprint.encode()).hexdigest(),
            modified_at=_timestamp(modified),
            details={
                "parent_model": "",
                "format": "gguf",
                "family": main.architecture,
                "families": sorted({info.architecture for info in infos}),
                "parameter_size": "",
                "quantization_level": main.quantization,
            },
            info={
                "general.architecture": main.architecture,
                "general.name": main.name,
                "dera.models": [str(path) for path in paths],
                "dera.context_length": pair.n_ctx,
                # what Ollama's clients read for the context (e.g. "llama.context_length")
                f"{main.architecture}.context_length": pair.n_ctx,
            },
        )

    def entry(self, name: str) -> dict:
        return {
            "name": name,
            "model": name,
            "modified_at": self.modified_at,
            "size": self.size,
            "digest": self.digest,
            "details": self.details,
        }


def ollama_routes(served: Served) -> list[Route]:
    pair, default_lam = served.pair, served.default_lam
    card = ModelCard.of(pair)
    names = [(f"{MODEL_ID}:latest", default_lam)] + [
        (f"{MODEL_ID}:{lam:g}", lam) for lam in served.lam_presets
    ]

    async def tags(request: Request) -> Response:
        models = []
        for name, lam in names:
            entry = card.entry(name)
            entry["dera_lambda"] = lam
            entry["description"] = describe_lam(lam, default=name.endswith(":latest"))
            models.append(entry)
        return JSONResponse({"models": models})

    async def ps(request: Request) -> Response:
        entry = card.entry(names[0][0])
        # Loaded for as long as the server runs: Ollama's clients read a far expiry.
        entry.update(expires_at="9999-12-31T23:59:59Z", size_vram=0)
        return JSONResponse({"models": [entry]})

    async def version(request: Request) -> Response:
        return JSONResponse({"version": OLLAMA_API_VERSION, "dera_local": _own_version()})

    async def show(request: Request) -> Response:
        return await answered(lambda: describe(request), failure_response)

    async def describe(request: Request) -> Response:
        body = await served.body(request)
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        name = body.get("model", body.get("name"))  # older clients send "name"
        if name is None:
            raise RequestError("'model' is required (see /api/tags)", "model")
        lam = lam_of_name(name, default_lam)
        if lam is not None and pair.depends_on_lam:  # what /api/chat would refuse
            lam = checked_lam(lam, served.lam_range, "model", "'model'")
        if lam is None:
            return _not_found(name)
        parameters = "\n".join(f"{key} {value:g}" for key, value in DEFAULTS.items())
        return JSONResponse(
            {
                "license": "",
                "modelfile": f"# dera-local serve: the DeRa mixture at lam {lam:g}\n",
                "parameters": parameters + f"\nlam {lam:g}",
                "template": "",  # the model's own chat template (GGUF metadata) is used
                "details": card.details,
                "model_info": {**card.info, "dera.lambda": lam},
                # tools: every template can have them (a generic rendering where the
                # model's own has no tools section; see dera_local/tools)
                "capabilities": ["completion", "tools"],
                "modified_at": card.modified_at,
            }
        )

    async def answer(request: Request, chat: bool) -> Response:
        started = time.perf_counter()
        body = await served.body(request)
        parsed = parse_ollama(
            body,
            default_lam,
            chat=chat,
            lam_range=served.lam_range_if_used,
            n_ctx=pair.n_ctx,
        )
        if parsed is None:
            return _not_found(body["model"])
        await check_schema_grammar(parsed.request.sampling, pair.model.vocab, "format")
        tools = None
        if chat and body.get("tools"):  # Ollama has no tool_choice: options.tool_choice
            options = body.get("options") or {}
            wanted = {
                "tools": body["tools"],
                "tool_choice": options.get("tool_choice"),
                "parallel_tool_calls": options.get("parallel_tool_calls", True),
            }
            tools = parse_tool_fields(wanted, served.template.source)
        parsed = await with_tools(parsed, tools, pair, "format")
        refuse_unguided(served, parsed, "options")
        check_exact_request(served, parsed, "options")
        prompt, negative_prompt, load_only = _prompts(
            body, chat, parsed.negative_prompt, served, tools
        )
        model = body["model"]
        if load_only:  # Ollama: an empty prompt loads the model and answers at once
            return JSONResponse(_Shape(model, chat, started).final("", "load", None))
        fields = {"prompt": "messages" if chat else "prompt", "negative prompt": "options"}
        job = Job(
            prompt,
            parsed.request,
            negative_prompt,
            cfg_scale=parsed.cfg_scale,
            per_token=parsed.per_token,
            fields=fields,
            exact=parsed.exact,
        )
        shape = _Shape(model, chat, started, token_bytes if parsed.per_token else None, tools)
        encoder = Encoder(
            lambda first, chunks: _ndjson(shape, first, chunks),
            "application/x-ndjson",
            lambda result: shape.final(result.text, result.finish_reason, result),
        )
        return await run(request, served, job, parsed.stream, encoder)

    def token_bytes(token: int) -> bytes:
        return pair.model.token_bytes(token, special=True)

    async def chat_endpoint(request: Request) -> Response:
        return await answered(lambda: answer(request, chat=True), failure_response)

    async def generate_endpoint(request: Request) -> Response:
        return await answered(lambda: answer(request, chat=False), failure_response)

    return [
        Route("/api/tags", tags, methods=["GET"]),
        Route("/api/ps", ps, methods=["GET"]),
        Route("/api/version", version, methods=["GET"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/chat", chat_endpoint, methods=["POST"]),
        Route("/api/generate", generate_endpoint, methods=["POST"]),
    ]


def _prompts(
    body: dict, chat: bool, negative: str | None, served: Served, tools: ToolRequest | None
) -> tuple[Callable, Callable | None, bool]:
    """The job's prompt and negative prompt makers (run on the worker thread), and
    whether the request only asks to load the model (an empty /api/generate prompt)."""
    pair, template = served.pair, served.template
    variables: dict = {}
    if chat:
        messages, variables = tool_messages(
            chat_messages(body),
            None if tools is None else tools.tools,
            native_tools(template.source),
        )
    else:
        text, system_text, raw = generate_prompt(body)
        if not text:
            return (lambda: []), None, True
        if raw:  # fed as it is, no template
            return (
                lambda: pair.tokenize(text),
                None if negative is None else (lambda: pair.tokenize(negative)),
                False,
            )
        system = [] if system_text is None else [{"role": "system", "content": system_text}]
        messages = [*system, {"role": "user", "content": text}]

    def prompt() -> list[int]:
        return template.tokens(pair, messages, **variables)

    def negative_prompt() -> list[int]:
        return template.negative_tokens(pair, messages, negative, **variables)

    return prompt, (None if negative is None else negative_prompt), False


def _own_version() -> str:
    try:
        return importlib.metadata.version("dera-local")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "unknown"


def failure_response(failure: Failure) -> JSONResponse:
    """A Failure as Ollama's error: {"error": message}."""
    return ollama_error(failure.status, failure.message, failure.headers)


def _not_found(name) -> JSONResponse:
    return ollama_error(
        404,
        f"model {name!r} not found: this server has {MODEL_ID} (its lam), or "
        f"{MODEL_ID}:<lam> for any lam in its range (see /api/tags)",
    )


@dataclass
class _Shape:
    """Ollama's objects for one answer: chunks, the last object, and with `token_bytes`
    (logprobs asked for) each token's log-probability in Ollama's format (>= 0.12.11:
    token, logprob, bytes, top_logprobs; the mixture's, as /v1 gives them)."""

    model: str
    chat: bool
    started: float
    token_bytes: Callable[[int], bytes] | None = None
    tools: ToolRequest | None = None  # with tools: text held back from a call opener on
    held: ToolTextFilter = field(default_factory=ToolTextFilter)

    def chunk(self, text: str, done: bool, tokens=(), logprobs=None, calls=()) -> dict:
        body = {"model": self.model, "created_at": _timestamp(datetime.now(timezone.utc))}
        if self.chat:
            body["message"] = {"role": "assistant", "content": text}
            if calls:  # Ollama's form: the arguments as an object
                body["message"]["tool_calls"] = [
                    {"function": {"index": i, "name": c.name, "arguments": c.arguments}}
                    for i, c in enumerate(calls)
                ]
        else:
            body["response"] = text
        body["done"] = done
        if self.token_bytes is not None and logprobs is not None and tokens:
            body["logprobs"] = chat_content(tokens, logprobs, self.token_bytes)
        return body

    def final(self, text: str, reason: str, result: GenerationResult | None) -> dict:
        """The last object of a stream (text "") or the whole answer: done, why, and
        Ollama's counts and durations (nanoseconds), with DeRa's `dera` object."""
        whole = result is not None and text != ""
        calls = []
        if whole and self.tools is not None:
            text, calls = parse_calls(text, self.tools.names)
        body = self.chunk(
            text,
            True,
            result.tokens if whole else (),
            result.logprobs if whole else None,
            calls,
        )
        body["done_reason"] = reason
        body["total_duration"] = int((time.perf_counter() - self.started) * 1e9)
        body["load_duration"] = 0  # loaded once, when the server started
        if result is not None:
            body["prompt_eval_count"] = len(result.prompt_tokens) - result.reused_prompt_tokens
            body["prompt_eval_duration"] = int(result.prompt_seconds * 1e9)
            body["eval_count"] = len(result.tokens)
            body["eval_duration"] = int(result.generation_seconds * 1e9)
            body["dera"] = dera(result)
        return body


async def _ndjson(shape: _Shape, first, chunks: AsyncIterator) -> AsyncIterator[str]:
    """One JSON object per line; closing it (client gone) cancels the job."""
    try:
        item = first
        while True:
            if isinstance(item, GenerationResult):
                if shape.tools is not None and shape.held.held:  # calls, or text after all
                    _, calls = parse_calls(shape.held.held, shape.tools.names)
                    text = "" if calls else shape.held.held
                    yield _line(shape.chunk(text, False, calls=calls))
                yield _line(shape.final("", item.finish_reason, item))
                break
            text = item.text if shape.tools is None else shape.held.feed(item.text)
            yield _line(shape.chunk(text, False, item.tokens, item.logprobs))
            try:
                item = await chunks.__anext__()
            except StopAsyncIteration:  # ended without a result: the server is stopping
                yield _line({"error": "the server is shutting down"})
                break
            except DeraError as exc:  # failed mid-stream (an RPC worker lost): say so, end
                yield _line({"error": str(exc)})
                break
    finally:
        await chunks.aclose()


def _line(body: dict) -> str:
    return json.dumps(body, ensure_ascii=False) + "\n"
