"""A LoRA pair: the reference loaded once, the adapter attached to the aligned context only."""

from __future__ import annotations

import pytest
from reference_impl import solo_greedy

import dera_local
from dera_local.errors import DeraError, ModelFileError


@pytest.fixture(scope="module")
def _shared_lora_pair(reference_path, lora_path):
    with dera_local.load_pair(None, reference_path, lora=lora_path, n_ctx=512) as pair:
        yield pair


@pytest.fixture
def lora_pair(_shared_lora_pair):
    _shared_lora_pair.clear_cache()
    return _shared_lora_pair


def test_one_model_serves_both_contexts(lora_pair):
    loaded = lora_pair.loaded
    assert loaded.aligned_model is loaded.reference_model
    assert loaded.aligned_ctx.ptr != loaded.reference_ctx.ptr
    assert loaded.adapter_info is not None and loaded.adapter_info.file_type == "adapter"


@pytest.mark.parametrize("lam", [1.0, 0.0])
def test_endpoints_equal_base_with_and_without_adapter(
    lora_pair, reference_path, lora_path, lam, greedy
):
    prompt = lora_pair.tokenize("Once upon a time")
    result = lora_pair.generate(prompt, lam=lam, sampling=greedy, max_tokens=32)
    with_adapter = solo_greedy(reference_path, prompt, 32, lora=lora_path)
    base_alone = solo_greedy(reference_path, prompt, 32)
    assert with_adapter != base_alone, "the fixture adapter must change the output"
    assert result.tokens == (with_adapter if lam == 1.0 else base_alone)


def test_adapter_given_as_model_or_both_sides_given(reference_path, lora_path, aligned_path):
    with pytest.raises(ModelFileError, match="load it as the LoRA adapter") as info:
        dera_local.load_pair(lora_path, reference_path)
    assert info.value.cli_hint == "pass it with --lora"
    with pytest.raises(DeraError, match="not both"):
        dera_local.load_pair(aligned_path, reference_path, lora=lora_path)


def test_model_given_as_adapter(reference_path, aligned_path):
    with pytest.raises(
        ModelFileError, match="this GGUF is a model, not an adapter; pass a GGUF adapter"
    ):
        dera_local.load_pair(None, reference_path, lora=aligned_path)


def test_cli_lora_flag_and_info(reference_path, lora_path, lora_pair, greedy):
    import json

    from click.testing import CliRunner

    from dera_local.cli import cli

    runner = CliRunner()
    args = ["-mr", str(reference_path), "--lora", str(lora_path)]
    result = runner.invoke(
        cli, ["generate", "Once upon", "--json", "--temp", "0", "-n", "10", "--lam", "0.5", *args]
    )
    assert result.exit_code == 0, result.stderr
    expected = lora_pair.generate("Once upon", lam=0.5, sampling=greedy, max_tokens=10)
    assert json.loads(result.stdout)["tokens"] == expected.tokens
    info = runner.invoke(cli, ["info", *args])
    assert info.exit_code == 0 and "LoRA adapter on the reference" in info.stdout
    assert "compatibility: OK, one base model and its adapter" in info.stdout
