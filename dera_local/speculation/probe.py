"""What speculation can gain on this machine for these models, measured (`dera-local
info --measure-speculation`): a few decode steps of each shape a verification of k
drafts makes (1 + k rows), through the same batched step, mixing and sampling that
generation uses, then the expected gain of each k at high acceptance. Where a batch row
costs nearly as much as a whole step (a small CPU, a large vocabulary) no k pays, and
the adaptive draft length will keep speculation paused; this says so up front."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..sampling.chain import SamplingParams
from .draft_length import DraftLength, expected_gain
from .drafts import SpeculationParams
from .step_costs import StepCosts

HIGH_ACCEPTANCE = 0.9  # copying text: most drafted tokens are kept
PROMPT = "Count from one to twenty: one, two, three, four, five,"


class _RepeatLast:
    """Drafts k copies of the last token: the shape of a verification, whatever the text
    (what is accepted does not matter here, only what each shape costs)."""

    cheap = True
    source = "measurement"

    def __init__(self) -> None:
        self.last = 0
        self.calls = 0

    def reset(self, tokens: Sequence[int]) -> None:
        self.last = tokens[-1] if tokens else 0

    def extend(self, tokens: Sequence[int]) -> None:
        if tokens:
            self.last = tokens[-1]

    def draft(self, k: int) -> list[int]:
        self.calls += 1
        return [self.last] * k


@dataclass
class DraftCostReport:
    step_ms: dict[int, float]  # rows -> ms per decode step (median)
    gains: dict[int, float]  # k -> expected tokens/s against plain, at HIGH_ACCEPTANCE
    break_even: float | None  # the lowest acceptance at which some k pays (None: none)

    @property
    def best_k(self) -> int:
        return max(self.gains, key=self.gains.__getitem__)

    @property
    def pays(self) -> bool:
        return self.gains[self.best_k] > DraftLength.REQUIRED_GAIN

    def lines(self) -> list[str]:
        plain = self.step_ms[1]
        costs = ", ".join(
            f"{rows}: {ms / plain:.2f}" for rows, ms in self.step_ms.items() if rows > 1
        )
        lines = [f"  step cost by rows, in plain steps of {plain:.1f} ms: {costs}"]
        best = self.best_k
        at_high = f"at {HIGH_ACCEPTANCE:.0%} acceptance the best is k={best}, "
        if self.pays:
            lines.append(f"  {at_high}{self.gains[best]:.2f}x the tokens/s of plain decoding")
            lines.append(f"  pays from about {self.break_even:.0%} acceptance")
        else:
            lines.append(
                "  speculation measured not to pay on this machine for this model: "
                f"{at_high}{self.gains[best]:.2f}x; the adaptive draft length keeps it paused"
            )
        return lines


def measure_draft_costs(model_set, max_k: int = 8, steps: int = 6) -> DraftCostReport:
    """Times `steps` decode steps (after one dropped) of one plain row and of 1 + k rows
    for k = 1..max_k on `model_set` (a pair, a mixture), greedy at lam 1."""
    greedy = SamplingParams(temperature=0.0)
    plain = SpeculationParams(draft_max=0)
    model_set.generate(PROMPT, sampling=greedy, max_tokens=steps + 2, speculation=plain)
    for k in range(1, max_k + 1):
        drafter = _RepeatLast()
        stream = model_set.stream(
            PROMPT,
            sampling=greedy,
            max_tokens=(steps + 2) * (k + 1),
            speculation=SpeculationParams(draft_max=k, adaptive=False),
            drafter=drafter,
        )
        for _ in stream:
            if drafter.calls > steps + 1:
                break
        stream.close()
    costs = model_set.step_costs()
    step_ms = {rows: seconds * 1000 for rows, seconds in costs.measured().items()}
    gains = {k: expected_gain(costs, k, HIGH_ACCEPTANCE) for k in range(1, max_k + 1)}
    return DraftCostReport(step_ms, gains, _break_even(costs, max_k))


def _break_even(costs: StepCosts, max_k: int) -> float | None:
    for percent in range(5, 100, 5):
        acceptance = percent / 100
        if any(
            expected_gain(costs, k, acceptance) > DraftLength.REQUIRED_GAIN
            for k in range(1, max_k + 1)
        ):
            return acceptance
    return None
