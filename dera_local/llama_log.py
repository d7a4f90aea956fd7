"""Routes llama.cpp's log through one callback: silent by default, stderr with verbose,
and the last lines kept so that a failed load can say why in one line."""

from __future__ import annotations

import collections
import ctypes
import sys

import llama_cpp

_GGML_LOG_LEVEL_WARN = 2
_GGML_LOG_LEVEL_ERROR = 3

_verbose = False
_recent: collections.deque[str] = collections.deque(maxlen=40)


@llama_cpp.llama_log_callback
def _on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    message = text.decode("utf-8", errors="replace")
    if _verbose:
        sys.stderr.write(message)
        sys.stderr.flush()
    if level in (_GGML_LOG_LEVEL_WARN, _GGML_LOG_LEVEL_ERROR) and message.strip():
        _recent.append(message.strip())


def install(verbose: bool = False) -> None:
    """Takes over llama.cpp's log (again: llama-cpp-python installs its own on import)."""
    global _verbose
    _verbose = verbose
    # _on_log is a module global, so the C side never sees a freed callback.
    llama_cpp.llama_log_set(_on_log, ctypes.c_void_p(0))


def is_verbose() -> bool:
    return _verbose


def recent_problem() -> str | None:
    """The last warning or error llama.cpp logged, if any (then forgets the backlog)."""
    last = _recent[-1] if _recent else None
    _recent.clear()
    return last
