"""What every loaded model set shares (a DeRa pair, a proxy-tuned model, a --mix mixture):
one tokenizer, prompt checks, generate-from-stream, and the lifecycle guard.

A subclass provides the interface the batched step (batch.BatchDecoder) reads:
`model` (tokenizer, end tokens, chat template), `n_ctx`, `n_vocab`, `n_batch`, `mixer`,
`source_weights(lam)`, `open_source_contexts(...)`, `logprob_sources`,
`overlap_decodes`; and for `stream()`: `speculation` (the default) and `_slots` (the
`SlotRunner` every single generation runs on, below).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ..engine.decoder import BatchDecoder
from ..engine.exact import DEFAULT_BUDGET
from ..engine.exact_attempts import DEFAULT_PARALLEL, check_parallel, exact_attempts
from ..engine.guidance import Guidance, guidance_for
from ..engine.logprobs import check_top_logprobs
from ..engine.mixing import validate_lam
from ..engine.request import GenerationRequest, resolved_sampling
from ..engine.stream import GenerationStream, claimed, slot_steps
from ..errors import BadParameterError, PromptError
from ..llama.context import Context
from ..sampling.chain import SamplingParams
from ..speculation.drafts import AcceptRule, Drafter, SpeculationParams, sample_equals_draft
from ..speculation.step_costs import StepCosts
from .guard import ModelSetGuard, PairClosedError


class ModelSet:
    model = None  # the LoadedModel whose tokenizer all sources share (set by subclasses)
    kind = "model set"  # for messages: "pair", "mixture"
    depends_on_lam = True  # False: fixed weights (a --mix spec), lam 1 only
    overlap_decodes = False  # the sources' decodes run in threads at once (see source_decodes)
    default_drafter: Drafter | None = None  # None: prompt lookup (a pair: its draft model)
    n_ctx: int
    n_vocab: int
    guard: ModelSetGuard
    speculation: SpeculationParams

    def close(self) -> None:  # pragma: no cover - every subclass frees its own
        raise NotImplementedError

    def loaded_models(self) -> list:  # pragma: no cover - every subclass lists its own
        """Each distinct LoadedModel of the set (for placement reports)."""
        raise NotImplementedError

    @property
    def is_remote(self) -> bool:
        """Whether any model's layers live on llama.cpp RPC workers."""
        return any(m.placement.remote for m in self.loaded_models())

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.guard.closed:
            raise PairClosedError(f"the {self.kind} is closed; load it again")

    # -- tokens and text ------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """Prompt text to ids, with the shared tokenizer. Special-token texts such as
        <|im_start|> become their ids, as in llama.cpp's CLI."""
        self._check_open()
        return self.model.tokenize(text, add_special=add_special, parse_special=True)

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        self._check_open()
        data = b"".join(self.model.token_bytes(t, special=special) for t in tokens)
        return data.decode("utf-8", errors="replace")

    def check_prompt(self, tokens: Sequence[int], which: str = "prompt") -> None:
        """Raises a one-line error unless the ids are a non-empty prompt that fits."""
        if not tokens:
            raise PromptError(f"the {which} is empty", which=which)
        bad = [t for t in tokens if not 0 <= t < self.n_vocab]
        if bad:
            raise PromptError(
                f"token id {bad[0]} is outside the vocabulary (0..{self.n_vocab - 1})",
                which=which,
            )
        if len(tokens) > self.n_ctx:
            raise PromptError(
                f"the {which} has {len(tokens)} tokens but the context holds {self.n_ctx}; "
                f"shorten the {which}",
                cli_hint="or raise -c",
                which=which,
            )

    def check_lam(self, lam: float) -> float:
        """lam as a checked float (see mixing.validate_lam)."""
        return validate_lam(lam)

    def _prompt_and_lam(
        self, prompt: str | Sequence[int], lam: float, max_tokens: int
    ) -> tuple[list[int], float]:
        """What every stream() checks first: (prompt ids, lam)."""
        self._check_open()
        lam = self.check_lam(lam)
        if max_tokens < -1 or max_tokens == 0:
            raise BadParameterError("max_tokens must be positive, or -1 for no limit")
        prompt_tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_prompt(prompt_tokens)
        return prompt_tokens, lam

    def exact_target(self, lam: float, guidance: Guidance | None) -> float | None:
        """The lam of the exact realignment target an answer at `lam` is measured against
        (its mismatch, see logprobs); None where there is none (every set but a pair's
        plain DeRa)."""
        return None

    def check_speculation(self, speculation: SpeculationParams) -> SpeculationParams:
        """The settings a stream may use (a pair refuses more drafts than it was loaded
        for)."""
        return speculation

    # -- generation -----------------------------------------------------------------------
    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        lam: float = 1.0,
        sampling: SamplingParams | None = None,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        logprobs: bool = False,
        top_logprobs: int = 0,
        json_schema: str | dict | None = None,
        speculation: SpeculationParams | None = None,
        drafter: Drafter | None = None,
        accept: AcceptRule = sample_equals_draft,
        logits_observer=None,
        negative_prompt: str | Sequence[int] | None = None,
        cfg_scale: float = 1.0,
        exact: bool = False,
        exact_budget: int = DEFAULT_BUDGET,
        exact_parallel: int = DEFAULT_PARALLEL,
        shown_special: Sequence[int] = (),
    ) -> GenerationStream:
        """Starts a generation from a prompt (text, or token ids fed as they are): the one
        slot of a batched decoder kept with its caches (a next prompt that starts the same
        way, such as the next chat turn, reads only the rest).

        lam: 1 = aligned model, 0 = reference, between = weaker alignment, > 1 extrapolates
            (a proxy-tuned model: alpha; a fixed-weight mixture takes only lam=1).
        max_tokens: at most this many new tokens (-1: until the context is full).
        stop: strings that end generation; they are not part of the text.
        logprobs: record each sampled token's log-probability under the aligned model,
            the reference and the mixture (result.logprobs), and the answer's summary
            (result.to_dict()["dera"]: the sums and the KL estimate to the reference);
            costs a copy per step. The mixture is the row the sampler chain receives,
            before its bias, grammar, penalties, temperature and truncation.
        top_logprobs: also the N (up to 20) most likely tokens of the mixture at each step
            (result.logprobs.top); implies logprobs.
        json_schema: constrain the answer to JSON matching this schema (text or parsed;
            {} = any JSON object), as a grammar (see sampling/json_schema.py); not with a grammar
            in `sampling`.
        speculation: how many tokens to draft and verify per step (default: the model
            set's, see load_pair; SpeculationParams(draft_max=0) turns it off).
            Speculation never changes what is sampled, only how many decodes it takes.
        drafter: a draft source (default: a pair's draft model if it has one, else prompt
            lookup); accept: the rule keeping a drafted token (tests).
        logits_observer: a llama_sampler put first in the chain (for tests and debugging).
        negative_prompt, cfg_scale: classifier-free guidance, h_neg + cfg_scale * (h_pos -
            h_neg) over the mixture of each prompt (see guidance.py); the negative prompt
            (text or ids) is read as a second sequence of the same batched contexts;
            drafts are verified in both sequences at once.
        exact: draw the answer from the model retrained at beta/lam itself (on the aligned
            model's implicit reward) instead of DeRa's per-token mix: attempts decode DeRa
            and each survives every token with the probability the exact target allows
            (see engine/exact.py); the surviving attempt that started first is returned,
            its cost in result.exact. A pair's plain DeRa, 0 <= lam <= 1, temperature in
            (0, 1], no truncation or penalties (a grammar, a JSON schema and bans by a
            bias of -100 mask both models). Speculation verifies each attempt's drafts
            against its DeRa rows and tests every verified position for the kill, so it
            changes only the decodes an answer takes (attempts decoded at once draft by
            prompt lookup: a draft model follows one text). exact_budget: the
            sequence-tokens attempts may spend before a new one would start (then
            ExactBudgetError). exact_parallel: attempts decoded at once, as slots of one
            batch sharing the prompt's cache.
        shown_special: control tokens written into the text as their own text (the
            vocabulary's tool-call markers: dera_local.tools.render.marker_tokens).
        """
        prompt_tokens, lam = self._prompt_and_lam(prompt, lam, max_tokens)
        check_top_logprobs(top_logprobs)
        guidance = guidance_for(self, negative_prompt, cfg_scale)
        request = GenerationRequest(
            prompt=prompt_tokens,
            lam=lam,
            sampling=resolved_sampling(sampling, json_schema),
            max_tokens=max_tokens,
            stop=tuple(stop),
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            guidance=guidance,
            speculation=self.check_speculation(speculation or self.speculation),
            drafter=drafter or self.default_drafter,
            accept=accept,
            target_lam=self.exact_target(lam, guidance),
            logits_observer=logits_observer,
            shown_special=tuple(shown_special),
        )
        n_slots = check_parallel(exact_parallel) if exact and 0.0 < lam < 1.0 else 1
        if n_slots > 1 and not getattr(request.drafter, "cheap", True):
            # a draft model follows one text: attempts decoded at once look up their own
            request = replace(request, drafter=None)
        decoder = self._slots.decoder_for(
            1 if guidance is None else 2, request.speculation.draft_max, n_slots
        )
        if not exact:
            return GenerationStream(slot_steps(decoder, self.guard, request), self.guard)
        steps = exact_attempts(decoder, request, parallel=n_slots, budget=exact_budget)
        return GenerationStream(claimed(self.guard, steps), self.guard)

    def step_costs(self, speculation: SpeculationParams | None = None) -> StepCosts:
        """What a decode step of single generations costs here, by its rows, as measured
        so far (the table the adaptive draft length decides from; see step_costs)."""
        draft_max = (speculation or self.speculation).draft_max
        return self._slots.decoder_for(1, draft_max).step_costs

    def generate(self, prompt: str | Sequence[int], **kwargs):
        """Generates to the end and returns the GenerationResult; keywords as for stream()."""
        stream = self.stream(prompt, **kwargs)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result


