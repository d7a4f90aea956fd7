"""The adaptive draft length (draft_length.DraftLength) and the step costs it decides from
(step_costs.StepCosts), driven by simulated steps: a slot whose drafter always has 16
tokens to propose, step timings from a known cost curve (with one-off slow timings or
noise), and acceptance from a known rule. The decisions are checked against what a
model that knows the true costs picks (expected_gain on the exact table)."""

from __future__ import annotations

import random
import statistics

import pytest

from dera_local.speculation.draft_length import DraftLength, expected_gain
from dera_local.speculation.drafts import SpeculationParams
from dera_local.speculation.step_costs import StepCosts

PLAIN_SECONDS = 0.030
SOURCE = "lookup"


class _Drafter:
    def __init__(self, cheap: bool = True, source: object = SOURCE) -> None:
        self.cheap, self.source = cheap, source


def cpu_seconds(rows: int) -> float:
    """A 2-core CPU's step: the first extra row costs 0.6 of a plain step, later ones 0.4."""
    return PLAIN_SECONDS * (1.0 if rows == 1 else 1.6 + 0.4 * (rows - 2))


def exact_best_k(acceptance: float, true_seconds=cpu_seconds, limit: int = 16) -> int:
    """The k a model that knows the true costs picks at this acceptance (0: none)."""
    costs = StepCosts.known({rows: true_seconds(rows) for rows in range(1, limit + 2)})
    gains = {k: expected_gain(costs, k, acceptance) for k in range(1, limit + 1)}
    best = max(gains, key=gains.__getitem__)
    return best if gains[best] > DraftLength.REQUIRED_GAIN else 0


class Simulation:
    """One slot's steps: each asks the controller for drafts, 'decodes' 1 + k rows (the
    timing recorded as BatchDecoder.step does) and reports what was kept."""

    def __init__(self, true_seconds=cpu_seconds, timing=None, draft_max: int = 16) -> None:
        self.true_seconds = true_seconds
        # timing(rows, seconds, visit) -> the seconds the step is measured at
        self.timing = timing or (lambda rows, seconds, visit: seconds)
        self.costs = StepCosts()
        self.control = DraftLength(SpeculationParams(draft_max=draft_max), _Drafter(), self.costs)
        self.visits: dict[int, int] = {}
        self.ks: list[int] = []
        self.acceptance_before: list[float] = []
        self.whys: list[str] = []  # why each step decided as it did

    def run(self, steps: int, accept) -> list[int]:
        """accept(k) -> how many of k drafts are kept."""
        start = len(self.ks)
        for _ in range(steps):
            self.acceptance_before.append(self.control.acceptance(SOURCE))
            limit = self.control.draft_limit(16)
            k = self.control.choose(limit)  # the drafter has all 16 to offer
            if k:
                kept = accept(k)
                self.control.after_verify(k, kept, kept < k)
            rows = 1 + k
            visit = self.visits[rows] = self.visits.get(rows, 0) + 1
            self.costs.record(rows, self.timing(rows, self.true_seconds(rows), visit))
            self.ks.append(k)
            self.whys.append(self.control.trace[-1].why)
        return self.ks[start:]


def every_draft(k: int) -> int:
    return k


def no_draft(k: int) -> int:
    return 0


def stopped_steps(run: Simulation, start: int = 0) -> int:
    """Steps from `start` on that did not draft because drafting was judged not to pay
    (paused or deciding so), not because a plain step was being timed."""
    return sum(1 for why in run.whys[start:] if why == "paused" or why.startswith("does not"))


def test_a_first_timing_ten_times_too_slow_does_not_stop_drafting():
    """One-off work (llama.cpp allocating a new batch shape's graph, cold caches) makes
    the first step of every shape 10x slow; at 100% acceptance drafting goes on."""
    slow_first = Simulation(timing=lambda rows, s, visit: s * 10 if visit == 1 else s)
    ks = slow_first.run(80, every_draft)
    assert slow_first.whys[0] == "first look at drafting"  # from the prior: nothing timed
    assert stopped_steps(slow_first) == 0
    assert set(slow_first.whys) <= {"first look at drafting", "pays", "re-timing a plain step"}
    assert ks[-1] == exact_best_k(slow_first.acceptance_before[-1])


