"""One decode-step shape on its own, for a profiler: the same loop as table 1 of
mixture.py, but only one shape per process, so that `perf record` sees only it.

    python bench/decode_shape.py MODEL.gguf one|cfg [--steps 300] [--threads 2] [--no-repack]
    perf record -o one.data python bench/decode_shape.py MODEL.gguf one
    perf report -i one.data --no-children --sort dso,symbol -g none -n

`one`: one token per step in one context; `cfg`: two sequences per step in one batched
context (what classifier-free guidance decodes). `--no-repack` loads the weights without
llama.cpp's extra (repacked) buffer types. Prints the median ms per step of --runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from dera_local.llama.backend import LoadedModel, LoadOptions
from dera_local.llama.context import Context, ContextOptions, TokenBatch

PROMPT = list(range(100, 140))


def ms_per_step(model: LoadedModel, sequences: list[int], steps: int, threads: int) -> float:
    options = ContextOptions(n_ctx=1024, n_batch=64, n_threads=threads, n_seq_max=2)
    context, batch = Context(model, options), TokenBatch(64)
    try:
        for seq in sequences:
            last = len(PROMPT) - 1
            batch.fill([(t, i, seq, i == last) for i, t in enumerate(PROMPT)])
            context.decode_batch(batch)
        start = time.perf_counter()
        for step in range(steps):
            position = len(PROMPT) + step
            batch.fill([(500 + step % 50, position, seq, True) for seq in sequences])
            context.decode_batch(batch)
        return 1000 * (time.perf_counter() - start) / steps
    finally:
        batch.close()
        context.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("shape", choices=["one", "cfg"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-repack", action="store_true")
    args = parser.parse_args()
    model = LoadedModel(Path(args.model), LoadOptions(use_extra_bufts=not args.no_repack))
    sequences = [0] if args.shape == "one" else [0, 1]
    try:
        times = [ms_per_step(model, sequences, args.steps, args.threads) for _ in range(args.runs)]
    finally:
        model.close()
    print(f"{Path(args.model).name} {args.shape}: {statistics.median(times):.2f} ms per step")


if __name__ == "__main__":
    main()
