"""Exact realignment's attempts run as parallel slots of one BatchDecoder, and which of
them is the answer (the math and the kill test: exact.py).

Attempts are numbered in the order they start. The answer is the surviving attempt with
the smallest number, decided once every attempt numbered before it has ended (killed):
whether attempt k is started depends only on attempts before it, and what it does only
on its own seeds, so the answer is an exact draw. Returning whichever survivor finishes
first would not be: short answers finish first (tests/test_exact_mode.py shows that
rule failing the same chi-square this one passes).

The budget is checked only when an attempt would start; a started attempt runs to its
end, since cutting it short would again favour short answers. So attempts spend at most
the budget plus what the attempts in flight then decode.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

from ..errors import BadParameterError
from .decoder import BatchDecoder
from .exact import (
    FINISH_KILLED,
    ExactBudgetError,
    ExactRun,
    attempt_requests,
    check_exact,
    decoded_tokens,
    out_of_budget,
)
from .request import GenerationRequest
from .slots import Slot
from .stream import GenerationResult, slot_result


class SmallestNumber:
    """The rule that keeps the answer exact: the survivor with the smallest number,
    once every attempt numbered before it has ended."""

    def __init__(self) -> None:
        self.ended: dict[int, bool] = {}  # attempt number -> survived

    def end(self, number: int, survived: bool) -> None:
        self.ended[number] = survived

    def answer(self) -> int | None:
        number = 0
        while number in self.ended:
            if self.ended[number]:
                return number
            number += 1
        return None

    def may_answer(self, number: int) -> bool:
        """False once a survivor numbered below `number` is known: that attempt can no
        longer be the answer, whatever it does."""
        return not any(survived and n < number for n, survived in self.ended.items())


class ExactAnswer:
    """The attempts of one exact answer: which may start, which ended or can no longer
    be the answer, and, once the rule names it, the answer with what it cost. Whoever
    owns the decoder runs them (exact_attempts below; the server's worker, beside other
    requests): it starts attempts while `wants_attempt()`, steps the decoder, retires
    what `settle()` hands back, and stops at `winner` (or `out_of_budget()` when no
    attempt is live and none may start)."""

    def __init__(self, request: GenerationRequest, *, parallel: int, budget: int) -> None:
        check_exact(request)
        if request.lam in (0.0, 1.0):  # nothing is killed: one attempt is the answer
            parallel = 1
        self.parallel = parallel
        self.budget = budget
        self.rule = SmallestNumber()  # looked up here: a test swaps in the pitfall's rule
        self.run = ExactRun()
        self.live: dict[Slot, int] = {}  # attempt in flight -> its number
        self._starts = attempt_requests(request)
        self._started = 0
        self._results: dict[int, GenerationResult] = {}

    @property
    def winner(self) -> int | None:
        return self.rule.answer()

    def wants_attempt(self) -> bool:
        """Another attempt may start now: fewer than `parallel` in flight, no survivor
        known, and the budget not spent (counting what the attempts in flight decoded)."""
        if len(self.live) >= self.parallel or not self.rule.may_answer(self._started):
            return False
        in_flight = sum(_decoded(slot) for slot in self.live)
        return self.run.tokens_spent + in_flight < self.budget

    def start(self, admit: Callable[[GenerationRequest], Slot]) -> Slot:
        """Starts the next attempt in the slot `admit` gives it."""
        slot = admit(next(self._starts))
        self.live[slot] = self._started
        self._started += 1
        return slot

    def settle(self) -> list[Slot]:
        """After a step: the attempts that ended, or that a survivor numbered before them
        has made useless, counted and handed back for the caller to retire."""
        done = []
        for slot, number in list(self.live.items()):
            if slot.finish_reason is not None:
                survived = slot.finish_reason != FINISH_KILLED
                self.rule.end(number, survived)
                if survived:
                    self._results[number] = slot_result(slot)
            elif self.rule.may_answer(number):
                continue
            else:  # a survivor before it is known
                self.run.discarded += 1
            del self.live[slot]
            self.run.tokens_spent += _decoded(slot)
            done.append(slot)
        return done

    def out_of_budget(self) -> ExactBudgetError:
        """The error once the budget is spent and every attempt was killed."""
        self.run.attempts = self.run.killed = len(self.rule.ended)
        return ExactBudgetError(out_of_budget(self.run, self.budget))

    def finish(self) -> tuple[GenerationResult, list[Slot]]:
        """The answer, its `exact` set, and the attempts still in flight (to retire):
        attempts numbered up to it (the sequence a one-at-a-time run would have made)
        and every token decoded, survivors past it counted as discarded."""
        winner = self.winner
        assert winner is not None
        run = self.run
        run.attempts = winner + 1
        run.killed = winner
        run.discarded += sum(1 for n in self.rule.ended if n > winner) + len(self.live)
        run.tokens_spent += sum(_decoded(slot) for slot in self.live)
        rest = list(self.live)
        self.live.clear()
        result = self._results[winner]
        result.exact = run.to_dict()
        return result, rest


def exact_attempts(
    decoder: BatchDecoder,
    request: GenerationRequest,
    *,
    parallel: int = 1,
    budget: int,
) -> Generator[str, None, GenerationResult]:
    """Runs the request's attempts, up to `parallel` at once in `decoder`'s free slots,
    until the rule names the answer; yields its text once, returns its result with
    `exact` set (attempts up to it, killed, tokens spent by all, discarded). Raises
    ExactBudgetError when the budget is spent before any attempt survived."""
    answer = ExactAnswer(request, parallel=max(1, min(parallel, decoder.free_slots)), budget=budget)
    if answer.parallel > 1:  # one read of the prompt (its new part), shared by every attempt
        decoder.share_prefix(list(request.prompt)[:-1], decoder.free_sequences[: answer.parallel])
    try:
        while answer.winner is None:
            while answer.wants_attempt():
                answer.start(decoder.admit)
            if not answer.live:
                raise answer.out_of_budget()
            decoder.step()
            for slot in answer.settle():
                decoder.retire(slot)
    except GeneratorExit:
        _retire_all(decoder, answer.live)
        raise
    except BaseException:
        _retire_all(decoder, answer.live, forget=True)
        raise
    result, rest = answer.finish()
    for slot in rest:
        decoder.retire(slot)
    if result.text:
        yield result.text
    return result


def _decoded(slot: Slot) -> int:
    return decoded_tokens(len(slot.output.tokens), slot.finish_reason)


def _retire_all(decoder: BatchDecoder, live: dict, *, forget: bool = False) -> None:
    for slot in list(live):
        decoder.retire(slot, forget=forget)
    live.clear()


MAX_PARALLEL = 16  # attempts decoded at once; each is a KV sequence of its own
# The default: on 2 CPU cores 4 attempts at once decode 1.2-1.6x the sequence-tokens per
# second of one at a time, 8 at once 1.5-1.9x, part of it spent on attempts started after
# the answer (bench/exact_cost.py; docs/performance/amd-epyc-avx2.md).
DEFAULT_PARALLEL = 4


def check_parallel(parallel: int) -> int:
    if isinstance(parallel, bool) or not isinstance(parallel, int):
        raise BadParameterError("exact_parallel must be a whole number of attempts")
    if not 1 <= parallel <= MAX_PARALLEL:
        raise BadParameterError(
            f"exact_parallel must be from 1 to {MAX_PARALLEL} attempts at once, got {parallel}"
        )
    return parallel
