"""Sampling parameters and the llama.cpp sampler chain that runs on the mixed logits."""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import random
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import llama_cpp
import numpy as np

from ..errors import BadParameterError
from .grammar_bounds import check_gbnf

_REAL_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "repeat_penalty",
    "frequency_penalty",
    "presence_penalty",
)


@dataclass(frozen=True)
class SamplingParams:
    """llama.cpp's sampling knobs, with its defaults. temperature 0 means greedy."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None  # None: a fresh random seed per call
    grammar: str | None = None  # GBNF, root rule "root"
    # (token id, bias) pairs added to the mixed logits first in the chain, as OpenAI's
    # logit_bias; -100 bans the token (it becomes -inf), as OpenAI documents.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # With a grammar: it applies only once one of these words appears in the answer (from
    # that word on: llama.cpp's lazy grammar), as tool calls that may or may not come.
    grammar_triggers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in _REAL_FIELDS:  # a 400-digit integer is a number, but not a float
            try:
                value = float(getattr(self, name))
            except OverflowError:
                value = math.inf
            except (TypeError, ValueError):
                raise BadParameterError(f"{name} must be a number") from None
            if not math.isfinite(value):
                raise BadParameterError(f"{name} must be finite")
            object.__setattr__(self, name, value)
        checks = [
            (self.temperature >= 0, "temperature must be >= 0 (0 = greedy)"),
            (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repeat_penalty > 0, "repeat_penalty must be > 0 (1 = off)"),
            (self.repeat_last_n >= -1, "repeat_last_n must be >= -1 (-1 = whole context)"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadParameterError(message)
        for token, bias in self.logit_bias:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise BadParameterError(f"logit_bias: {token!r} is not a token id")
            if not (isinstance(bias, (int, float)) and -100 <= bias <= 100):
                raise BadParameterError(f"logit_bias of token {token}: a number from -100 to 100")

    def with_seed(self) -> SamplingParams:
        """A copy with a concrete seed, so that a run can be reported and repeated."""
        if self.seed is not None:
            return self
        return replace(self, seed=random.randrange(2**31))

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


# One redirection of fd 2 at a time: two threads interleaving dup2 calls would leave
# stderr pointing at a closed temporary file (a server checks grammars off the decode
# thread while the decode thread builds its own).
_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def captured_stderr() -> Iterator[Callable[[], list[str]]]:
    """Redirects file descriptor 2 (where C code prints) into a temporary file for the
    block; yields a function returning the captured lines."""
    lines: list[str] = []
    with _STDERR_LOCK, tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines += sink.read().decode("utf-8", errors="replace").splitlines()


class GrammarError(BadParameterError):
    """llama.cpp refused a grammar; `reason` is what its parser said (may be empty)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def compiled_grammar(
    grammar: str, vocab: llama_cpp.llama_vocab_p, triggers: tuple[str, ...] = ()
) -> llama_cpp.llama_sampler_p:
    """llama.cpp's grammar sampler for GBNF text (root rule "root"), after the checks
    that keep its parser from crashing (grammar_bounds); the caller owns it. With
    `triggers`, lazy: it applies from the first trigger word on. A grammar llama.cpp
    refuses is a BadParameterError with its reason."""
    check_gbnf(grammar)
    # llama.cpp prints parse errors straight to stderr (fprintf, not its log): catch
    # them, so that the user sees one line that includes the reason.
    with captured_stderr() as printed:
        if triggers:
            sampler = _lazy_grammar(grammar, vocab, triggers)
        else:
            sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        reason = next((line for line in printed() if "error" in line), "")
        reason = reason.split("error parsing grammar:", 1)[-1].strip()
        detail = f" ({reason})" if reason else ""
        raise GrammarError(
            f"the GBNF grammar does not parse{detail}; check its rule 'root'", reason
        )
    return sampler


def _lazy_grammar(grammar: str, vocab, triggers: tuple[str, ...]):
    """llama.cpp's lazy grammar: its patterns must match the whole answer so far, and
    the grammar reads it from the first group (the trigger word) on. A trigger that is
    one token of the vocabulary (Qwen's <tool_call>) also triggers as that token."""
    patterns = [f"[\\s\\S]*?({_ecma_escape(word)})[\\s\\S]*".encode() for word in triggers]
    words = (ctypes.c_char_p * len(patterns))(*patterns)
    single = [t for t in (_single_token(vocab, word) for word in triggers) if t is not None]
    tokens = (llama_cpp.llama_token * max(len(single), 1))(*single)
    return llama_cpp.llama_sampler_init_grammar_lazy_patterns(
        vocab, grammar.encode("utf-8"), b"root", words, len(patterns), tokens, len(single)
    )


def _ecma_escape(word: str) -> str:
    return "".join(f"\\{c}" if c in r"\^$.|?*+()[]{}/" else c for c in word)


def _single_token(vocab, word: str) -> int | None:
    text = word.encode("utf-8")
    out = (llama_cpp.llama_token * 4)()
    n = llama_cpp.llama_tokenize(vocab, text, len(text), out, 4, False, True)
    return int(out[0]) if n == 1 else None


