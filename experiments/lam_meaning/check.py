"""`importance.py --check`: sample a small fresh slice (4 prompts x 6 seeds that no
stored run used, ~5 min on 2 cores) and say whether its statistics agree with the stored
run's. The slice is kept (results/check-samples.jsonl, appended as it is sampled, so an
interrupted check resumes; its provenance in check-provenance.jsonl) and the comparison
is written to results/check.md: a check anyone can read, and rerun on their machine
with `--results` pointing elsewhere.

Samples at temperature 1 do not reproduce across CPUs (llama.cpp's kernels round
differently per ISA and batch shape), so the check compares statistics, not answers:
per proposal lam', the mean words and the one-sample KL to the reference; per target
lam, the mean mismatch W = lam A + (1 - lam) R - M over DeRa_lam's answers (which
importance sampling rests on). Only unbiased means are compared (log Z and the
self-normalised estimates are biased by the number of draws, which differs). Each is
compared with the stored run on the same prompts by Welch's t test (variances pooled
within prompts). The 26 statistics are strongly correlated (one seed drives every lam of
a run), so they are judged together by Bonferroni: each at two-sided level 0.05 / 26,
and the slice reproduces the run if none disagrees (at most a 5% false alarm rate, for
any correlation between them).
"""

from __future__ import annotations

import math

import numpy as np
from provenance import provenance
from stages import TARGETS, log, read_rows, record_provenance, result_files, sample

SLICE_PROMPTS = 4
SLICE_SEEDS = 6
FRESH_SEED_OFFSET = 7777  # no stored run uses these seeds
FAMILY_LEVEL = 0.05


def normal_quantile(p: float) -> float:
    """Inverse of the standard normal CDF by bisection on erf (no scipy needed)."""
    low, high = -10.0, 10.0
    for _ in range(100):
        mid = (low + high) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def t_quantile(p: float, dof: float) -> float:
    """Student's t quantile by the Cornish-Fisher expansion in 1/dof (within 1% from 10
    degrees of freedom, the least a slice has)."""
    z = normal_quantile(p)
    return (
        z
        + (z**3 + z) / (4 * dof)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * dof**3)
    )


def statistics_of(runs: list[dict]) -> dict[str, tuple[float, float, float]]:
    """name -> (mean over prompts of the per-prompt mean, its standard error from the
    variance pooled within prompts, that variance's degrees of freedom)."""
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
        groups = [np.asarray(v, np.float64) for v in by_prompt.values()]
        dof = sum(len(g) - 1 for g in groups)
        pooled = sum(((g - g.mean()) ** 2).sum() for g in groups) / dof if dof else math.nan
        se = math.sqrt(pooled * sum(1 / len(g) for g in groups)) / len(groups)
        out[name] = (float(np.mean([g.mean() for g in groups])), se, float(dof))
    return out


def compare(stored: dict, fresh: dict) -> list[tuple[str, float, float, float, bool]]:
    """(name, stored, fresh, allowed difference, agrees) per statistic both have: Welch's
    t test at the Bonferroni level for all of them."""
    names = [name for name in stored if name in fresh]
    level = FAMILY_LEVEL / max(len(names), 1)
    rows = []
    for name in names:
        (mean, se, dof), (other, other_se, other_dof) = stored[name], fresh[name]
        combined = math.hypot(se, other_se)
        if combined == 0:  # e.g. KL at lam 0, exactly 0 on both sides
            rows.append((name, mean, other, 0.0, other == mean))
            continue
        welch = combined**4 / (se**4 / dof + other_se**4 / other_dof)
        allowed = t_quantile(1 - level / 2, welch) * combined
        rows.append((name, mean, other, allowed, abs(other - mean) <= allowed))
    return rows


def check(args, files: dict, prompts: list[str]) -> int:
    stored_runs = read_rows(files["samples"])
    if not stored_runs:
        log("error: no stored samples to check against; run the sample stage first")
        return 2
    chosen = sorted({r["prompt"] for r in stored_runs})[:: max(1, len(prompts) // SLICE_PROMPTS)]
    chosen = chosen[:SLICE_PROMPTS]
    fresh_files = result_files(args.results, "check")
    record_provenance(fresh_files, "check")
    sample(fresh_files, prompts, range(SLICE_SEEDS), args.seed + FRESH_SEED_OFFSET, only=chosen)
    fresh_runs = [r for r in read_rows(fresh_files["samples"]) if r["prompt"] in chosen]
    stored = statistics_of([r for r in stored_runs if r["prompt"] in chosen])
    rows = compare(stored, statistics_of(fresh_runs))
    disagree = [row for row in rows if not row[4]]
    verdict = not disagree
    outcome = "reproduce here." if verdict else "do NOT reproduce here."
    where = provenance()["machine"]
    lines = [
        "# `importance.py --check`: a fresh slice against the stored run",
        "",
        f"Fresh slice: prompts {chosen}, {SLICE_SEEDS} new seeds each (base "
        f"{args.seed + FRESH_SEED_OFFSET}, results/check-samples.jsonl); stored run on the "
        "same prompts. Welch's t test per statistic at the Bonferroni level "
        f"{FAMILY_LEVEL:g} / {len(rows)}.",
        "",
        "| statistic | stored | fresh | allowed difference | agrees |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {mean:.2f} | {other:.2f} | {allowed:.2f} | {'yes' if agrees else 'NO'} |"
            for name, mean, other, allowed, agrees in rows
        ),
        "",
        f"**{len(rows) - len(disagree)}/{len(rows)} statistics agree: the stored results "
        f"{outcome}** ({where})",
    ]
    report = "\n".join(lines) + "\n"
    (args.results / "check.md").write_text(report)
    print(report, end="")
    return 0 if verdict else 1
