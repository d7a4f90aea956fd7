"""Study part 3 (issue 35): does the target Pi_lam exist for lam > 1 without a length cap?

    python experiments/lam_meaning/cap_test.py --seeds 8     # sample (resumable), report

For lam > 1 every token's z(s) = sum_v pi_ref(v|s)^(1-lam) pi_1(v|s)^lam is >= 1
(Hoelder), so exact draws by killing attempts are impossible, and the target rewards
disagreement between the models: the longer an answer, the more weight it can gather.
Whether `Z_lam = sum_y pi_ref(y)^(1-lam) pi_1(y)^lam` is finite without a cap cannot be
decided by sampling; what sampling can show is how the capped target behaves as the cap
grows. For each lam of LAMS, DeRa_lam's answers to the 20 held-out prompts are drawn
once at the largest cap (384 tokens); cut at a smaller cap c, a draw is exactly a draw
of DeRa_lam capped at c, and its importance weight to the capped target is
exp(W_c), W_c the sum of its first c mismatch terms (log z at each prefix; the end
token's term only if it came before the cap). So per prompt and cap:
  log Z_c         = log mean exp(W_c)  (Z_c = E_DeRa[exp(W_c)], an unbiased estimate)
  mass at the cap = the share of sum exp(W_c) on answers cut at c (the target's own
                    share of answers that did not end by themselves)
  DeRa at the cap = the share of DeRa's answers cut at c
with ESS and the Pareto k-hat of the weights (weights.py), and 95% bootstrap intervals
over prompts. The reading rule is in README.md (part 3, the cap test), written before
the run. Rows: results/cap-samples.jsonl (one line per prompt and seed); report:
results/cap-test.md and .json.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import numpy as np
from provenance import provenance
from stages import PURE_SAMPLING, held_out_prompts, load_pair, log, read_rows, seed_of
from weights import bootstrap, effective_sample_size, logmeanexp, pareto_k_hat

HERE = Path(__file__).resolve().parent
LAMS = (1.25, 1.5, 2.0)
CAPS = (96, 192, 384)
BASE_SEED = 4026  # fresh draws: not the importance study's 2026 nor the exact draws' 3026
MIN_DRAWS = 8  # per prompt and lam, for any reading but "undecided"


def sample(prompts: list[str], seeds: int, folder: Path) -> None:
    import dera_local
    from dera_local.analysis.sweep import LambdaSweep

    path = folder / "cap-samples.jsonl"
    done = {(r["prompt"], r["seed"]) for r in read_rows(path)}
    todo = [(p, s) for s in range(seeds) for p in range(len(prompts)) if (p, s) not in done]
    if not todo:
        return
    with (folder / "cap-provenance.jsonl").open("a") as out:
        out.write(json.dumps({"stage": "cap sample", **provenance()}) + "\n")
    log(f"sampling {len(todo)} (prompt, seed) runs at lam {list(LAMS)}, cap {max(CAPS)}")
    started = time.time()
    with (
        load_pair() as pair,
        LambdaSweep(pair, LAMS, max_tokens=max(CAPS), step_mismatch=True) as runner,
        path.open("a") as out,
    ):
        for n, (p, s) in enumerate(todo, 1):
            session = dera_local.ChatSession(pair)
            session.messages = [{"role": "user", "content": prompts[p]}]
            sampling = dera_local.SamplingParams(**PURE_SAMPLING, seed=seed_of(p, s, BASE_SEED))
            rows = runner.run(session.prompt_tokens(), sampling=sampling)
            record = {
                "prompt": p,
                "seed": s,
                "answers": [
                    {
                        "lam": row.lam,
                        "n_tokens": len(row.tokens),
                        "ended": row.end_token is not None,
                        "steps": row.mismatch_steps,
                    }
                    for row in rows
                ],
            }
            out.write(json.dumps(record) + "\n")
            out.flush()
            elapsed = time.time() - started
            lengths = [len(row.tokens) for row in rows]
            log(f"  {n}/{len(todo)}: lengths {lengths}; {elapsed:.0f}s, "
                f"~{elapsed / n * (len(todo) - n):.0f}s left")  # fmt: skip


def capped(answer: dict, cap: int) -> tuple[float, bool]:
    """(W_c, cut at c) for one draw made at the largest cap."""
    steps = answer["steps"]
    if answer["n_tokens"] >= cap:
        return float(sum(steps[:cap])), True
    return float(sum(steps)), False  # ended before the cap: its end token's term included


def per_prompt(rows: list[dict], lam: float, cap: int) -> np.ndarray:
    """[prompts, 6]: log Z, mass at the cap, DeRa's share at the cap, ESS, k-hat, draws."""
    by_prompt: dict[int, list[tuple[float, bool]]] = {}
    for row in rows:
        answer = next(a for a in row["answers"] if a["lam"] == lam)
        by_prompt.setdefault(row["prompt"], []).append(capped(answer, cap))
    table = []
    for draws in (by_prompt[p] for p in sorted(by_prompt)):
        w = np.array([d[0] for d in draws])
        cut = np.array([d[1] for d in draws])
        share = np.exp(w - w.max())
        table.append([
            float(logmeanexp(w)),
            float(share[cut].sum() / share.sum()),
            float(cut.mean()),
            effective_sample_size(w),
            pareto_k_hat(w),
            len(w),
        ])  # fmt: skip
    return np.array(table)