def test_a_slow_timing_that_is_kept_costs_a_few_probes_at_most():
    """The one-off slow step is the second of the first draft shape instead (so the
    first-timing rule misses it, and it is the only timing of that shape): the
    controller may pause, but its probes re-measure and drafting resumes within a few
    probes, then stays on."""
    slow_second = Simulation(timing=lambda rows, s, visit: s * 10 if (rows, visit) == (2, 2) else s)
    slow_second.run(120, every_draft)
    probes = slow_second.whys.count("probe after a pause")
    assert probes <= 3
    assert stopped_steps(slow_second, start=60) == 0


@pytest.mark.parametrize("sigma", [0.05, 0.1])
def test_noisy_timings_converge_to_the_k_of_the_true_costs(sigma):
    """Timings with multiplicative noise (sigma 0.1 is twice the step-to-step spread of
    plain steps measured on a 2-core Xeon), drafts kept with probability 0.85: once
    settled, the k chosen where it decided (not while paused or probing) is the k the
    true costs give at the same acceptance, or one as good (within 3% of its expected
    gain; near the optimum several k are that close, so which one wins is noise)."""
    truth = StepCosts.known({rows: cpu_seconds(rows) for rows in range(1, 18)})
    good_shares = []
    for seed in range(1, 11):
        noise, acceptance = random.Random(seed), random.Random(seed + 100)
        noisy = Simulation(
            timing=lambda rows, s, visit, rng=noise: s * rng.lognormvariate(0, sigma)
        )

        def bernoulli(k: int, rng=acceptance) -> int:  # each draft kept with probability 0.85
            kept = 0
            while kept < k and rng.random() < 0.85:
                kept += 1
            return kept

        ks = noisy.run(400, bernoulli)
        decided = [
            i
            for i in range(150, 400)
            if noisy.whys[i] == "pays" or noisy.whys[i].startswith("does not pay")
        ]
        good, distance = 0, 0
        for i in decided:
            a = noisy.acceptance_before[i]
            best, k = exact_best_k(a), ks[i]
            best_gain = expected_gain(truth, best, a) if best else 1.0
            good += (expected_gain(truth, k, a) if k else 1.0) >= 0.97 * best_gain
            distance += abs(k - best)
        assert distance / len(decided) <= 0.75, f"seed {seed}"
        good_shares.append(good / len(decided))
    assert statistics.median(good_shares) >= 0.95, good_shares
    assert min(good_shares) >= 0.8, good_shares


def test_zero_acceptance_stays_paused():
    never = Simulation()
    ks = never.run(800, no_draft)
    verifications = [i for i, k in enumerate(ks) if k]
    assert len(verifications) <= 8  # a first look, then probes at doubling pauses
    assert sum(1 for i in verifications if i >= 400) <= 2
    assert all(k <= 1 for k in ks)  # a failed probe is never followed by a bigger one
    gaps = [b - a for a, b in zip(verifications, verifications[1:], strict=False)]
    assert gaps == sorted(gaps) and gaps[-1] > DraftLength.MAX_PAUSE


def test_acceptance_that_returns_resumes_drafting_within_a_few_probes():
    """Text with nothing to copy, then text that copies (every draft kept)."""
    changing = Simulation()
    changing.run(150, no_draft)
    ks = changing.run(400, every_draft)
    first_run = next(i for i in range(len(ks) - 3) if all(ks[i : i + 4]))
    probes = sum(1 for k in ks[:first_run] if k)
    assert probes <= 3
    assert stopped_steps(changing, start=150 + first_run) == 0  # then it keeps drafting


@pytest.mark.parametrize("sharing, pays", [(1, True), (8, False)])
def test_a_step_shared_by_many_generations_charges_drafts_for_all_of_them(sharing, pays):
    """In a step of 8 slots one draft row adds 6% to the step: cheap for the slot, but it
    delays all 8, so at 40% acceptance drafting loses tokens overall; alone, the same
    rows and acceptance pay."""
    costs = StepCosts.known({sharing: 0.100, sharing + 1: 0.106})
    control = DraftLength(SpeculationParams(draft_max=1), _Drafter(), costs)
    control.draft_limit(1, base_rows=sharing, sharing=sharing)
    for i in range(30):
        kept = 1 if i % 5 < 2 else 0
        control.after_verify(1, kept, not kept)
    k, gain = control.best_k(SOURCE, 1)
    assert (k == 1) is pays
    assert gain == pytest.approx(
        (sharing - 1 + 1 + control.acceptance(SOURCE)) / sharing / 1.06, rel=1e-9
    )


