"""The logits llama.cpp's sampler chain sees are lam * a + (1 - lam) * r, where a and r come
from each model run alone through llama-cpp-python's Llama class, mixed in numpy."""

from __future__ import annotations

import numpy as np
import pytest
from reference_impl import LogitsRecorder, numpy_mix, solo_greedy, solo_logits

import dera_local

STEPS = 24


@pytest.mark.filterwarnings("ignore:lam=")
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, 2.5, -0.5])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_sampler_sees_the_mixture_of_each_model_alone(
    pair, aligned_path, reference_path, lam, temperature
):
    prompt = pair.tokenize("The quick brown fox")
    recorder = LogitsRecorder()
    sampling = dera_local.SamplingParams(temperature=temperature, seed=11)
    result = pair.generate(
        prompt, lam=lam, sampling=sampling, max_tokens=STEPS, logits_observer=recorder.sampler
    )
    assert result.finish_reason == "length", "the tiny models should not stop early here"
    assert len(recorder.steps) == STEPS

    sequence = prompt + result.tokens
    aligned = solo_logits(aligned_path, sequence)
    reference = solo_logits(reference_path, sequence)
    for step, seen in enumerate(recorder.steps):
        position = len(prompt) - 1 + step
        expected = numpy_mix(aligned[position], reference[position], lam)
        np.testing.assert_allclose(
            seen,
            expected,
            rtol=1e-4,
            atol=1e-4 * np.abs(expected).max(),
            err_msg=f"step {step}, lam {lam}",
        )
        if temperature == 0:
            assert result.tokens[step] == int(np.argmax(expected))


@pytest.mark.parametrize("lam, which", [(1.0, "aligned"), (0.0, "reference")])
def test_endpoints_equal_one_model_alone_in_llama_class(
    pair, aligned_path, reference_path, lam, which, greedy
):
    prompt = pair.tokenize("Once upon a time")
    result = pair.generate(prompt, lam=lam, sampling=greedy, max_tokens=32)
    path = aligned_path if which == "aligned" else reference_path
    assert result.tokens == solo_greedy(path, prompt, 32)
    other = reference_path if which == "aligned" else aligned_path
    assert result.tokens != solo_greedy(other, prompt, 32), "the two tiny models must differ"


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_native_and_numpy_hooks_give_identical_tokens(aligned_path, reference_path, temperature):
    sampling = dera_local.SamplingParams(temperature=temperature, seed=5)
    outputs = {}
    for hook in ("native", "numpy"):
        if hook == "native" and dera_local.engine.mixing._native is None:
            pytest.skip("compiled hook not built")
        with dera_local.load_pair(aligned_path, reference_path, n_ctx=256, hook=hook) as p:
            assert p.mixer.path == hook
            outputs[hook] = [
                p.generate("Hi there", lam=lam, sampling=sampling, max_tokens=40).tokens
                for lam in (0.4, 1.7)
            ]
    assert outputs["native"] == outputs["numpy"]
