"""The DPO training script's options (models/smollm2-concise-dpo/train_config.py): runs
at other KL strengths write elsewhere and never resume each other's checkpoints. torch
is not needed for these."""

from __future__ import annotations

from pathlib import Path

import pytest
from file_modules import load_module


@pytest.fixture(scope="module")
def train_config():
    return load_module("train_config", "models/smollm2-concise-dpo/train_config.py")


def test_defaults_are_the_shipped_adapters_run(train_config):
    args = train_config.parse_args([], default_out=Path("shipped.lora.gguf"))
    assert args.config == train_config.TrainConfig(
        beta=0.1, rank=8, alpha=16.0, lr=5e-4, epochs=2, batch_pairs=4, seed=0
    )
    assert args.out == Path("shipped.lora.gguf")


def test_beta_and_out_choose_another_run_and_its_own_checkpoint(train_config, tmp_path):
    out = tmp_path / "beta-0.05.lora.gguf"
    args = train_config.parse_args(["--beta", "0.05", "--out", str(out)], default_out=None)
    assert args.config.beta == 0.05 and args.out == out
    assert train_config.checkpoint_path(out) == tmp_path / "beta-0.05.lora.gguf.checkpoint.pt"
    other = train_config.checkpoint_path(tmp_path / "beta-0.2.lora.gguf")
    assert other != train_config.checkpoint_path(out)


def test_a_checkpoint_of_other_settings_is_refused(train_config, tmp_path):
    base = train_config.TrainConfig()
    changed = train_config.TrainConfig(beta=0.2)
    assert base.fingerprint() != changed.fingerprint()
    assert base.fingerprint() == train_config.TrainConfig().fingerprint()
    train_config.check_resumable(base.fingerprint(), base, tmp_path / "c.pt")
    with pytest.raises(SystemExit, match="written by a run with other settings"):
        train_config.check_resumable(base.fingerprint(), changed, tmp_path / "c.pt")
    with pytest.raises(SystemExit):  # checkpoints from before settings were recorded
        train_config.check_resumable(None, base, tmp_path / "c.pt")


@pytest.mark.parametrize("argv", [["--beta", "0"], ["--beta", "-1"], ["--out", "x.bin"]])
def test_unusable_options_stop_with_a_usage_error(train_config, argv, capsys):
    with pytest.raises(SystemExit) as stopped:
        train_config.parse_args(argv, default_out=Path("a.gguf"))
    assert stopped.value.code == 2
    assert "must" in capsys.readouterr().err
