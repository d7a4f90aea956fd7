"""`importance.py --check`: sample a small fresh slice (4 prompts x 4 seeds that no
stored run used, ~3 min on 2 cores) and say whether its statistics agree with the stored run's.

Samples at temperature 1 do not reproduce across CPUs (llama.cpp's kernels round
differently per ISA and batch shape), so the check compares statistics, not answers:
per proposal lam', the mean words and the one-sample KL to the reference; per target
lam, the mean mismatch W = lam A + (1 - lam) R - M over DeRa_lam's answers (which
importance sampling rests on). Only unbiased means are compared (log Z and the
self-normalised estimates are biased by the number of draws, which differs). Each is
compared with the stored run on the same prompts: it agrees if the difference is inside
the 99% interval of a difference of two independent means (2.58 combined standard
errors, each stratified by prompt). The slice reproduces the run if at most one of its
26 statistics disagrees (two false alarms at 1% each happen about 3% of the time).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
from importance import TARGETS, log, read_rows, result_files, sample

SLICE_PROMPTS = 4
SLICE_SEEDS = 4
FRESH_SEED_OFFSET = 7777  # no stored run uses these seeds
Z_99 = 2.576


def statistics_of(runs: list[dict]) -> dict[str, tuple[float, float]]:
    """name -> (mean over prompts of the per-prompt mean, its standard error)."""
    values: dict[str, dict[int, list[float]]] = {}

    def add(name: str, prompt: int, value: float) -> None:
        values.setdefault(name, {}).setdefault(prompt, []).append(value)

    for run in runs:
        for answer in run["answers"]:
            lam = answer["lam"]
            aligned, reference, mixture = answer["sampled"]
            add(f"words at lam' {lam:g}", run["prompt"], answer["words"])
            add(f"KL to ref at lam' {lam:g}", run["prompt"], mixture - reference)
            if lam in TARGETS:
                w = lam * aligned + (1 - lam) * reference - mixture
                add(f"mean mismatch at lam {lam:g}", run["prompt"], w)
    out = {}
    for name, by_prompt in values.items():
        means = [float(np.mean(v)) for v in by_prompt.values()]
        variances = [
            float(np.var(v, ddof=1)) / len(v) if len(v) > 1 else math.nan
            for v in by_prompt.values()
        ]
        out[name] = (float(np.mean(means)), math.sqrt(sum(variances)) / len(means))
    return out


def compare(stored: dict, fresh: dict) -> list[tuple[str, float, float, float, bool]]:
    """(name, stored, fresh, allowed difference, agrees) per statistic both have."""
    rows = []
    for name, (mean, se) in stored.items():
        if name not in fresh:
            continue
        other, other_se = fresh[name]
        allowed = Z_99 * math.hypot(se, other_se)
        rows.append((name, mean, other, allowed, abs(other - mean) <= allowed))
    return rows


def check(args, files: dict, prompts: list[str]) -> int:
    stored_runs = read_rows(files["samples"])
    if not stored_runs:
        log("error: no stored samples to check against; run the sample stage first")
        return 2
    chosen = sorted({r["prompt"] for r in stored_runs})[:: max(1, len(prompts) // SLICE_PROMPTS)]
    chosen = chosen[:SLICE_PROMPTS]
    with tempfile.TemporaryDirectory(prefix="dera-check-") as folder:
        fresh_files = result_files(Path(folder), "check")
        sample(fresh_files, prompts, range(SLICE_SEEDS), args.seed + FRESH_SEED_OFFSET, only=chosen)
        fresh_runs = read_rows(fresh_files["samples"])
    stored = statistics_of([r for r in stored_runs if r["prompt"] in chosen])
    rows = compare(stored, statistics_of(fresh_runs))
    disagree = [row for row in rows if not row[4]]
    print(
        f"Fresh slice: prompts {chosen}, {SLICE_SEEDS} new seeds each; "
        "stored run on the same prompts."
    )
    print(f"{'statistic':32} {'stored':>9} {'fresh':>9} {'allowed':>9}")
    for name, mean, other, allowed, agrees in rows:
        mark = "" if agrees else "   <- outside"
        print(f"{name:32} {mean:9.2f} {other:9.2f} {allowed:9.2f}{mark}")
    verdict = len(disagree) <= 1
    outcome = "reproduce here." if verdict else "do NOT reproduce here."
    print(f"{len(rows) - len(disagree)}/{len(rows)} statistics agree: the stored results {outcome}")
    return 0 if verdict else 1
