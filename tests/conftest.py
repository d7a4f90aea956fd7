"""Session fixtures: tiny GGUF models written at test time (no downloads), and loaded pairs."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny_models import tokenizer_vocab, write_tiny_lora, write_tiny_model

import dera_local
from dera_local.cli import cli


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
def _shared_pair(aligned_path, reference_path):
    with dera_local.load_pair(aligned_path, reference_path, n_ctx=512, n_threads=2) as loaded:
        yield loaded


@pytest.fixture
def pair(_shared_pair):
    """The tiny pair, loaded once per session, with an empty prefix cache for each test
    (so no test's result depends on what the test before it generated)."""
    _shared_pair.clear_cache()
    return _shared_pair


@pytest.fixture
def greedy() -> dera_local.SamplingParams:
    return dera_local.SamplingParams(temperature=0)


@pytest.fixture
def run(aligned_path, reference_path, monkeypatch):
    """Runs the CLI on the tiny pair (through DERA_ALIGNED/DERA_REFERENCE) with optional
    stdin; exceptions other than click's own propagate, so a traceback fails the test."""
    monkeypatch.setenv("DERA_ALIGNED", str(aligned_path))
    monkeypatch.setenv("DERA_REFERENCE", str(reference_path))

    def invoke(*args: str, stdin: str | None = None):
        return CliRunner().invoke(cli, list(args), input=stdin, catch_exceptions=False)

    return invoke
