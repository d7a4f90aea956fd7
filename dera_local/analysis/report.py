"""Summaries of a sweep: mean reward and mean KL(pi_lam || pi_ref) per lam, as rows, CSV
and the reward-vs-KL picture of the DeRa paper (matplotlib, from the `plot` extra)."""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from ..errors import BadParameterError, DeraError
from .sweep import SweepRow


def standard_error(values: Sequence[float]) -> float | None:
    """Standard error of the mean (sample standard deviation / sqrt(n)); None for n < 2."""
    if len(values) < 2:
        return None
    return statistics.stdev(values) / math.sqrt(len(values))


def summarize(rows: Sequence[SweepRow]) -> list[dict]:
    """One dict per lam (per (lam, cfg_scale) in a sweep over CFG scales; in first-seen
    order): n, mean tokens, mean KL and mean reward, each mean with its standard error."""
    by_point: dict[tuple[float, float | None], list[SweepRow]] = {}
    for row in rows:
        by_point.setdefault((row.lam, row.cfg_scale), []).append(row)
    guided = any(scale is not None for _, scale in by_point)
    summary = []
    for (lam, scale), mine in by_point.items():
        kls = [r.kl_to_reference for r in mine]
        rewards = [r.reward for r in mine if r.reward is not None]
        summary.append(
            {
                "lam": lam,
                **({"cfg_scale": scale} if guided else {}),
                "n": len(mine),
                "mean_kl_to_reference": statistics.fmean(kls),
                "se_kl_to_reference": standard_error(kls),
                "mean_tokens": statistics.fmean(len(r.tokens) for r in mine),
                "mean_reward": statistics.fmean(rewards) if rewards else None,
                "se_reward": standard_error(rewards),
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


def plot(
    summary: list[dict],
    path: str | Path,
    *,
    markers: Sequence[dict] = (),
    title: str = "DeRa: reward vs KL across λ",
) -> None:
    """Mean reward against mean KL(pi_lam || pi_ref), one labelled point per lam, with
    standard-error bars on both axes; labels are placed so they do not overlap.

    markers: other policies drawn as separate points (e.g. models retrained at another
    KL strength), each a dict with "label" and the same mean/se keys as a summary row.
    """
    if any(s["mean_reward"] is None for s in summary):
        raise BadParameterError(
            "the plot is reward against KL: the rows need rewards (a reward function)",
            cli_hint="give --reward",
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DeraError("plotting needs matplotlib: pip install 'dera-local[plot]'") from None
    figure, axes = plt.subplots(figsize=(5.5, 4.5))
    xs = [s["mean_kl_to_reference"] for s in summary]
    ys = [s["mean_reward"] for s in summary]
    axes.errorbar(
        xs,
        ys,
        xerr=[s["se_kl_to_reference"] or 0.0 for s in summary],
        yerr=[s["se_reward"] or 0.0 for s in summary],
        fmt="o-",
        capsize=3,
        label="DeRa λ grid",
    )
    for marker in markers:
        axes.errorbar(
            [marker["mean_kl_to_reference"]],
            [marker["mean_reward"]],
            xerr=[marker.get("se_kl_to_reference") or 0.0],
            yerr=[marker.get("se_reward") or 0.0],
            fmt="s",
            markersize=7,
            capsize=3,
            label=marker["label"],
        )
    axes.set_xlabel("KL(π_λ ‖ π_ref) per answer (nats), mean ± s.e.")
    axes.set_ylabel("mean reward ± s.e.")
    axes.set_title(title)
    if markers:
        axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    place_labels(axes, [_point_label(s) for s in summary], xs, ys)
    try:
        figure.savefig(path, dpi=120)
    except OSError as exc:
        raise DeraError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        plt.close(figure)


def _point_label(entry: dict) -> str:
    scale = entry.get("cfg_scale")
    return f"λ={entry['lam']:g}" + ("" if scale is None else f" s={scale:g}")


# Where a label may sit relative to its point, in points, tried in this order.
_LABEL_OFFSETS = [(6, 6), (6, -14), (-40, 6), (-40, -14), (6, 18), (-40, 18), (6, -26)]


def place_labels(axes, labels: Sequence[str], xs: Sequence[float], ys: Sequence[float]) -> list:
    """Annotates each point, trying offsets until its label's box overlaps no label
    placed before it (the last offset is kept if none is free). Returns the texts."""
    axes.figure.canvas.draw()  # fixes the axes limits; text extents are only known after
    renderer = axes.figure.canvas.get_renderer()
    placed: list = []
    texts = []
    for label, x, y in zip(labels, xs, ys, strict=True):
        for offset in _LABEL_OFFSETS:
            text = axes.annotate(label, (x, y), textcoords="offset points", xytext=offset)
            box = text.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed) or offset == _LABEL_OFFSETS[-1]:
                break
            text.remove()
        placed.append(box)
        texts.append(text)
    return texts
