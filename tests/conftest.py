"""Session fixtures: tiny GGUF models written at test time (no downloads), and loaded pairs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import tokenizer_vocab, write_tiny_lora, write_tiny_model  # noqa: E402

import dera_local  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def aligned_path(model_dir) -> Path:
    return write_tiny_model(model_dir / "aligned.gguf", seed=1)


@pytest.fixture(scope="session")
def reference_path(model_dir) -> Path:
    return write_tiny_model(model_dir / "reference.gguf", seed=2)


@pytest.fixture(scope="session")
def other_vocab_path(model_dir) -> Path:
    """Same size as the shared tokenizer, one token text changed (id 257, 'he' -> 'hx')."""
    tokens, _ = tokenizer_vocab()
    tokens = list(tokens)
    tokens[257] = "hx"
    return write_tiny_model(model_dir / "other_vocab.gguf", seed=3, tokens=tokens)


@pytest.fixture(scope="session")
def lora_path(model_dir) -> Path:
    return write_tiny_lora(model_dir / "adapter.gguf", seed=9)


@pytest.fixture(scope="session")
def pair(aligned_path, reference_path):
    with dera_local.load_pair(aligned_path, reference_path, n_ctx=512, n_threads=2) as loaded:
        yield loaded


GREEDY = dera_local.SamplingParams(temperature=0)
