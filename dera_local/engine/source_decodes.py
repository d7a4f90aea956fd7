"""Decodes one batch in every source context of a model set, one after another or
overlapped.

The sources of a mixture are independent until their logits are mixed, so where they
sit on different devices (GPUs, RPC workers) their decodes can run at the same time and a
step costs the slowest decode instead of the sum. Each context is driven by exactly one
thread (llama.cpp contexts are not thread-safe, but two contexts may decode at once):
the first in the caller's thread, every other one in a worker thread of its own. On one
CPU the decodes would only compete for the same cores, so overlapping is off there (see
model_sets/loading.overlap_by_default).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from ..llama.context import Context, TokenBatch


class SourceDecodes:
    """Runs `decode_batch` on every context; `spans` (when recording) keeps each decode's
    (context index, start, end) times of the last step, for tests and benchmarks."""

    def __init__(self, contexts: list[Context], overlap: bool) -> None:
        self.contexts = contexts
        self.overlap = overlap and len(contexts) > 1
        self._pool = ThreadPoolExecutor(len(contexts) - 1, "dera-source") if self.overlap else None
        self.recording = False
        self.spans: list[tuple[int, float, float]] = []

    def run(self, batch: TokenBatch) -> None:
        if self.recording:
            self.spans = []
        if self._pool is None:
            for index, ctx in enumerate(self.contexts):
                self._decode(index, ctx, batch)
            return
        pending = [
            self._pool.submit(self._decode, index, ctx, batch)
            for index, ctx in enumerate(self.contexts[1:], start=1)
        ]
        try:
            self._decode(0, self.contexts[0], batch)
        finally:
            # Every context's decode ends before the step goes on (or its error is raised):
            # a context is never left decoding while the caller touches it.
            for future in pending:
                future.exception()
        for future in pending:
            future.result()

    def _decode(self, index: int, ctx: Context, batch: TokenBatch) -> None:
        if not self.recording:
            ctx.decode_batch(batch)
            return
        started = time.perf_counter()
        ctx.decode_batch(batch)
        self.spans.append((index, started, time.perf_counter()))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
