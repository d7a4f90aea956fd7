"""Part 1's report: the importance-sampling estimates with bootstrap intervals over
prompts, the calibration lam'*(lam), and the verdict by the rule in README.md."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
from provenance import provenance
from stages import PROPOSALS, ROOT, TARGETS, read_rows
from weights import PromptDraws, argmin_parabola, bootstrap, crossing, estimate, proposal_means

# The built-in pair's model-card metadata, bundled with the package (dera-local info).
CALIBRATION_CARD = ROOT / "models" / "smollm2-concise-dpo" / "lam-calibration.json"
USEFUL_RANGE = (0.0, 1.5)  # the model card's: from lam 2 on, answers are short but often broken
MIN_POOLED_ESS = 10  # the verdict rule's "measurable" threshold (of 132 answers a prompt)
BAND = (0.9, 1.1)  # "within 10%"
KNOWN_TARGETS = (0.0, 1.0)  # the reference and the aligned model: the estimator's check
FINE_TARGETS = np.round(np.arange(0.1, 3.001, 0.05), 2)  # for effective lams


def prompt_draws(runs: list[dict]) -> dict[int, PromptDraws]:
    """The sampled answers grouped by prompt, as weights.PromptDraws (value = words)."""
    grouped: dict[int, list[dict]] = {}
    for run in runs:
        grouped.setdefault(run["prompt"], []).extend(run["answers"])
    draws = {}
    for prompt, answers in sorted(grouped.items()):
        draws[prompt] = PromptDraws(
            aligned=np.array([a["sampled"][0] for a in answers]),
            reference=np.array([a["sampled"][1] for a in answers]),
            proposals=np.array([a["grid"] for a in answers]),
            source=np.array([PROPOSALS.index(a["lam"]) for a in answers]),
            value=np.array([a["words"] for a in answers], dtype=np.float64),
        )
    return draws


def per_prompt_tables(draws: dict[int, PromptDraws], targets) -> dict[str, np.ndarray]:
    """Every per-prompt number the report averages, as arrays [prompts, ...]."""
    rows = {
        key: []
        for key in (
            "log_z",
            "pi_words",
            "pi_kl",
            "ess",
            "k_hat",
            "kl_from",
            "ess_of",
            "q_words",
            "q_kl",
        )  # fmt: skip
    }
    for one in draws.values():
        estimates = [estimate(one, lam) for lam in targets]
        rows["log_z"].append([e.log_z for e in estimates])
        rows["pi_words"].append([e.words for e in estimates])
        rows["pi_kl"].append([e.kl_to_reference for e in estimates])
        rows["ess"].append([e.ess for e in estimates])
        rows["k_hat"].append([e.k_hat for e in estimates])
        rows["kl_from"].append([e.kl_from_proposal for e in estimates])
        rows["ess_of"].append([e.ess_of_proposal for e in estimates])
        words, kl = proposal_means(one)
        rows["q_words"].append(words)
        rows["q_kl"].append(kl)
    return {key: np.asarray(value, dtype=np.float64) for key, value in rows.items()}


def _interval(point, low, high, digits=2) -> str:
    return f"{point:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _judge(ratios: dict[str, tuple[float, float, float]], measurable: bool) -> str:
    if not measurable:
        return "not measurable at this sample size"
    inside = all(BAND[0] <= low and high <= BAND[1] for _, low, high in ratios.values())
    outside = any(high < BAND[0] or low > BAND[1] for _, low, high in ratios.values())
    return "fails" if outside else "holds within 10%" if inside else "undecided"


def analyse(runs: list[dict]) -> dict:
    """Every figure of the report, as plain numbers (what importance.json stores)."""
    draws = prompt_draws(runs)
    lams = np.array(PROPOSALS)
    tables = per_prompt_tables(draws, TARGETS)
    fine = per_prompt_tables(draws, FINE_TARGETS)
    n_answers = {p: len(d.value) for p, d in draws.items()}
    result = {"prompts": len(draws), "answers_per_prompt": statistics.median(n_answers.values())}
    by_target = []
    for t, lam in enumerate(TARGETS):
        own = PROPOSALS.index(lam)
        per_prompt = np.column_stack(
            [
                tables["pi_words"][:, t],
                tables["q_words"][:, own],
                tables["pi_kl"][:, t],
                tables["q_kl"][:, own],
                tables["log_z"][:, t],
                tables["kl_from"][:, t, own],
                tables["kl_from"][:, t, :],
            ]
        )
        curve = slice(6, 6 + len(lams))

        def calibration(m, curve=curve):
            return argmin_parabola(lams, m[curve])

        entry = {
            "lam": lam,
            "log_z": bootstrap(per_prompt, lambda m: m[4]),
            "pi_words": bootstrap(per_prompt, lambda m: m[0]),
            "dera_words": bootstrap(per_prompt, lambda m: m[1]),
            "pi_kl": bootstrap(per_prompt, lambda m: m[2]),
            "dera_kl": bootstrap(per_prompt, lambda m: m[3]),
            "kl_dera_to_target": bootstrap(per_prompt, lambda m: m[5]),
            "calibration": bootstrap(per_prompt, calibration),
            "kl_by_proposal": [
                bootstrap(per_prompt, lambda m, j=j: m[6 + j]) for j in range(len(lams))
            ],
            "median_pooled_ess": float(np.median(tables["ess"][:, t])),
            "median_k_hat": float(np.nanmedian(tables["k_hat"][:, t])),
            "mean_own_ess": float(np.mean(tables["ess_of"][:, t, own])),
        }
        ratios = {
            "calibration / lam": bootstrap(per_prompt, lambda m, lam=lam: calibration(m) / lam),
            "words DeRa / target": bootstrap(per_prompt, lambda m: m[1] / m[0]),
            "KL to reference DeRa / target": bootstrap(per_prompt, lambda m: m[3] / m[2]),
        }
        entry["ratios"] = ratios
        entry["verdict"] = _judge(ratios, entry["median_pooled_ess"] >= MIN_POOLED_ESS)
        by_target.append(entry)
    result["targets"] = by_target
    # The effective lam of each proposal: the target whose KL to the reference equals
    # DeRa_lam''s (as in part 2), on the fine grid of targets.
    effective = []
    for j, lam in enumerate(lams):
        joined = np.column_stack([fine["q_kl"][:, j], fine["pi_kl"]])

        def level(m):
            found = crossing(FINE_TARGETS, m[1:], m[0])
            return np.nan if found is None else found

        effective.append(
            {
                "lam": float(lam),
                "words": bootstrap(tables["q_words"][:, j : j + 1], lambda m: m[0]),
                "kl_to_reference": bootstrap(tables["q_kl"][:, j : j + 1], lambda m: m[0]),
                "effective_lam": bootstrap(joined, level, resamples=500),
                "cut_at_cap": sum(
                    a["finish_reason"] == "length"
                    for run in runs
                    for a in run["answers"]
                    if a["lam"] == lam
                ),
                "answers": sum(a["lam"] == lam for run in runs for a in run["answers"]),
            }
        )
    result["proposals"] = effective
    # Where the answer is known: the target at lam 0 is the reference and at lam 1 the
    # aligned model, each also a proposal (log Z = 0; words and KL are the proposal's).
    known = per_prompt_tables(draws, KNOWN_TARGETS)
    result["known_targets"] = [
        {
            "lam": lam,
            "log_z": bootstrap(known["log_z"][:, t : t + 1], lambda m: m[0]),
            "pi_words": bootstrap(known["pi_words"][:, t : t + 1], lambda m: m[0]),
            "dera_words": bootstrap(tables["q_words"][:, [PROPOSALS.index(lam)]], lambda m: m[0]),
            "pi_kl": bootstrap(known["pi_kl"][:, t : t + 1], lambda m: m[0]),
            "dera_kl": bootstrap(tables["q_kl"][:, [PROPOSALS.index(lam)]], lambda m: m[0]),
            "median_pooled_ess": float(np.median(known["ess"][:, t])),
        }
        for t, lam in enumerate(KNOWN_TARGETS)
    ]
    result["seeds_per_prompt"] = len({run["seed"] for run in runs})
    result["trend_over_seeds"] = trend_over_seeds(runs)
    result["pi_kl_curve"] = {
        "lam": FINE_TARGETS.tolist(),
        "kl_to_reference": np.nanmean(fine["pi_kl"], axis=0).tolist(),
        "median_pooled_ess": np.median(fine["ess"], axis=0).tolist(),
    }
    return _plain(result)


def trend_over_seeds(runs: list[dict]) -> list[dict]:
    """Median pooled ESS and Pareto k-hat per target with the first 6, 12, 18, ... seeds
    of every prompt: whether more seeds help (ESS growing, k-hat settling below 0.7) or
    the weights stay heavy-tailed whatever the sample size."""
    seeds = sorted({run["seed"] for run in runs})
    rows = []
    for n in range(6, len(seeds) + 1, 6):
        kept = set(seeds[:n])
        tables = per_prompt_tables(prompt_draws([r for r in runs if r["seed"] in kept]), TARGETS)
        rows.append(
            {
                "seeds": n,
                "median_pooled_ess": np.median(tables["ess"], axis=0).tolist(),
                "median_k_hat": np.nanmedian(tables["k_hat"], axis=0).tolist(),
            }
        )
    return rows


def _plain(value):
    """numpy scalars and tuples -> JSON-friendly floats and lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return float(value)
    return value


