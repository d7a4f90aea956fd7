"""Classifier-free guidance (negative prompts) and how a generation's mixture becomes
weighted terms.

A generation reads one or two prompts: the user's (positive) and, with guidance, a
negative or unconditional one, each as its own KV sequence of every source model. Its
next-token logits are

    h = sum over sources s, prompts p of  w_s(lam) * f_p * h[s, p]

where w_s(lam) are the model set's source weights (DeRa: lam and 1 - lam; proxy-tuning:
1, alpha and -alpha) and f = (scale, 1 - scale) the guidance factors, i.e.
h = h_neg + scale * (h_pos - h_neg) applied to the whole model mixture, as llama.cpp's
former --cfg-scale did for one model. Scale 1 is the positive prompt alone, 0 the
negative alone.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import BadParameterError

MAX_CFG_SCALE = 100.0  # llama.cpp's old examples used 1-4; far beyond that, text breaks


def validate_cfg_scale(scale: float) -> float:
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise BadParameterError(f"the CFG scale must be a number, got {scale!r}") from None
    if not math.isfinite(value) or abs(value) > MAX_CFG_SCALE:
        raise BadParameterError(
            f"the CFG scale must be between -{MAX_CFG_SCALE:g} and {MAX_CFG_SCALE:g}, got {scale!r}"
        )
    return value


@dataclass(frozen=True)
class Guidance:
    """A negative prompt (token ids, fed like the prompt) and the guidance scale."""

    negative_tokens: tuple[int, ...]
    scale: float

    def __post_init__(self) -> None:
        if not self.negative_tokens:
            raise BadParameterError(
                "the negative prompt is empty after tokenizing; give some text "
                "(an unconditional prompt is the model's BOS token or an empty chat turn)"
            )


@dataclass(frozen=True)
class Term:
    """One row of a mixture: source `source` (a model context) reading prompt `prompt`
    (0 = positive, 1 = negative), times `weight`."""

    source: int
    prompt: int
    weight: float


def mixture_terms(
    source_weights: Sequence[float], guidance_scale: float | None = None
) -> list[Term]:
    """The terms of one generation, positive-prompt terms first and sources in order:
    with two DeRa sources and no guidance, exactly (aligned, lam), (reference, 1 - lam)."""
    factors = [1.0] if guidance_scale is None else [guidance_scale, 1.0 - guidance_scale]
    return [
        Term(source, prompt, weight * factor)
        for prompt, factor in enumerate(factors)
        for source, weight in enumerate(source_weights)
    ]


def warn_if_weights_cancel(weights: Sequence[float], what: str) -> None:
    """Weights summing to 0 make a contrast, not a mixture of distributions: the logits
    lose their scale, and sampling from them is no longer a tempered model."""
    if abs(math.fsum(weights)) < 1e-9:
        warnings.warn(
            f"the {what} weights sum to 0: this is a contrast of models, not a "
            "distribution-preserving mixture; expect it to need a low temperature",
            stacklevel=3,
        )


def guidance_for(models, negative_prompt, cfg_scale: float) -> Guidance | None:
    """The Guidance of a generation from its negative prompt (text, tokenized like the
    prompt, or ids) and scale; None without a negative prompt."""
    scale = validate_cfg_scale(cfg_scale)
    if negative_prompt is None:
        if scale != 1.0:
            raise BadParameterError(
                f"a CFG scale of {scale:g} needs a negative prompt to steer away from "
                "(an empty one is the unconditional prompt)",
                cli_hint="add --cfg-negative-prompt TEXT",
            )
        return None
    if isinstance(negative_prompt, str):
        tokens = models.tokenize(negative_prompt)
    else:
        tokens = [int(t) for t in negative_prompt]
    return Guidance(tuple(tokens), scale)