def check_grammar(grammar: str, vocab: llama_cpp.llama_vocab_p) -> None:
    """Raises what compiled_grammar would (compiles the grammar once and frees it), so
    that a server refuses it when the request arrives, not on the decode thread."""
    llama_cpp.llama_sampler_free(compiled_grammar(grammar, vocab))


# llama_token_data as numpy sees it (id, logit, p: 12 bytes, as the C struct).
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


def _is_grammar(sampler: llama_cpp.llama_sampler_p) -> bool:
    return llama_cpp.llama_sampler_name(sampler) == b"grammar"


class SamplerChain:
    """A llama.cpp sampler chain built from SamplingParams; free it with close() (or use
    it as a context manager). `SamplerChain.live` counts chains not yet freed."""

    live = 0

    def __init__(
        self,
        params: SamplingParams,
        vocab: llama_cpp.llama_vocab_p,
        n_ctx: int,
        observer: llama_cpp.llama_sampler_p | None = None,
    ) -> None:
        """`observer`, if given, runs first and sees the logits exactly as the chain gets
        them (tests use it); it stays owned by the caller."""
        self.ptr = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params()
        )
        SamplerChain.live += 1
        self._observer = observer
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self._grammar: llama_cpp.llama_sampler_p | None = None  # owned by the chain
        self._candidates: np.ndarray | None = None  # allowed_tokens' scratch array
        # Tokens a logit bias of -100 bans: a fixed mask (exact realignment needs it).
        self.banned = np.array([t for t, bias in params.logit_bias if bias <= -100], dtype=np.int64)
        try:
            if observer is not None:
                llama_cpp.llama_sampler_chain_add(self.ptr, observer)
            for sampler in self._samplers(params, vocab, n_ctx):
                llama_cpp.llama_sampler_chain_add(self.ptr, sampler)
                if _is_grammar(sampler):
                    self._grammar = sampler
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _samplers(params: SamplingParams, vocab, n_ctx: int):
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        if params.logit_bias:
            bad = [t for t, _ in params.logit_bias if t >= n_vocab]
            if bad:
                raise BadParameterError(
                    f"logit_bias: token {bad[0]} is outside the vocabulary (0..{n_vocab - 1})"
                )
            entries = (llama_cpp.llama_logit_bias * len(params.logit_bias))()
            for entry, (token, bias) in zip(entries, params.logit_bias, strict=True):
                entry.token = token
                entry.bias = -math.inf if bias <= -100 else float(bias)
            yield llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(entries), entries)
        if params.grammar is not None:
            yield compiled_grammar(params.grammar, vocab, params.grammar_triggers)
        penalize = (
            params.repeat_penalty != 1.0
            or params.frequency_penalty != 0.0
            or params.presence_penalty != 0.0
        )
        if penalize:
            last_n = n_ctx if params.repeat_last_n == -1 else params.repeat_last_n
            yield llama_cpp.llama_sampler_init_penalties(
                llama_cpp.llama_vocab_n_tokens(vocab),
                last_n,
                params.repeat_penalty,
                params.frequency_penalty,
                params.presence_penalty,
            )
        if params.greedy:
            yield llama_cpp.llama_sampler_init_greedy()
            return
        if params.top_k > 0:
            yield llama_cpp.llama_sampler_init_top_k(params.top_k)
        if params.top_p < 1.0:
            yield llama_cpp.llama_sampler_init_top_p(params.top_p, 1)
        if params.min_p > 0.0:
            yield llama_cpp.llama_sampler_init_min_p(params.min_p, 1)
        yield llama_cpp.llama_sampler_init_temp(params.temperature)
        seed = params.seed if params.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
        yield llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF)

    @property
    def masks(self) -> bool:
        """Whether the chain removes tokens by a mask (a grammar, or bans by bias)."""
        return self._grammar is not None or len(self.banned) > 0

    def allowed_tokens(self) -> np.ndarray:
        """The tokens the chain's masks let through at this point of the answer (the
        grammar in its current state; bias bans): a boolean array over the vocabulary.
        Asks the grammar sampler itself (apply, which leaves its state as it is), so it
        is the mask the next sample_at applies."""
        allowed = np.ones(self._n_vocab, dtype=bool)
        allowed[self.banned] = False
        if self._grammar is not None:
            if self._candidates is None:
                self._candidates = np.zeros(self._n_vocab, dtype=_TOKEN_DATA)
            candidates = self._candidates
            candidates["id"] = np.arange(self._n_vocab, dtype=np.int32)
            candidates["logit"] = 0.0
            candidates["p"] = 0.0
            array = llama_cpp.llama_token_data_array(
                data=candidates.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)),
                size=self._n_vocab,
                selected=-1,
                sorted=False,
            )
            llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(array))
            rejected = candidates["id"][np.isneginf(candidates["logit"])]
            allowed[rejected] = False
        return allowed

    def sample_at(self, ctx: llama_cpp.llama_context_p, index: int) -> int:
        """Samples from output `index` of ctx's last batch (-1: the last output), and
        accepts the token into the chain."""
        return int(llama_cpp.llama_sampler_sample(self.ptr, ctx, index))

    def close(self) -> None:
        if self.ptr:
            if self._observer is not None:  # not ours to free
                llama_cpp.llama_sampler_chain_remove(self.ptr, 0)
            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None
            SamplerChain.live -= 1

    def __enter__(self) -> SamplerChain:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
