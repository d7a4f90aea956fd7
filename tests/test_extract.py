"""dera-local extract: a model whose difference from its reference is a merged rank-r
adapter comes back as that adapter (outputs equal, logits within tolerance of the merged
model run alone); quantized inputs work; bad input is one line and leaves no file."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from reference_impl import solo_greedy, solo_logits
from tiny_models import write_merged, write_tiny_model

import dera_local
from dera_local.cli import cli
from dera_local.errors import DeraError, IncompatibleModelsError, ModelFileError
from dera_local.extract import extract

pytest.importorskip("scipy")
Q8_0, Q4_1 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1
TOKENS = [260, 84, 104, 101, 32, 99, 97, 116, 32, 115, 97, 116]


@pytest.fixture(scope="module")
def merged(model_dir, reference_path, lora_path):
    """The reference with the rank-4 test adapter merged in (a "full fine-tune")."""
    return write_merged(reference_path, lora_path, model_dir / "merged.gguf")


def test_a_merged_rank_r_adapter_is_recovered(tmp_path, merged, reference_path):
    out = tmp_path / "extracted.lora.gguf"
    report = extract(merged, reference_path, out, rank=4, dtype="f32")
    carried = [t for t in report.tensors if t.carried]
    assert len(carried) == 2 * 3  # q, v and ffn_up of both blocks: what the adapter touched
    assert report.kept_share == pytest.approx(1.0, abs=1e-6)  # the difference is rank 4
    assert not report.not_carried  # nothing else differs
    # The extracted pair's aligned side is the merged model, run alone by llama-cpp-python.
    expected = solo_logits(str(merged), TOKENS)
    got = solo_logits(str(reference_path), TOKENS, lora=str(out))
    # W x + B (A x) against (W + B A) x: float32 rounding of two orders of operations
    # (measured up to 2.3e-4 on logits of magnitude ~5); without the adapter they differ
    # by ~1 (checked below), so the tolerance has teeth.
    np.testing.assert_allclose(got, expected, atol=5e-4, rtol=1e-4)
    assert np.abs(solo_logits(str(reference_path), TOKENS) - expected).max() > 0.5
    assert solo_greedy(str(reference_path), TOKENS, 16, lora=str(out)) == solo_greedy(
        str(merged), TOKENS, 16
    )
    with (
        dera_local.load_pair(merged, reference_path, n_ctx=256) as full,
        dera_local.load_pair(None, reference_path, lora=out, n_ctx=256) as low_rank,
    ):
        greedy = dera_local.SamplingParams(temperature=0)
        for lam in (0.5, 1.0, 2.0):
            expected_tokens = full.generate("Once", lam=lam, sampling=greedy, max_tokens=16)
            got_tokens = low_rank.generate("Once", lam=lam, sampling=greedy, max_tokens=16)
            assert got_tokens.tokens == expected_tokens.tokens
    # The adapter records where it came from and its rank (info --lora shows dera.* keys).
    info = dera_local.read_gguf(out, expect="adapter")
    assert info.metadata["dera.extract.rank"] == 4
    assert info.metadata["dera.extract.aligned"] == "merged.gguf"
    assert info.metadata["dera.extract.reference"] == reference_path.name


def test_a_lower_rank_keeps_less_and_says_how_much(tmp_path, merged, reference_path):
    report = extract(merged, reference_path, tmp_path / "r2.lora.gguf", rank=2)
    assert 0.3 < report.kept_share < 0.999
    layers = report.per_layer()
    assert set(layers) == {"blk.0", "blk.1"} and all(0 < s < 1 for s in layers.values())
    data = report.to_dict()
    assert data["rank"] == 2 and data["kept_share"] == report.kept_share


def test_differences_without_a_lora_form_are_reported_not_dropped(
    tmp_path, model_dir, reference_path, lora_path
):
    """A full fine-tune also moves the norm weights, which no adapter carries."""
    one = write_merged(reference_path, lora_path, model_dir / "shifted.gguf", norm_shift=0.1)
    two = reference_path
    report = extract(one, two, tmp_path / "x.lora.gguf", rank=64)
    missing = {t.name: t for t in report.not_carried}
    assert set(missing) == {f"blk.{i}.{n}_norm.weight" for i in (0, 1) for n in ("attn", "ffn")} | {
        "output_norm.weight"
    }
    for tensor in missing.values():  # each vector of 64 moved by 0.1: norm 0.8
        assert tensor.norm == pytest.approx(0.8, rel=1e-5) and "vector" in tensor.why_not
    assert report.kept_share < 1.0  # what is not carried counts against the total
    result = CliRunner().invoke(cli, ["extract", str(one), str(two), "-o",
                                      str(tmp_path / "y.lora.gguf"), "--rank", "8"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "not carried: blk.0.attn_norm.weight" in result.output
    assert "of the difference's energy" in result.output


@pytest.mark.parametrize("matrix_type", [Q8_0, Q4_1])
def test_quantized_models_extract_and_the_adapter_loads(
    tmp_path, model_dir, lora_path, matrix_type
):
    reference = write_tiny_model(model_dir / f"ref-{matrix_type.name}.gguf", seed=2,
                                 matrix_type=matrix_type)  # fmt: skip
    merged = write_merged(reference, lora_path, model_dir / f"merged-{matrix_type.name}.gguf",
                          matrix_type=matrix_type)  # fmt: skip
    out = tmp_path / "q.lora.gguf"
    report = extract(merged, reference, out, rank=4)
    # Quantization noise makes the difference full-rank; most of it is the adapter's.
    assert 0.5 < report.kept_share <= 1.0
    plain = solo_logits(str(reference), TOKENS)
    target = solo_logits(str(merged), TOKENS)
    adapted = solo_logits(str(reference), TOKENS, lora=str(out))
    assert np.abs(adapted - target).mean() < 0.5 * np.abs(plain - target).mean()


def test_bad_input_is_one_line_and_leaves_no_file(tmp_path, model_dir, reference_path,
                                                  other_vocab_path, lora_path, merged):  # fmt: skip
    out = tmp_path / "out.lora.gguf"
    qwen = write_tiny_model(model_dir / "qwen.gguf", seed=2, architecture="qwen2")
    cases = [
        ((merged, other_vocab_path), IncompatibleModelsError, "token"),
        ((qwen, reference_path), IncompatibleModelsError, "qwen2"),
        ((lora_path, reference_path), ModelFileError, "adapter"),
    ]
    for (aligned, reference), error, says in cases:
        with pytest.raises(error, match=says):
            extract(aligned, reference, out, rank=4)
    with pytest.raises(DeraError, match="cannot write"):
        extract(merged, reference_path, tmp_path / "no" / "such" / "dir" / "a.gguf")
    # Ctrl-C in the middle: the KeyboardInterrupt goes on, and no file is left behind.
    seen = []

    def interrupt(name: str) -> None:
        seen.append(name)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(merged, reference_path, out, rank=4, progress=interrupt)
    assert list(tmp_path.iterdir()) == []
    result = CliRunner().invoke(cli, ["extract", str(lora_path), str(reference_path), "-o",
                                      str(out)])  # fmt: skip
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output and not out.exists()


def test_large_matrices_take_the_randomized_svd_and_it_finds_their_rank():
    """Above FULL_SVD_LIMIT on both sides the randomized SVD runs: an exactly rank-5
    matrix comes back to float precision."""
    from dera_local.extract import FULL_SVD_LIMIT, truncated_svd

    pytest.importorskip("sklearn")
    rng = np.random.default_rng(0)
    n = FULL_SVD_LIMIT + 52
    matrix = rng.standard_normal((n, 5)) @ rng.standard_normal((5, n))
    left, right = truncated_svd(matrix.astype(np.float32), 5)
    assert left.shape == (n, 5) and right.shape == (5, n)
    error = np.linalg.norm(left @ right - matrix) / np.linalg.norm(matrix)
    assert error < 1e-5
