"""What a generation gives back: `GenerationResult`, and `GenerationStream` (iterate for
text), plus `slot_steps`, which runs one generation as the single slot of a
`BatchDecoder` (guided and multi-model generations take this path)."""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator
from dataclasses import asdict, dataclass

from ..model_sets.guard import ModelSetGuard
from ..speculation.drafts import DraftCounts
from .decoder import BatchDecoder
from .logprobs import SequenceLogprobs
from .request import GenerationRequest
from .slots import Slot


@dataclass
class GenerationResult:
    """One finished generation. `tokens` excludes the end-of-generation token."""

    text: str
    tokens: list[int]
    prompt_tokens: list[int]
    finish_reason: str
    lam: float
    seed: int | None
    reused_prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    logprobs: SequenceLogprobs | None = None  # with stream(..., logprobs=True)
    drafted: int = 0  # tokens proposed by speculation
    accepted: int = 0  # of those, kept (the rest cost one batched row each)
    verify_steps: int = 0  # batched decodes that verified drafts
    # What the adaptive draft length measured and decided (DraftLength.report), when
    # the generation speculated: step costs by rows, acceptance per source, decisions.
    speculation: dict | None = None
    # With a negative prompt (classifier-free guidance): its ids and the scale.
    negative_prompt_tokens: list[int] | None = None
    cfg_scale: float | None = None
    reused_negative_prompt_tokens: int | None = None  # read from its cache, not decoded
    # Exact realignment (stream(..., exact=True)): attempts, killed, tokens spent, Z.
    exact: dict | None = None
    end_token: int | None = None  # the end-of-generation token that ended it, if one did

    @property
    def tokens_per_second(self) -> float:
        if not self.tokens or self.generation_seconds <= 0:
            return 0.0
        return len(self.tokens) / self.generation_seconds

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.negative_prompt_tokens is None:  # no guidance: nothing to report
            for key in ("negative_prompt_tokens", "cfg_scale", "reused_negative_prompt_tokens"):
                del data[key]
        if self.exact is None:
            del data["exact"]
        data["tokens_per_second"] = self.tokens_per_second
        del data["logprobs"]  # per token: see logprob_format (it needs the tokenizer)
        if self.logprobs is not None:
            data["logprob_sums"] = self.logprobs.sums()
            data["dera"] = self.logprobs.summary()
        return data


class GenerationStream:
    """Iterate for text chunks (always whole UTF-8 characters); `result` is set at the end.
    Closing it early (or breaking out of the loop) stops generation cleanly.

    The llama.cpp resources of a generation (its sampler chain) are created when the
    first chunk is asked for and freed when it ends or is closed, so a stream that is
    never iterated holds nothing."""

    def __init__(
        self, steps: Generator[str, None, GenerationResult], guard: ModelSetGuard | None = None
    ) -> None:
        self._steps = steps
        self._guard = guard
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            if self._guard is None:
                return next(self._steps)
            with self._guard.step():
                return next(self._steps)
        except StopIteration as end:
            if end.value is not None:
                self.result = end.value
            raise

    def close(self) -> None:
        self._steps.close()


def claimed(
    guard: ModelSetGuard, steps: Generator[str, None, GenerationResult]
) -> Generator[str, None, GenerationResult]:
    """`steps` run as the model set's one generation: the guard refuses a second one
    started while it runs (from the first step to the end or close)."""
    owner = object()
    guard.claim(owner)
    try:
        return (yield from steps)
    finally:
        guard.release(owner)


def slot_steps(
    decoder: BatchDecoder, guard: ModelSetGuard, request: GenerationRequest
) -> Generator[str, None, GenerationResult]:
    """One generation as the only slot of `decoder`: yields text, returns the result.
    The decoder keeps each sequence's cache afterwards, so a next prompt that starts
    the same way (the next chat turn; its negative prompt too) reads only the rest."""
    return claimed(guard, _one_slot(decoder, request))


def _one_slot(
    decoder: BatchDecoder, request: GenerationRequest
) -> Generator[str, None, GenerationResult]:
    slot = decoder.admit(request)
    try:
        while slot.finish_reason is None:
            decoder.step()
            if slot.new_text:
                yield slot.new_text
    except GeneratorExit:  # closed between steps: the caches are consistent
        decoder.retire(slot)
        raise
    except BaseException:  # a decode may have stopped half way: forget those caches
        decoder.retire(slot, forget=True)
        raise
    decoder.retire(slot)
    return slot_result(slot)


def slot_result(slot: Slot) -> GenerationResult:
    """The GenerationResult of a finished BatchDecoder slot (timed up to now)."""
    now = time.perf_counter()
    first = slot.first_token_at or now
    guidance = slot.guidance
    counts = slot.drafting.counts if slot.drafting is not None else DraftCounts()
    return GenerationResult(
        text=slot.output.text,
        tokens=slot.output.tokens,
        prompt_tokens=slot.prompt_tokens,
        finish_reason=slot.finish_reason,
        lam=slot.lam,
        seed=slot.sampling.seed,
        reused_prompt_tokens=slot.reused_prompt_tokens,
        prompt_seconds=first - slot.started,
        generation_seconds=now - first,
        logprobs=slot.logprobs,
        drafted=counts.drafted,
        accepted=counts.accepted,
        verify_steps=counts.verify_steps,
        speculation=slot.drafting.controller.report() if slot.drafting is not None else None,
        negative_prompt_tokens=None if guidance is None else list(guidance.negative_tokens),
        cfg_scale=slot.cfg_scale,
        reused_negative_prompt_tokens=slot.reused_negative_prompt_tokens,
        end_token=slot.output.end_token,
    )
