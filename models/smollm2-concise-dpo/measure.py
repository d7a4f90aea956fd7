"""Stage 4: the adapter's measured effect as a function of lam, on held-out prompts.

For each held-out prompt, one batched sweep (dera_local.analysis.sweep) samples one answer per lam
from the DeRa mixture pi_lam (temperature 1, no top-k/top-p/min-p, so that answers are
draws from pi_lam itself; the seed is fixed per prompt) and records its word count (the
reward, negated) and log pi_lam(y) - log pi_ref(y) summed over its tokens: a one-sample
estimate of KL(pi_lam || pi_ref). Prints a Markdown table of means and standard errors.

    python models/smollm2-concise-dpo/measure.py [--lambdas 0,0.5,1,1.5,2,3]

Resumable: rows are appended to data/measure.jsonl and reused on a rerun.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from prompts import split_prompts  # noqa: E402
from reward import word_count  # noqa: E402

import dera_local  # noqa: E402
from dera_local.analysis.sweep import LambdaSweep  # noqa: E402
from dera_local.sources.default_pair import demo_adapter_path, demo_reference_path  # noqa: E402

PURE_SAMPLING = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


def _mean_se(values: list[float]) -> str:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {se:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lambdas", default="0,0.5,1,1.5,2,3")
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--adapter", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "data" / "measure.jsonl")
    args = parser.parse_args()
    lambdas = [float(x) for x in args.lambdas.split(",")]
    _, heldout = split_prompts()
    args.out.parent.mkdir(exist_ok=True)
    rows = [json.loads(line) for line in args.out.open()] if args.out.exists() else []
    done = {(r["lam"], r["prompt"]) for r in rows}

    adapter = args.adapter or demo_adapter_path()
    started = time.time()
    with (
        dera_local.load_pair(None, demo_reference_path(), lora=adapter, n_ctx=1024) as pair,
        LambdaSweep(pair, lambdas, max_tokens=args.max_tokens) as runner,
        args.out.open("a") as out,
    ):
        for index, prompt in enumerate(heldout):
            if all((lam, prompt) in done for lam in lambdas):
                continue
            session = dera_local.ChatSession(pair)
            session.messages = [{"role": "user", "content": prompt}]
            sampling = dera_local.SamplingParams(**PURE_SAMPLING, seed=args.seed + index)
            for result in runner.run(session.prompt_tokens(), sampling=sampling):
                row = {
                    "lam": result.lam,
                    "prompt": prompt,
                    "text": result.text,
                    "words": word_count(result.text),
                    "finish_reason": result.finish_reason,
                    "n_tokens": len(result.tokens),
                    "kl_to_reference": result.kl_to_reference,
                }
                rows.append(row)
                out.write(json.dumps(row) + "\n")
            out.flush()
            print(
                f"[{index + 1}/{len(heldout)}] {time.time() - started:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    print(
        "| lam | words per answer (reward = -words) | KL(pi_lam ‖ pi_ref) per answer, nats "
        "| cut at max tokens |"
    )
    print("|---|---|---|---|")
    for lam in lambdas:
        mine = [r for r in rows if r["lam"] == lam]
        cut = sum(r["finish_reason"] == "length" for r in mine)
        print(
            f"| {lam:g} | {_mean_se([r['words'] for r in mine])} | "
            f"{_mean_se([r['kl_to_reference'] for r in mine])} | {cut}/{len(mine)} |"
        )


if __name__ == "__main__":
    main()
