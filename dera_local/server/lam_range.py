"""The lams a server accepts (`serve --lam-range MIN:MAX`).

The default is 0:2. Below 0 the mixture (1 + a) * reference - a * aligned moves *away*
from the aligned model: that undoes its alignment ("emulated disalignment", Zhou et al.
2024, arXiv 2402.12343), which a server that others reach should not offer unasked.
Above 2 it extrapolates far past anything DeRa's approximation was shown to hold for
(the built-in pair's answers already break at 2). An operator widens it on purpose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import BadParameterError


@dataclass(frozen=True)
class LamRange:
    low: float = 0.0
    high: float = 2.0

    @classmethod
    def parse(cls, text: str) -> LamRange:
        low, sep, high = text.partition(":")
        try:
            bounds = (float(low), float(high)) if sep else None
        except ValueError:
            bounds = None
        if bounds is None or not all(math.isfinite(b) for b in bounds) or bounds[0] > bounds[1]:
            raise BadParameterError(f"--lam-range {text!r}: give MIN:MAX with MIN <= MAX, e.g. 0:2")
        return cls(*bounds)

    def holds(self, lam: float) -> bool:
        return self.low <= lam <= self.high

    def __str__(self) -> str:
        return f"[{self.low:g}, {self.high:g}]"


def describe_lam(lam: float, *, default: bool = False) -> str:
    """What a lam means for the pair, for /v1/models."""
    if lam == 0:
        what = "the reference model alone"
    elif lam == 1:
        what = "the aligned model as trained"
    elif 0 < lam < 1:
        what = "between the two: weaker alignment than trained"
    elif lam > 1:
        what = "stronger alignment than trained (extrapolated)"
    else:
        what = "away from the aligned model: its alignment reversed"
    return f"lam {lam:g}: {what}" + (" (the server's default)" if default else "")