def analyse(rows: list[dict]) -> dict:
    result = {"prompts": len({r["prompt"] for r in rows}), "draws": len(rows), "lams": {}}
    for lam in LAMS:
        entries = {}
        for cap in CAPS:
            table = per_prompt(rows, lam, cap)
            names = ("log_z", "mass_at_cap", "dera_at_cap")
            entry = {
                name: bootstrap(table[:, i], lambda x: float(x)) for i, name in enumerate(names)
            }
            entry["median_ess"] = float(np.median(table[:, 3]))
            # k-hat needs 5 tail draws (25 per prompt): with fewer, NaN for every prompt
            k_hats = table[:, 4][np.isfinite(table[:, 4])]
            entry["median_k_hat"] = float(np.median(k_hats)) if len(k_hats) else float("nan")
            entries[cap] = entry
        # how log Z grows from the smallest to the largest cap, per prompt
        growth = per_prompt(rows, lam, CAPS[-1])[:, 0] - per_prompt(rows, lam, CAPS[0])[:, 0]
        result["lams"][lam] = {
            "caps": entries,
            "log_z_growth": bootstrap(growth, lambda x: float(x)),
            "reading": reading(entries, bootstrap(growth, lambda x: float(x)), fewest_draws(rows)),
        }
    return result


def fewest_draws(rows: list[dict]) -> int:
    counts: dict[int, int] = {}
    for row in rows:
        counts[row["prompt"]] = counts.get(row["prompt"], 0) + 1
    return min(counts.values())


def reading(entries: dict, growth: tuple, draws: int) -> str:
    """The rule written in README.md before the run (intervals: 95% over prompts)."""
    largest = entries[CAPS[-1]]
    if draws < MIN_DRAWS:
        return "undecided (too few draws)"
    if growth[1] > 0 and largest["mass_at_cap"][1] >= 0.5:
        return "no cap-free target in sight"
    if growth[2] < 0.1 and largest["mass_at_cap"][2] < 0.1 and largest["median_k_hat"] <= 0.7:
        return "converges"
    return "undecided"


def _ci(value: tuple, digits: int = 2) -> str:
    point, low, high = value
    return f"{point:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def markdown(result: dict) -> str:
    lines = [
        "# The cap test: Pi_lam for lam > 1 as the length cap grows (study part 3, issue 35)",
        "",
        f"{result['draws']} DeRa draws per lam over {result['prompts']} prompts, each made at "
        f"the {CAPS[-1]}-token cap and cut at the smaller caps; 95% bootstrap intervals over "
        "prompts. Mass at the cap: the capped target's share on answers cut there.",
        "",
        "| lam | cap | log Z_cap | target's mass at the cap | DeRa's answers at the cap "
        "| median ESS | median k-hat |",
        "|---|---|---|---|---|---|---|",
    ]
    for lam, data in result["lams"].items():
        for cap, entry in data["caps"].items():
            lines.append(
                f"| {lam:g} | {cap} | {_ci(entry['log_z'])} | {_ci(entry['mass_at_cap'])} "
                f"| {_ci(entry['dera_at_cap'])} | {entry['median_ess']:.1f} "
                f"| {entry['median_k_hat']:.2f} |"
            )
    lines += [
        "",
        "| lam | log Z growth, cap 96 to 384 | reading (README's rule) |",
        "|---|---|---|",
    ]
    for lam, data in result["lams"].items():
        lines.append(f"| {lam:g} | {_ci(data['log_z_growth'])} | {data['reading']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=8, help="draws per prompt and lam")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped; rerun to resume"))
    args.results.mkdir(parents=True, exist_ok=True)
    try:
        if not args.report_only:
            sample(held_out_prompts(args.prompts), args.seeds, args.results)
    except KeyboardInterrupt:
        sys.exit("stopped; rerun to resume")
    rows = read_rows(args.results / "cap-samples.jsonl")
    if not rows:
        raise SystemExit("no draws yet: run without --report-only first")
    result = analyse(rows)
    (args.results / "cap-test.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.results / "cap-test.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
