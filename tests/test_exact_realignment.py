"""The exact synthetic study of DeRa's per-token approximation (experiments/lam_meaning):
its dynamic programs against brute-force enumeration of every capped answer, and its
closed form against the dynamic program."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "lam_meaning"))
from exact import END, Chain, dera, geometric_continue, moments, optimum  # noqa: E402


def tiny_chain(seed: int = 3, cap: int = 3) -> Chain:
    rng = np.random.default_rng(seed)
    vocab = 3  # the end and two tokens
    ref = rng.dirichlet(np.ones(vocab), size=vocab + 1)
    rho = rng.normal(size=(vocab + 1, vocab))
    return Chain(ref, rho, cap)


def answers(chain: Chain):
    """Every capped answer (token list without the end) with whether it ended itself."""
    vocab = chain.ref.shape[1]
    for length in range(chain.cap + 1):
        for body in itertools.product(range(1, vocab), repeat=length):
            yield list(body), length < chain.cap  # under the cap, the end token follows


def sequence_logprob(chain: Chain, policy, body, ended) -> float:
    """log probability of an answer under a step policy (or the reference when None)."""
    state, total = chain.start, 0.0
    tokens = body + ([END] if ended else [])
    for step, token in enumerate(tokens):
        table = chain.ref if policy is None else policy[step]
        total += math.log(table[state, token])
        state = token
    return total


def sequence_reward(chain: Chain, body, ended) -> float:
    state, total = chain.start, 0.0
    for token in body + ([END] if ended else []):
        total += chain.rho[state, token]
        state = token
    return total


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_the_optimum_is_the_tilted_reference_over_every_capped_answer(beta):
    chain = tiny_chain()
    policy = optimum(chain, beta)
    everything = list(answers(chain))
    tilted = np.array(
        [sequence_logprob(chain, None, *a) + sequence_reward(chain, *a) / beta for a in everything]
    )
    target = tilted - np.log(np.exp(tilted).sum())
    found = np.array([sequence_logprob(chain, policy, *a) for a in everything])
    np.testing.assert_allclose(found, target, atol=1e-10)
    # moments from the forward program against the enumeration
    p = np.exp(target)
    ref = np.array([sequence_logprob(chain, None, *a) for a in everything])
    rewards = np.array([sequence_reward(chain, *a) for a in everything])
    got = moments(chain, policy)
    assert got.reward == pytest.approx(float(p @ rewards), abs=1e-10)
    assert got.kl_to_ref == pytest.approx(float(p @ (target - ref)), abs=1e-10)
    assert got.length == pytest.approx(float(p @ [len(a[0]) for a in everything]), abs=1e-10)


def test_dera_ends_are_exact_and_its_middle_is_the_per_token_mixture():
    chain = tiny_chain(seed=5)
    aligned = optimum(chain, 1.0)
    np.testing.assert_allclose(dera(chain, aligned, 1.0), aligned, atol=1e-12)
    np.testing.assert_allclose(dera(chain, aligned, 0.0)[0], chain.ref, atol=1e-12)
    half = dera(chain, aligned, 0.5)
    expected = np.sqrt(chain.ref * aligned[1])
    np.testing.assert_allclose(half[1], expected / expected.sum(axis=1, keepdims=True))
    # KL between two policies from the forward program against the enumeration
    everything = list(answers(chain))
    log_half = np.array([sequence_logprob(chain, half, *a) for a in everything])
    log_aligned = np.array([sequence_logprob(chain, aligned, *a) for a in everything])
    kl = float(np.exp(log_half) @ (log_half - log_aligned))
    assert moments(chain, half, aligned).kl_to_other == pytest.approx(kl, abs=1e-10)


def test_the_closed_form_matches_the_program_for_a_geometric_reference():
    p_end, cost, beta = 0.02, 0.05, 0.1
    vocab = 4
    row = np.full(vocab, (1 - p_end) / (vocab - 1))
    row[END] = p_end
    ref = np.tile(row, (vocab + 1, 1))
    rho = np.full((vocab + 1, vocab), -cost)
    rho[:, END] = 0.0
    chain = Chain(ref, rho, cap=3000)  # long enough that the cap no longer matters early
    aligned = optimum(chain, beta)
    for lam in (0.5, 2.0):
        exact, mixed = geometric_continue(p_end, cost, beta, lam)
        target = optimum(chain, beta / lam)
        assert 1 - target[0, chain.start, END] == pytest.approx(exact, rel=1e-9)
        per_token = dera(chain, aligned, lam)
        assert 1 - per_token[0, chain.start, END] == pytest.approx(mixed, rel=1e-9)
        assert abs(exact - mixed) > 1e-3  # the approximation is not exact here


def test_the_synthetic_study_needs_no_llama_cpp():
    """synthetic.py (and its provenance) imports with llama_cpp unimportable: the exact
    study is numpy alone (the full run, ~40 s of CPU, gave the stored results again)."""
    import subprocess

    folder = Path(__file__).resolve().parents[1] / "experiments" / "lam_meaning"
    code = (
        "import sys; sys.modules['llama_cpp'] = None; sys.path.insert(0, sys.argv[1]);"
        "import synthetic, provenance; print(provenance.provenance()['machine'])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "llama-cpp-python" in done.stdout
