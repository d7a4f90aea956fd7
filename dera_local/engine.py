"""The lockstep DeRa engine: both models read the same tokens; at each step the aligned
context's logits are replaced in place by lam * aligned + (1 - lam) * reference and
llama.cpp's sampler chain picks the next token from them.

Both KV caches always hold the same token prefix, so a later call whose prompt starts
with what the caches hold (the next chat turn, the same prompt again) reads only the rest.
"""

from __future__ import annotations

import os
import time
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from . import backend
from .backend import Context, ContextOptions
from .errors import BadParameterError
from .loading import LoadedPair, PairOptions, load_models
from .logprobs import SequenceLogprobs, float_view
from .mixing import LogitMixer, validate_lam
from .sampling import SamplerChain, SamplingParams
from .sequence import SequenceOutput


@dataclass
class GenerationResult:
    """One finished generation. `tokens` excludes the end-of-generation token."""

    text: str
    tokens: list[int]
    prompt_tokens: list[int]
    finish_reason: str
    lam: float
    seed: int | None
    reused_prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    logprobs: SequenceLogprobs | None = None  # with stream(..., logprobs=True)

    @property
    def tokens_per_second(self) -> float:
        if not self.tokens or self.generation_seconds <= 0:
            return 0.0
        return len(self.tokens) / self.generation_seconds

    def to_dict(self) -> dict:
        data = asdict(self)
        data["tokens_per_second"] = self.tokens_per_second
        if self.logprobs is not None:
            data["logprob_sums"] = self.logprobs.sums()
        return data


class GenerationStream:
    """Iterate for text chunks (always whole UTF-8 characters); `result` is set at the end.
    Closing it early (or breaking out of the loop) stops generation cleanly.

    The llama.cpp resources of a generation (its sampler chain) are created when the
    first chunk is asked for and freed when it ends or is closed, so a stream that is
    never iterated holds nothing."""

    def __init__(self, steps: Generator[str, None, GenerationResult]) -> None:
        self._steps = steps
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            return next(self._steps)
        except StopIteration as end:
            if end.value is not None:
                self.result = end.value
            raise

    def close(self) -> None:
        self._steps.close()


