"""What K-term mixtures cost: classifier-free guidance on one model (two sequences of ONE
batched context) against one model alone and against two separate contexts, and
two-term DeRa as a `Mixture` against the same two terms as a `DeraPair` (both one slot
of the batched decoder since every generation runs on it: what differs is the model set).

    python bench/mixture.py [--runs 5] [--tokens 64] [--threads N] [--pairs smollm2,qwen]
    python bench/mixture.py --steps-only A.gguf B.gguf ...   # table 1 for any models

Table 1, the decode step itself (backend contexts, after a 40-token prompt; median of
--runs of --tokens steps): one token in one context; two sequences in one batch of one
context (what CFG decodes each step: the batching factor); one token in each of two
contexts (CFG without batching).

Table 2, generation (ms per generated token, greedy, median of --runs; tokens/s =
1000 / ms): the model alone; CFG on that model (negative prompt, scale 1.5); DeRa at
lam 0.5 through `DeraPair` (speculation off) and the same two terms as a Mixture
(BatchDecoder slot + the K-term kernel). All rows run alternately in one process.
"""

from __future__ import annotations

import statistics
import time

from common import PairSpec, bench_parser, machine, qwen_pair, smollm2_pair, table

import dera_local
from dera_local.llama.context import Context, ContextOptions, TokenBatch
from dera_local.model_sets.mixture import MixTerm, Source, load_mixture
from dera_local.speculation.drafts import SpeculationParams

GREEDY = dera_local.SamplingParams(temperature=0)
PROMPT = (
    "Write a long, detailed story about a lighthouse keeper who finds a message in a "
    "bottle, describing the sea, the weather and the harbour town. Begin:"
)
NEGATIVE = "Write a short, dull list of facts. Begin:"
NO_DRAFTS = SpeculationParams(draft_max=0)


def _step_times(model, threads: int, tokens: int) -> dict[str, float]:
    """Seconds per decode step for the three shapes of table 1 (one pass each)."""
    options = ContextOptions(n_ctx=1024, n_batch=64, n_threads=threads, n_seq_max=2)
    first, second = Context(model, options), Context(model, options)
    batch = TokenBatch(64)
    prompt = list(range(100, 140))
    out: dict[str, float] = {}
    try:

        def prefill(ctx: Context, sequences: list[int]) -> None:
            ctx.clear()
            for seq in sequences:
                batch.fill([(t, i, seq, i == len(prompt) - 1) for i, t in enumerate(prompt)])
                ctx.decode_batch(batch)

        def run(name: str, contexts: list[Context], sequences: list[int]) -> None:
            for ctx in contexts:
                prefill(ctx, sequences)
            start = time.perf_counter()
            for step in range(tokens):
                position = len(prompt) + step
                batch.fill([(500 + step % 50, position, seq, True) for seq in sequences])
                for ctx in contexts:
                    ctx.decode_batch(batch)
            out[name] = (time.perf_counter() - start) / tokens

        run("one", [first], [0])
        run("batched", [first], [0, 1])
        run("two", [first, second], [0])
    finally:
        batch.close()
        first.close()
        second.close()
    return out


def _ms_per_token(generate) -> float:
    result = generate()
    return 1000 * result.generation_seconds / max(1, len(result.tokens) - 1)


