"""Issue 35, part 4: the target Pi_lam sampled exactly (engine/exact.py: DeRa attempts
killed token by token), on the built-in pair, at the prompts, cap and sampling of the
importance study (stages.py) - no importance weights.

    python experiments/lam_meaning/exact_draws.py --lam 0.75 --answers 20
    python experiments/lam_meaning/exact_draws.py --lam 0.5 --prompts 10 --answers 5

Each exact answer is one line of results/exact-lam<lam>.jsonl (resumable: a rerun
draws only what is missing): its tokens, words, what it cost (attempts, killed,
sequence-tokens) and its log-probabilities teacher-forced under DeRa at lam 0, 1 and
every proposal of the importance study (dera_local.analysis.score, each model's own
logits), from which exact_report.py computes the target's words, its KL to the
reference, the unbiased Z per prompt, and KL between the target and every proposal.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from stages import (
    HERE,
    MAX_TOKENS,
    PROPOSALS,
    PURE_SAMPLING,
    held_out_prompts,
    load_pair,
    log,
    read_rows,
    seed_of,
)

sys.path.insert(0, str(HERE.parents[1] / "models" / "smollm2-concise-dpo"))
from provenance import provenance  # noqa: E402
from reward import word_count  # noqa: E402

GRID = tuple(sorted({0.0, 1.0, *PROPOSALS}))
BASE_SEED = 3026  # not the importance study's 2026: fresh draws
PARALLEL = 8


def exact_file(folder: Path, lam: float) -> Path:
    return folder / f"exact-lam{lam:g}.jsonl"


def draw(lam: float, prompts: list[str], answers: int, folder: Path) -> None:
    import dera_local
    from dera_local.analysis.score import score

    path = exact_file(folder, lam)
    done = {(r["prompt"], r["seed"]) for r in read_rows(path)}
    todo = [(p, s) for s in range(answers) for p in range(len(prompts)) if (p, s) not in done]
    if not todo:
        return
    with (folder / "exact-provenance.jsonl").open("a") as out:
        out.write(json.dumps({"stage": f"exact lam {lam:g}", **provenance()}) + "\n")
    log(f"drawing {len(todo)} exact answers at lam {lam:g}, {PARALLEL} attempts at once")
    started = time.time()
    with load_pair() as pair, path.open("a") as out:
        for n, (p, s) in enumerate(todo, 1):
            session = dera_local.ChatSession(pair)
            session.messages = [{"role": "user", "content": prompts[p]}]
            prompt_tokens = session.prompt_tokens()
            sampling = dera_local.SamplingParams(**PURE_SAMPLING, seed=seed_of(p, s, BASE_SEED))
            t0 = time.time()
            result = pair.generate(
                prompt_tokens,
                lam=lam,
                sampling=sampling,
                max_tokens=MAX_TOKENS,
                exact=True,
                exact_parallel=PARALLEL,
                exact_budget=10**9,  # the study needs every answer: the cost is what it measures
            )
            seconds = time.time() - t0
            forced = result.tokens + ([result.end_token] if result.end_token is not None else [])
            rows = {row.lam: row.logprob for row in score(pair, prompt_tokens, forced, GRID)}
            record = {
                "prompt": p,
                "seed": s,
                "lam": lam,
                "tokens": result.tokens,
                "end_token": result.end_token,
                "finish_reason": result.finish_reason,
                "words": word_count(result.text),
                "text": result.text,
                **result.exact,
                "seconds": seconds,
                "grid": [rows[x] for x in GRID],
            }
            out.write(json.dumps(record) + "\n")
            out.flush()
            elapsed = time.time() - started
            log(
                f"  {n}/{len(todo)}: prompt {p} seed {s}, {result.exact['attempts']} attempts, "
                f"{len(result.tokens)} tokens; {elapsed:.0f}s, "
                f"~{elapsed / n * (len(todo) - n):.0f}s left"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lam", type=float, required=True)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--answers", type=int, default=20, help="exact answers per prompt")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped; rerun to resume"))
    args.results.mkdir(parents=True, exist_ok=True)
    try:
        draw(args.lam, held_out_prompts(args.prompts), args.answers, args.results)
    except KeyboardInterrupt:
        sys.exit("stopped; rerun to resume")


if __name__ == "__main__":
    main()
