"""Part 1's sampling and verification stages and what every stage shares (the lam grid,
the held-out prompts, result files, provenance); importance.py runs them from the
command line, check.py and report.py read what they wrote."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT / "models" / "smollm2-concise-dpo")]

from prompts import split_prompts  # noqa: E402
from provenance import provenance  # noqa: E402
from reward import word_count  # noqa: E402

PROPOSALS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
TARGETS = (0.5, 0.75, 1.5, 2.0)
PURE_SAMPLING = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
MAX_TOKENS = 96


def held_out_prompts(n: int) -> list[str]:
    """One prompt per held-out topic (split_prompts gives three per topic, in order), so
    prompts are independent draws for the bootstrap."""
    _, heldout = split_prompts()
    return heldout[::3][:n]


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a killed run: redone on the rerun
    return rows


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def seed_of(prompt: int, seed: int, base: int) -> int:
    return base + 1000 * prompt + seed


def load_pair():
    import dera_local
    from dera_local.sources.default_pair import demo_adapter_path, demo_reference_path
    from dera_local.speculation.drafts import SpeculationParams

    return dera_local.load_pair(
        None,
        demo_reference_path(),
        lora=demo_adapter_path(),
        n_ctx=1024,
        speculation=SpeculationParams(draft_max=0),  # plain sampling from each proposal
    )


def sample(
    files: dict, prompts: list[str], seeds: range, base_seed: int, only: list[int] | None = None
) -> None:
    """Samples every (prompt, seed) not yet in the samples file (prompt numbers are
    positions in `prompts`; `only`: just these)."""
    import dera_local
    from dera_local.analysis.sweep import LambdaSweep

    done = {(r["prompt"], r["seed"]) for r in read_rows(files["samples"])}
    numbers = range(len(prompts)) if only is None else only
    todo = [(p, s) for p in numbers for s in seeds if (p, s) not in done]
    if not todo:
        return
    log(f"sampling {len(todo)} (prompt, seed) runs at lam' {list(PROPOSALS)}")
    started = time.time()
    with (
        load_pair() as pair,
        LambdaSweep(pair, PROPOSALS, max_tokens=MAX_TOKENS, logprob_lams=PROPOSALS) as runner,
        files["samples"].open("a") as out,
    ):
        for n, (p, s) in enumerate(todo, 1):
            session = dera_local.ChatSession(pair)
            session.messages = [{"role": "user", "content": prompts[p]}]
            prompt_tokens = session.prompt_tokens()
            sampling = dera_local.SamplingParams(**PURE_SAMPLING, seed=seed_of(p, s, base_seed))
            rows = runner.run(prompt_tokens, sampling=sampling)
            # One line per (prompt, seed): a run is either all there or redone.
            record = {
                "prompt": p,
                "seed": s,
                "prompt_tokens": prompt_tokens,
                "answers": [
                    {
                        "lam": row.lam,
                        "tokens": row.tokens,
                        "end_token": row.end_token,
                        "finish_reason": row.finish_reason,
                        "words": word_count(row.text),
                        # A, R, M: under the aligned model, the reference, this proposal
                        "sampled": [
                            row.logprob_aligned,
                            row.logprob_reference,
                            row.logprob_mixture,
                        ],
                        # under every proposal, for multiple importance sampling
                        "grid": row.logprob_grid,
                        "text": row.text,
                    }
                    for row in rows
                ],
            }
            out.write(json.dumps(record) + "\n")
            out.flush()
            elapsed = time.time() - started
            left = elapsed / n * (len(todo) - n)
            log(f"  {n}/{len(todo)} runs, {elapsed:.0f}s, ~{left:.0f}s left")


def verify(files: dict, n: int = 24) -> None:
    """Teacher-forces n answers (spread over the runs) through both models with
    dera_local.analysis.score, an independent computation from each model's own logits, and
    records how far the log-probabilities summed while sampling are from it."""
    from dera_local.analysis.score import score as score_response

    runs = read_rows(files["samples"])
    done = {(r["prompt"], r["seed"], r["lam"]) for r in read_rows(files["verify"])}
    picks = []
    for i in range(n):
        run = runs[(i * 7919) % len(runs)]
        answer = run["answers"][i % len(run["answers"])]
        if (run["prompt"], run["seed"], answer["lam"]) not in done:
            picks.append((run, answer))
    if not picks:
        return
    log(f"teacher-forcing {len(picks)} sampled answers to check their log-probabilities")
    with load_pair() as pair, files["verify"].open("a") as out:
        for run, answer in picks:
            tokens = answer["tokens"] + (
                [answer["end_token"]] if answer["end_token"] is not None else []
            )
            grid = sorted({0.0, 1.0, *PROPOSALS})
            scored = score_response(pair, run["prompt_tokens"], tokens, grid)
            rows = {r.lam: r.logprob for r in scored}
            aligned, reference, mixture = answer["sampled"]
            record = {
                "prompt": run["prompt"],
                "seed": run["seed"],
                "lam": answer["lam"],
                "n_tokens": len(tokens),
                # sampled minus teacher-forced, summed over the answer
                "aligned": aligned - rows[1.0],
                "reference": reference - rows[0.0],
                "mixture": mixture - rows[answer["lam"]],
                "grid": [a - rows[lam] for a, lam in zip(answer["grid"], PROPOSALS, strict=True)],
            }
            out.write(json.dumps(record) + "\n")


def result_files(folder: Path, prefix: str) -> dict:
    return {
        "samples": folder / f"{prefix}-samples.jsonl",
        "verify": folder / f"{prefix}-verify.jsonl",
        "provenance": folder / f"{prefix}-provenance.jsonl",
    }


def record_provenance(files: dict, stage: str) -> None:
    with files["provenance"].open("a") as out:
        out.write(json.dumps({"stage": stage, **provenance()}) + "\n")
