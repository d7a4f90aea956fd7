"""What recording log-probabilities costs per token (the server always records them, for
every answer's `dera` object): greedy generations of the SmolLM2 pair with and without
logprobs, and with top_logprobs=20, alternating in one process; median ms per token.

    python bench/logprobs_cost.py [--runs 7] [--tokens 64]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_parser, demo_pair_or_exit, machine, table  # noqa: E402

import dera_local  # noqa: E402
from dera_local.speculation.drafts import SpeculationParams  # noqa: E402

PROMPT = "The numbers from 1 to 300, separated by commas: 1, 2, 3, 4, 5, 6, 7,"


def main() -> None:
    args = bench_parser(__doc__, runs=7, tokens=64).parse_args()
    spec = demo_pair_or_exit()
    print(f"machine: {machine()}")
    modes = {
        "no logprobs": {},
        "logprobs": {"logprobs": True},
        "top_logprobs=20": {"top_logprobs": 20},
    }
    times: dict[str, list[float]] = {name: [] for name in modes}
    greedy = dera_local.SamplingParams(temperature=0)
    pair = dera_local.load_pair(
        spec.aligned, spec.reference, lora=spec.lora, n_ctx=1024, n_threads=args.threads
    )
    with pair:
        for _ in range(args.runs + 1):  # the first round warms up
            for name, extra in modes.items():
                pair.clear_cache()
                pair.generate(PROMPT, lam=0.5, max_tokens=1, sampling=greedy)  # the prompt
                start = time.perf_counter()
                result = pair.generate(PROMPT, lam=0.5, max_tokens=args.tokens + 1,
                                       sampling=greedy, speculation=SpeculationParams(draft_max=0),
                                       **extra)  # fmt: skip
                times[name].append((time.perf_counter() - start) * 1000 / len(result.tokens))
    base = statistics.median(times["no logprobs"][1:])
    rows = []
    for name in modes:
        ms = statistics.median(times[name][1:])
        rows.append([name, f"{ms:.2f}", f"{ms - base:+.2f}", f"{ms / base:.3f}x"])
    print(f"{spec.name}, greedy, lam 0.5, {args.tokens} tokens, median of {args.runs}")
    print(table(["recorded", "ms/token", "vs none", "ratio"], rows))


if __name__ == "__main__":
    main()
