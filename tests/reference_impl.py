"""Independent computations the tests compare against: each model run alone through
llama-cpp-python's own `Llama` class, and the DeRa formula in numpy on its logits."""

from __future__ import annotations

import ctypes
from functools import cache

import llama_cpp
import numpy as np
from llama_cpp._internals import CustomSampler


@cache
def solo_model(path: str, n_ctx: int = 512, lora: str | None = None) -> llama_cpp.Llama:
    return llama_cpp.Llama(
        model_path=path, n_ctx=n_ctx, n_threads=2, logits_all=True, lora_path=lora, verbose=False
    )


def solo_logits(path: str, tokens: list[int], lora: str | None = None) -> np.ndarray:
    """float32 logits after each token of `tokens`, from one model alone (optionally
    with a LoRA adapter)."""
    model = solo_model(str(path), lora=str(lora) if lora else None)
    model.reset()
    model.eval(tokens)
    return np.array(model.scores[: len(tokens)], dtype=np.float32)


def solo_logits_stepwise(
    path: str, prompt: list[int], generated: list[int], lora: str | None = None
) -> np.ndarray:
    """float32 logits that predicted each generated token, from one model alone reading
    the prompt in one batch and then one token per eval, as generation decodes (batch
    shape changes rounding: with a LoRA adapter, by up to ~4e-3 on the tiny models)."""
    model = solo_model(str(path), lora=str(lora) if lora else None)
    model.reset()
    model.eval(prompt)
    for token in generated[:-1]:
        model.eval([token])
    n = len(prompt) - 1
    return np.array(model.scores[n : n + len(generated)], dtype=np.float32)


def solo_greedy(path: str, prompt_tokens: list[int], n: int, lora: str | None = None) -> list[int]:
    """Greedy tokens from one model alone (optionally with a LoRA adapter), through
    Llama.generate (its own sampler)."""
    model = solo_model(str(path), lora=str(lora) if lora else None)
    model.reset()
    out: list[int] = []
    for token in model.generate(prompt_tokens, temp=0.0, repeat_penalty=1.0, reset=True):
        if llama_cpp.llama_vocab_is_eog(model._model.vocab, token) or len(out) == n:
            break
        out.append(token)
    return out


def numpy_mix(aligned: np.ndarray, reference: np.ndarray, lam: float) -> np.ndarray:
    return lam * aligned.astype(np.float64) + (1 - lam) * reference.astype(np.float64)


class LogitsRecorder:
    """A llama.cpp sampler that copies the logits it is handed (in token-id order, as the
    chain's first sampler sees them) and changes nothing."""

    def __init__(self) -> None:
        self.steps: list[np.ndarray] = []
        self._custom = CustomSampler(self._record)

    def _record(self, cur_p) -> None:
        array = cur_p.contents
        n = array.size
        raw = np.ctypeslib.as_array(
            ctypes.cast(array.data, ctypes.POINTER(ctypes.c_float)), (n * 3,)
        ).reshape(n, 3)
        ids = raw[:, 0].view(np.int32)
        logits = np.empty(n, dtype=np.float32)
        logits[ids] = raw[:, 1]
        self.steps.append(logits)

    @property
    def sampler(self):
        return self._custom.get_sampler()


def mixture_logits_stepwise(terms, prompts, generated):
    """sum_i w_i * logits_i, float64, per step: terms are (weight, path, lora, prompt
    index); each source runs alone (llama-cpp-python's Llama) on its prompt, then on the
    generated tokens one at a time."""
    steps = []
    runs = {}
    for _, path, lora, which in terms:
        key = (str(path), str(lora), which)
        if key not in runs:
            runs[key] = solo_logits_stepwise(path, prompts[which], generated, lora)
    for step in range(len(generated)):
        total = sum(
            weight * runs[(str(path), str(lora), which)][step].astype(np.float64)
            for weight, path, lora, which in terms
        )
        steps.append(total)
    return steps


def assert_logits_seen(recorder, expected, tokens, greedy_check=True):
    assert len(recorder.steps) == len(expected)
    for step, (seen, want) in enumerate(zip(recorder.steps, expected, strict=True)):
        np.testing.assert_allclose(
            seen, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=f"step {step}"
        )
        if greedy_check:
            assert tokens[step] == int(np.argmax(want)), f"step {step}"
