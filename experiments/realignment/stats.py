"""The comparison's arithmetic, on plain arrays (tested in tests/test_realignment.py):
DeRa policies from logits, per-token KL between policies, means with standard errors."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def dera_log_probs(aligned: np.ndarray, reference: np.ndarray, lam: float) -> np.ndarray:
    """log pi_lam for logits rows: softmax(lam * aligned + (1 - lam) * reference), the
    DeRa policy sampled at temperature 1 with no truncation."""
    mixed = lam * np.asarray(aligned, np.float64) + (1.0 - lam) * np.asarray(reference, np.float64)
    return log_softmax(mixed)


def token_kl(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """KL(p || q) for each row, from log-probabilities (0 log 0 = 0)."""
    p = np.exp(log_p)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (log_p - log_q), 0.0)
    return terms.sum(axis=-1)


def kl_row(source: np.ndarray, targets: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Summed per-token KL(source || target) over the rows of one answer, per target.

    As sum(p log p) - sum(p log q), each a single pass over the rows (einsum), with p
    computed once: the answers' log-softmax rows are finite, so no 0 * -inf arises (rows
    with -inf go through token_kl)."""
    if not all(np.isfinite(log_q).all() for log_q in targets.values()):
        return {name: float(token_kl(source, log_q).sum()) for name, log_q in targets.items()}
    p = np.exp(source)
    own = float(np.einsum("ij,ij->", p, source))
    return {name: own - float(np.einsum("ij,ij->", p, log_q)) for name, log_q in targets.items()}


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n))."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def relative_gap(value: float, target: float) -> float:
    """|value - target| / |target|: the issue's "within 10%" yardstick."""
    return abs(value - target) / abs(target)


def nearest(row: Mapping[str, float], exclude: str) -> str:
    """The target closest to a source (smallest KL), leaving the source itself out."""
    return min((kl, name) for name, kl in row.items() if name != exclude)[1]
