"""Study part 3 (issue 35): the report of the exact draws (exact_draws.py), by the rule
pre-registered in README.md (part 3), beside part 1's importance-sampling estimates.

    python experiments/lam_meaning/exact_report.py --lam 0.75

Writes results/exact-lam<lam>.md and .json. Per prompt: Z from the attempt counts
(inverse binomial sampling: r answers after N attempts, Z = (r - 1) / (N - 1),
unbiased), the target's words and KL to the reference from its exact draws, the reverse
KL(DeRa_lam' || Pi_lam) from part 1's stored DeRa answers (no weights), and the forward
KL(Pi_lam || DeRa_lam') from the exact draws; then means over prompts with 95%
bootstrap intervals over prompts (weights.bootstrap).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from exact_draws import GRID, exact_file
from stages import HERE, PROPOSALS, read_rows
from weights import argmin_parabola, bootstrap

MIN_DRAWS = 5  # per prompt, for a target to be measurable (the pre-registered rule)
# Part 1's importance-sampling estimates (results/importance-24-seeds.json), for the table.
PART1 = {0.75: {"words": 11.3, "kl": 12.9}, 0.5: {"words": 10.7, "kl": 9.1}}


def per_prompt(lam: float, exact_rows: list[dict], dera_runs: list[dict]) -> dict:
    """[prompts, ...] arrays of every per-prompt number the report averages."""
    grid = np.asarray(GRID)
    assert list(GRID) == list(PROPOSALS), "the teacher-forced grid is part 1's proposals"
    by_prompt: dict[int, list[dict]] = {}
    for row in exact_rows:
        by_prompt.setdefault(row["prompt"], []).append(row)
    dera: dict[int, list[dict]] = {}
    for run in dera_runs:
        dera.setdefault(run["prompt"], []).extend(run["answers"])
    one, zero = list(GRID).index(1.0), list(GRID).index(0.0)
    out = {k: [] for k in ("n", "z", "log_z", "words", "kl_ref", "reverse", "forward",
                           "q_words", "q_kl", "cap_share", "attempts", "tokens")}  # fmt: skip
    prompts = sorted(by_prompt)
    for p in prompts:
        rows = by_prompt[p]
        r, n_attempts = len(rows), sum(row["attempts"] for row in rows)
        z = (r - 1) / (n_attempts - 1) if n_attempts > 1 else 1.0
        log_z = np.log(z) if z > 0 else -np.inf
        g = np.array([row["grid"] for row in rows])  # [draws, proposals]
        a, ref = g[:, one], g[:, zero]
        target = lam * a + (1 - lam) * ref
        out["n"].append(r)
        out["z"].append(z)
        out["log_z"].append(log_z)
        out["words"].append(np.mean([row["words"] for row in rows]))
        out["kl_ref"].append(np.mean(lam * (a - ref)) - log_z)
        out["forward"].append(np.mean(target[:, None] - g, axis=0) - log_z)
        out["cap_share"].append(np.mean([row["finish_reason"] == "length" for row in rows]))
        out["attempts"].append(n_attempts / r)
        out["tokens"].append(np.mean([row["tokens_spent"] for row in rows]))
        reverse, q_words, q_kl = [], [], []
        for lam_q in grid:
            mine = [x for x in dera.get(p, []) if x["lam"] == lam_q]
            A = np.array([x["sampled"][0] for x in mine])
            R = np.array([x["sampled"][1] for x in mine])
            M = np.array([x["sampled"][2] for x in mine])
            reverse.append(log_z - np.mean(lam * A + (1 - lam) * R - M))
            q_words.append(np.mean([x["words"] for x in mine]))
            q_kl.append(np.mean(M - R))
        out["reverse"].append(reverse)
        out["q_words"].append(q_words)
        out["q_kl"].append(q_kl)
    return {"prompts": prompts, **{k: np.asarray(v, np.float64) for k, v in out.items()}}


def analyse(lam: float, tables: dict) -> dict:
    grid = np.asarray(GRID)
    at = list(GRID).index(lam)
    mean = lambda key: bootstrap(tables[key], lambda m: float(m))  # noqa: E731
    reverse_cal = bootstrap(tables["reverse"], lambda m: argmin_parabola(grid, m))
    forward_cal = bootstrap(tables["forward"], lambda m: argmin_parabola(grid, m))
    ratios = {
        "calibration": bootstrap(tables["reverse"], lambda m: argmin_parabola(grid, m) / lam),
        "words": bootstrap(
            np.stack([tables["q_words"][:, at], tables["words"]], 1), lambda m: m[0] / m[1]
        ),
        "kl_to_reference": bootstrap(
            np.stack([tables["q_kl"][:, at], tables["kl_ref"]], 1), lambda m: m[0] / m[1]
        ),
    }
    measurable = bool(tables["n"].min() >= MIN_DRAWS)
    return {
        "lam": lam,
        "prompts": len(tables["prompts"]),
        "draws": int(tables["n"].sum()),
        "draws_per_prompt_min": int(tables["n"].min()),
        "measurable": measurable,
        "log_z": mean("log_z"),
        "z": mean("z"),
        "words": mean("words"),
        "kl_to_reference": mean("kl_ref"),
        "cap_share": mean("cap_share"),
        "attempts_per_answer": mean("attempts"),
        "tokens_per_answer": mean("tokens"),
        "reverse_kl": [
            bootstrap(tables["reverse"][:, j : j + 1], lambda m: float(m[0]))
            for j in range(len(grid))
        ],  # fmt: skip
        "forward_kl": [
            bootstrap(tables["forward"][:, j : j + 1], lambda m: float(m[0]))
            for j in range(len(grid))
        ],  # fmt: skip
        "reverse_calibration": reverse_cal,
        "forward_calibration": forward_cal,
        "ratios": ratios,
        "verdict": judge(ratios, measurable),
    }


def judge(ratios: dict, measurable: bool) -> str:
    if not measurable:
        return "not measurable (a prompt has fewer than 5 exact draws)"
    inside = [low >= 0.9 and high <= 1.1 for _, low, high in ratios.values()]
    outside = [high < 0.9 or low > 1.1 for _, low, high in ratios.values()]
    if any(outside):
        return "fails"
    return "holds within 10%" if all(inside) else "undecided"


def _ci(value, digits: int = 2) -> str:
    point, low, high = value
    return f"{point:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def markdown(result: dict) -> str:
    lam = result["lam"]
    part1 = PART1.get(lam, {})
    lines = [
        f"# Exact draws of Pi_{lam:g} on the built-in pair (study part 3, issue 35)",
        "",
        f"{result['draws']} exact answers over {result['prompts']} prompts (at least "
        f"{result['draws_per_prompt_min']} per prompt); 95% bootstrap intervals over prompts.",
        "",
        "| quantity | exact draws | part 1 (importance sampling) |",
        "|---|---|---|",
        f"| target's words | {_ci(result['words'], 1)} | {part1.get('words', '-')} |",
        f"| KL(Pi ‖ pi_ref), nats | {_ci(result['kl_to_reference'], 1)} | {part1.get('kl', '-')} |",
        f"| log Z | {_ci(result['log_z'])} | |",
        f"| share of answers at the 96-token cap | {_ci(result['cap_share'])} | |",
        f"| attempts per answer | {_ci(result['attempts_per_answer'], 1)} | |",
        f"| sequence-tokens per answer (8 at once) | {_ci(result['tokens_per_answer'], 0)} | |",
        "",
        "| DeRa lam' | KL(DeRa_lam' ‖ Pi), nats (reverse) | KL(Pi ‖ DeRa_lam'), nats (forward) |",
        "|---|---|---|",
    ]
    for lam_q, rev, fwd in zip(GRID, result["reverse_kl"], result["forward_kl"], strict=True):
        lines.append(f"| {lam_q:g} | {_ci(rev, 1)} | {_ci(fwd, 1)} |")
    ratios = result["ratios"]
    lines += [
        "",
        f"Calibration lam'* (closest DeRa lam): reverse {_ci(result['reverse_calibration'])}, "
        f"forward {_ci(result['forward_calibration'])}.",
        "",
        f"Verdict ratios: lam'*/lam {_ci(ratios['calibration'])}, DeRa's words over the "
        f"target's {_ci(ratios['words'])}, DeRa's KL to the reference over the target's "
        f"{_ci(ratios['kl_to_reference'])}.",
        "",
        f"**Verdict, by the pre-registered rule: {result['verdict']}.**",
    ]
    return "\n".join(lines) + "\n"


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lam", type=float, required=True)
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    exact_rows = read_rows(exact_file(args.results, args.lam))
    if not exact_rows:
        raise SystemExit(f"no exact draws at lam {args.lam:g}: run exact_draws.py first")
    dera_runs = read_rows(args.results / "importance-samples.jsonl")
    dera_runs = [run for run in dera_runs if run["seed"] < 24]
    result = analyse(args.lam, per_prompt(args.lam, exact_rows, dera_runs))
    # Not Path.with_suffix: it would take ".75" of "exact-lam0.75" for a suffix.
    stem = f"exact-lam{args.lam:g}"
    (args.results / f"{stem}.json").write_text(json.dumps(_plain(result), indent=1) + "\n")
    (args.results / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
