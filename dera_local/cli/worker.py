"""`dera-local worker`: llama.cpp's RPC server on this machine, so that hosts running
dera-local (with --rpc) can place model layers on its CPU or GPU."""

from __future__ import annotations

import click

from ..rpc.endpoints import DEFAULT_PORT
from ..rpc.worker import WorkerSettings, serve


@click.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Anything but loopback exposes an unauthenticated, "
    "unencrypted protocol: prefer an SSH tunnel (see the README).",
)
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True)
@click.option(
    "-t",
    "--threads",
    "n_threads",
    type=click.IntRange(0),
    default=0,
    help="CPU threads for the graphs it runs (0 = all cores).",
)
@click.option(
    "--device",
    "devices",
    metavar="NAME[,NAME]",
    default="",
    help="ggml devices to serve, e.g. CUDA0 or CPU (default: the GPUs, else the CPU).",
)
@click.option(
    "--cache",
    "cache_dir",
    metavar="DIR",
    default=None,
    help="Keep received weights in DIR (llama.cpp's tensor cache), so a restarted "
    "worker is not sent them again.",
)
def worker(host: str, port: int, n_threads: int, devices: str, cache_dir: str | None) -> None:
    """Serve this machine's CPU or GPU to dera-local hosts (llama.cpp RPC worker).

    Run one per machine, then on the host: dera-local chat --rpc HOST:PORT (every
    model's layers there) or --rpc-aligned / --rpc-reference (one model each).
    Stop it with Ctrl-C.
    """
    names = tuple(name.strip() for name in devices.split(",") if name.strip())
    try:
        serve(
            WorkerSettings(host, port, n_threads, names, cache_dir),
            on_warning=lambda text: click.echo(f"warning: {text}", err=True),
        )
    except KeyboardInterrupt:  # Ctrl-C is how a worker is meant to stop
        click.echo("worker stopped", err=True)