def verification(rows: list[dict]) -> dict | None:
    """The sampled sums against the teacher-forced ones (importance.verify)."""
    if not rows:
        return None
    differences = [abs(r[key]) for r in rows for key in ("aligned", "reference", "mixture")]
    per_token = [abs(r[key]) / r["n_tokens"] for r in rows for key in ("aligned", "reference")]
    grid = [abs(d) for r in rows for d in r["grid"]]
    return {
        "answers": len(rows),
        "median_abs_sum": statistics.median(differences),
        "max_abs_sum": max(differences),
        "median_abs_per_token": statistics.median(per_token),
        "max_abs_grid_sum": max(grid),
    }


def markdown(result: dict, verified: dict | None, sources: list[dict]) -> str:
    lines = [
        f"Prompts: {result['prompts']} (one per held-out topic); answers per prompt: "
        f"{result['answers_per_prompt']:g} ({len(PROPOSALS)} proposals x "
        f"{result['seeds_per_prompt']:g} seeds); 95% bootstrap intervals over prompts in "
        "brackets. Pi_lam's words and KL to the reference are self-normalised (they need "
        "the effective sample size); DeRa's are plain means; the calibration needs no "
        "weights (log Z is the same for every proposal, so the closest proposal is the one "
        "with the largest mean mismatch W); KL(DeRa ‖ Pi) uses the estimated log Z, which "
        "is biased low, so it is a lower bound in expectation.",
        "",
        "| target lam | Pi_lam words | DeRa_lam words | Pi_lam KL to ref | DeRa_lam KL to ref "
        "| KL(DeRa_lam ‖ Pi_lam) | calibration lam'* | pooled ESS (median) "
        "| Pareto k-hat (median) "
        f"| own ESS (mean, of {result['seeds_per_prompt']:g}) "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in result["targets"]:
        lines.append(
            f"| {t['lam']:g} | {_interval(*t['pi_words'], 1)} | {_interval(*t['dera_words'], 1)} "
            f"| {_interval(*t['pi_kl'])} | {_interval(*t['dera_kl'])} "
            f"| {_interval(*t['kl_dera_to_target'])} | {_interval(*t['calibration'])} "
            f"| {t['median_pooled_ess']:.1f} | {t['median_k_hat']:.2f} "
            f"| {t['mean_own_ess']:.1f} | {t['verdict']} |"
        )
    lines += [
        "",
        "The trend over seeds (the first N seeds of every prompt): median pooled ESS / median "
        "Pareto k-hat of the pooled weights (k-hat > 0.7: the weighted means are not to be "
        "trusted at that sample size; > 1: the weights' variance is infinite).",
        "",
        "| seeds | " + " | ".join(f"target {lam:g}" for lam in TARGETS) + " |",
        "|---|" + "---|" * len(TARGETS),
    ]
    for row in result["trend_over_seeds"]:
        cells = [
            f"{e:.1f} / {k:.2f}"
            for e, k in zip(row["median_pooled_ess"], row["median_k_hat"], strict=True)
        ]
        lines.append(f"| {row['seeds']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Where the answer is known (the target at lam 0 is the reference, at 1 the aligned "
        "model; both are also proposals): log Z is 0 and the target's words and KL are the "
        "proposal's own.",
        "",
        "| target lam | log Z (exact: 0) | Pi words | DeRa words (direct mean) | Pi KL to ref "
        "| DeRa KL to ref (direct mean) | pooled ESS (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in result["known_targets"]:
        lines.append(
            f"| {t['lam']:g} | {_interval(*t['log_z'])} | {_interval(*t['pi_words'], 1)} "
            f"| {_interval(*t['dera_words'], 1)} | {_interval(*t['pi_kl'])} "
            f"| {_interval(*t['dera_kl'])} | {t['median_pooled_ess']:.1f} |"
        )
    lines += ["", "The verdict's ratios (95% intervals; the rule: all inside [0.9, 1.1]):", ""]
    lines += ["| target lam | " + " | ".join(result["targets"][0]["ratios"]) + " |"]
    lines += ["|---|---|---|---|"]
    for t in result["targets"]:
        lines.append(
            f"| {t['lam']:g} | " + " | ".join(_interval(*r) for r in t["ratios"].values()) + " |"
        )
    lines += [
        "",
        "KL(DeRa_lam' ‖ Pi_lam) for every proposal lam' (rows) and target (columns), nats:",
        "",
        "| lam' | " + " | ".join(f"target {t['lam']:g}" for t in result["targets"]) + " |",
        "|---|" + "---|" * len(result["targets"]),
    ]
    for j, lam in enumerate(PROPOSALS):
        cells = [_interval(*t["kl_by_proposal"][j]) for t in result["targets"]]
        lines.append(f"| {lam:g} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Each proposal on its own: words, one-sample KL to the reference, and its effective "
        "lam (the target Pi_lam with the same KL to the reference; blank where none on "
        "0.1..3 does; it rests on the target's self-normalised KL, so on the weights):",
        "",
        "| lam' | words | KL to ref | effective lam | cut at 96 tokens |",
        "|---|---|---|---|---|",
    ]
    for p in result["proposals"]:
        effective = p["effective_lam"]
        shown = "" if np.isnan(effective[0]) else _interval(*effective)
        lines.append(
            f"| {p['lam']:g} | {_interval(*p['words'], 1)} | {_interval(*p['kl_to_reference'])} "
            f"| {shown} | {p['cut_at_cap']:.0f}/{p['answers']:.0f} |"
        )
    if verified:
        lines += [
            "",
            f"Sampled sums against teacher-forced ones ({verified['answers']} answers): median "
            f"|difference| {verified['median_abs_sum']:.2f} nats per answer "
            f"({verified['median_abs_per_token']:.4f} per token), at most "
            f"{verified['max_abs_sum']:.2f} (A, R, M) and {verified['max_abs_grid_sum']:.2f} "
            "(other proposals).",
        ]
    lines += ["", "Made on (every run that sampled into the file, then the report):", ""]
    for source in sources:
        lines.append(
            f"- {source['stage']}: {source['machine']}; commit {source['commit']}; "
            + ", ".join(f"{k} {v}" for k, v in source["versions"].items())
            + f"; {source['date']}"
        )
    return "\n".join(lines) + "\n"


def calibration_card(result: dict, sources: list[dict]) -> dict:
    """What a user of the built-in pair can rely on: for each target lam, the DeRa lam
    closest to it (weight-free) and how far apart the two still are, the useful range and
    the verdict; where and how it was measured."""
    return {
        "_about": (
            "Measured by experiments/lam_meaning/importance.py --stage report (issue 26): "
            "for the exact target at lam (the aligned model retrained at beta/lam, "
            "Pi_lam ∝ pi_ref^(1-lam) pi_1^lam over whole answers), the DeRa lam whose "
            "answers are closest to it (smallest KL(DeRa ‖ Pi_lam); 95% bootstrap interval "
            "over prompts) and that smallest KL per answer (a lower bound in expectation)."
        ),
        "closest_dera_lam": [
            {
                "target_lam": t["lam"],
                "dera_lam": round(t["calibration"][0], 3),
                "interval": [round(t["calibration"][1], 3), round(t["calibration"][2], 3)],
                "kl_nats_per_answer_at_best": round(min(kl[0] for kl in t["kl_by_proposal"]), 2),
            }
            for t in result["targets"]
        ],
        "useful_range": list(USEFUL_RANGE),
        "verdicts": {f"{t['lam']:g}": t["verdict"] for t in result["targets"]},
        "measured": {
            "prompts": result["prompts"],
            "seeds_per_prompt": result["seeds_per_prompt"],
            "answers_per_target": int(result["answers_per_prompt"] * result["prompts"]),
            "made_on": [f"{s['machine']}; commit {s['commit']}" for s in sources],
        },
    }


def report(files: dict, folder: Path, seeds: int) -> None:
    """Reports the runs of the first `seeds` seeds of every prompt."""
    runs = [run for run in read_rows(files["samples"]) if run["seed"] < seeds]
    if not runs:
        raise SystemExit("error: no samples yet; run the sample stage first")
    result = analyse(runs)
    verified = verification(read_rows(files["verify"]))
    sampled = [r for r in read_rows(files["provenance"]) if r["stage"] == "sample"]
    # one line per distinct machine and commit that sampled (a resumed run adds one)
    sources = list({(r["machine"], r["commit"]): r for r in sampled}.values())
    sources.append({"stage": "report", **provenance()})
    payload = {"result": result, "verification": verified, "provenance": sources}
    name = f"importance-{seeds}-seeds"
    (folder / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    text = markdown(result, verified, sources)
    (folder / f"{name}.md").write_text(text)
    card = calibration_card(result, sources)
    CALIBRATION_CARD.write_text(json.dumps(card, indent=1, ensure_ascii=False) + "\n")
    print(text)
