"""Lambda sweeps: every lam of a grid decodes one prompt as parallel sequences of ONE pair
of batched contexts (batch.BatchDecoder, the step the server shares). The prompt is read
once and shared (unified KV cache); each step is one llama_decode per model for all live
sequences, then per sequence an in-place mix of its logits row with its own lam and a
sample from its own sampler chain.

With the same sampling seed, each sequence's output is what `generate` gives at its lam.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from .batch import BatchDecoder, Slot
from .engine import DeraPair
from .errors import BadParameterError, DeraError
from .mixing import validate_lam
from .sampling import SamplingParams


def parse_lambdas(values: str | Iterable[float]) -> list[float]:
    """'0,0.5,1' or numbers -> a checked list: non-empty, finite, no duplicates."""
    if isinstance(values, str):
        parts = [v.strip() for v in values.split(",") if v.strip()]
        try:
            values = [float(v) for v in parts]
        except ValueError:
            raise BadParameterError(
                f"the lambda list must be numbers separated by commas, got {values!r}"
            ) from None
    lambdas = [validate_lam(v) for v in values]
    if not lambdas:
        raise BadParameterError("the lambda list is empty; give e.g. 0,0.5,1")
    duplicates = sorted({v for v in lambdas if lambdas.count(v) > 1})
    if duplicates:
        repeated = ", ".join(f"{v:g}" for v in duplicates)
        raise BadParameterError(f"the lambda list repeats {repeated}")
    return lambdas


@dataclass
class SweepRow:
    """One lam's answer to one prompt, with summed log-probabilities of its tokens
    (including a final end-of-generation token) under each model and the mixture."""

    prompt_id: str
    lam: float
    text: str
    tokens: list[int]
    finish_reason: str
    logprob_aligned: float
    logprob_reference: float
    logprob_mixture: float
    reward: float | None = None
    end_token: int | None = None  # the end-of-generation token sampled last (in the sums)

    @property
    def kl_to_reference(self) -> float:
        """One-sample estimate of KL(pi_lam || pi_ref) for this answer."""
        return self.logprob_mixture - self.logprob_reference


class LambdaSweep:
    """Batched contexts for one lam grid over a loaded pair (the weights are shared): one
    BatchDecoder slot per lam, all starting from one shared read of the prompt."""

    def __init__(self, pair: DeraPair, lambdas: Sequence[float], *, max_tokens: int = 256):
        self.pair = pair
        self.lambdas = parse_lambdas(lambdas)
        if max_tokens <= 0:
            raise BadParameterError("max_tokens must be positive for a sweep")
        self.max_tokens = max_tokens
        n = len(self.lambdas)
        # Room for one shared prompt plus every sequence's own tokens.
        self.decoder = BatchDecoder(
            pair,
            n,
            n_ctx_per_slot=pair.n_ctx,
            n_ctx_total=pair.n_ctx + n * (max_tokens + 1),
        )

    def close(self) -> None:
        self.decoder.close()

    def __enter__(self) -> LambdaSweep:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(
        self,
        prompt: str | Sequence[int],
        *,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
        prompt_id: str = "0",
    ) -> list[SweepRow]:
        """Decodes the prompt at every lam of the grid; rows in grid order."""
        pair = self.pair
        sampling = (sampling or SamplingParams()).with_seed()
        tokens = pair.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        pair.check_prompt(tokens)
        decoder = self.decoder
        decoder.share_prefix(tokens[:-1])
        slots = []
        try:
            for lam in self.lambdas:
                slots.append(
                    decoder.admit(
                        tokens,
                        lam=lam,
                        sampling=sampling,
                        max_tokens=self.max_tokens,
                        stop=stop,
                        logprobs=True,
                    )
                )
            while any(slot.finish_reason is None for slot in slots):
                decoder.step()
        finally:
            for slot in slots:
                decoder.retire(slot)
        return [_row(slot, prompt_id) for slot in slots]


def _row(slot: Slot, prompt_id: str) -> SweepRow:
    sums = slot.logprobs.sums()
    return SweepRow(
        prompt_id=prompt_id,
        lam=slot.lam,
        text=slot.output.text,
        tokens=slot.output.tokens,
        finish_reason=slot.finish_reason,
        logprob_aligned=sums["aligned"],
        logprob_reference=sums["reference"],
        logprob_mixture=sums["mixture"],
        end_token=slot.output.end_token,
    )


def sweep(
    pair: DeraPair,
    prompts: Iterable[tuple[str, str | Sequence[int]]],
    lambdas: Sequence[float],
    *,
    sampling: SamplingParams | None = None,
    max_tokens: int = 256,
    stop: Sequence[str] = (),
    reward: Callable[[str], float] | None = None,
) -> Iterator[SweepRow]:
    """Yields rows for (prompt_id, prompt) pairs, every lam per prompt, in one batched
    pair of contexts; `reward` (text -> float) fills each row's reward."""
    with LambdaSweep(pair, lambdas, max_tokens=max_tokens) as runner:
        for prompt_id, prompt in prompts:
            for row in runner.run(prompt, sampling=sampling, stop=stop, prompt_id=prompt_id):
                if reward is not None:
                    row.reward = _checked_reward(reward, row.text)
                yield row


def _checked_reward(reward: Callable[[str], float], text: str) -> float:
    try:
        value = float(reward(text))
    except Exception as exc:  # a user's function: report it in one line
        raise DeraError(f"the reward function failed: {type(exc).__name__}: {exc}") from None
    if math.isnan(value):
        raise BadParameterError("the reward function returned NaN")
    return value
