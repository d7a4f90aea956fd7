"""Lambda-grid costs: a batched sweep of 8 lam values against 8 sequential single-lam
runs, and scoring an 11-value grid against scoring one lam.

    python bench/sweep_score.py [--runs 5] [--tokens 48] [--pairs tiny,smollm2,qwen]
"""

from __future__ import annotations

import statistics
import time

from common import PairSpec, median_of, run_pairs, table, timed

import dera_local
from dera_local.analysis.score import score
from dera_local.analysis.sweep import LambdaSweep
from dera_local.llama.context import TokenBatch
from dera_local.speculation.drafts import SpeculationParams

# lam < 1 keeps every sequence going for the demo pair (its adapter ends answers early)
SWEEP_GRID = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
SCORE_GRID = [round(0.3 * i, 1) for i in range(11)]
PROMPT = "Write a long, detailed story about a lighthouse keeper. Begin:"
RESPONSE = (
    " The lighthouse stood on a rock at the edge of the bay, and every evening the keeper "
    "climbed its hundred and twelve steps to light the lamp. He had done this for thirty "
    "years, through storms and calm, and he knew every sound the old tower made."
)


def batch_scaling(pair, prompt: list[int], runs: int) -> list[list[str]]:
    """Milliseconds of one aligned-model decode step carrying 1, 2, 4 or 8 sequences: the
    ceiling on what batching lam values can gain on this machine."""
    rows, single = [], None
    for n_seq in (1, 2, 4, 8):
        aligned, reference = pair.open_contexts(
            n_ctx=1024 + 64 * n_seq, n_seq_max=n_seq, n_outputs_max=n_seq
        )
        batch = TokenBatch(64)
        try:
            aligned.decode(prompt)
            for seq in range(1, n_seq):
                aligned.copy_sequence(0, seq)
            steps = []
            for step in range(runs * 4):
                batch.fill([(100 + step, len(prompt) + step, seq, True) for seq in range(n_seq)])
                start = time.perf_counter()
                aligned.decode_batch(batch)
                steps.append(time.perf_counter() - start)
        finally:
            batch.close()
            aligned.close()
            reference.close()
        ms = statistics.median(steps) * 1000
        single = single or ms
        rows.append(
            [
                f"{n_seq} sequences",
                f"{ms:.2f}",
                f"{ms / single:.2f}x",
                f"{n_seq * single / ms:.2f}x",
            ]
        )
    return rows


def bench_pair(spec: PairSpec, n: int, threads: int, runs: int) -> str:
    greedy = dera_local.SamplingParams(temperature=0)
    with dera_local.load_pair(
        spec.aligned, spec.reference, lora=spec.lora, n_ctx=1024, n_threads=threads
    ) as pair:
        prompt = pair.tokenize(PROMPT)
        counted = {}

        def sequential() -> float:
            start, tokens = time.perf_counter(), 0
            for lam in SWEEP_GRID:
                pair.clear_cache()
                tokens += len(pair.generate(prompt, lam=lam, sampling=greedy, max_tokens=n).tokens)
            counted["sequential"] = tokens
            return tokens / (time.perf_counter() - start)

        def batched(runner: LambdaSweep, key: str) -> float:
            start = time.perf_counter()
            rows = runner.run(prompt, sampling=greedy)
            counted[key] = sum(len(r.tokens) for r in rows)
            return counted[key] / (time.perf_counter() - start)

        no_drafts = SpeculationParams(draft_max=0)
        with (
            LambdaSweep(pair, SWEEP_GRID, max_tokens=n) as runner,
            LambdaSweep(pair, SWEEP_GRID, max_tokens=n, speculation=no_drafts) as plain,
        ):
            rates = {"batched": [], "batched, no drafts": []}
            for _ in range(runs):  # alternating: drift hits both alike
                rates["batched"].append(batched(runner, "batched"))
                rates["batched, no drafts"].append(batched(plain, "batched, no drafts"))
            batched_rate = statistics.median(rates["batched"])
            plain_rate = statistics.median(rates["batched, no drafts"])
        sequential_rate = median_of(runs, sequential)
        score_one = median_of(runs, lambda: timed(lambda: score(pair, prompt, RESPONSE, [1.0])))
        score_grid = median_of(
            runs, lambda: timed(lambda: score(pair, prompt, RESPONSE, SCORE_GRID))
        )
        n_response = len(pair.tokenize(RESPONSE, add_special=False))
        scaling = batch_scaling(pair, prompt, runs)
    return "\n".join(
        [
            f"### {spec.name}\n",
            f"{len(prompt)}-token prompt; sweep: {len(SWEEP_GRID)} lam values x up to {n} tokens "
            f"(greedy); score: {n_response}-token response; {threads} threads, median of {runs}\n",
            table(
                ["", "value", "ratio"],
                [
                    ["8 sequential single-lam runs, tokens/s", f"{sequential_rate:.1f}", "1.00x"],
                    [
                        "one batched sweep of 8 lam values, tokens/s",
                        f"{batched_rate:.1f}",
                        f"**{batched_rate / sequential_rate:.2f}x**",
                    ],
                    [
                        "the same sweep without drafts (--draft-max 0), tokens/s",
                        f"{plain_rate:.1f}",
                        f"{plain_rate / sequential_rate:.2f}x",
                    ],
                    ["score, 1 lam, ms", f"{score_one * 1000:.1f}", "1.00x"],
                    [
                        "score, 11-lam grid, ms",
                        f"{score_grid * 1000:.1f}",
                        f"**{score_grid / score_one:.2f}x**",
                    ],
                ],
            ),
            f"\n(tokens generated: batched {counted['batched']}, without drafts "
            f"{counted['batched, no drafts']}, sequential {counted['sequential']})\n",
            table(
                ["one decode step of the aligned model", "ms", "cost vs 1", "tokens/s vs 1"],
                scaling,
            ),
        ]
    )


def main() -> None:
    run_pairs("Lambda sweeps and grid scoring", bench_pair, __doc__, tokens=48)


if __name__ == "__main__":
    main()
