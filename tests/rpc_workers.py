"""llama.cpp RPC workers (`dera-local worker`) as child processes on free loopback ports,
and a fake worker that answers the handshake with another protocol version."""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import threading
import time

from server_process import free_port

from dera_local.rpc.endpoints import hello

# `python -m dera_local.cli`, with Ctrl-C (SIGINT) raising KeyboardInterrupt even when the
# suite was started where SIGINT is ignored (a background job of a non-interactive shell:
# Python then keeps ignoring it, and a test that stops a worker with it would wait).
WITH_CTRL_C = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'dera-local'; runpy.run_module('dera_local.cli', run_name='__main__')"
)


class Worker:
    def __init__(self, *args: str, host: str = "127.0.0.1") -> None:
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                WITH_CTRL_C,
                "worker",
                "--host",
                host,
                "--port",
                str(self.port),
                "-t",
                "1",
                *args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 30
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the worker did not start: {self.process.stderr.read()}")
            try:
                hello(self.endpoint, timeout=2)  # the worker serves the next host after it
                return
            except Exception:
                if time.time() > deadline:
                    self.stop()
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stderr.close()


@contextlib.contextmanager
def workers(n: int):
    started: list[Worker] = []
    try:
        for _ in range(n):
            started.append(Worker())
        yield started
    finally:
        for worker in started:
            worker.stop()


@contextlib.contextmanager
def fake_worker(version: tuple[int, int, int]):
    """Answers every HELLO with `version` (what a worker of another llama.cpp says)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(1 + 8 + 24)
                conn.sendall(struct.pack("<Q", 28) + bytes(version) + bytes(25))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.close()