class DeraPair:
    """An aligned and a reference model decoding in lockstep with DeRa mixing."""

    def __init__(self, loaded: LoadedPair, mixer: LogitMixer, overlap_decodes: bool) -> None:
        self.loaded = loaded
        self.mixer = mixer
        self.n_ctx = loaded.aligned_ctx.n_ctx
        self.n_vocab = loaded.aligned_model.n_vocab
        self._cached: list[int] = []  # tokens both KV caches hold, in order
        # One model file and no adapter: the mixture equals that model for every lam, so
        # the reference context is never decoded and nothing is mixed.
        self.identical = loaded.aligned_model is loaded.reference_model and (
            loaded.adapter_info is None
        )
        self._overlap = ThreadPoolExecutor(1, "dera-reference") if overlap_decodes else None
        self._scoring: tuple[Context, Context] | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        if self._overlap is not None:
            self._overlap.shutdown()
        for ctx in self._scoring or ():
            ctx.close()
        self.loaded.close()

    def __enter__(self) -> DeraPair:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- tokens and text ------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """Prompt text to ids, with the aligned model's tokenizer (both share it).
        Special-token texts such as <|im_start|> become their ids, as in llama.cpp's CLI."""
        return self.loaded.aligned_model.tokenize(text, add_special=add_special, parse_special=True)

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        model = self.loaded.aligned_model
        data = b"".join(model.token_bytes(t, special=special) for t in tokens)
        return data.decode("utf-8", errors="replace")

    def open_contexts(
        self, n_ctx: int, n_seq_max: int, n_outputs_max: int, n_batch: int | None = None
    ) -> tuple[Context, Context]:
        """A further (aligned, reference) pair of contexts over the same loaded weights,
        with the adapter attached to the aligned one, e.g. for batched sweeps or scoring.
        The caller closes them."""
        loaded = self.loaded
        base = loaded.aligned_ctx
        options = ContextOptions(
            n_ctx=n_ctx,
            n_batch=n_batch or base.n_batch,
            n_threads=base.n_threads,
            flash_attn=base.flash_attn,
            n_seq_max=n_seq_max,
            n_outputs_max=n_outputs_max,
        )
        aligned = Context(loaded.aligned_model, options)
        try:
            if base.adapter is not None:
                aligned.attach_lora(base.adapter, loaded.lora_scale)
            reference = Context(loaded.reference_model, options)
        except BaseException:
            aligned.close()
            raise
        return aligned, reference

    def scoring_contexts(self) -> tuple[Context, Context]:
        """Contexts that return logits for every position of a batch (teacher forcing),
        opened on first use and kept; the generation contexts return one row per step."""
        if self._scoring is None:
            n_batch = self.loaded.aligned_ctx.n_batch
            self._scoring = self.open_contexts(self.n_ctx, n_seq_max=1, n_outputs_max=n_batch)
        return self._scoring

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

    def clear_cache(self) -> None:
        """Forgets the cached prefix: the next call re-reads its whole prompt."""
        self._cached = []
        for ctx in self._live_contexts():
            ctx.truncate(0)

    # -- generation -----------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], **kwargs) -> GenerationResult:
        """Generates to the end and returns the result; keywords as for stream()."""
        stream = self.stream(prompt, **kwargs)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        lam: float = 1.0,
        sampling: SamplingParams | None = None,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        logprobs: bool = False,
        logits_observer=None,
    ) -> GenerationStream:
        """Starts a DeRa generation from a prompt (text, or token ids fed as they are).

        lam: 1 = aligned model, 0 = reference, between = weaker alignment, > 1 extrapolates.
        max_tokens: at most this many new tokens (-1: until the context is full).
        stop: strings that end generation; they are not part of the text.
        logprobs: record each sampled token's log-probability under the aligned model,
            the reference and the mixture (result.logprobs); costs a copy per step.
        logits_observer: a llama_sampler put first in the chain (for tests and debugging).
        """
        lam = validate_lam(lam)
        sampling = (sampling or SamplingParams()).with_seed()
        if max_tokens < -1 or max_tokens == 0:
            raise BadParameterError("max_tokens must be positive, or -1 for no limit")
        prompt_tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_prompt(prompt_tokens)
        return GenerationStream(
            self._lockstep(
                prompt_tokens,
                lam,
                sampling,
                max_tokens,
                stop,
                logits_observer,
                SequenceLogprobs() if logprobs else None,
            )
        )

    def _lockstep(
        self,
        prompt_tokens: list[int],
        lam: float,
        sampling: SamplingParams,
        max_tokens: int,
        stop: Sequence[str],
        logits_observer,
        logprobs: SequenceLogprobs | None,
    ) -> Generator[str, None, GenerationResult]:
        model = self.loaded.aligned_model
        output = SequenceOutput(
            model, n_prompt=len(prompt_tokens), n_ctx=self.n_ctx, max_tokens=max_tokens, stop=stop
        )
        with SamplerChain(sampling, model.vocab, self.n_ctx, logits_observer) as chain:
            started = time.perf_counter()
            reused = self._prefill(prompt_tokens)
            prefilled = time.perf_counter()
            while True:
                token = sample_mixture(
                    self.mixer,
                    self.loaded.aligned_ctx,
                    self._mixing_partner,
                    -1,
                    self.n_vocab,
                    self._mixing_lam(lam),
                    chain,
                    logprobs,
                )
                finish = output.advance(token)
                if output.new_text:
                    yield output.new_text
                if finish is not None:
                    break
                self._decode_both([token])
            tail = output.flush()
            if tail:
                yield tail
        return GenerationResult(
            text=output.text,
            tokens=output.tokens,
            prompt_tokens=prompt_tokens,
            finish_reason=finish,
            lam=lam,
            seed=sampling.seed,
            reused_prompt_tokens=reused,
            prompt_seconds=prefilled - started,
            generation_seconds=time.perf_counter() - prefilled,
            logprobs=logprobs,
        )

    @property
    def _mixing_partner(self) -> Context:
        # An identical pair mixes the aligned logits with themselves at lam 1: a no-op.
        return self.loaded.aligned_ctx if self.identical else self.loaded.reference_ctx

    def _mixing_lam(self, lam: float) -> float:
        return 1.0 if self.identical else lam

    def _live_contexts(self) -> list[Context]:
        if self.identical:
            return [self.loaded.aligned_ctx]
        return [self.loaded.aligned_ctx, self.loaded.reference_ctx]

    def _prefill(self, tokens: list[int]) -> int:
        """Brings both KV caches to `tokens`, reusing the common cached prefix; returns how
        many tokens were reused. Always decodes at least the last token, for fresh logits."""
        keep = 0
        limit = min(len(self._cached), len(tokens) - 1)
        while keep < limit and self._cached[keep] == tokens[keep]:
            keep += 1
        # What the caches really hold wins over our bookkeeping (an interrupt may have
        # landed between the two decodes of one step).
        contexts = self._live_contexts()
        keep = min(keep, *(ctx.n_cached() for ctx in contexts))
        self._cached = self._cached[:keep]
        for ctx in contexts:
            ctx.truncate(keep)
        if any(ctx.n_cached() != keep for ctx in contexts):
            keep = 0  # a model that cannot drop a tail (recurrent) was cleared instead
            self._cached = []
            for ctx in contexts:
                ctx.truncate(0)
        self._decode_both(tokens[keep:])
        return keep

    def _decode_both(self, tokens: list[int]) -> None:
        if self.identical:
            self.loaded.aligned_ctx.decode(tokens)
        elif self._overlap is not None:
            pending = self._overlap.submit(self.loaded.reference_ctx.decode, tokens)
            self.loaded.aligned_ctx.decode(tokens)
            pending.result()
        else:
            self.loaded.aligned_ctx.decode(tokens)
            self.loaded.reference_ctx.decode(tokens)
        self._cached.extend(tokens)


