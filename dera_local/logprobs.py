"""Per-token log-probabilities of sampled tokens under the aligned model, the reference
and the DeRa mixture: what KL(pi_lam || pi_ref) estimates and reward/KL sweeps need.

The mixture is softmax(lam * a + (1 - lam) * r) before temperature and truncation, i.e.
the distribution DeRa defines; sample at temperature 1 with no top-k/top-p/min-p to make
the sampled sequences draws from it.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import numpy as np


def float_view(address: int, n: int) -> np.ndarray:
    """A numpy view (no copy) of n float32 values at a C address."""
    return np.ctypeslib.as_array(ctypes.cast(address, ctypes.POINTER(ctypes.c_float)), (n,))


def log_softmax_at(logits: np.ndarray, token: int) -> float:
    """log softmax(logits)[token]; exp in float32 (numpy's SIMD path), the sum in float64."""
    peak = logits.max()
    total = np.exp(logits - peak).sum(dtype=np.float64)
    return float(logits[token]) - float(peak) - float(np.log(total))


@dataclass
class SequenceLogprobs:
    """Log-probabilities of each sampled token, including a final end-of-generation token."""

    aligned: list[float] = field(default_factory=list)
    reference: list[float] = field(default_factory=list)
    mixture: list[float] = field(default_factory=list)

    def add(
        self, token: int, aligned: np.ndarray, reference: np.ndarray, mixed: np.ndarray
    ) -> None:
        self.aligned.append(log_softmax_at(aligned, token))
        self.reference.append(log_softmax_at(reference, token))
        self.mixture.append(log_softmax_at(mixed, token))

    def sums(self) -> dict[str, float]:
        return {
            "aligned": float(sum(self.aligned)),
            "reference": float(sum(self.reference)),
            "mixture": float(sum(self.mixture)),
        }
