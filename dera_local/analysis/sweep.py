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
from dataclasses import dataclass, replace

from ..engine.decoder import BatchDecoder
from ..engine.exact import DEFAULT_BUDGET, check_exact
from ..engine.exact_attempts import DEFAULT_PARALLEL
from ..engine.guidance import guidance_for, validate_cfg_scale
from ..engine.mixing import validate_lam
from ..engine.request import GenerationRequest
from ..engine.slots import Slot
from ..errors import BadParameterError, DeraError
from ..model_sets.pair import DeraPair
from ..sampling.chain import SamplingParams
from ..speculation.drafts import DraftCounts, SpeculationParams


def parse_lambdas(
    values: str | Iterable[float], check: Callable[[float], float] = validate_lam
) -> list[float]:
    """'0,0.5,1' or numbers -> a checked list: non-empty, no duplicates, each value
    passed through `check` (default validate_lam; a model set's check_lam)."""
    return _parse_grid(values, check, "lambda list", "0,0.5,1")


def parse_cfg_scales(values: str | Iterable[float]) -> list[float]:
    """'1,1.5,3' or numbers -> a checked list of CFG scales, as parse_lambdas."""
    return _parse_grid(values, validate_cfg_scale, "CFG scale list", "1,1.5,3")


def _parse_grid(values, validate, what: str, example: str) -> list[float]:
    if isinstance(values, str):
        parts = [v.strip() for v in values.split(",") if v.strip()]
        try:
            values = [float(v) for v in parts]
        except ValueError:
            raise BadParameterError(
                f"the {what} must be numbers separated by commas, got {values!r}"
            ) from None
    grid = [validate(v) for v in values]
    if not grid:
        raise BadParameterError(f"the {what} is empty; give e.g. {example}")
    duplicates = sorted({v for v in grid if grid.count(v) > 1})
    if duplicates:
        repeated = ", ".join(f"{v:g}" for v in duplicates)
        raise BadParameterError(f"the {what} repeats {repeated}")
    return grid


MAX_SEQUENCES = 256  # llama.cpp's limit on the sequences of one context (LLAMA_MAX_SEQ)


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
    cfg_scale: float | None = None  # with a negative prompt: the guidance scale
    # With the sweep's logprob_lams: the answer's summed log-probability under plain DeRa
    # at each of them (importance weights between the grid's points).
    logprob_grid: list[float] | None = None
    # For a pair's plain DeRa (no CFG): the answer's mismatch to the exact target at lam
    # (logprobs.mismatch); None otherwise.
    mismatch: float | None = None
    # With sweep(..., exact=True): what the exact answer cost (GenerationResult.exact).
    exact: dict | None = None
    # With LambdaSweep(step_mismatch=True), for a plain pair's DeRa: each token's term of
    # `mismatch` (log z at its prefix), so the mismatch of the answer cut at any length
    # is a prefix sum (what a length-capped target needs).
    mismatch_steps: list[float] | None = None

    @property
    def kl_to_reference(self) -> float:
        """One-sample estimate of KL(pi_lam || pi_ref) for this answer."""
        return self.logprob_mixture - self.logprob_reference


class LambdaSweep:
    """Batched contexts for one lam grid over a loaded model set (the weights are
    shared): one BatchDecoder slot per lam, all starting from one shared read of the
    prompt. With `cfg_scales`, one slot per (lam, scale) point, each also reading the
    negative prompt given to run()."""

    def __init__(
        self,
        pair: DeraPair,
        lambdas: Sequence[float],
        *,
        max_tokens: int = 256,
        cfg_scales: Sequence[float] | None = None,
        speculation: SpeculationParams | None = None,
        logprob_lams: Sequence[float] = (),
        step_mismatch: bool = False,
    ):
        """speculation: drafts per slot (prompt lookup, verified in the shared step;
        default the model set's; SpeculationParams(draft_max=0) turns it off).
        logprob_lams: also score every answer under plain DeRa at these lams, as it is
        sampled (SweepRow.logprob_grid). step_mismatch: keep each token's mismatch term
        (SweepRow.mismatch_steps)."""
        self.pair = pair
        self.step_mismatch = step_mismatch
        self.lambdas = parse_lambdas(lambdas, pair.check_lam)  # a fixed mixture: lam 1 only
        self.cfg_scales = None if cfg_scales is None else parse_cfg_scales(cfg_scales)
        if max_tokens <= 0:
            raise BadParameterError("max_tokens must be positive for a sweep")
        self.max_tokens = max_tokens
        self.logprob_lams = tuple(parse_lambdas(logprob_lams)) if len(logprob_lams) else ()
        self.points = [(lam, s) for lam in self.lambdas for s in self.cfg_scales or [None]]
        prompts = 1 if self.cfg_scales is None else 2
        # A context holds at most MAX_SEQUENCES sequences: a finer grid runs in chunks of
        # points, each decoded together (rows stay in grid order).
        self.chunk = MAX_SEQUENCES // prompts
        n = min(len(self.points), self.chunk)
        self.speculation = speculation or pair.speculation
        drafts = self.speculation.draft_max  # 0 when speculation is off
        # Room for one shared prompt (and one shared negative prompt) plus every
        # sequence's own tokens and the drafts it verifies past them.
        self.decoder = BatchDecoder(
            pair,
            n,
            n_ctx_per_slot=pair.n_ctx,
            n_ctx_total=prompts * (pair.n_ctx + n * (max_tokens + 1 + drafts)),
            prompts_per_slot=prompts,
            max_drafts=drafts,
        )
        self.counts = DraftCounts()  # drafts over every run() so far

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
        negative_prompt: str | Sequence[int] | None = None,
    ) -> list[SweepRow]:
        """Decodes the prompt at every point of the grid; rows in grid order (lam-major).
        A negative prompt is needed exactly when the sweep has CFG scales."""
        pair = self.pair
        sampling = (sampling or SamplingParams()).with_seed()
        tokens = pair.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        pair.check_prompt(tokens)
        if (negative_prompt is None) != (self.cfg_scales is None):
            raise BadParameterError(
                "a sweep over CFG scales needs a negative prompt, and a negative prompt "
                "needs CFG scales to sweep",
                cli_hint="give both --cfg-negative-prompt and --cfg-scales",
            )
        rows = []
        for start in range(0, len(self.points), self.chunk):
            points = self.points[start : start + self.chunk]
            rows += self._run_points(points, tokens, sampling, stop, prompt_id, negative_prompt)
        return rows

    def _run_points(self, points, tokens, sampling, stop, prompt_id, negative_prompt):
        """One batched run of the prompt at `points` (at most self.chunk of them)."""
        pair, decoder = self.pair, self.decoder
        if self.cfg_scales is not None:
            guide = guidance_for(pair, negative_prompt, self.cfg_scales[0])
            free, n = decoder.free_sequences, len(points)
            decoder.share_prefix(tokens[:-1], free[:n])
            decoder.share_prefix(list(guide.negative_tokens)[:-1], free[n:])
        else:
            decoder.share_prefix(tokens[:-1])
        slots = []
        try:
            base = GenerationRequest(
                prompt=tokens,
                sampling=sampling,
                max_tokens=self.max_tokens,
                stop=tuple(stop),
                logprobs=True,
                logprob_lams=self.logprob_lams,
                speculation=self.speculation,
            )
            for lam, scale in points:  # one request per point, derived from the base
                guidance = None if scale is None else guidance_for(pair, negative_prompt, scale)
                point = replace(
                    base, lam=lam, guidance=guidance, target_lam=pair.exact_target(lam, guidance)
                )
                slots.append(decoder.admit(point))
            while any(slot.finish_reason is None for slot in slots):
                decoder.step()
            for slot in slots:
                if slot.drafting is not None:
                    self.counts.add(slot.drafting.counts)
        finally:
            for slot in slots:
                decoder.retire(slot)
        return [_row(slot, prompt_id, self.step_mismatch) for slot in slots]


