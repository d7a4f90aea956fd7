"""Issue 35, the lam > 1 question, one route to a proof tried: does a family of answers
that repeat themselves gain target mass without bound?

    python experiments/lam_meaning/repetition_probe.py [--prompts 6] [--repeats 40]

For lam > 1 the target Pi_lam ∝ pi_ref^(1-lam) pi_1^lam has a normaliser without a
length cap only if the unnormalised mass of all ended answers is finite. One family of
answers whose mass grows without bound would prove there is none. Repetition is the
obvious candidate: once a text repeats, both models predict the next copy with growing
confidence, and for lam > 1 a token both models find near-certain, but the aligned one
more so, has a per-token factor pi_1^lam pi_ref^(1-lam) above 1.

Per held-out prompt: one DeRa answer at lam 1.5 (temperature 1, no truncation, the
96-token cap, fresh seeds, base 6026; a prompt whose answer hit the cap is skipped),
its tokens repeated --repeats times and ended with its own end token, teacher-forced
through the reference (R) and the aligned model (A) once (dera_local.analysis.score).
From those rows, for every cut m at the end of a repetition, the target's unnormalised
log mass of "the first m tokens, then the end token", lam A + (1 - lam) R, at lam 1.25,
1.5 and 2; and the mass gained per repetition over the last 10. A sustained positive
gain would exhibit answers of unbounded target mass (no normaliser); a negative one says
only that this family converges, and the question stays open. Exploratory: no verdict
rule was written before it ran. Results: results/repetition-probe.md and .json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from provenance import provenance
from stages import HERE, MAX_TOKENS, PURE_SAMPLING, held_out_prompts, log, seed_of

LAMS = (1.25, 1.5, 2.0)
DRAWN_AT = 1.5
BASE_SEED = 6026  # fresh: 2026, 3026, 4026 and 5026 are the other parts'
LAST = 10  # repetitions the gain is averaged over
N_CTX = 4096


def log_softmax(rows: np.ndarray) -> np.ndarray:
    x = rows.astype(np.float64)
    peak = x.max(axis=-1, keepdims=True)
    return x - peak - np.log(np.exp(x - peak).sum(axis=-1, keepdims=True))


def repetition_masses(pair, prompt_tokens, body, end, repeats) -> dict[float, list[float]]:
    """lam -> the target's unnormalised log mass of body * k + [end], k = 1..repeats."""
    from dera_local.analysis.score import teacher_forced_logits

    response = list(body) * repeats + [end]
    aligned, reference, aligned_end, reference_end = [], [], [], []
    for a_rows, r_rows, targets in teacher_forced_logits(pair, prompt_tokens, response):
        log_a, log_r = log_softmax(a_rows), log_softmax(r_rows)
        picked = np.arange(len(targets))
        aligned.append(log_a[picked, targets])
        reference.append(log_r[picked, targets])
        aligned_end.append(log_a[:, end])  # row i: the end token after i response tokens
        reference_end.append(log_r[:, end])
    a, r = np.concatenate(aligned)[:-1], np.concatenate(reference)[:-1]
    a_end, r_end = np.concatenate(aligned_end), np.concatenate(reference_end)
    cuts = [k * len(body) for k in range(1, repeats + 1)]
    masses = {}
    for lam in LAMS:
        before = np.concatenate([[0.0], np.cumsum(lam * a + (1 - lam) * r)])
        ending = lam * a_end + (1 - lam) * r_end
        masses[lam] = [float(before[m] + ending[m]) for m in cuts]
    return masses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=6, help="first N held-out prompts")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    import dera_local
    from dera_local.sources.default_pair import demo_adapter_path, demo_reference_path

    plain = dera_local.SpeculationParams(draft_max=0)
    rows = []
    with dera_local.load_pair(
        None, demo_reference_path(), lora=demo_adapter_path(), n_ctx=N_CTX, speculation=plain
    ) as pair:
        for p, text in enumerate(held_out_prompts(args.prompts)):
            session = dera_local.ChatSession(pair)
            session.messages = [{"role": "user", "content": text}]
            prompt_tokens = session.prompt_tokens()
            sampling = dera_local.SamplingParams(**PURE_SAMPLING, seed=seed_of(p, 0, BASE_SEED))
            answer = pair.generate(
                prompt_tokens, lam=DRAWN_AT, sampling=sampling, max_tokens=MAX_TOKENS
            )
            if answer.end_token is None:
                log(f"prompt {p}: the answer reached the cap; skipped")
                continue
            body = list(answer.tokens)
            repeats = min(args.repeats, (N_CTX - len(prompt_tokens) - 1) // len(body))
            masses = repetition_masses(pair, prompt_tokens, body, answer.end_token, repeats)
            gains = {lam: np.diff(m)[-LAST:] for lam, m in masses.items()}
            rows.append(
                {
                    "prompt": p,
                    "answer_tokens": len(body),
                    "repeats": repeats,
                    "log_mass": {str(lam): m for lam, m in masses.items()},
                    "last_gains": {str(lam): g.tolist() for lam, g in gains.items()},
                }
            )
            log(f"prompt {p}: {len(body)} tokens x {repeats}")
    write(args.results, rows, args.repeats)


def write(folder: Path, rows: list[dict], repeats: int) -> None:
    lines = [
        "# Repetition probe (lam > 1): target mass of an answer repeated k times",
        "",
        f"DeRa answers at lam {DRAWN_AT:g} (96-token cap), each repeated up to {repeats} "
        "times and ended with its end token; the target's unnormalised log mass "
        "lam A + (1 - lam) R after one repetition and after the last, and the mean (min, "
        f"max) of the mass gained per repetition over the last {LAST}, in nats.",
        "",
        "| prompt | answer tokens x repeats | lam | log mass, 1 repetition | log mass, last "
        f"| gain per repetition, last {LAST}: mean (min, max) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        for lam in LAMS:
            mass, gains = row["log_mass"][str(lam)], np.asarray(row["last_gains"][str(lam)])
            lines.append(
                f"| {row['prompt']} | {row['answer_tokens']} x {row['repeats']} | {lam:g} "
                f"| {mass[0]:.1f} | {mass[-1]:.1f} "
                f"| {gains.mean():.2f} ({gains.min():.2f}, {gains.max():.2f}) |"
            )
    where = provenance()
    lines += ["", f"({where['machine']}; commit {where.get('commit', '?')})"]
    report = "\n".join(lines) + "\n"
    (folder / "repetition-probe.md").write_text(report)
    (folder / "repetition-probe.json").write_text(
        json.dumps({"rows": rows, "provenance": where}, indent=1) + "\n"
    )
    print(report, end="")


if __name__ == "__main__":
    main()
