"""Surviving an RPC worker that dies or stops answering.

What llama.cpp does (ggml-rpc.cpp, read for this): each worker has one connection and
one sender thread per process; a failed send or receive ends in GGML_ABORT, which kills
the whole process, and a worker that stops answering without closing the connection
leaves that thread (and the llama_decode waiting on it) blocked in recv() forever: no
socket has a timeout.

So every llama.cpp call that can talk to a worker runs through `RemoteCalls`: in a
thread of its own, waited on with a deadline. ggml's abort callback is pointed at
`_on_abort`, which, for RPC failures in any thread but the main one, records the fault
and parks that thread instead of returning (returning would abort). The waiting caller
sees the fault (or its deadline) and raises WorkerError. From then on the process's
connections to workers cannot be trusted (a parked thread may hold llama.cpp's locks),
so every later remote call is refused with the same reason and nothing remote is freed;
models on this machine alone keep working.
"""

from __future__ import annotations

import queue
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import WorkerError
from ..llama import devices as ggml_devices

# What ggml-rpc aborts with when a worker is gone, refuses or answers garbage.
_RPC_ABORTS = (
    "Remote RPC server crashed",
    "Failed to connect to",
    "RPC handshake failed",
    "RPC transport initialization failed",
)

_lock = threading.Lock()
_fault: str | None = None
_fault_seen = threading.Event()


def fault() -> str | None:
    """Why remote calls are refused (None while no worker was lost)."""
    return _fault


def _record(reason: str) -> None:
    global _fault
    with _lock:
        if _fault is None:
            _fault = reason
    _fault_seen.set()


@ggml_devices.ABORT_CALLBACK
def _on_abort(message: bytes | None) -> None:
    text = (message or b"").decode("utf-8", errors="replace")
    if threading.current_thread() is threading.main_thread() or not any(
        sign in text for sign in _RPC_ABORTS
    ):
        sys.stderr.write(text + "\n")  # ggml's own default, then it aborts as before
        return
    _record(text.split(": ", 1)[-1].strip())
    threading.Event().wait()  # park this thread for good: returning would abort


_installed = False


def install() -> None:
    """Points ggml's abort callback at the trap (once; `_on_abort` is a module global,
    so the C side never holds a freed callback)."""
    global _installed
    if not _installed:
        ggml_devices.set_abort_callback(_on_abort)
        _installed = True


class RemoteCalls:
    """Runs llama.cpp calls that talk to RPC workers in one daemon thread of its own,
    each waited on for at most `timeout` seconds (measured from the call's start or its
    last `progress()`), and turns a lost worker into WorkerError."""

    def __init__(self, endpoints: tuple[str, ...], timeout: float) -> None:
        install()
        self.endpoints = endpoints
        self.timeout = timeout
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._last_progress = 0.0

    def progress(self) -> None:
        """Moves the deadline: the running call is alive (a model load reports it)."""
        self._last_progress = time.monotonic()

    def check(self) -> None:
        """Raises WorkerError when an earlier call lost a worker."""
        if _fault is not None:
            raise self._error(_fault)

    def __call__(self, function: Callable[..., Any], *args: Any) -> Any:
        self.check()
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="dera-rpc-calls", daemon=True)
            self._thread.start()
        done = threading.Event()
        outcome: list = []
        self._last_progress = time.monotonic()
        self._jobs.put((function, args, done, outcome))
        # Wake every 0.1 s to notice a fault reported by another thread (ggml's sender).
        while not done.wait(0.1):
            if _fault_seen.is_set():
                raise self._error(_fault or "a worker failed")
            if time.monotonic() - self._last_progress > self.timeout:
                _record(f"no answer within {self.timeout:g} s")
                raise self._error(_fault or "")
        kind, value = outcome[0]
        if kind == "error":
            raise value
        return value

    def close(self) -> None:
        """Ends the calls thread once its queue is done (nothing remote runs after)."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            function, args, done, outcome = job
            try:
                outcome.append(("value", function(*args)))
            except BaseException as exc:  # handed to the caller, raised there
                outcome.append(("error", exc))
            done.set()

    def _error(self, reason: str) -> WorkerError:
        # Name the workers that are gone (nothing accepts a connection) when that can be
        # told; a stopped worker's machine still accepts, so then name them all.
        gone = [e for e in self.endpoints if not _accepts(e)]
        where = ", ".join(gone or self.endpoints)
        return WorkerError(
            f"lost the RPC worker {where} ({reason}); restart it and load the models "
            "again (this process uses no RPC worker after a loss)"
        )


def _accepts(endpoint: str) -> bool:
    host, _, port = endpoint.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
    except OSError:
        return False
    return True
