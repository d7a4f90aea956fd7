"""The exact target's figures: each answer's log-probability under plain DeRa at every
lam of a grid (what importance sampling across lam needs) and its mismatch
W = lam * A + (1 - lam) * R - M, checked against numpy on each model's own logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from reference_impl import solo_logits

import dera_local
from dera_local.analysis.sweep import LambdaSweep

SAMPLING = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    peak = x.max(-1, keepdims=True)
    return x - peak - np.log(np.exp(x - peak).sum(-1, keepdims=True))


def _each_model(aligned_path, reference_path, prompt, answer):
    """Float64 logits rows that predicted each answer token, from each model alone."""
    sequence = prompt + answer
    rows = slice(len(prompt) - 1, len(sequence) - 1)
    a = solo_logits(aligned_path, sequence)[rows].astype(np.float64)
    r = solo_logits(reference_path, sequence)[rows].astype(np.float64)
    return a, r, (np.arange(len(answer)), np.array(answer))


def test_a_sweep_scores_every_answer_under_every_lam_of_its_grid(
    pair, aligned_path, reference_path
):
    grid = [0.0, 0.3, 0.7, 1.0, 2.5]
    sampling = dera_local.SamplingParams(**SAMPLING, seed=4)
    prompt = pair.tokenize("abc")
    with LambdaSweep(pair, [0.7, 1.6], max_tokens=12, logprob_lams=grid) as runner:
        rows = runner.run(prompt, sampling=sampling)
    for row in rows:
        answer = row.tokens + ([row.end_token] if row.end_token is not None else [])
        a, r, picked = _each_model(aligned_path, reference_path, prompt, answer)
        expected = [_log_softmax(lam * a + (1 - lam) * r)[picked].sum() for lam in grid]
        assert row.logprob_grid == pytest.approx(expected, abs=1e-3)
        # the grid's own arithmetic is the sampler's: lam 0, 1 and the row's own lam agree
        # with the sums taken for the sampled token exactly
        assert row.logprob_grid[0] == row.logprob_reference
        assert row.logprob_grid[3] == row.logprob_aligned
        if row.lam in grid:
            assert row.logprob_grid[grid.index(row.lam)] == row.logprob_mixture
    plain = LambdaSweep(pair, [0.7], max_tokens=4)
    with plain:
        assert plain.run(prompt, sampling=sampling)[0].logprob_grid is None


@pytest.mark.parametrize("lam", [0.4, 1.7])
def test_generate_json_reports_the_mismatch_to_the_exact_target(
    run, aligned_path, reference_path, pair, lam
):
    printed = run(
        "generate", "abc", "--lam", str(lam), "--temp", "1", "--top-k", "0", "--top-p", "1",
        "--min-p", "0", "--seed", "3", "-n", "10", "--json",
    )  # fmt: skip
    data = json.loads(printed.output)
    answer = data["tokens"] + ([data["end_token"]] if data.get("end_token") is not None else [])
    a, r, picked = _each_model(aligned_path, reference_path, data["prompt_tokens"], answer)
    log_a, log_r = _log_softmax(a)[picked], _log_softmax(r)[picked]
    log_h = _log_softmax(lam * a + (1 - lam) * r)[picked]
    expected = (lam * log_a + (1 - lam) * log_r - log_h).sum()
    assert data["dera"]["mismatch"] == pytest.approx(expected, abs=2e-3)
    assert data["dera"]["mismatch_per_token"] == pytest.approx(expected / len(answer), abs=2e-4)
    assert abs(expected) > 0.01  # between 0 and 1 and beyond, per-token mixing is not exact


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_the_mismatch_is_zero_where_dera_is_exact(pair, lam):
    sampling = dera_local.SamplingParams(**SAMPLING, seed=5)
    result = pair.generate("abc", lam=lam, sampling=sampling, max_tokens=8, logprobs=True)
    assert result.to_dict()["dera"]["mismatch"] == 0.0


def test_no_mismatch_where_the_mixture_is_not_the_pair_alone(pair):
    guided = pair.generate(
        "abc", lam=0.5, max_tokens=4, logprobs=True, negative_prompt="xyz", cfg_scale=1.5,
        sampling=dera_local.SamplingParams(temperature=0),
    )  # fmt: skip
    assert "mismatch" not in guided.to_dict()["dera"]


def test_sweep_rows_carry_the_mismatch(run, tmp_path):
    out, prompts = tmp_path / "rows.jsonl", tmp_path / "prompts.txt"
    prompts.write_text("abc\n")
    run("sweep", "--prompts", str(prompts), "--lambdas", "0,0.5,2", "--temp", "1",
        "--seed", "2", "-n", "6", "--out", str(out))  # fmt: skip
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows:
        expected = (
            row["lam"] * row["logprob_aligned"]
            + (1 - row["lam"]) * row["logprob_reference"]
            - row["logprob_mixture"]
        )
        assert row["mismatch"] == pytest.approx(expected, abs=1e-9)
    assert rows[0]["mismatch"] == 0.0


def test_step_mismatch_is_log_z_at_each_prefix(pair, aligned_path, reference_path):
    """Each token's term is log sum_v pi_ref(v|s)^(1-lam) pi_1(v|s)^lam at its prefix,
    computed here from each model's own logits; the terms sum to the answer's mismatch."""
    sampling = dera_local.SamplingParams(**SAMPLING, seed=11)
    prompt = pair.tokenize("abc")
    with LambdaSweep(pair, [0.0, 0.6, 1.8], max_tokens=10, step_mismatch=True) as runner:
        rows = runner.run(prompt, sampling=sampling)
    for row in rows:
        answer = row.tokens + ([row.end_token] if row.end_token is not None else [])
        a, r, _ = _each_model(aligned_path, reference_path, prompt, answer)
        mixed = row.lam * _log_softmax(a) + (1 - row.lam) * _log_softmax(r)
        log_z = np.log(np.exp(mixed).sum(-1))
        assert len(row.mismatch_steps) == len(answer)
        assert row.mismatch_steps == pytest.approx(log_z, abs=1e-3)
        assert sum(row.mismatch_steps) == pytest.approx(row.mismatch, abs=1e-9)
        if 0 < row.lam < 1:  # Hoelder: z <= 1 inside [0, 1], >= 1 outside
            assert max(row.mismatch_steps) <= 1e-6
        elif row.lam > 1:
            assert min(row.mismatch_steps) >= -1e-6
    assert rows[0].mismatch_steps == [0.0] * len(rows[0].mismatch_steps)
    with LambdaSweep(pair, [0.6], max_tokens=4) as plain:
        assert plain.run(prompt, sampling=sampling)[0].mismatch_steps is None
