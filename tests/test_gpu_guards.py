"""What a GPU user needs even where the build has no GPU: -ngl refused in one line where
it could only be a mistake, and no context that samples on the device (llama.cpp's
experimental backend sampling would bypass the host-side hook)."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import pytest

import dera_local
from dera_local.errors import BadParameterError
from dera_local.llama import backend

PACKAGE = Path(dera_local.__file__).parent


def test_ngl_on_a_cpu_build_is_one_line(run):
    if backend.supports_gpu_offload():
        pytest.skip("this build has a GPU backend")
    result = run("generate", "abc", "-n", "2", "-ngl", "4")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: -ngl 4: this llama.cpp build has no GPU to offload to (a CPU build); drop "
        "-ngl, or install a GPU build of llama-cpp-python (docs/install.md) "
        "(-ngl/--n-gpu-layers)"
    ]
    assert run("generate", "abc", "-n", "2", "-ngl", "0").exit_code == 0


@pytest.mark.parametrize("n", [-2, -100])
def test_ngl_below_minus_one_is_refused(aligned_path, reference_path, n):
    with pytest.raises(BadParameterError, match=rf"-ngl {n}: use -1 \(all layers\), 0"):
        dera_local.load_pair(aligned_path, reference_path, n_gpu_layers=n)


def test_the_reference_layers_are_checked_too(aligned_path, reference_path, monkeypatch):
    monkeypatch.setattr(backend, "supports_gpu_offload", lambda: True)
    with pytest.raises(BadParameterError, match=r"-ngl -3: use -1"):
        dera_local.load_pair(aligned_path, reference_path, n_gpu_layers_reference=-3)
    with pytest.raises(BadParameterError, match=r"-ngl 7: the largest model here has 2"):
        dera_local.load_pair(aligned_path, reference_path, n_gpu_layers=0, n_gpu_layers_reference=7)


def test_ngl_beyond_the_largest_model_is_refused(aligned_path, reference_path, monkeypatch):
    """The tiny models have 2 layers (3 with the output layer): 3 is all, 4 a mistake.
    The check runs before llama.cpp loads anything, so a pretended GPU is enough."""
    monkeypatch.setattr(backend, "supports_gpu_offload", lambda: True)
    with pytest.raises(BadParameterError, match=r"-ngl 4: the largest model here has 2 layers "):
        dera_local.load_pair(aligned_path, reference_path, n_gpu_layers=4)
    with pytest.raises(BadParameterError, match=r"-ngl 99: the largest model here has 2"):
        dera_local.load_mixture([(0.5, aligned_path), (0.5, reference_path)], n_gpu_layers=99)


def test_no_context_uses_backend_sampling(aligned_path, reference_path, monkeypatch):
    seen = []
    create = llama_cpp.llama_init_from_model

    def spy(model, params):
        seen.append((params.n_samplers, bool(params.samplers)))
        return create(model, params)

    monkeypatch.setattr(llama_cpp, "llama_init_from_model", spy)
    with dera_local.load_pair(aligned_path, reference_path, n_ctx=256) as pair:
        pair.generate(pair.tokenize("abc"), lam=0.5, max_tokens=2)
    assert len(seen) == 2 and seen == [(0, False), (0, False)]
    sources = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    assert "llama_set_sampler(" not in sources  # the other way to attach one
