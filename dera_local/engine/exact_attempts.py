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

from collections.abc import Generator

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
    check_exact(request)
    if request.lam in (0.0, 1.0):  # nothing is killed: one attempt is the answer
        parallel = 1
    parallel = max(1, min(parallel, decoder.free_slots))
    if parallel > 1:  # one read of the prompt (its new part), shared by every attempt
        decoder.share_prefix(list(request.prompt)[:-1], decoder.free_sequences[:parallel])
    rule = SmallestNumber()  # looked up here: a test swaps in the pitfall's rule
    run = ExactRun()
    starts = attempt_requests(request)
    started = 0
    live: dict[Slot, int] = {}
    results: dict[int, GenerationResult] = {}
    try:
        while (winner := rule.answer()) is None:
            while len(live) < parallel and _may_start(rule, started, live, run, budget):
                live[decoder.admit(next(starts))] = started
                started += 1
            if not live:  # the budget is spent and every attempt was killed
                run.attempts = run.killed = len(rule.ended)
                raise ExactBudgetError(out_of_budget(run, budget))
            decoder.step()
            for slot, number in list(live.items()):
                if slot.finish_reason is not None:
                    del live[slot]
                    run.tokens_spent += _decoded(slot)
                    survived = slot.finish_reason != FINISH_KILLED
                    rule.end(number, survived)
                    if survived:
                        results[number] = slot_result(slot)
                    decoder.retire(slot)
                elif not rule.may_answer(number):  # a survivor before it is known
                    del live[slot]
                    run.tokens_spent += _decoded(slot)
                    run.discarded += 1
                    decoder.retire(slot)
    except GeneratorExit:
        _retire_all(decoder, live)
        raise
    except BaseException:
        _retire_all(decoder, live, forget=True)
        raise
    # What the answer cost: attempts numbered up to it (the sequence a one-at-a-time
    # run would have made), every token decoded, and survivors past it as discarded.
    run.attempts = winner + 1
    run.killed = winner
    run.discarded += sum(1 for n in rule.ended if n > winner)
    run.discarded += len(live)
    for slot in live:
        run.tokens_spent += _decoded(slot)
    _retire_all(decoder, live)
    result = results[winner]
    result.exact = run.to_dict()
    if result.text:
        yield result.text
    return result


def _may_start(rule, number: int, live: dict, run: ExactRun, budget: int) -> bool:
    """Attempt `number` starts while no survivor is known and the budget is not spent
    (counting what the attempts in flight have decoded so far)."""
    if not rule.may_answer(number):
        return False
    in_flight = sum(_decoded(slot) for slot in live)
    return run.tokens_spent + in_flight < budget


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