def _row(slot: Slot, prompt_id: str, step_mismatch: bool = False) -> SweepRow:
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
        cfg_scale=slot.cfg_scale,
        logprob_grid=slot.logprobs.grid_sums() if slot.logprobs.grid else None,
        mismatch=slot.logprobs.mismatch(),
        mismatch_steps=slot.logprobs.mismatch_steps() if step_mismatch else None,
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
    cfg_scales: Sequence[float] | None = None,
    negative_prompt: str | Sequence[int] | None = None,
    speculation: SpeculationParams | None = None,
    exact: bool = False,
    exact_budget: int = DEFAULT_BUDGET,
    exact_parallel: int = DEFAULT_PARALLEL,
) -> Iterator[SweepRow]:
    """Yields rows for (prompt_id, prompt) pairs, every lam (and CFG scale) per prompt, in
    one batched set of contexts; `reward` (text -> float) fills each row's reward. An
    item may be (prompt_id, prompt, negative_prompt) to give each its own negative.

    exact: each row's answer drawn by exact realignment instead (DeraPair.stream's
    exact; every lam in [0, 1], no CFG): one lam after another, each answer's attempts
    decoded `exact_parallel` at once; the row's `exact` says what it cost."""
    if exact:
        if cfg_scales is not None:
            raise BadParameterError("exact realignment has no CFG: drop the CFG scales")
        yield from _exact_rows(
            pair, prompts, lambdas, sampling, max_tokens, stop, reward, exact_budget, exact_parallel
        )
        return
    with LambdaSweep(
        pair, lambdas, max_tokens=max_tokens, cfg_scales=cfg_scales, speculation=speculation
    ) as runner:
        for prompt_id, prompt, *own_negative in prompts:
            negative = own_negative[0] if own_negative else negative_prompt
            for row in runner.run(
                prompt, sampling=sampling, stop=stop, prompt_id=prompt_id, negative_prompt=negative
            ):
                if reward is not None:
                    row.reward = _checked_reward(reward, row.text)
                yield row


def _exact_rows(
    pair, prompts, lambdas, sampling, max_tokens, stop, reward, budget, parallel
) -> Iterator[SweepRow]:
    grid = parse_lambdas(lambdas, pair.check_lam)
    sampling = (sampling or SamplingParams()).with_seed()  # one seed for every lam, as a sweep
    for lam in grid:  # every lam checked before the first answer is drawn
        check_exact(
            GenerationRequest(
                prompt=(0,), lam=lam, sampling=sampling, target_lam=pair.exact_target(lam, None)
            )
        )
    for prompt_id, prompt, *_ in prompts:
        for lam in grid:
            result = pair.generate(
                prompt,
                lam=lam,
                sampling=sampling,
                max_tokens=max_tokens,
                stop=stop,
                logprobs=True,
                exact=True,
                exact_budget=budget,
                exact_parallel=parallel,
            )
            sums = result.logprobs.sums()
            row = SweepRow(
                prompt_id=prompt_id,
                lam=lam,
                text=result.text,
                tokens=result.tokens,
                finish_reason=result.finish_reason,
                logprob_aligned=sums["aligned"],
                logprob_reference=sums["reference"],
                logprob_mixture=sums["mixture"],
                end_token=result.end_token,
                mismatch=result.logprobs.mismatch(),
                exact=result.exact,
            )
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
