"""Runs the server's generations on one dedicated thread (a llama.cpp context must not be
used from two threads) as continuous batching: up to `parallel` requests decode together
in one batch, each with its own lam; more wait in a bounded queue; a request leaves the
batch at the next step once it ends or its client goes away. A follow-up request goes to
the slot that holds its conversation's prefix when that slot is free.

An exact request (engine/exact.py) runs its attempts in slots of the same batch: one
always, and up to `exact_parallel` while no other request waits for a slot (a started
attempt runs to its end, since cutting it short would bias the answer, so a request
that arrives then waits for at most one attempt)."""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

from ..engine.decoder import BatchDecoder
from ..engine.exact import DEFAULT_BUDGET
from ..engine.exact_attempts import DEFAULT_PARALLEL, ExactAnswer
from ..engine.guidance import Guidance
from ..engine.logprobs import SequenceLogprobs
from ..engine.request import GenerationRequest
from ..engine.slots import Slot
from ..engine.stream import GenerationResult, slot_result
from ..errors import BadParameterError
from ..model_sets.pair import DeraPair

# The decode thread builds every request's sampler chain, and llama.cpp's grammar parser
# recurses once per nested group (up to grammar_bounds.MAX_GROUP_DEPTH, under 0.5 MB):
# a known stack, not the platform's default for threads (128 KB on musl).
DECODE_THREAD_STACK = 16 << 20


def _started_with_stack(target: Callable[[], None], name: str, size: int) -> threading.Thread:
    previous = threading.stack_size(size)  # applies to threads created from now on
    try:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
    finally:
        threading.stack_size(previous)
    return thread


class QueueFull(Exception):
    """More requests are waiting than the server accepts; the client should retry."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new requests."""


@dataclass(eq=False)  # compared (and hashed) by identity: a set holds the live ones
class Job:
    """One request: `prompt` makes its token ids (tokenizing and template rendering run
    on the worker thread, so a long prompt never blocks the event loop)."""

    prompt: Callable[[], list[int]]
    request: GenerationRequest  # its prompt and guidance are filled in when it starts
    negative_prompt: Callable[[], list[int]] | None = None  # classifier-free guidance
    cfg_scale: float = 1.0
    per_token: bool = False  # stream each token's log-probabilities with its text
    exact: bool = False  # exact realignment: attempts until one survives (engine/exact.py)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # The request fields that held each prompt ({"prompt": "messages", ...}), so that
    # a prompt that does not fit is refused naming its field.
    fields: dict[str, str] = field(default_factory=dict)


@dataclass
class Counters:
    completed: int = 0  # the generation ran to its end (stop or length)
    cancelled: int = 0  # the client went away (or closed the stream) before the end
    failed: int = 0  # an error was answered (bad prompt, runtime failure)
    rejected: int = 0  # 503: the queue was full


@dataclass
class TextChunk:
    """What one step made safe to show, and the tokens sampled since the last chunk with
    their log-probabilities (when the request asked for them per token)."""

    text: str
    tokens: list[int]
    logprobs: SequenceLogprobs | None = None


@dataclass(eq=False)
class _Waiting:
    job: Job
    deliver: Callable[[object], None]  # thread-safe: a TextChunk, a result, an error, None
    delivered_tokens: int = 0
    answer: ExactAnswer | None = None  # an exact job's attempts

    def chunk(self, slot: Slot) -> TextChunk:
        """The tokens sampled since the last chunk, with the text the last step made safe
        to show."""
        start, end = self.delivered_tokens, len(slot.output.tokens)
        self.delivered_tokens = end
        logprobs = None
        if self.job.per_token and slot.logprobs is not None:
            logprobs = slot.logprobs.slice(start, end)
        return TextChunk(slot.new_text, slot.output.tokens[start:end], logprobs)

    def whole(self, result: GenerationResult) -> TextChunk:
        """An exact answer, shown at once when it survived."""
        logprobs = None
        if self.job.per_token and result.logprobs is not None:
            logprobs = result.logprobs.slice(0, len(result.tokens))
        return TextChunk(result.text, list(result.tokens), logprobs)


