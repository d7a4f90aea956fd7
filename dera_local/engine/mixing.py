"""The DeRa logit hook: h = lam * aligned + (1 - lam) * reference, in place.

Two interchangeable paths compute it: the compiled kernel in native/ (built by
`pip install` as dera_local._native) and a numpy twin used when the kernel cannot be
loaded. Both follow the same rules (see native/dera_mix.h) and round identically.
"""

from __future__ import annotations

import ctypes
import math
import os
import warnings
from collections.abc import Sequence

import numpy as np

from ..errors import BadParameterError

try:  # the compiled hook is optional: a machine without a C compiler gets numpy
    from .. import _native
except ImportError as exc:  # pragma: no cover - depends on the build
    _native = None
    _NATIVE_IMPORT_ERROR: str | None = str(exc)
else:
    _NATIVE_IMPORT_ERROR = None

NATIVE = "native"
NUMPY = "numpy"


MAX_LAM = 1000.0  # beyond this the float32 mix of logits loses all meaning (or overflows)
FAR_LAM = 10.0  # beyond this, extrapolation far past the aligned model: warn


def validate_lam(lam: float, *, warn: bool = True) -> float:
    """Returns lam as a float; rejects NaN, infinities and |lam| > 1000 (float32 logits
    times such weights overflow or say nothing), warns (unless `warn` is false) when it
    is negative or > 10."""
    try:
        value = float(lam)
    except OverflowError:  # an integer too large for a float
        value = math.inf
    except (TypeError, ValueError):
        raise BadParameterError(f"lam must be a number, got {str(lam)[:40]!r}") from None
    if not math.isfinite(value):
        raise BadParameterError(f"lam must be finite, got {str(lam)[:40]}")
    if abs(value) > MAX_LAM:
        raise BadParameterError(f"lam must be between -{MAX_LAM:g} and {MAX_LAM:g}, got {lam!r}")
    if not warn:
        return value
    if value > FAR_LAM:
        warnings.warn(
            f"lam={value:g} extrapolates far past the aligned model; expect broken text",
            stacklevel=3,
        )
    if value < 0:
        warnings.warn(
            f"lam={value} < 0 moves away from the aligned model (emulated disalignment)",
            stacklevel=3,
        )
    return value


def float_view(address: int, n: int) -> np.ndarray:
    """A numpy view (no copy) of n float32 values at a C address."""
    return np.ctypeslib.as_array(ctypes.cast(address, ctypes.POINTER(ctypes.c_float)), (n,))


def mix_numpy(out: np.ndarray, aligned: np.ndarray, reference: np.ndarray, lam: float) -> None:
    """DeRa's two-term mix in numpy, out = lam * aligned + (1 - lam) * reference with
    the -inf rules of native/dera_mix.h (the K-term kernel gives its bits for two
    terms); `out` may be `aligned`."""
    wa = np.float32(lam)
    wr = np.float32(1.0 - lam)
    if wr == 0:
        if out is not aligned:
            out[:] = aligned
        return
    if wa == 0:
        out[:] = reference
        return
    impossible = (aligned == -np.inf) | (reference == -np.inf)
    with np.errstate(invalid="ignore"):  # -inf + inf = NaN here, replaced just below
        mixed = wa * aligned
        mixed += wr * reference
    mixed[impossible] = -np.inf
    out[:] = mixed


def mix_terms_numpy(out: np.ndarray, rows: list[np.ndarray], weights: list[float]) -> None:
    """The numpy twin of dera_mix_terms (bit-identical): the weighted sum of float32 rows
    in term order, weight-0 terms left out, -inf in any weighted term kept."""
    active = [
        (np.float32(w), row) for w, row in zip(weights, rows, strict=True) if np.float32(w) != 0
    ]
    if not active:
        out[:] = 0
        return
    impossible = np.zeros(out.shape, dtype=bool)
    with np.errstate(invalid="ignore", over="ignore"):  # -inf terms: replaced just below
        mixed = active[0][0] * active[0][1]
        impossible |= active[0][1] == -np.inf
        for weight, row in active[1:]:
            mixed = mixed + weight * row
            impossible |= row == -np.inf
    mixed[impossible] = -np.inf
    out[:] = mixed


class LogitMixer:
    """Mixes logits rows (given by address) into one, by the active path."""

    def __init__(self, path: str | None = None) -> None:
        wanted = path or os.environ.get("DERA_HOOK") or (NATIVE if _native else NUMPY)
        if wanted not in (NATIVE, NUMPY):
            raise BadParameterError(f"unknown hook path {wanted!r}: use 'native' or 'numpy'")
        if wanted == NATIVE and _native is None:
            raise BadParameterError(
                f"the compiled hook is not available ({_NATIVE_IMPORT_ERROR}); "
                "reinstall with a C compiler or use DERA_HOOK=numpy"
            )
        self.path = wanted

    def mix_terms_in_place(
        self, out_addr: int, row_addrs: Sequence[int], weights: Sequence[float], n_vocab: int
    ) -> None:
        """out[:] = sum of weights[i] * rows[i] (K-term mixtures: CFG, proxy-tuning, specs);
        `out` may be one of the rows. With two terms (lam, 1 - lam) the bits equal
        mix_numpy's."""
        if self.path == NATIVE:
            _native.mix_terms(out_addr, tuple(row_addrs), tuple(weights), n_vocab)
        else:
            rows = [float_view(address, n_vocab) for address in row_addrs]
            mix_terms_numpy(float_view(out_addr, n_vocab), rows, list(weights))

    def describe(self) -> str:
        """One line for `dera-local info`: which path mixes the logits, and why."""
        if self.path == NATIVE:
            return f"native (compiled C kernel in {_native.__file__})"
        if _native is None:
            return f"numpy fallback (compiled hook unavailable: {_NATIVE_IMPORT_ERROR})"
        return "numpy (chosen with --hook/DERA_HOOK; the compiled hook is available)"
