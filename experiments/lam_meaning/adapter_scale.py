"""Study part 3 (issue 35): the one-model alternative users ask about - the built-in
adapter applied at scale lam (weight interpolation, one decode per token) - measured
against the same exact target Pi_lam as DeRa.

    python experiments/lam_meaning/adapter_scale.py --lam 0.75 --seeds 12   # sample, report
    python experiments/lam_meaning/adapter_scale.py --lam 0.5 --prompts 10 --seeds 12

Answers are drawn from q = the reference with the adapter at scale lam (temperature 1,
no truncation, the 96-token cap, the exact draws' prompts; fresh seeds, base 5026); each
is teacher-forced under the reference (R) and the full adapter (A) with
dera_local.analysis.score (each model's own logits), and q's own log-probability (its
sampled sum) is kept. With Z per prompt from the exact draws (exact_report.per_prompt):
  KL(q || Pi_lam) = E_q[log q - lam A - (1 - lam) R] + log Z      (no weights)
and q's words and KL to the reference beside the target's and DeRa_lam's. Rows:
results/adapter-lam<L>.jsonl; report: results/adapter-lam<L>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

import numpy as np
from exact_draws import exact_file
from exact_report import per_prompt
from provenance import provenance
from stages import (
    HERE,
    MAX_TOKENS,
    PROPOSALS,
    PURE_SAMPLING,
    held_out_prompts,
    log,
    read_rows,
    seed_of,
)
from weights import bootstrap

sys.path.insert(0, str(HERE.parents[1] / "models" / "smollm2-concise-dpo"))
from reward import word_count  # noqa: E402

BASE_SEED = 5026  # fresh: not 2026 (part 1), 3026 (exact draws) nor 4026 (cap test)


def rows_file(folder: Path, lam: float) -> Path:
    return folder / f"adapter-lam{lam:g}.jsonl"


def sample(lam: float, prompts: list[str], seeds: int, folder: Path) -> None:
    import dera_local
    from dera_local.analysis.score import score
    from dera_local.sources.default_pair import demo_adapter_path, demo_reference_path
    from dera_local.speculation.drafts import SpeculationParams

    path = rows_file(folder, lam)
    done = {(r["prompt"], r["seed"]) for r in read_rows(path)}
    todo = [(p, s) for s in range(seeds) for p in range(len(prompts)) if (p, s) not in done]
    if not todo:
        return
    with (folder / "adapter-provenance.jsonl").open("a") as out:
        out.write(json.dumps({"stage": f"adapter lam {lam:g}", **provenance()}) + "\n")
    log(f"sampling {len(todo)} answers of the adapter at scale {lam:g}")
    plain = SpeculationParams(draft_max=0)
    reference, adapter = demo_reference_path(), demo_adapter_path()
    with (
        dera_local.load_pair(None, reference, lora=adapter, lora_scale=lam, n_ctx=1024,
                             speculation=plain) as scaled,
        dera_local.load_pair(None, reference, lora=adapter, n_ctx=1024, speculation=plain) as pair,
        path.open("a") as out,
    ):  # fmt: skip
        for n, (p, s) in enumerate(todo, 1):
            session = dera_local.ChatSession(pair)
            session.messages = [{"role": "user", "content": prompts[p]}]
            prompt_tokens = session.prompt_tokens()
            sampling = dera_local.SamplingParams(**PURE_SAMPLING, seed=seed_of(p, s, BASE_SEED))
            # lam 1 on the scaled pair: the aligned side alone, i.e. q itself
            result = scaled.generate(prompt_tokens, lam=1.0, sampling=sampling,
                                     max_tokens=MAX_TOKENS, logprobs=True)  # fmt: skip
            forced = result.tokens + ([result.end_token] if result.end_token is not None else [])
            scored = {
                row.lam: row.logprob for row in score(pair, prompt_tokens, forced, [0.0, 1.0])
            }
            record = {
                "prompt": p,
                "seed": s,
                "lam": lam,
                "words": word_count(result.text),
                "n_tokens": len(result.tokens),
                "finish_reason": result.finish_reason,
                "q": result.logprobs.sums()["aligned"],
                "aligned": scored[1.0],
                "reference": scored[0.0],
                "text": result.text,
            }
            out.write(json.dumps(record) + "\n")
            out.flush()
            if n % 20 == 0 or n == len(todo):
                log(f"  {n}/{len(todo)}")


def analyse(lam: float, rows: list[dict], folder: Path) -> dict:
    exact_rows = read_rows(exact_file(folder, lam))
    dera_runs = [r for r in read_rows(folder / "importance-samples.jsonl") if r["seed"] < 24]
    target = per_prompt(lam, exact_rows, dera_runs)
    at = list(PROPOSALS).index(lam)
    by_prompt: dict[int, list[dict]] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt"], []).append(row)
    table = []
    for i, p in enumerate(target["prompts"]):
        mine = by_prompt.get(p, [])
        if not mine:
            continue
        q = np.array([r["q"] for r in mine])
        a = np.array([r["aligned"] for r in mine])
        ref = np.array([r["reference"] for r in mine])
        table.append([
            float(np.mean(q - lam * a - (1 - lam) * ref) + target["log_z"][i]),  # KL(q||Pi)
            float(np.mean([r["words"] for r in mine])),
            float(np.mean(q - ref)),  # q's KL to the reference
            target["words"][i],
            target["kl_ref"][i],
            target["reverse"][i][at],  # KL(DeRa_lam || Pi_lam), part 1's answers
            target["q_words"][i][at],
            target["q_kl"][i][at],
            len(mine),
        ])  # fmt: skip
    t = np.array(table)
    col = lambda j: bootstrap(t[:, j], lambda m: float(m))  # noqa: E731
    return {
        "lam": lam,
        "prompts": len(t),
        "answers": int(t[:, 8].sum()),
        "kl_adapter_to_target": col(0),
        "kl_dera_to_target": col(5),
        "words": {"adapter": col(1), "target": col(3), "dera": col(6)},
        "kl_to_reference": {"adapter": col(2), "target": col(4), "dera": col(7)},
        "words_ratio": bootstrap(t[:, [1, 3]], lambda m: m[0] / m[1]),
        "kl_ratio": bootstrap(t[:, [2, 4]], lambda m: m[0] / m[1]),
    }


def _ci(value, digits: int = 2) -> str:
    point, low, high = value
    return f"{point:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def markdown(r: dict) -> str:
    lam = r["lam"]
    return "\n".join([
        f"# The adapter at scale {lam:g} against Pi_{lam:g} (study part 3, issue 35)",
        "",
        f"{r['answers']} answers of the adapter at scale {lam:g} over {r['prompts']} prompts; "
        "Z per prompt from the exact draws; 95% bootstrap intervals over prompts.",
        "",
        "| quantity | adapter at scale lam | DeRa at lam | the target Pi_lam |",
        "|---|---|---|---|",
        f"| KL(q ‖ Pi_{lam:g}), nats | {_ci(r['kl_adapter_to_target'])} "
        f"| {_ci(r['kl_dera_to_target'])} | 0 |",
        f"| words | {_ci(r['words']['adapter'])} | {_ci(r['words']['dera'])} "
        f"| {_ci(r['words']['target'])} |",
        f"| KL to the reference, nats | {_ci(r['kl_to_reference']['adapter'])} "
        f"| {_ci(r['kl_to_reference']['dera'])} | {_ci(r['kl_to_reference']['target'])} |",
        "",
        f"Adapter over target: words {_ci(r['words_ratio'])}, KL to the reference "
        f"{_ci(r['kl_ratio'])}.",
    ]) + "\n"  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lam", type=float, required=True)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped; rerun to resume"))
    try:
        sample(args.lam, held_out_prompts(args.prompts), args.seeds, args.results)
    except KeyboardInterrupt:
        sys.exit("stopped; rerun to resume")
    result = analyse(args.lam, read_rows(rows_file(args.results, args.lam)), args.results)
    stem = f"adapter-lam{args.lam:g}"  # not with_suffix: ".75" would be taken for one
    (args.results / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.results / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
