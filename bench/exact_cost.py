"""What an exact answer costs (issue 35): sequence-tokens and wall time per exact answer
on the built-in pair, by lam, with 1, 4 and 8 attempts decoded at once, against one plain
DeRa answer at the same lam (same prompts, seeds, temperature 1, no truncation, answers
capped at --tokens), measured in one process.

    python bench/exact_cost.py                       # lam 0.25 0.5 0.75 0.9, 4 answers each
    python bench/exact_cost.py --lams 0.75 --answers 8 --parallel 1,4,8
    python bench/exact_cost.py --lams 0.75 --parallel 1,4 --draft-max 0,16   # speculation

Per cell: the mean over the answers of attempts, sequence-tokens (every attempt's,
discarded ones too) and wall time, and the throughput, sequence-tokens per second (what
parallel attempts buy). Attempts per answer are geometric (mean 1 / Z, as wide as its
mean), and an attempt's tokens are not reproducible across batch shapes on a real model
(batched rounding flips a sampled token now and then), so a few answers per cell say
little about cost per answer: compare the throughput. "x DeRa": wall time per exact
answer over the median time of one plain DeRa answer (same lam, prompts, seeds).
--draft-max 0,16: each cell also with speculation (prompt lookup, adaptive draft length):
an attempt's tokens and kills are the same either way (engine/exact.py; up to batched
rounding on a real model), so the throughput column compares the two directly; "drafts
kept" is accepted over drafted.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_parser, demo_pair_or_exit, machine, table  # noqa: E402

PROMPTS = [
    "Why is the sky blue?",
    "Give me a tip for learning to cook.",
    "What is a black hole?",
    "How do plants make food?",
]


def main() -> None:
    parser = bench_parser(__doc__, runs=1, tokens=96)
    parser.add_argument("--lams", default="0.25,0.5,0.75,0.9")
    parser.add_argument("--parallel", default="1,4,8")
    parser.add_argument("--answers", type=int, default=4, help="exact answers per cell")
    parser.add_argument("--draft-max", default="0", help="speculation per cell (0: off)")
    args = parser.parse_args()
    import dera_local

    spec = demo_pair_or_exit()
    lams = [float(x) for x in args.lams.split(",")]
    widths = [int(x) for x in args.parallel.split(",")]
    draft_maxes = [int(x) for x in args.draft_max.split(",")]
    print(f"machine: {machine()}; {args.threads} threads; answers <= {args.tokens} tokens\n")
    rows = []
    with dera_local.load_pair(
        spec.aligned,
        spec.reference,
        lora=spec.lora,
        n_ctx=1024,
        n_threads=args.threads,
        # room for the largest draft asked; each call says its own speculation
        speculation=dera_local.SpeculationParams(draft_max=max(draft_maxes)),
    ) as pair:
        session = dera_local.ChatSession(pair)
        encoded = []
        for text in PROMPTS:
            session.messages = [{"role": "user", "content": text}]
            encoded.append(session.prompt_tokens())

        def settings(i: int) -> dict:
            sampling = dera_local.SamplingParams(
                temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=100 + i
            )
            return {"sampling": sampling, "max_tokens": args.tokens}

        for lam in lams:
            plain = []
            for i in range(args.answers):
                start = time.perf_counter()
                pair.generate(
                    encoded[i % len(encoded)],
                    lam=lam,
                    speculation=dera_local.SpeculationParams(draft_max=0),
                    **settings(i),
                )
                plain.append(time.perf_counter() - start)
            one = statistics.median(plain)
            for width in widths:
                for draft_max in draft_maxes:
                    rows.append(
                        exact_cell(pair, encoded, settings, args, lam, width, draft_max, one)
                    )
                    print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    headers = [
        "lam",
        "attempts at once",
        "draft max",
        "drafts kept",
        "attempts",
        "sequence-tokens",
        "sequence-tokens / s",
        "s / exact answer",
        "s / DeRa answer",
        "x DeRa",
    ]
    print(table(headers, rows))


def exact_cell(pair, encoded, settings, args, lam, width, draft_max, one) -> list[str]:
    """One table row: --answers exact answers at lam, `width` attempts at once."""
    import dera_local
    from dera_local.speculation.drafts import sample_equals_draft

    speculation = dera_local.SpeculationParams(draft_max=draft_max)
    times, tokens, attempts = [], [], []
    drafted = accepted = 0

    def accept(sampled: int, draft: int) -> bool:  # the usual rule, counting every attempt's
        nonlocal drafted, accepted
        kept = sample_equals_draft(sampled, draft)
        drafted += 1
        accepted += kept
        return kept

    for i in range(args.answers):
        start = time.perf_counter()
        result = pair.generate(
            encoded[i % len(encoded)],
            lam=lam,
            exact=True,
            exact_parallel=width,
            exact_budget=10**9,
            speculation=speculation,
            accept=accept,
            **settings(i),
        )
        times.append(time.perf_counter() - start)
        tokens.append(result.exact["tokens_spent"])
        attempts.append(result.exact["attempts"])
    wall = statistics.mean(times)
    return [
        f"{lam:g}",
        str(width),
        str(draft_max),
        f"{accepted}/{drafted}" if draft_max else "-",
        f"{statistics.mean(attempts):.1f}",
        f"{statistics.mean(tokens):,.0f}",
        f"{sum(tokens) / sum(times):.1f}",
        f"{wall:.2f}",
        f"{one:.2f}",
        f"{wall / one:.1f}",
    ]


if __name__ == "__main__":
    main()
