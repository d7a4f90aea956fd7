"""A generation in flight in the batched step (batch.BatchDecoder): the `Slot`, its `Lane`
in the KV cache per prompt, and its speculation state (`Drafting`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..sampling.chain import SamplerChain, SamplingParams
from ..speculation.draft_length import DraftLength
from ..speculation.drafts import AcceptRule, DraftCounts, Drafter
from .guidance import Guidance, Term
from .logprobs import SequenceLogprobs
from .outputs import SequenceOutput


@dataclass(eq=False)
class Lane:
    """One prompt of a slot in the KV cache: its sequence and what it still has to read."""

    seq_id: int
    pending: list[int]  # prompt tokens still to read, or [last sampled token]
    position: int  # position of pending[0]


@dataclass(eq=False)
class Drafting:
    """A slot's speculation: where its drafts come from, how many pay (DraftLength, from
    the measured acceptance and step times), and what they came to."""

    drafter: Drafter
    controller: DraftLength
    accept: AcceptRule
    counts: DraftCounts = field(default_factory=DraftCounts)
    drafts: list[int] = field(default_factory=list)  # in this step's batch, to verify


@dataclass(eq=False)
class Slot:
    """One generation in the batch. `new_text` holds what its last step made safe to
    show; `finish_reason` is set when it ended."""

    lam: float
    guidance: Guidance | None
    terms: list[Term]
    prompt_tokens: list[int]
    chain: SamplerChain
    output: SequenceOutput
    sampling: SamplingParams
    logprobs: SequenceLogprobs | None
    lanes: list[Lane]  # lanes[0]: the prompt; lanes[1]: the negative prompt, if any
    reused_prompt_tokens: int
    reused_negative_prompt_tokens: int | None = None
    tag: object = None  # the caller's handle (e.g. the server's job)
    drafting: Drafting | None = None  # speculation, when admitted with it
    kill_test: object = None  # exact realignment's per-token test (engine/exact.py)
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    weights: list[float] = field(init=False)  # the terms' weights, in term order

    def __post_init__(self) -> None:
        self.weights = [term.weight for term in self.terms]

    @property
    def seq_id(self) -> int:
        return self.lanes[0].seq_id

    @property
    def prefilling(self) -> bool:
        """Still reading its prompt (nothing sampled yet)."""
        return self.first_token_at is None

    @property
    def finish_reason(self) -> str | None:
        return self.output.finish_reason

    @property
    def new_text(self) -> str:
        return self.output.new_text

    @property
    def cfg_scale(self) -> float | None:
        return None if self.guidance is None else self.guidance.scale
