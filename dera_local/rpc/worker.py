"""A llama.cpp RPC worker: this machine's CPU or GPU, served to dera-local (or llama.cpp)
hosts that place model layers on it. It is llama.cpp's own server
(ggml_backend_rpc_start_server in the installed wheel), started from Python.

The protocol has no authentication and no encryption: anyone who reaches the port can
run graphs on the machine and read what it holds. Bind it to 127.0.0.1 (the default)
and reach it through an SSH tunnel, or only on a private network.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadParameterError, RuntimeFailure
from ..llama import backend
from ..llama import devices as ggml_devices
from .endpoints import DEFAULT_PORT, is_loopback, parse_endpoints

EXPOSED_WARNING = (
    "the RPC worker listens on {host}, not on loopback: llama.cpp's RPC protocol has no "
    "authentication or encryption, so anyone who can reach port {port} can use this "
    "machine's memory and compute. Keep it on a private network, or bind 127.0.0.1 and "
    "reach it through an SSH tunnel (see the README)."
)


@dataclass(frozen=True)
class WorkerSettings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    n_threads: int = 0  # 0 = all cores (up to 16)
    devices: tuple[str, ...] = ()  # ggml device names; () = the GPUs, else the CPU
    cache_dir: str | None = None  # llama.cpp's tensor cache: weights are not sent again

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def exposed(self) -> bool:
        return not is_loopback(self.host)


def checked(settings: WorkerSettings) -> WorkerSettings:
    """The settings, validated (BadParameterError with one line)."""
    parse_endpoints(settings.endpoint, "--host/--port")
    if settings.n_threads < 0:
        raise BadParameterError("the thread count must be 0 (all cores) or more")
    return settings


def choose_devices(names: tuple[str, ...]) -> list[ggml_devices.Device]:
    """The named ggml devices (e.g. CPU, CUDA0), or by default this machine's GPUs, else
    its CPU."""
    available = ggml_devices.local_devices()
    if not names:
        return (
            list(ggml_devices.offload_devices())
            or [d for d in available if d.kind == ggml_devices.CPU][:1]
        )
    by_name = {d.name.lower(): d for d in available}
    chosen = []
    for name in names:
        device = by_name.get(name.lower())
        if device is None:
            known = ", ".join(d.name for d in available)
            raise BadParameterError(f"no device named {name!r} here (devices: {known})")
        chosen.append(device)
    return chosen


def _check_port_free(settings: WorkerSettings) -> None:
    # llama.cpp only prints "Failed to create server socket" when it cannot listen.
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((settings.host, settings.port))
    except OSError as exc:
        raise RuntimeFailure(
            f"cannot listen on {settings.endpoint}: {(exc.strerror or str(exc)).lower()}"
        ) from None
    finally:
        probe.close()


def serve(settings: WorkerSettings, on_warning=None) -> None:
    """Serves until the process is stopped (Ctrl-C / SIGTERM). llama.cpp prints what it
    serves and each connection on stdout. Raises DeraError if it cannot start."""
    settings = checked(settings)
    devices = choose_devices(settings.devices)
    if settings.exposed and on_warning is not None:
        on_warning(EXPOSED_WARNING.format(host=settings.host, port=settings.port))
    cache_dir = None
    if settings.cache_dir:
        path = Path(settings.cache_dir).expanduser()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BadParameterError(f"cannot use {path} as the cache: {exc.strerror}") from None
        cache_dir = str(path)
    _check_port_free(settings)
    threads = settings.n_threads or backend.default_threads()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            ggml_devices.start_rpc_server(settings.endpoint, cache_dir, threads, devices)
        except BaseException as exc:  # pragma: no cover - reported below
            failed.append(exc)

    # The server's accept loop never returns; in a daemon thread it leaves the main
    # thread free to take Ctrl-C and to end the process.
    server = threading.Thread(target=run, name="rpc-worker", daemon=True)
    server.start()
    while server.is_alive():
        server.join(0.5)
    if failed:
        raise failed[0]
    raise RuntimeFailure(f"llama.cpp's RPC server on {settings.endpoint} stopped (see above)")