class SlotRunner:
    """`home`: a decoder over the generation contexts opened at load (a pair's: one
    prompt, room for its drafts), used by every generation that fits it, so no second KV
    cache is allocated and nothing is opened before the first token. Generations that
    need more (a negative prompt's second sequence, more drafts), or model sets without
    load-time contexts, use a second decoder opened on first use and reopened bigger when
    a generation first asks for more (its old caches are dropped then)."""

    def __init__(self, models, contexts: list[Context] | None = None, max_drafts: int = 0):
        self.models = models
        self.home = None
        if contexts is not None:
            self.home = BatchDecoder(
                models, 1, models.n_ctx, max_drafts=max_drafts, contexts=contexts
            )
        self.extra: BatchDecoder | None = None

    def decoder_for(self, n_prompts: int, max_drafts: int = 0, n_slots: int = 1) -> BatchDecoder:
        home = self.home
        if (
            home is not None
            and n_prompts == 1
            and n_slots == 1
            and max_drafts <= home.opened_for_drafts
        ):
            return home
        extra = self.extra
        if (
            extra is None
            or extra.prompts_per_slot < n_prompts
            or extra.opened_for_drafts < max_drafts
            or extra.n_slots < n_slots
        ):
            self._close_extra()
            self.extra = BatchDecoder(
                self.models,
                n_slots,
                self.models.n_ctx,
                prompts_per_slot=n_prompts,
                max_drafts=max_drafts,
            )
        return self.extra

    def forget(self) -> None:
        """Forgets every cached prompt: the next call reads its whole prompt."""
        if self.home is not None:
            self.home.forget_cached()
        self._close_extra()

    def close(self) -> None:
        if self.home is not None:
            self.home.close()
            self.home = None
        self._close_extra()

    def _close_extra(self) -> None:
        if self.extra is not None:
            self.extra.close()
            self.extra = None
