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


class ShuttingDown(Exception):
    """The server is stopping and takes no new requests."""


@dataclass(eq=False)  # compared (and hashed) by identity: a set holds the live ones
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
        self._jobs: set[Job] = set()
        self.stopping = False

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def close(self) -> None:
        self.stop_all()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def stop_all(self) -> None:
        """Server shutdown: refuse new jobs and end every queued or running one at its
        next token (each stream then ends with a clean error event)."""
        with self._lock:
            self.stopping = True
            jobs = list(self._jobs)
        for job in jobs:
            job.cancelled.set()

    def _admit(self, job: Job) -> None:
        with self._lock:
            if self.stopping:
                raise ShuttingDown()
            if self._in_flight >= self.max_queue:
                self.counters.rejected += 1
                raise QueueFull()
            self._in_flight += 1
            self._jobs.add(job)

    def _release(self, job: Job, outcome: str) -> None:
        """outcome: "completed", "cancelled" or "failed", as the worker saw it end (the
        client may close its side after a finished generation: that is not a cancel)."""
        with self._lock:
            self._in_flight -= 1
            self._jobs.discard(job)
            setattr(self.counters, outcome, getattr(self.counters, outcome) + 1)

    async def run(self, job: Job) -> AsyncIterator[str | GenerationResult]:
        """Yields text chunks, then the GenerationResult. Raises QueueFull when full,
        or the generation's own error (e.g. a prompt longer than the context). Closing
        the iterator early (a client that went away) cancels the generation."""
        self._admit(job)
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
                self._release(job, outcome)
                loop.call_soon_threadsafe(inbox.put_nowait, None)

        try:
            self._executor.submit(produce)
        except BaseException:
            self._release(job, "failed")
            raise
        try:
            while (item := await inbox.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancelled.set()  # no-op after a normal end; stops a running generation
