"""What every loaded model set shares (a DeRa pair, a proxy-tuned model, a --mix mixture):
one tokenizer, prompt checks, generate-from-stream, and the lifecycle guard.

A subclass provides the interface the batched step (batch.BatchDecoder) reads:
`model` (tokenizer, end tokens, chat template), `n_ctx`, `n_vocab`, `n_batch`, `mixer`,
`source_weights(lam)`, `open_source_contexts(...)`, `logprob_sources`,
`overlap_decodes`; and `stream()`.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import BadParameterError
from .mixing import validate_lam
from .pair_guard import PairClosedError, PairGuard
from .sampling import SamplingParams
from .stream import GenerationStream, slot_steps


class ModelSet:
    model = None  # the LoadedModel whose tokenizer all sources share (set by subclasses)
    kind = "model set"  # for messages: "pair", "mixture"
    depends_on_lam = True  # False: fixed weights (a --mix spec), lam 1 only
    overlap_decodes = False  # the sources' decodes run in threads at once (see source_decodes)
    n_ctx: int
    n_vocab: int
    guard: PairGuard

    def close(self) -> None:  # pragma: no cover - every subclass frees its own
        raise NotImplementedError

    def stream(self, prompt, **kwargs):  # pragma: no cover - every subclass decodes its own
        raise NotImplementedError

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

    def check_prompt(self, tokens: Sequence[int]) -> None:
        """Raises a one-line error unless the ids are a non-empty prompt that fits."""
        if not tokens:
            raise BadParameterError("the prompt is empty")
        bad = [t for t in tokens if not 0 <= t < self.n_vocab]
        if bad:
            raise BadParameterError(
                f"token id {bad[0]} is outside the vocabulary (0..{self.n_vocab - 1})"
            )
        if len(tokens) > self.n_ctx:
            raise BadParameterError(
                f"the prompt has {len(tokens)} tokens but the context holds {self.n_ctx}; "
                "shorten the prompt",
                cli_hint="or raise -c",
            )

    def check_lam(self, lam: float) -> float:
        """lam as a checked float (see mixing.validate_lam)."""
        return validate_lam(lam)

    def _prepare(
        self, prompt: str | Sequence[int], lam: float, sampling, max_tokens: int
    ) -> tuple[list[int], float, SamplingParams]:
        """What every stream() checks first: (prompt ids, lam, seeded sampling)."""
        self._check_open()
        lam = self.check_lam(lam)
        sampling = (sampling or SamplingParams()).with_seed()
        if max_tokens < -1 or max_tokens == 0:
            raise BadParameterError("max_tokens must be positive, or -1 for no limit")
        prompt_tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_prompt(prompt_tokens)
        return prompt_tokens, lam, sampling

    def _slot_stream(
        self, runner, prompt_tokens: list[int], guidance, speculation, **settings
    ) -> GenerationStream:
        """A generation as the one slot of `runner`'s decoder (slot_runner.SlotRunner)."""
        decoder = runner.decoder_for(1 if guidance is None else 2, speculation.draft_max)
        steps = slot_steps(
            decoder,
            self.guard,
            prompt_tokens,
            guidance=guidance,
            speculation=speculation,
            **settings,
        )
        return GenerationStream(steps, self.guard)

    def generate(self, prompt: str | Sequence[int], **kwargs):
        """Generates to the end and returns the GenerationResult; keywords as for stream()."""
        stream = self.stream(prompt, **kwargs)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result