class GenerationWorker:
    """Continuous batching: one thread drives a BatchDecoder with up to `parallel` slots.
    Between two decode steps it admits waiting requests into free slots and retires the
    ones that ended or whose client went away; every request keeps its own lam, sampling
    settings, stop strings and length."""

    def __init__(
        self,
        pair: DeraPair,
        max_queue: int,
        *,
        parallel: int = 4,
        guided: bool = True,
        exact_budget: int = DEFAULT_BUDGET,
        exact_parallel: int = DEFAULT_PARALLEL,
    ) -> None:
        """Each of the `parallel` slots holds pair.n_ctx tokens (serve loads the pair with
        its share of -c); `guided`: each also has a sequence for a negative prompt.
        exact_budget: sequence-tokens per exact answer; exact_parallel: the most slots
        one exact answer's attempts take at once."""
        if parallel < 1:
            raise BadParameterError(f"parallel must be at least 1, got {parallel}")
        self.pair = pair
        self.max_queue = max_queue
        self.parallel = parallel
        self.n_ctx_per_slot = pair.n_ctx
        self.counters = Counters()
        self._lock = threading.Condition()
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._in_flight = 0  # waiting + running
        self._jobs: set[Job] = set()
        self.stopping = False
        self._closed = False
        self.guided = guided
        # Each slot drafts by prompt lookup over its own text (a draft model follows one
        # text, so it cannot serve several slots) and verifies in the shared step.
        self.speculation = pair.speculation
        self.exact_budget = exact_budget
        self.exact_parallel = exact_parallel
        self._decoder = BatchDecoder(
            pair,
            parallel,
            self.n_ctx_per_slot,
            prompts_per_slot=2 if guided else 1,
            max_drafts=self.speculation.draft_max,
        )
        self._thread = _started_with_stack(self._loop, "dera-batch", DECODE_THREAD_STACK)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def close(self) -> None:
        self.stop_all()
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join()
        self._decoder.close()

    def stop_all(self) -> None:
        """Server shutdown: refuse new jobs and end every queued or running one at its
        next token (each stream then ends with a clean error event)."""
        with self._lock:
            self.stopping = True
            jobs = list(self._jobs)
            self._lock.notify_all()
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

    async def run(self, job: Job) -> AsyncIterator[TextChunk | GenerationResult]:
        """Yields TextChunks, then the GenerationResult. Raises QueueFull when full,
        or the generation's own error (e.g. a prompt longer than a slot). Closing the
        iterator early (a client that went away) cancels the generation."""
        self._admit(job)
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()

        def deliver(item: object) -> None:
            loop.call_soon_threadsafe(inbox.put_nowait, item)

        with self._lock:
            self._waiting.append(_Waiting(job, deliver))
            self._lock.notify_all()
        try:
            while (item := await inbox.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancelled.set()  # no-op after a normal end; stops a running generation
            with self._lock:
                self._lock.notify_all()

    # --- the decoding thread ---

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._decoder.live and not self._closed:
                    self._lock.wait()
                if self._closed and not self._decoder.live and not self._waiting:
                    return
                admitted = self._take_admissible()
            try:
                self._iterate(admitted)
            except BaseException as exc:  # a failed decode fails every generation in it
                for waiting in self._live_jobs():
                    self._finish(waiting, "failed", forget=True, last=exc)

    def _take_admissible(self) -> list[_Waiting]:
        """Waiting requests for the free slots (and the cancelled ones, to drop them)."""
        admitted, free = [], self._decoder.free_slots
        while self._waiting and (free or self._waiting[0].job.cancelled.is_set()):
            waiting = self._waiting.popleft()
            free -= not waiting.job.cancelled.is_set()
            admitted.append(waiting)
        return admitted

    def _iterate(self, admitted: list[_Waiting]) -> None:
        """Admit, drop the cancelled, then one batched step for every live slot."""
        decoder = self._decoder
        for waiting in admitted:
            self._start(waiting)
        for waiting in self._live_jobs():
            if waiting.job.cancelled.is_set():
                self._finish(waiting, "cancelled")
        if not decoder.live:
            return
        exact_jobs: dict[_Waiting, None] = {}  # in the order their slots sampled
        for slot in decoder.step():
            waiting = slot.tag
            if waiting.answer is not None:  # an exact answer is shown once it survived
                exact_jobs[waiting] = None
                continue
            if slot.new_text:
                waiting.deliver(waiting.chunk(slot))
            if slot.finish_reason is not None:
                self._finish(waiting, "completed", last=slot_result(slot))
        for waiting in exact_jobs:
            self._advance_exact(waiting)

    def _advance_exact(self, waiting: _Waiting) -> None:
        """After a step of an exact job's attempts: retire the ones that ended or can no
        longer be the answer; answer once the rule names the survivor (its text in one
        chunk); else keep one attempt running, and more while no request waits, until
        the budget is spent."""
        answer, decoder = waiting.answer, self._decoder
        for slot in answer.settle():
            decoder.retire(slot)
        if answer.winner is not None:
            result, rest = answer.finish()
            for slot in rest:
                decoder.retire(slot)
            waiting.deliver(waiting.whole(result))
            self._finish(waiting, "completed", last=result)
            return

        def admit(request: GenerationRequest) -> Slot:
            return decoder.admit(request, tag=waiting)

        if not answer.live and answer.wants_attempt():  # its own slot, just freed
            answer.start(admit)
        if not answer.live:
            self._finish(waiting, "failed", last=answer.out_of_budget())
            return
        with self._lock:
            queued = bool(self._waiting)
        while not queued and decoder.free_slots and answer.wants_attempt():
            answer.start(admit)

    def _live_jobs(self) -> list[_Waiting]:
        """The jobs with a slot in the batch, each once (an exact job may have several)."""
        return list(dict.fromkeys(slot.tag for slot in self._decoder.live))

    def _start(self, waiting: _Waiting) -> None:
        job = waiting.job
        if job.cancelled.is_set():  # cancelled while it waited
            self._release(job, "cancelled")
            waiting.deliver(None)
            return
        try:
            guidance = None
            if job.negative_prompt is not None:
                guidance = Guidance(tuple(job.negative_prompt()), job.cfg_scale)
            request = replace(
                job.request,
                prompt=tuple(job.prompt()),
                guidance=guidance,
                speculation=self.speculation,
                target_lam=self.pair.exact_target(job.request.lam, guidance),
            )
            if job.exact:  # one attempt now; more once it has read the prompt
                waiting.answer = ExactAnswer(
                    request, parallel=self.exact_parallel, budget=self.exact_budget
                )
                waiting.answer.start(lambda attempt: self._decoder.admit(attempt, tag=waiting))
            else:
                self._decoder.admit(request, tag=waiting)
        except BaseException as exc:  # handed to the request that asked
            self._release(job, "failed")
            waiting.deliver(exc)
            waiting.deliver(None)

    def _finish(
        self, waiting: _Waiting, outcome: str, *, forget: bool = False, last: object = None
    ) -> None:
        """Retire the job's slots and count its outcome *before* the client hears the
        end, so a client that asks /health right after its stream sees it counted."""
        for slot in [s for s in self._decoder.live if s.tag is waiting]:
            self._decoder.retire(slot, forget=forget)
        self._release(waiting.job, outcome)
        if last is not None:
            waiting.deliver(last)
        waiting.deliver(None)
