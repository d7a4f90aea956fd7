"""Where a plain generation's time goes, for this checkout and another one measured in the
same process (bench/baseline.py): per generated token, the time inside llama_decode (both
contexts) and the rest (mixing, sampling, stop rules, the engine's own bookkeeping).

    python bench/engine_overhead.py --baseline-checkout /tmp/before [--pairs smollm2,qwen]

Whole-generation tokens/s moves by several percent between runs on a shared 2-core VM
because llama.cpp's decode time does; the rest is what the engine itself costs, and is
what changes when the engine does. Greedy, lam 0.5, no speculation, the first token
(prefill) excluded; medians of --runs, the two checkouts alternating.
"""

from __future__ import annotations

import argparse
import statistics
import time

import llama_cpp
from baseline import add_argument, load_baseline
from common import machine, qwen_pair, smollm2_pair, table
from throughput import PROMPT

import dera_local

GREEDY = dera_local.SamplingParams(temperature=0)
PLAIN = dera_local.SpeculationParams(draft_max=0)


class DecodeClock:
    """Wraps llama_cpp.llama_decode to add up the seconds spent inside it."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._real = llama_cpp.llama_decode
        llama_cpp.llama_decode = self._timed

    def _timed(self, ctx, batch):
        started = time.perf_counter()
        try:
            return self._real(ctx, batch)
        finally:
            self.seconds += time.perf_counter() - started


def per_token(pair, prompt, tokens: int, clock: DecodeClock) -> tuple[float, float]:
    """(ms per token in all, ms per token inside llama_decode) after the first token."""
    pair.clear_cache()
    stream = pair.stream(prompt, lam=0.5, sampling=GREEDY, max_tokens=tokens, speculation=PLAIN)
    next(stream)
    clock.seconds = 0.0
    started = time.perf_counter()
    for _ in stream:
        pass
    n = len(stream.result.tokens) - 1
    return (time.perf_counter() - started) / n * 1000, clock.seconds / n * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", default="smollm2,qwen")
    add_argument(parser)
    args = parser.parse_args()
    before = load_baseline(args.baseline_checkout) if args.baseline_checkout else None
    clock = DecodeClock()
    print(f"## Engine overhead per token\n\nMachine: {machine()}\n")
    rows = []
    for key in args.pairs.split(","):
        spec = {"smollm2": smollm2_pair, "qwen": qwen_pair}[key]()
        if spec is None:
            continue
        files = dict(lora=spec.lora, n_ctx=1024, n_threads=args.threads)
        pairs = {"this checkout": dera_local.load_pair(spec.aligned, spec.reference, **files)}
        if before is not None:
            label = f"before ({args.baseline_checkout})"
            pairs[label] = before.load_pair(spec.aligned, spec.reference, **files)
        prompt = pairs["this checkout"].tokenize(PROMPT)
        samples: dict = {name: [] for name in pairs}
        for round_ in range(args.runs + 1):  # the first round warms up
            for name, pair in pairs.items():
                measured = per_token(pair, prompt, args.tokens, clock)
                if round_:
                    samples[name].append(measured)
        for name, values in samples.items():
            total = statistics.median(v[0] for v in values)
            decode = statistics.median(v[1] for v in values)
            rest = statistics.median(v[0] - v[1] for v in values)
            rows.append([spec.name, name, f"{total:.3f}", f"{decode:.3f}", f"{rest:.3f}"])
        for pair in pairs.values():
            pair.close()
    headers = ["pair", "code", "ms/token", "inside llama_decode", "the rest (engine)"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
