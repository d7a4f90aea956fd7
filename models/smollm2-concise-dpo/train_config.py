"""The DPO run's settings, kept apart from train.py so that they can be tested without
torch: which checkpoint belongs to which run, and refusing to resume a different run."""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class TrainConfig:
    beta: float = 0.1
    rank: int = 8
    alpha: float = 16.0
    lr: float = 5e-4
    epochs: int = 2
    batch_pairs: int = 4
    seed: int = 0

    def fingerprint(self) -> str:
        """Short digest of every setting that changes the trained weights."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def parse_args(argv: list[str] | None, default_out: Path) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="DPO-train the conciseness LoRA and export it as a llama.cpp LoRA GGUF."
    )
    defaults = TrainConfig()
    parser.add_argument(
        "--beta",
        type=float,
        default=defaults.beta,
        help="DPO KL strength (the shipped adapter uses 0.1)",
    )
    parser.add_argument("--rank", type=int, default=defaults.rank)
    parser.add_argument("--alpha", type=float, default=defaults.alpha)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-pairs", type=int, default=defaults.batch_pairs)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--data", type=Path, default=HERE / "data")
    parser.add_argument(
        "--out",
        type=Path,
        default=default_out,
        help="where to write the adapter GGUF (its .sha256 and checkpoint go next to it)",
    )
    args = parser.parse_args(argv)
    if not args.beta > 0:
        parser.error(f"--beta must be positive, got {args.beta}")
    if args.out.suffix != ".gguf":
        parser.error(f"--out must name a .gguf file, got {args.out}")
    args.config = TrainConfig(
        beta=args.beta,
        rank=args.rank,
        alpha=args.alpha,
        lr=args.lr,
        epochs=args.epochs,
        batch_pairs=args.batch_pairs,
        seed=args.seed,
    )
    return args


def checkpoint_path(out: Path) -> Path:
    """One checkpoint per output file, so runs at different betas never share one."""
    return out.parent / (out.name + ".checkpoint.pt")


def check_resumable(saved_fingerprint: str | None, config: TrainConfig, path: Path) -> None:
    """Resuming a checkpoint written with other settings would silently mix two runs."""
    if saved_fingerprint != config.fingerprint():
        raise SystemExit(
            f"error: {path} was written by a run with other settings; "
            "delete it to start over, or rerun with the settings it was made with"
        )
