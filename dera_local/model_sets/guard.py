"""Keeps a pair's llama.cpp contexts to one generation at a time and off after close().

llama.cpp contexts are not thread-safe, and two generations interleaved on one pair
would each see the other's tokens in the shared KV cache. So every step of a generation
(one `next()` of its stream) runs under the guard's lock, a generation claims the pair
from its first step to its end, and close() waits for a running step and then makes
every later step fail with a clear error instead of touching freed memory.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from ..errors import DeraError


class PairBusyError(DeraError):
    """Another generation is running on this pair (finish or close it first)."""


class PairClosedError(DeraError):
    """The pair was closed; load it again to generate."""


class ModelSetGuard:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: object | None = None  # the generation that holds the pair
        self.closed = False

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """One step of a generation: exclusive use of the contexts."""
        with self._lock:
            if self.closed:
                raise PairClosedError("the pair is closed; load it again to generate")
            yield

    def claim(self, owner: object) -> None:
        """Called under step(): the generation `owner` starts."""
        if self._owner is not None and self._owner is not owner:
            raise PairBusyError(
                "the pair is busy with another generation; finish or close that stream "
                "first (or load one pair per thread)"
            )
        self._owner = owner

    def release(self, owner: object) -> None:
        if self._owner is owner:
            self._owner = None

    def close(self) -> bool:
        """Marks the pair closed once a running step ends; False if it already was."""
        with self._lock:
            was_open, self.closed = not self.closed, True
            self._owner = None
            return was_open
