"""`dera-local serve` as a real child process on a free loopback port, for the server
and browser tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    args: list[str], *, cwd: str | None = None, env: dict | None = None, log=None
) -> tuple[subprocess.Popen, str]:
    """Starts the server with `args` and waits for /health; returns it and its base URL.
    `cwd`/`env`: run another checkout's dera_local (benchmarks against an older one).
    `log`: a file for its stderr (a pipe nobody reads fills up after many requests)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "dera_local.cli", "serve", "--port", str(port), *args],
        stdout=subprocess.DEVNULL if env else subprocess.PIPE,
        stderr=log or subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(process.stderr.read() if process.stderr else "server exited")
        try:
            urllib.request.urlopen(f"{base}/health", timeout=1)
            return process, base
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("server did not start")