def test_a_costly_drafter_is_decided_before_drafting_and_its_time_counts():
    """Rows nearly free (a GPU) but drafting a token as dear as a plain step: even with
    every draft kept, k tokens cost 1 + 1.1 k plain steps, which no k repays."""
    model = _Drafter(cheap=False, source="draft model")
    costs = StepCosts.known({rows: 0.1 * (1 + 0.1 * (rows - 1)) for rows in range(1, 10)})
    control = DraftLength(SpeculationParams(draft_max=8), model, costs)
    assert control.draft_limit(8) >= 1  # the plain step is already timed: a first look
    control.after_drafting(2, 0.2)
    control.after_verify(2, 2, False)
    assert control.draft_limit(8) == 0  # decided before drafting: no decodes spent
    assert control.choose(0) == 0
    assert control.trace[-1].why.startswith("does not pay")
    fixed = DraftLength(SpeculationParams(draft_max=8, adaptive=False), model)
    assert fixed.draft_limit(5) == 5 and fixed.choose(5) == 5
    assert DraftLength(SpeculationParams(draft_max=0), model).draft_limit(5) == 0


def test_a_source_that_does_not_pay_never_blocks_one_that_does():
    lookup = _Drafter()
    costs = StepCosts.known({1: 0.1, 2: 0.15, 3: 0.19, 4: 0.23})
    control = DraftLength(SpeculationParams(draft_max=3), lookup, costs)
    for step in range(40):
        lookup.source = ("lookup", 2) if step % 2 else ("lookup", 4)
        k = control.choose(control.draft_limit(3))
        if k:
            kept = 0 if lookup.source == ("lookup", 2) else k
            control.after_verify(k, kept, kept < k)
    assert control.acceptance(("lookup", 4)) > 0.9
    lookup.source = ("lookup", 4)
    assert control.choose(control.draft_limit(3)) == 3  # while 2-grams are paused
    lookup.source = ("lookup", 2)
    assert control.choose(control.draft_limit(3)) == 0


def test_the_trace_says_what_was_decided_and_why():
    run = Simulation()
    run.run(12, every_draft)
    report = run.control.report()
    whys = [d["why"] for d in report["decisions"]]
    assert whys[:2] == ["first look at drafting", "pays"]
    assert sum(d["steps"] for d in report["decisions"]) == 12
    assert report["acceptance"][SOURCE]["rate"] > 0.8
    # k grew every step: only the 2-row shape was seen twice (first timings are dropped)
    assert report["step_ms_by_rows"] == {2: pytest.approx(cpu_seconds(2) * 1000)}


def test_step_costs_drop_first_timings_take_medians_and_fill_gaps():
    costs = StepCosts()
    assert costs.seconds(3) == pytest.approx(2.0)  # the prior, in one-row steps
    costs.record(1, 9.0)  # dropped: one-off work
    assert costs.measured() == {}
    for seconds in (0.10, 0.11, 0.50):  # one slow outlier
        costs.record(1, seconds)
    assert costs.seconds(1) == pytest.approx(0.11)
    for seconds in (1.0, 0.16, 0.17):  # a shape of 2 rows: first dropped, then 2 kept
        costs.record(2, seconds)
    assert costs.seconds(2) == pytest.approx(0.165)
    # one wider shape, no line yet: beyond it at most 0.35 plain steps per row
    assert costs.seconds(4) == pytest.approx(0.165 + 2 * 0.35 * 0.11)
    for seconds in (1.0, 0.26, 0.25, 0.27):
        costs.record(6, seconds)
    # a line through 2 rows (0.165, 2 timings) and 6 rows (0.26, 3 timings)
    slope = (0.26 - 0.165) / 4
    assert costs.seconds(4) == pytest.approx(0.165 + 2 * slope)
    assert costs.seconds(2) == pytest.approx(0.165)
    assert costs.seconds(8) == pytest.approx(0.26 + 2 * slope)  # slope under the cap
    costs.record(12, 1.0)
    costs.record(12, 2.0)  # one kept timing of a far shape does not tilt the line
    assert costs.seconds(4) == pytest.approx(0.165 + 2 * slope)
