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
    """Wraps llama_decode, llama_synchronize and llama_get_logits_ith to add up the
    seconds spent inside them: on a GPU, llama_decode returns once the work is queued,
    and the wait for it (and the logits' copy to the host) is in the first call that
    needs the results, llama_get_logits_ith or llama_synchronize."""

    def __init__(self) -> None:
        self.seconds = 0.0
        for name in ("llama_decode", "llama_synchronize", "llama_get_logits_ith"):
            setattr(llama_cpp, name, self._timed(getattr(llama_cpp, name)))

    def _timed(self, real):
        def timed(*args):
            started = time.perf_counter()
            try:
                return real(*args)
            finally:
                self.seconds += time.perf_counter() - started

        return timed


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
    from dera_local.llama import devices

    gpus = ", ".join(f"{d.name} ({d.description})" for d in devices.offload_devices())
    print(f"## Engine overhead per token\n\nMachine: {machine()}; layers on: {gpus or 'CPU'}\n")
    rows = []
    for key in args.pairs.split(","):
        spec = {"smollm2": smollm2_pair, "qwen": qwen_pair}[key]()
        if spec is None:
            continue
        # Serial decodes: overlapped (the GPU default), the two threads' seconds inside
        # llama.cpp add up to more than the wall time.
        files = dict(lora=spec.lora, n_ctx=1024, n_threads=args.threads, overlap_decodes=False)
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
    headers = [
        "pair",
        "code",
        "ms/token",
        "inside llama.cpp (decode, wait, logits)",
        "the rest (engine)",
    ]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
