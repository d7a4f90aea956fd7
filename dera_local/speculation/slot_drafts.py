"""Speculation per slot of the batched step: a slot's drafter proposes tokens after its
last one (prompt lookup, or a draft model), the step decodes them in every sequence of
the slot at once, and the walk below keeps the drafts the chain would have sampled
anyway (speculative.verify_drafts), telling the adaptive draft length what was kept
and what drafting cost (the decoder times the steps)."""

from __future__ import annotations

import time
from collections.abc import Callable

from ..engine.slots import Drafting, Slot
from ..errors import BadParameterError
from .draft_length import DraftLength
from .drafts import AcceptRule, Drafter, PromptLookup, SpeculationParams, verify_drafts
from .step_costs import StepCosts


def drafting_for(
    speculation: SpeculationParams | None,
    drafter: Drafter | None,
    accept: AcceptRule,
    prompt: list[int],
    max_drafts: int,
    costs: StepCosts,
    lanes: int = 1,
) -> Drafting | None:
    """A new slot's speculation (None: it decodes one token per step). The drafter
    (default: prompt lookup over the prompt) starts following the prompt here; a draft
    model reads it now. costs: the decoder's step costs; lanes: the slot's sequences
    (each carries the drafts)."""
    if speculation is None or not speculation.enabled or not max_drafts:
        return None
    if speculation.draft_max > max_drafts:
        raise BadParameterError(
            f"draft_max {speculation.draft_max} is more than this decoder was opened "
            f"for ({max_drafts})",
            cli_hint="lower --draft-max",
        )
    drafter = drafter or PromptLookup(speculation.ngram_min, speculation.ngram_max)
    drafter.reset(prompt)
    return Drafting(drafter, DraftLength(speculation, drafter, costs, lanes), accept)


def plan_drafts(slot: Slot, room: int, base_rows: int, sharing: int) -> tuple[list[int], float]:
    """The drafts a speculating slot verifies this step (none: one plain token), and the
    seconds drafting took. room: the most that fit its batch share and its context
    (max_tokens is applied here); base_rows: the rows the step carries without them;
    sharing: the slots decoding in the step."""
    drafting = slot.drafting
    tokens_left = slot.output.tokens_left
    if tokens_left is not None:  # a step keeps at most k + 1 tokens
        room = min(room, tokens_left - 1)
    controller = drafting.controller
    limit = controller.draft_limit(room, base_rows, sharing)
    started = time.perf_counter()
    drafts = drafting.drafter.draft(limit) if limit > 0 else []
    seconds = time.perf_counter() - started
    controller.after_drafting(len(drafts), seconds)
    drafting.drafts = drafts[: controller.choose(len(drafts))]
    return drafting.drafts, seconds


def walk_drafts(
    slot: Slot,
    sample_row: Callable[[int], int],
    advance: Callable[[int], str | None],
) -> tuple[list[int], str | None]:
    """Samples the slot's verification rows in order (row i follows the i-th input token)
    and keeps drafts while the chain agrees; counts them and tells the draft length how
    many were kept. Returns the kept tokens and the finish reason. The caller drops the
    cached positions after the last kept token."""
    drafting = slot.drafting
    assert drafting is not None and drafting.drafts
    drafts = drafting.drafts
    kept, accepted, finish = verify_drafts(sample_row, drafts, advance, drafting.accept)
    counts = drafting.counts
    counts.drafted += len(drafts)
    counts.accepted += accepted
    counts.verify_steps += 1
    rejected = accepted < len(drafts) and finish is None
    drafting.controller.after_verify(len(drafts), accepted, rejected)
    drafting.drafts = []
    return kept, finish
