"""One generation as one value: `GenerationRequest`, everything a slot of the batched
decoder needs, built once where a request enters (the Python API, a sweep point, a server
dialect's parser) and read by the engine by attribute, as llama.cpp's server carries
`slot_params` and mlx-lm a `GenerationArguments`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..sampling.chain import SamplingParams
from ..sampling.json_schema import with_json_schema
from ..speculation.drafts import AcceptRule, Drafter, SpeculationParams, sample_equals_draft
from .guidance import Guidance


@dataclass(frozen=True)
class GenerationRequest:
    """What one slot generates.

    prompt: token ids, fed as they are. lam: the mixture's dial (a proxy-tuned model's
    alpha). sampling: with a concrete seed and the grammar resolved (`resolved_sampling`
    makes it so). max_tokens: -1 until the context is full. stop: strings that end the
    answer. kill_test: exact realignment's per-token test of one attempt (engine/exact.py).
    logprobs / top_logprobs / logprob_lams: what to record per token (see
    logprobs.SequenceLogprobs). guidance: a negative prompt's ids and scale (CFG).
    speculation, drafter, accept: how drafts are made and kept (never what is sampled).
    target_lam: the lam of the exact realignment target the answer's mismatch is measured
    against (a plain pair's DeRa only; the model set decides). logits_observer: a
    llama_sampler put first in the chain (tests, debugging).
    """

    prompt: tuple[int, ...] = ()
    lam: float = 1.0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    logprob_lams: tuple[float, ...] = ()
    guidance: Guidance | None = None
    speculation: SpeculationParams | None = None
    drafter: Drafter | None = None
    accept: AcceptRule = sample_equals_draft
    target_lam: float | None = None
    logits_observer: object = None
    kill_test: object = None  # exact realignment: the attempt's kill test (engine/exact.py)
    # Control tokens written into the text as their own text (a vocabulary's tool-call
    # markers, such as Qwen's <tool_call>, which the calls are parsed from).
    shown_special: tuple[int, ...] = ()

    def __post_init__(self) -> None:  # sequences as tuples: the value is frozen all through
        object.__setattr__(self, "prompt", tuple(self.prompt))
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        object.__setattr__(self, "logprob_lams", tuple(self.logprob_lams))

    @property
    def records_logprobs(self) -> bool:
        return bool(self.logprobs or self.top_logprobs or self.logprob_lams)


def resolved_sampling(
    sampling: SamplingParams | None, json_schema: str | dict | None = None
) -> SamplingParams:
    """The sampling a request carries: a concrete seed (so that the run can be reported
    and repeated) and a JSON schema turned into its grammar, here and only here."""
    return with_json_schema(sampling or SamplingParams(), json_schema).with_seed()
