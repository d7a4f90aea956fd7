"""Runs generations for the server one at a time on a dedicated thread (a llama.cpp
context must not be used from two threads), with a bounded queue in front of it and
cancellation between tokens. Consecutive requests that share a prefix (a conversation)
reuse the pair's KV caches."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..engine import DeraPair, GenerationResult


class QueueFull(Exception):
    """More requests are waiting than the server accepts; the client should retry."""


@dataclass
class Job:
    """One request: `prompt` makes its token ids (tokenizing and template rendering run
    on the worker thread, so a long prompt never blocks the event loop)."""

    prompt: Callable[[], list[int]]
    settings: dict
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Counters:
    completed: int = 0  # the generation ran to its end (stop or length)
    cancelled: int = 0  # the client went away (or closed the stream) before the end
    failed: int = 0  # an error was answered (bad prompt, runtime failure)
    rejected: int = 0  # 503: the queue was full


class GenerationWorker:
    def __init__(self, pair: DeraPair, max_queue: int) -> None:
        self.pair = pair
        self.max_queue = max_queue
        self.counters = Counters()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dera-generate")
        self._lock = threading.Lock()
        self._in_flight = 0  # queued + running

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _admit(self) -> None:
        with self._lock:
            if self._in_flight >= self.max_queue:
                self.counters.rejected += 1
                raise QueueFull()
            self._in_flight += 1

    def _release(self, outcome: str) -> None:
        """outcome: "completed", "cancelled" or "failed", as the worker saw it end (the
        client may close its side after a finished generation: that is not a cancel)."""
        with self._lock:
            self._in_flight -= 1
            setattr(self.counters, outcome, getattr(self.counters, outcome) + 1)

    async def run(self, job: Job) -> AsyncIterator[str | GenerationResult]:
        """Yields text chunks, then the GenerationResult. Raises QueueFull when full,
        or the generation's own error (e.g. a prompt longer than the context). Closing
        the iterator early (a client that went away) cancels the generation."""
        self._admit()
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()

        def produce() -> None:
            outcome = "cancelled"
            try:
                if job.cancelled.is_set():  # cancelled while it waited in the queue
                    return
                stream = self.pair.stream(job.prompt(), **job.settings)
                try:
                    for chunk in stream:
                        loop.call_soon_threadsafe(inbox.put_nowait, chunk)
                        if job.cancelled.is_set():
                            break
                finally:
                    stream.close()
                if stream.result is not None:
                    outcome = "completed"
                    loop.call_soon_threadsafe(inbox.put_nowait, stream.result)
            except BaseException as exc:  # handed to the request that asked
                outcome = "failed"
                loop.call_soon_threadsafe(inbox.put_nowait, exc)
            finally:
                self._release(outcome)
                loop.call_soon_threadsafe(inbox.put_nowait, None)

        try:
            self._executor.submit(produce)
        except BaseException:
            self._release("failed")
            raise
        try:
            while (item := await inbox.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancelled.set()  # no-op after a normal end; stops a running generation
