"""Summaries of a sweep: mean reward and mean KL(pi_lam || pi_ref) per lam, as rows, CSV
and the reward-vs-KL picture of the DeRa paper (matplotlib, from the `plot` extra)."""

from __future__ import annotations

import csv
import statistics
from collections.abc import Sequence
from pathlib import Path

from .errors import DeraError
from .sweep import SweepRow


def summarize(rows: Sequence[SweepRow]) -> list[dict]:
    """One dict per lam (in first-seen order): n, mean words, mean KL, mean reward."""
    by_lam: dict[float, list[SweepRow]] = {}
    for row in rows:
        by_lam.setdefault(row.lam, []).append(row)
    summary = []
    for lam, mine in by_lam.items():
        rewards = [r.reward for r in mine if r.reward is not None]
        summary.append(
            {
                "lam": lam,
                "n": len(mine),
                "mean_kl_to_reference": statistics.fmean(r.kl_to_reference for r in mine),
                "mean_tokens": statistics.fmean(len(r.tokens) for r in mine),
                "mean_reward": statistics.fmean(rewards) if rewards else None,
            }
        )
    return summary


def write_csv(summary: list[dict], path: str | Path) -> None:
    try:
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(summary[0]))
            writer.writeheader()
            writer.writerows(summary)
    except OSError as exc:
        raise DeraError(f"cannot write {path}: {exc.strerror}") from None


def plot(summary: list[dict], path: str | Path) -> None:
    """Mean reward against mean KL(pi_lam || pi_ref), one labelled point per lam."""
    if any(s["mean_reward"] is None for s in summary):
        raise DeraError("--plot needs --reward: the picture is reward against KL")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DeraError("--plot needs matplotlib: pip install 'dera-local[plot]'") from None
    figure, axes = plt.subplots(figsize=(5, 4))
    xs = [s["mean_kl_to_reference"] for s in summary]
    ys = [s["mean_reward"] for s in summary]
    axes.plot(xs, ys, "o-")
    for s, x, y in zip(summary, xs, ys, strict=True):
        axes.annotate(f"λ={s['lam']:g}", (x, y), textcoords="offset points", xytext=(5, 5))
    axes.set_xlabel("KL(π_λ ‖ π_ref) per answer (nats)")
    axes.set_ylabel("mean reward")
    axes.set_title("DeRa: reward vs KL across λ")
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=120)
    except OSError as exc:
        raise DeraError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        plt.close(figure)
