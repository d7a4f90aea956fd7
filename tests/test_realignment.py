"""The realignment experiment's arithmetic (experiments/realignment/stats.py), against
direct computations on small synthetic arrays."""

from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import pytest
from file_modules import ROOT, load_module


@pytest.fixture(scope="module")
def stats():
    return load_module("realignment_stats", "experiments/realignment/stats.py")


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_dera_policy_is_the_softmax_of_the_mixed_logits(stats):
    rng = np.random.default_rng(0)
    aligned, reference = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    for lam in (0.0, 0.5, 1.0, 2.0):
        got = np.exp(stats.dera_log_probs(aligned, reference, lam))
        for row in range(3):
            expected = _softmax(lam * aligned[row] + (1 - lam) * reference[row])
            np.testing.assert_allclose(got[row], expected, rtol=1e-12)
    np.testing.assert_allclose(
        stats.dera_log_probs(aligned, reference, 0.0), stats.log_softmax(reference)
    )


def test_token_kl_matches_the_definition_and_handles_zero_probabilities(stats):
    p = np.array([[0.5, 0.25, 0.25, 0.0]])
    q = np.array([[0.25, 0.25, 0.25, 0.25]])
    with np.errstate(divide="ignore"):
        kl = stats.token_kl(np.log(p), np.log(q))
    expected = 0.5 * math.log(2) + 0.25 * 0 + 0.25 * 0
    assert kl[0] == pytest.approx(expected)
    assert stats.token_kl(np.log(q), np.log(q))[0] == 0.0


def test_kl_row_sums_over_an_answers_tokens_for_each_target(stats):
    rng = np.random.default_rng(1)
    source = stats.log_softmax(rng.normal(size=(4, 5)))
    other = stats.log_softmax(rng.normal(size=(4, 5)))
    row = stats.kl_row(source, {"self": source, "other": other})
    assert row["self"] == pytest.approx(0.0, abs=1e-12)
    p = np.exp(source)
    assert row["other"] == pytest.approx(float((p * (source - other)).sum()))
    assert row["other"] > 0
    assert stats.nearest({"self": 0.0, "a": 0.3, "b": 0.1}, exclude="self") == "b"
    # the fast path (finite rows) equals the definition; a -inf row takes the slow path
    with np.errstate(divide="ignore"):
        masked = np.log(np.where(np.arange(5) == 2, 0.0, np.exp(other)))
    slow = float(stats.token_kl(source, masked).sum())
    assert stats.kl_row(source, {"masked": masked})["masked"] == pytest.approx(slow)


def test_mean_and_standard_error(stats):
    mean, se = stats.mean_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert se == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert stats.mean_se([5.0]) == (5.0, 0.0)
    assert all(math.isnan(v) for v in stats.mean_se([]))
    assert stats.relative_gap(9.0, 10.0) == pytest.approx(0.1)


def test_training_table_summarises_each_quarter_of_a_log(tmp_path):
    sys.path[:0] = [str(ROOT / "experiments" / "realignment"),
                    str(ROOT / "models" / "smollm2-concise-dpo")]  # fmt: skip
    try:
        realign = importlib.import_module("realign")
    finally:
        del sys.path[:2]
    steps = [f"step {i}/8 loss {0.1 * (8 - i):.4f} margin {10.0 * i:.2f} acc 1.00 {i}s"
             for i in range(1, 9)]  # fmt: skip
    (tmp_path / "beta-0.2.train.log").write_text("warning line\n" + "\n".join(steps) + "\n")
    rows = [r for r in realign.training_table(tmp_path) if r.startswith("| β=")]
    assert rows[0] == "| β=0.2 | 1 | 0.6500 | 15.0 | 3.0 | 1.00 |"
    assert rows[3] == "| β=0.2 | 4 | 0.0500 | 75.0 | 15.0 | 1.00 |"