def sample_mixture(
    mixer: LogitMixer,
    aligned_ctx: Context,
    reference_ctx: Context,
    index: int,
    n_vocab: int,
    lam: float,
    chain: SamplerChain,
    logprobs: SequenceLogprobs | None = None,
) -> int:
    """One DeRa step on output `index` of the last batch: mixes the reference logits into
    the aligned ones in place, samples with the chain, and (if asked) records the token's
    log-probabilities, from a copy of the aligned logits taken before the mix."""
    aligned_address = aligned_ctx.logits_address(index)
    reference_address = reference_ctx.logits_address(index)
    before = float_view(aligned_address, n_vocab).copy() if logprobs is not None else None
    mixer.mix_in_place(aligned_address, reference_address, n_vocab, lam)
    token = chain.sample_at(aligned_ctx.ptr, index)
    if logprobs is not None:
        logprobs.add(
            token,
            before,
            float_view(reference_address, n_vocab),
            float_view(aligned_address, n_vocab),
        )
    return token


def load_pair(
    aligned: str | os.PathLike[str] | None,
    reference: str | os.PathLike[str],
    *,
    lora: str | os.PathLike[str] | None = None,
    lora_scale: float = 1.0,
    n_ctx: int = PairOptions.n_ctx,
    n_batch: int = PairOptions.n_batch,
    n_threads: int = PairOptions.n_threads,
    n_gpu_layers: int | None = None,
    flash_attn: str = "off",
    hook: str | None = None,
    overlap_decodes: bool | None = None,
    verbose: bool = False,
) -> DeraPair:
    """Loads an aligned and a reference GGUF model for DeRa decoding.

    lora: instead of an aligned model file (pass aligned=None), the reference plus this
    LoRA adapter GGUF; the base weights are loaded once and shared by both contexts.
    flash_attn: "off" (default, as llama-cpp-python's Llama), "on" or "auto".
    hook: "native" or "numpy" (default: native when compiled, else numpy; env DERA_HOOK).
    overlap_decodes: run the two models' decodes in two threads (default: on when layers
    are offloaded to a GPU, where the two decodes can overlap; off on CPU, where both
    would compete for the same cores).
    """
    if flash_attn not in ("on", "off", "auto"):
        raise BadParameterError(f"flash_attn must be 'on', 'off' or 'auto', got {flash_attn!r}")
    options = PairOptions(n_ctx, n_batch, n_threads, n_gpu_layers, flash_attn, verbose)
    mixer = LogitMixer(hook)
    loaded = load_models(aligned, reference, options, lora=lora, lora_scale=lora_scale)
    if overlap_decodes is None:
        overlap_decodes = loaded.load_options.n_gpu_layers != 0 and backend.supports_gpu_offload()
    return DeraPair(loaded, mixer, overlap_decodes)
