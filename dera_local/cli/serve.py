"""`dera-local serve`: the loaded models behind OpenAI and Ollama APIs (loopback by default)."""

from __future__ import annotations

import socket

import click

from ..analysis.sweep import parse_lambdas
from ..engine.exact import DEFAULT_BUDGET
from ..engine.exact_attempts import DEFAULT_PARALLEL, MAX_PARALLEL
from ..engine.mixing import validate_lam
from ..errors import BadParameterError, DeraError
from ..rpc.endpoints import is_loopback
from ..server.lam_range import LamRange
from ..sources.default_pair import recommended_lams
from .open_models import open_model_set
from .options import model_options, split_options
from .sampling_options import lam_option


def _check_port_free(host: str, port: int) -> None:
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DeraError(f"cannot serve on {host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise DeraError(
                f"cannot serve on {host}:{port}: {exc.strerror}; choose another --port"
            ) from None


def _parse_presets(text: str) -> list[float]:
    try:
        return parse_lambdas(text)
    except DeraError as exc:
        raise BadParameterError(f"--lam-presets {text!r}: {exc}") from None


def _deadline(flag: str, seconds: float, what: str):
    """A --*-timeout option: the seconds a client has for something."""
    return click.option(
        flag,
        type=click.FloatRange(0.1),
        default=seconds,
        show_default=True,
        help=f"Seconds a client has {what}",
    )


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, envvar="DERA_HOST")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8080, show_default=True, envvar="DERA_PORT"
)
@click.option(
    "--api-key",
    default=None,
    envvar="DERA_API_KEY",
    help="Require 'Authorization: Bearer KEY' on /v1/*.",
)
@lam_option("lam for requests without dera_lambda. Env: DERA_LAMBDA.")
@click.option(
    "--max-queue",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="Requests waiting or running before new ones get 503.",
)
@click.option("--max-body-bytes", type=click.IntRange(1024), default=1 << 20, show_default=True)
@_deadline("--body-timeout", 30.0, "to send a request body (then 408).")
@_deadline(
    "--header-timeout",
    10.0,
    "to send a request's headers, from connecting or from the request's first byte "
    "(then 408 and the connection is closed).",
)
@click.option(
    "--parallel",
    "-np",
    "parallel",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="Requests decoded together (continuous batching); -c is split among them.",
)
@click.option(
    "--lam-presets",
    default=None,
    help="lams that /v1/models offers as model ids dera-local@<lam> (default: the "
    "pair's recommended ones; the built-in pair's stop at 1.5, where its answers still hold).",
)
@click.option(
    "--lam-range",
    default="0:2",
    show_default=True,
    help="lams requests may ask for, MIN:MAX. Below 0 the mixture reverses the aligned "
    "model's alignment; widen it only on purpose.",
)
@click.option("--chat-template", default=None, help="Jinja chat template text to use.")
@click.option(
    "--cfg/--no-cfg",
    "guided",
    default=True,
    show_default=True,
    help="Accept negative prompts (dera_negative_prompt, dera_cfg_scale): each slot gets "
    "room for a second sequence, so the KV cache is twice -c.",
)
@click.option(
    "--exact-budget",
    type=click.IntRange(1),
    default=DEFAULT_BUDGET,
    show_default=True,
    help="Tokens the attempts of one exact answer (dera_exact) may spend before a 503.",
)
@click.option(
    "--exact-parallel",
    type=click.IntRange(1, MAX_PARALLEL),
    default=DEFAULT_PARALLEL,
    show_default=True,
    help="Slots one exact answer's attempts may take at once (beyond the first, only "
    "while no other request waits).",
)
@model_options
def serve(
    host: str,
    port: int,
    api_key: str | None,
    lam: float,
    max_queue: int,
    max_body_bytes: int,
    body_timeout: float,
    header_timeout: float,
    parallel: int,
    lam_presets: str | None,
    lam_range: str,
    chat_template: str | None,
    guided: bool,
    exact_budget: int,
    exact_parallel: int,
    **kwargs,
) -> None:
    """Serve /v1/chat/completions, /v1/completions, /v1/models and /health."""
    try:
        import uvicorn

        from ..server.app import create_app
        from ..server.protocol import with_header_deadline

        server_class = _stopping_server_class()
    except ImportError:
        raise DeraError("serve needs the server extra: pip install 'dera-local[server]'") from None
    lam = validate_lam(lam)
    if not is_loopback(host) and not api_key:
        click.echo(
            f"warning: serving on {host} without --api-key: anyone who can reach "
            "this port can use the models",
            err=True,
        )
    presets = _parse_presets(lam_presets) if lam_presets is not None else None
    bounds = LamRange.parse(lam_range)
    for value in (lam, *(presets or ())):
        if not bounds.holds(value):  # before the models load: one line, at once
            raise BadParameterError(
                f"lam {value:g} is outside the server's lam range {bounds}",
                cli_hint="widen --lam-range or change --lam/--lam-presets",
            )
    if kwargs.get("draft_model"):
        raise BadParameterError(
            "the server drafts by prompt lookup, per request (a draft model follows one "
            "text at a time); drop -md"
        )
    _check_port_free(host, port)  # before the models load: one line, not uvicorn's log
    model, _, _ = split_options(kwargs)
    if model.get("n_ctx"):
        # llama.cpp's server semantics: -c is the whole KV cache, each slot gets a share.
        share = model["n_ctx"] // parallel
        if share < 64:
            raise BadParameterError(
                f"-c {model['n_ctx']} split among {parallel} parallel slots leaves {share} "
                "tokens each; raise -c or lower --parallel"
            )
        model["n_ctx"] = share
    with open_model_set(**model) as pair:
        if presets is None:
            presets = [p for p in recommended_lams(pair) if bounds.holds(p)]
        if not pair.depends_on_lam:  # a fixed --mix: no lam to pick
            presets, lam = (), validate_lam(1.0)
        app = create_app(
            pair,
            default_lam=lam,
            api_key=api_key,
            max_queue=max_queue,
            max_body_bytes=max_body_bytes,
            body_timeout=body_timeout,
            chat_template=chat_template,
            parallel=parallel,
            lam_presets=presets,
            guided=guided,
            exact_budget=exact_budget,
            exact_parallel=exact_parallel,
            lam_range=bounds,
        )
        click.echo(
            f"dera-local: serving on http://{host}:{port}/v1 (OpenAI API) and /api (Ollama API) "
            f"(lam {lam:g}; {parallel} parallel "
            f"slots of {pair.n_ctx} tokens); chat page at http://{host}:{port}/",
            err=True,
        )
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            http=with_header_deadline(header_timeout),
            log_level="warning",
            timeout_graceful_shutdown=5,
        )
        server_class(config, app.state.worker).run()


def _stopping_server_class():
    import uvicorn

    class StoppingServer(uvicorn.Server):
        """On SIGTERM/SIGINT: end every generation at its next token (streams get a final
        error event) and stop within uvicorn's 5 s grace; a second signal exits at once."""

        def __init__(self, config, worker) -> None:
            super().__init__(config)
            self.worker = worker

        def handle_exit(self, sig, frame) -> None:
            # Not uvicorn's own handler: it re-raises the signal after shutdown (exit
            # status -15, or a KeyboardInterrupt traceback), and only a second SIGINT
            # forces the exit. A handled stop exits 0.
            if self.should_exit:
                self.force_exit = True
            self.should_exit = True
            self.worker.stop_all()

    return StoppingServer
