"""How many drafted tokens a speculating slot verifies each step (`DraftLength`), from
the acceptance it has seen and the step costs its decoder measured (step_costs).

A verification of k drafts keeps 1 + a + a^2 + ... + a^k tokens on average, where a is
the chance that a drafted token is accepted (tracked per draft source: prompt lookup by
match length, or the draft model), and costs a step of k more rows per lane (plus the
drafting, for a draft model). The k with the best expected tokens per second wins if
it beats a plain step by a margin; when no k pays, that source pauses and then probes.

Decisions must not hang on luck in the first steps (one slow timing once switched
speculation off for a whole answer while every draft was accepted), so: timings are
robust (StepCosts drops each shape's first timing, takes medians and fits a line); a
slot re-times its plain step now and then when no step with nothing to draft did; a
probe that is kept halves the next pause and doubles the next probe, and only a
rejected probe doubles the pause (zero acceptance stays paused, text that starts to
copy resumes drafting within a few probes). Every decision is kept in `trace`
(generate --json's `speculation`, and -v)."""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import asdict, dataclass

from .drafts import Drafter, SpeculationParams
from .step_costs import StepCosts


@dataclass
class Acceptance:
    """Decayed counts of accepted and judged drafted tokens of one draft source."""

    accepted: float = 0.0
    judged: float = 0.0

    @property
    def rate(self) -> float:
        # Laplace's rule: 1/2 with no evidence, then the observed rate.
        return (self.accepted + 1.0) / (self.judged + 2.0)


@dataclass
class Decision:
    """A run of steps of one slot that decided the same: from `step` (counted from the
    slot's first decode), `steps` long, verifying `k` drafts (0: plain) because `why`;
    with the acceptance and expected gain (tokens/s against plain) it was decided on."""

    step: int
    steps: int
    k: int
    why: str
    acceptance: float | None = None
    gain: float | None = None


def expected_gain(
    costs: StepCosts,
    k: int,
    acceptance: float,
    *,
    base_rows: int = 1,
    lanes: int = 1,
    sharing: int = 1,
    draft_seconds: float = 0.0,
) -> float:
    """Expected tokens per second of verifying k drafts, against decoding plainly.
    base_rows: the rows the step carries without these drafts; lanes: the slot's
    sequences (each carries the drafts); sharing: the slots decoding in the step. The
    drafts' extra time delays all of them: the step makes sharing - 1 + E tokens
    instead of `sharing`. draft_seconds: drafting time per drafted token."""
    a = min(acceptance, 0.999)
    kept = (1 - a ** (k + 1)) / (1 - a)
    plain = costs.seconds(base_rows)
    drafted = costs.seconds(base_rows + k * lanes) + k * draft_seconds
    return (sharing - 1 + kept) / sharing * plain / drafted


@dataclass
class _SourceState:
    """What one draft source has shown, and its pause: a source that does not pay (a
    2-gram match in open text) is paused on its own, so it never blocks one that pays
    (a 4-gram match in copied text)."""

    acceptance: Acceptance
    pause_left: int = 0  # steps it still sits out
    pause: int = 0  # the next pause's length
    probe_due: bool = False  # its next draft is a probe after a pause
    probe_size: int = 1  # drafts its next probe verifies (doubles while probes pass)


