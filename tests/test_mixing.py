"""The mixing hook on plain arrays: the formula, -inf rules, and native == numpy bit for bit."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from dera_local.engine import mixing
from dera_local.errors import BadParameterError

LAMS = [0.0, 0.3, 1.0, 2.5, -0.5, 1e-9, 1 - 1e-9]


def _arrays(n: int = 4099, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal(n) * 8).astype(np.float32)
    r = (rng.standard_normal(n) * 8).astype(np.float32)
    a[[3, 10]] = -np.inf
    r[[10, 20]] = -np.inf
    return a, r


def _mix(path: str, a: np.ndarray, r: np.ndarray, lam: float) -> np.ndarray:
    out = a.copy()
    mixer = mixing.LogitMixer(path)
    mixer.mix_terms_in_place(
        out.ctypes.data, [out.ctypes.data, r.ctypes.data], [lam, 1 - lam], out.size
    )
    return out


@pytest.mark.filterwarnings("ignore:lam=")
@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("path", ["native", "numpy"])
def test_mix_matches_formula_and_keeps_impossible_tokens(path, lam):
    if path == "native" and mixing._native is None:
        pytest.skip("compiled hook not built")
    a, r = _arrays()
    out = _mix(path, a, r, lam)
    finite = np.isfinite(a) & np.isfinite(r)
    expected = lam * a[finite].astype(np.float64) + (1 - lam) * r[finite].astype(np.float64)
    np.testing.assert_allclose(out[finite], expected, rtol=1e-6, atol=1e-5)
    assert not np.isnan(out).any()
    if lam == 0.0:  # the aligned model has no say: its -inf at 3 does not count
        assert out[3] == r[3] and out[20] == -np.inf
    elif lam == 1.0:
        assert out[20] == a[20] and out[3] == -np.inf
    else:  # -inf in either weighted model stays -inf, never +inf or NaN
        assert out[3] == out[10] == out[20] == -np.inf


@pytest.mark.skipif(mixing._native is None, reason="compiled hook not built")
@pytest.mark.parametrize("lam", LAMS)
def test_native_and_numpy_are_bit_identical(lam):
    a, r = _arrays(seed=7)
    assert _mix("native", a, r, lam).tobytes() == _mix("numpy", a, r, lam).tobytes()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "x", None, 1e38, -1001.0])
def test_non_finite_huge_or_non_numeric_lam_is_rejected(bad):
    with pytest.raises(BadParameterError):
        mixing.validate_lam(bad)


def test_negative_lam_warns():
    with pytest.warns(UserWarning, match="emulated disalignment"):
        assert mixing.validate_lam(-0.5) == -0.5


def test_unknown_hook_path_is_rejected():
    with pytest.raises(BadParameterError, match="unknown hook path"):
        mixing.LogitMixer("cuda")


def test_native_hook_is_built():
    """A silent fallback would hide a broken build; opt out only on purpose."""
    if os.environ.get("DERA_ALLOW_NO_NATIVE"):
        pytest.skip("DERA_ALLOW_NO_NATIVE is set")
    assert mixing._native is not None, mixing._NATIVE_IMPORT_ERROR
    assert mixing.LogitMixer().path == "native"


def test_far_extrapolation_warns_but_is_allowed():
    with pytest.warns(UserWarning, match="extrapolates far past the aligned model"):
        assert mixing.validate_lam(50) == 50.0
    with pytest.warns(UserWarning):
        assert mixing.validate_lam(1000) == 1000.0  # the bound itself is allowed


def test_huge_lam_and_nan_lora_scale_are_one_line_in_the_cli(run, lora_path, reference_path):
    result = run("generate", "hi", "--lam", "1e38")
    assert result.exit_code == 1 and "lam must be between -1000 and 1000" in result.stderr
    scale = run("generate", "hi", "-mr", str(reference_path), "--lora", str(lora_path),
                "--lora-scale", "nan")  # fmt: skip
    assert scale.exit_code == 1 and "the LoRA scale must be finite" in scale.stderr


# --- K-term mixtures (groundwork for CFG, proxy-tuning and N-model mixtures) ---


def _rows(k: int, n: int = 4096, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = [(rng.standard_normal(n) * 8).astype(np.float32) for _ in range(k)]
    for j, row in enumerate(rows):  # tokens impossible in one model or another
        row[rng.choice(n, 20, replace=False)] = -np.inf
        row[j] = -np.inf
    return rows


def _native_terms(rows, weights) -> np.ndarray:
    out = np.empty_like(rows[0])
    mixing._native.mix_terms(
        out.ctypes.data, tuple(r.ctypes.data for r in rows), tuple(weights), len(out)
    )
    return out


@pytest.mark.skipif(mixing._native is None, reason="compiled hook not built")
@pytest.mark.parametrize(
    "weights",
    [[1.0], [0.7], [1.5, -0.5], [0.3, 0.7], [2.0, -1.5, 0.5], [1.0, 0.0, -0.25, 0.25],
     [0.0, 0.0], [-1.0, 2.0, 0.5, -0.5]],
)  # fmt: skip
def test_k_term_mix_native_equals_numpy_bits_and_the_float64_sum(weights):
    rows = _rows(len(weights))
    native = _native_terms(rows, weights)
    twin = np.empty_like(rows[0])
    mixing.mix_terms_numpy(twin, rows, weights)
    assert np.array_equal(native, twin)
    weighted = [(w, r) for w, r in zip(weights, rows, strict=True) if w != 0]
    impossible = np.zeros(len(native), bool)
    for _, row in weighted:
        impossible |= np.isneginf(row)
    assert np.all(np.isneginf(native[impossible])) and not np.isnan(native).any()
    with np.errstate(invalid="ignore"):  # -inf + inf where impossible: not compared
        exact = sum(
            (np.float64(w) * r.astype(np.float64) for w, r in weighted), np.zeros(len(native))
        )
    np.testing.assert_allclose(native[~impossible], exact[~impossible], rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(mixing._native is None, reason="compiled hook not built")
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, 1.7, -0.5, 3.0])
def test_two_terms_give_the_dera_kernels_bits(lam):
    aligned, reference = _rows(2, seed=3)
    dera = np.empty_like(aligned)
    mixing.mix_numpy(dera, aligned, reference, lam)  # the two-term formula, bit for bit
    terms = _native_terms([aligned, reference], [lam, 1.0 - lam])
    assert np.array_equal(dera, terms)
    in_place = aligned.copy()
    mixing._native.mix_terms(in_place.ctypes.data, (in_place.ctypes.data, reference.ctypes.data),
                             (lam, 1.0 - lam), len(in_place))  # fmt: skip
    assert np.array_equal(in_place, dera)  # out may be the first row


@pytest.mark.skipif(mixing._native is None, reason="compiled hook not built")
def test_k_term_mix_rejects_bad_arguments():
    row = np.zeros(8, np.float32)
    for rows, weights in (((), ()), ((row.ctypes.data,), (1.0, 2.0)),
                          ((row.ctypes.data,), (float("nan"),)),
                          ((row.ctypes.data,) * 17, (1.0,) * 17)):  # fmt: skip
        with pytest.raises(ValueError, match="mix_terms"):
            mixing._native.mix_terms(row.ctypes.data, rows, weights, 8)
