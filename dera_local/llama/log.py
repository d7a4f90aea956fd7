"""Routes llama.cpp's log through one callback: silent by default, stderr with verbose,
and the last lines kept so that a failed load can say why in one line."""

from __future__ import annotations

import collections
import ctypes
import sys

import llama_cpp

_GGML_LOG_LEVEL_WARN = 3  # ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_GGML_LOG_LEVEL_ERROR = 4

_verbose = False
_recent: collections.deque[tuple[int, str]] = collections.deque(maxlen=40)
# Lines kept while a model loads: where llama.cpp put each layer and how big each
# device's share of the weights is (see rpc/placement.py).
_LOAD_SIGNS = ("assigned to device", "model buffer size")
_load_lines: list[str] | None = None


@llama_cpp.llama_log_callback
def _on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    message = text.decode("utf-8", errors="replace")
    if _verbose:
        sys.stderr.write(message)
        sys.stderr.flush()
    if level in (_GGML_LOG_LEVEL_WARN, _GGML_LOG_LEVEL_ERROR) and message.strip():
        _recent.append((level, message.strip()))
    if _load_lines is not None and any(sign in message for sign in _LOAD_SIGNS):
        _load_lines.append(message)


def install(verbose: bool = False) -> None:
    """Takes over llama.cpp's log (again: llama-cpp-python installs its own on import)."""
    global _verbose
    _verbose = verbose
    take_over()


def take_over() -> None:
    """Routes llama.cpp's log through dera-local's filter without changing verbosity:
    called before ggml first enumerates its devices, whose banners (ggml_vulkan's
    "Found 1 Vulkan devices", at debug level) would otherwise reach stderr through
    llama-cpp-python's own logger on every command."""
    # _on_log is a module global, so the C side never sees a freed callback.
    llama_cpp.llama_log_set(_on_log, ctypes.c_void_p(0))


def is_verbose() -> bool:
    return _verbose


def recent_problem() -> str | None:
    """The first error llama.cpp logged since the last call (the cause; later lines are
    consequences), else the last warning; then forgets them."""
    errors = [text for level, text in _recent if level == _GGML_LOG_LEVEL_ERROR]
    found = errors[0] if errors else (_recent[-1][1] if _recent else None)
    _recent.clear()
    if found is None:
        return None
    # "llama_model_load: error loading model: <cause>" -> "<cause>"
    return found.rsplit("error loading model: ", 1)[-1]


def start_load_capture() -> None:
    """Keeps llama.cpp's "layer N assigned to device X" and "X model buffer size = N MiB"
    lines until load_lines()."""
    global _load_lines
    _load_lines = []


def load_lines() -> list[str]:
    """The lines kept since start_load_capture(); stops keeping them."""
    global _load_lines
    lines, _load_lines = _load_lines or [], None
    return lines