class DraftLength:
    DECAY = 0.8  # weight of the evidence so far at each new verification
    REQUIRED_GAIN = 1.05  # drafting must promise clearly more: a wrong "yes" costs time
    FIRST_PAUSE = 8
    MAX_PAUSE = 256
    MAX_PROBE = 8  # the most drafts a probe verifies
    # Until the plain step has this many kept timings, every RETIME_EVERY-th step is
    # plain, then every RETIME_LATER-th: every other cost is relative to it, costs drift
    # as the context grows, and while drafting pays (text that copies throughout) no
    # other step times it. Most text has steps with nothing to draft, which time it for
    # free; until then the prior stands in (a plain step taken up front costs the
    # drafts of the answer's first steps, where copying is most reliable).
    PLAIN_TIMINGS = 3
    RETIME_EVERY = 16
    RETIME_LATER = 64
    TRACE_LIMIT = 256

    def __init__(
        self,
        params: SpeculationParams,
        drafter: Drafter,
        costs: StepCosts | None = None,
        lanes: int = 1,
    ) -> None:
        self.params = params
        self.drafter = drafter
        self.costs = costs if costs is not None else StepCosts()
        self.lanes = lanes
        self.trace: list[Decision] = []
        self.trace_dropped = 0
        self._sources: dict[object, _SourceState] = {}
        self._pooled = Acceptance()  # all sources together
        self._draft_seconds: deque[float] = deque(maxlen=StepCosts.WINDOW)  # per token
        self._probing: object = None  # the source whose probe is being verified
        self._asked = False  # the drafter was asked for drafts in this step
        self._decided: int | None = None  # a costly drafter's k, decided before drafting
        self._step = 0
        self._base_rows = lanes
        self._sharing = 1

    def draft_limit(self, room: int, base_rows: int | None = None, sharing: int = 1) -> int:
        """How many tokens to ask the drafter for in this step (0: decode one token
        plainly). room: the most that fit; base_rows: the rows the step carries without
        this slot's drafts (default: its own lanes); sharing: the slots decoding in it."""
        self._step += 1
        self._base_rows = base_rows or self.lanes
        self._sharing = max(sharing, 1)
        self._decided = None
        self._asked = False
        for state in self._sources.values():  # pauses count steps, drafted or not
            if state.pause_left > 0:
                state.pause_left -= 1
                state.probe_due = state.pause_left == 0
        if not self.params.enabled:
            return 0
        if room <= 0:  # the batch, the context or max_tokens leaves no room
            self._note(0, "no room for drafts")
            return 0
        limit = min(self.params.draft_max, room)
        few = self.costs.timings(self._base_rows) < self.PLAIN_TIMINGS
        if (
            self.params.adaptive
            and self._step % (self.RETIME_EVERY if few else self.RETIME_LATER) == 0
        ):
            self._note(0, "re-timing a plain step")
            return 0
        if self.params.adaptive and not self.drafter.cheap:
            # Drafting costs decodes here: decide before drafting.
            state = self._state(self.drafter.source)
            if state.pause_left > 0:
                self._note(0, "paused")
                return 0
            limit = self._decided = self._verdict(self.drafter.source, limit)
        self._asked = limit > 0
        return limit

    def choose(self, proposed: int) -> int:
        """How many of the proposed drafts to verify (0: none; decode one plainly)."""
        if proposed < max(self.params.draft_min, 1):
            if self._asked:
                self._note(0, "nothing to draft")
            return 0
        if not self.params.adaptive:
            self._note(proposed, "fixed draft length")
            return proposed
        if self._decided is not None:
            return min(proposed, self._decided)
        source = self.drafter.source
        if self._state(source).pause_left > 0:
            self._note(0, "paused")
            return 0
        return self._verdict(source, proposed)

    def after_drafting(self, drafted: int, seconds: float) -> None:
        """The drafter took `seconds` to propose `drafted` tokens."""
        if drafted:
            self._draft_seconds.append(seconds / drafted)

    def after_verify(self, drafted: int, accepted: int, rejected: bool) -> None:
        """rejected: the walk ended on a drafted token that was not kept (not at the
        bonus row or a stop)."""
        source = self.drafter.source
        state = self._state(source)
        for counts in (state.acceptance, self._pooled):
            counts.accepted = counts.accepted * self.DECAY + accepted
            counts.judged = counts.judged * self.DECAY + accepted + rejected
        if self._probing == source:
            self._probing = None
            if accepted:  # drafting may pay again: look sooner
                state.pause = max(state.pause // 2, self.FIRST_PAUSE)
            else:
                state.pause = min(state.pause * 2, self.MAX_PAUSE)
            # Probes that pass verify more next time, so that evidence of a change (text
            # that starts to copy) outweighs the old failures in a few probes.
            passed = accepted == drafted
            state.probe_size = min(state.probe_size * 2, self.MAX_PROBE) if passed else 1

    def best_k(self, source: object, limit: int) -> tuple[int, float]:
        """The k (0: none) with the best expected gain for `source`, and that gain."""
        acceptance = self.acceptance(source)
        draft_seconds = statistics.median(self._draft_seconds) if self._draft_seconds else 0.0
        best, best_gain = 0, 0.0
        for k in range(1, limit + 1):
            gain = expected_gain(
                self.costs,
                k,
                acceptance,
                base_rows=self._base_rows,
                lanes=self.lanes,
                sharing=self._sharing,
                draft_seconds=draft_seconds,
            )
            if gain > best_gain:
                best, best_gain = k, gain
        return (best if best_gain > self.REQUIRED_GAIN else 0), best_gain

    def acceptance(self, source: object) -> float:
        # A source not seen yet (a longer n-gram match, say) starts from what all
        # sources have shown so far.
        state = self._sources.get(source)
        if state is None or not state.acceptance.judged:
            return self._pooled.rate
        return state.acceptance.rate

    def report(self) -> dict:
        """What it measured and decided, for generate --json / -v."""
        return {
            "adaptive": self.params.adaptive,
            "step_ms_by_rows": {
                rows: round(seconds * 1000, 2) for rows, seconds in self.costs.measured().items()
            },
            "draft_ms_per_token": (
                round(statistics.median(self._draft_seconds) * 1000, 3)
                if self._draft_seconds
                else None
            ),
            "acceptance": {
                source_name(source): {
                    "rate": round(state.acceptance.rate, 3),
                    "judged": round(state.acceptance.judged, 2),
                }
                for source, state in self._sources.items()
                if state.acceptance.judged
            },
            "decisions": [asdict(decision) for decision in self.trace],
            "decisions_dropped": self.trace_dropped,
        }

    def _state(self, source: object) -> _SourceState:
        state = self._sources.get(source)
        if state is None:
            state = self._sources[source] = _SourceState(Acceptance(), pause=self.FIRST_PAUSE)
        return state

    def _verdict(self, source: object, limit: int) -> int:
        state = self._state(source)
        k, gain = self.best_k(source, limit)
        if state.probe_due or not self._pooled.judged:
            why = "probe after a pause" if state.probe_due else "first look at drafting"
            state.probe_due, self._probing = False, source
            k = max(k, min(state.probe_size, limit))
        elif k == 0:
            state.pause_left = state.pause
            why = f"does not pay: pausing {state.pause} steps"
        else:
            state.pause, state.probe_size = self.FIRST_PAUSE, 1
            why = "pays"
        self._note(k, why, self.acceptance(source), gain)
        return k

    def _note(self, k: int, why: str, acceptance: float | None = None, gain=None) -> None:
        last = self.trace[-1] if self.trace else None
        if last is not None and last.k == k and last.why == why:
            last.steps += 1
            return
        if len(self.trace) >= self.TRACE_LIMIT:
            self.trace_dropped += 1
            return
        rounded = None if gain is None else round(gain, 3)
        acceptance = None if acceptance is None else round(acceptance, 3)
        self.trace.append(Decision(self._step, 1, k, why, acceptance, rounded))


def source_name(source: object) -> str:
    if isinstance(source, tuple) and source and source[0] == "lookup":
        return f"lookup {source[1]}-gram"
    return str(source)


def report_lines(report: dict) -> list[str]:
    """A DraftLength.report() as text (generate -v): step costs, acceptance per
    source, then each run of decisions."""
    step_ms = report["step_ms_by_rows"]
    plain = step_ms.get(1)
    costs = ", ".join(
        f"{rows}: {ms:.1f}" + (f" ({ms / plain:.2f}x)" if plain and rows != 1 else "")
        for rows, ms in step_ms.items()
    )
    lines = [f"speculation: step ms by rows: {costs or 'none measured'}"]
    if report["draft_ms_per_token"]:
        lines.append(f"speculation: drafting {report['draft_ms_per_token']:.2f} ms per token")
    accepted = ", ".join(
        f"{name} {counts['rate']:.0%}" for name, counts in report["acceptance"].items()
    )
    lines.append(f"speculation: acceptance: {accepted or 'nothing verified'}")
    for decision in report["decisions"]:
        first, steps = decision["step"], decision["steps"]
        span = f"step {first}" if steps == 1 else f"steps {first}-{first + steps - 1}"
        what = f"k={decision['k']}" if decision["k"] else "plain"
        why = decision["why"]
        if decision["gain"] is not None:
            why += f"; acceptance {decision['acceptance']:.0%}, expected {decision['gain']:.2f}x"
        lines.append(f"speculation: {span}: {what} ({why})")
    if report["decisions_dropped"]:
        lines.append(f"speculation: ... {report['decisions_dropped']} more decisions")
    return lines