def bench(spec: PairSpec, tokens: int, threads: int, runs: int) -> str:
    model_file, adapter = spec.reference, spec.lora
    aligned = spec.aligned or spec.reference
    alone = dera_local.load_pair(model_file, model_file, n_ctx=1024, n_threads=threads)
    if spec.lora:
        pair = dera_local.load_pair(
            None, spec.reference, lora=spec.lora, n_ctx=1024, n_threads=threads
        )
        terms = [
            MixTerm(Source(spec.reference, spec.lora), 0.5),
            MixTerm(Source(spec.reference), 0.5),
        ]
    else:
        pair = dera_local.load_pair(aligned, spec.reference, n_ctx=1024, n_threads=threads)
        terms = [MixTerm(Source(aligned), 0.5), MixTerm(Source(spec.reference), 0.5)]
    mixture = load_mixture(terms, n_ctx=1024, n_threads=threads)
    del adapter
    try:
        steps = [_step_times(alone.model, threads, tokens) for _ in range(runs)]
        step = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
        settings = dict(sampling=GREEDY, max_tokens=tokens)
        cases = {
            "model alone": lambda: alone.generate(PROMPT, speculation=NO_DRAFTS, **settings),
            "CFG on the model (one context, 2 sequences)": lambda: alone.generate(
                PROMPT, negative_prompt=NEGATIVE, cfg_scale=1.5, **settings
            ),
            "DeRa lam 0.5, DeraPair": lambda: pair.generate(
                PROMPT, lam=0.5, speculation=NO_DRAFTS, **settings
            ),
            "DeRa lam 0.5, general K-term path": lambda: mixture.generate(PROMPT, **settings),
        }
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for case in cases.values():  # warm-up
            alone.clear_cache(), pair.clear_cache(), mixture.clear_cache()
            case()
        for _ in range(runs):
            for name, case in cases.items():
                alone.clear_cache(), pair.clear_cache(), mixture.clear_cache()
                samples[name].append(_ms_per_token(case))
        ms = {name: statistics.median(values) for name, values in samples.items()}
    finally:
        mixture.close()
        pair.close()
        alone.close()
    one = step["one"]
    table1 = table(
        ["decode step", "ms", "x one token"],
        [
            ["1 token, 1 context", f"{1000 * one:.2f}", "1.00"],
            ["2 sequences, 1 batched context (CFG)", f"{1000 * step['batched']:.2f}",
             f"{step['batched'] / one:.2f}"],
            ["1 token in each of 2 contexts", f"{1000 * step['two']:.2f}",
             f"{step['two'] / one:.2f}"],
        ],
    )  # fmt: skip
    base = ms["model alone"]
    pair_ms = ms["DeRa lam 0.5, DeraPair"]
    rows = []
    for name, value in ms.items():
        ratio = value / base
        versus = ""
        if name.endswith("general K-term path"):
            versus = f"{pair_ms / value:.3f}x the DeraPair's tokens/s"
        rows.append([name, f"{value:.2f}", f"{1000 / value:.1f}", f"{ratio:.2f}", versus])
    table2 = table(["generation", "ms/token", "tokens/s", "x model alone", ""], rows)
    return f"### {spec.name}, {threads} threads, {tokens} tokens\n\n{table1}\n\n{table2}"


def _steps_table(paths: list[str], threads: int, tokens: int, runs: int) -> str:
    rows = []
    for path in paths:
        with dera_local.load_pair(path, path, n_ctx=1024, n_threads=threads) as alone:
            steps = [_step_times(alone.model, threads, tokens) for _ in range(runs)]
        step = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
        rows.append(
            [
                path.rsplit("/", 1)[-1],
                f"{1000 * step['one']:.2f}",
                f"{step['batched'] / step['one']:.2f}",
                f"{step['two'] / step['one']:.2f}",
            ]
        )
    headers = ["model", "1 token (ms)", "2 sequences, 1 context (x)", "2 contexts (x)"]
    return f"{threads} threads, {tokens} steps\n\n" + table(headers, rows)


def main() -> None:

    parser = bench_parser(__doc__, runs=5, tokens=64, pairs="smollm2,qwen")
    parser.add_argument("--steps-only", nargs="+", metavar="GGUF", help="table 1 for these")
    args = parser.parse_args()
    makers = {"smollm2": smollm2_pair, "qwen": qwen_pair}
    print(f"## Mixture costs\n\nMachine: {machine()}\n")
    if args.steps_only:
        print(_steps_table(args.steps_only, args.threads, args.tokens, args.runs))
        return
    for name in args.pairs.split(","):
        spec = makers[name]()
        if spec is not None:
            print(bench(spec, args.tokens, args.threads, args.runs) + "\n", flush=True)


if __name__ == "__main__":
    main()
