"""Decode throughput, prefill/time to first token and a per-token cost breakdown of
dera-local against what users would run instead, on each available pair.

    python bench/throughput.py [--runs 5] [--tokens 64] [--threads N] [--pairs tiny,smollm2,qwen]
                               [--baseline-checkout DIR]

Rows (tokens per second, median of --runs after one warm-up, greedy, fixed prompt):
  (a) the aligned model alone through llama-cpp-python's Llama (the floor)
  (b) the serial bound 1 / (1/t_aligned + 1/t_reference), both measured like (a)
  (c) dera-local (lam = 0.5)
  (d) two Llama objects, the reference evaluated in a Python logits_processor
  (c0) with --baseline-checkout: dera-local of another checkout (bench/baseline.py),
       imported in this process and measured in the same rotation as (c)
Ratios are computed within this run.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import llama_cpp
import numpy as np
from common import PairSpec, run_pairs, table

import dera_local
from dera_local.sampling.chain import SamplerChain

LAM = 0.5
BASELINE: list = []  # with --baseline-checkout: [the checkout's dera_local module, its path]
GREEDY = dera_local.SamplingParams(temperature=0)
PROMPT = (
    "Write a long, detailed story about a lighthouse keeper who finds a message in a "
    "bottle, describing the sea, the weather, the keeper's daily routine, the letters he "
    "writes back and the people of the small harbour town nearby. Begin:"
)


def _llama(model: str, lora: str | None, threads: int) -> llama_cpp.Llama:
    return llama_cpp.Llama(
        model_path=model,
        lora_path=lora,
        n_ctx=1024,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )


def _time_generation(generator, n: int) -> tuple[float, float]:
    """(seconds to the first token, seconds per later token) of a token generator."""
    start = time.perf_counter()
    next(generator)
    first = time.perf_counter()
    for _ in range(n - 1):
        next(generator)
    return first - start, (time.perf_counter() - first) / (n - 1)


def _llama_per_token(llm: llama_cpp.Llama, prompt: list[int], n: int) -> float:
    llm.reset()
    return _time_generation(llm.generate(prompt, temp=0.0, repeat_penalty=1.0), n)[1]


def _llama_prefill(llm: llama_cpp.Llama, prompt: list[int]) -> float:
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    return time.perf_counter() - start


def _processor_per_token(
    aligned: llama_cpp.Llama, reference: llama_cpp.Llama, prompt: list[int], n: int
) -> float:
    """What a user writes today: the reference evaluated inside a logits_processor."""
    n_vocab = aligned.n_vocab()
    aligned.reset()
    reference.reset()
    reference.eval(prompt)
    seen = [len(prompt)]

    def mix(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        new = input_ids[seen[0] :].tolist()
        if new:
            reference.eval(new)
            seen[0] = len(input_ids)
        pointer = llama_cpp.llama_get_logits_ith(reference.ctx, -1)
        ref = np.ctypeslib.as_array(pointer, shape=(n_vocab,))
        return LAM * scores + (1 - LAM) * ref

    generator = aligned.generate(
        prompt, temp=0.0, repeat_penalty=1.0, logits_processor=llama_cpp.LogitsProcessorList([mix])
    )
    return _time_generation(generator, n)[1]


def _dera_per_token(pair, prompt: list[int], n: int) -> float:
    pair.clear_cache()
    result = pair.generate(prompt, lam=LAM, sampling=GREEDY, max_tokens=n)
    return result.generation_seconds / len(result.tokens)


def _dera_first_token(pair, prompt: list[int]) -> float:
    pair.clear_cache()
    start = time.perf_counter()
    pair.generate(prompt, lam=LAM, sampling=GREEDY, max_tokens=1)
    return time.perf_counter() - start


def measure_interleaved(
    spec: PairSpec, prompt: list[int], n: int, threads: int, runs: int
) -> dict[str, float]:
    """Medians of every measurement, taken in rotation (a, r, c, d, prefills, ...) so that
    drift in machine speed hits all of them alike; the first round is a warm-up."""
    aligned = _llama(*spec.aligned_alone, threads)
    reference = _llama(spec.reference, None, threads)
    files = dict(lora=spec.lora, n_ctx=1024, n_threads=threads)
    with contextlib.ExitStack() as stack:
        pair = stack.enter_context(dera_local.load_pair(spec.aligned, spec.reference, **files))
        measures = {
            "a": lambda: _llama_per_token(aligned, prompt, n),
            "r": lambda: _llama_per_token(reference, prompt, n),
            "c": lambda: _dera_per_token(pair, prompt, n),
            "d": lambda: _processor_per_token(aligned, reference, prompt, n),
            "prefill a": lambda: _llama_prefill(aligned, prompt),
            "prefill r": lambda: _llama_prefill(reference, prompt),
            "ttft": lambda: _dera_first_token(pair, prompt),
        }
        if BASELINE:
            before = stack.enter_context(
                BASELINE[0].load_pair(spec.aligned, spec.reference, **files)
            )
            measures["c0"] = lambda: _dera_per_token(before, prompt, n)
            measures["ttft0"] = lambda: _dera_first_token(before, prompt)
        samples: dict[str, list[float]] = {key: [] for key in measures}
        for round_ in range(runs + 1):
            for key, measure in measures.items():
                value = measure()
                if round_:
                    samples[key].append(value)
        result = {key: statistics.median(values) for key, values in samples.items()}
        result["breakdown"] = breakdown(pair, prompt, n, runs)
    aligned.close()
    reference.close()
    return result


def breakdown(pair, prompt: list[int], n: int, runs: int) -> dict:
    """Milliseconds per token of each part of one decode step, timed separately on the
    pair's generation contexts (what the engine does per token, minus its bookkeeping)."""
    contexts = pair.lockstep.contexts  # [aligned, reference], or one for a model alone
    model = contexts[0].model
    addresses = lambda: [ctx.logits_address(-1) for ctx in contexts]  # noqa: E731
    parts = {
        "aligned decode": [],
        "reference decode": [],
        "mixing": [],
        "sampling": [],
        "detokenize": [],
    }
    for _ in range(runs):
        pair.clear_cache()
        for ctx in contexts:
            ctx.decode(prompt)
        chain = SamplerChain(GREEDY, model.vocab, pair.n_ctx)
        sums = dict.fromkeys(parts, 0.0)
        for _ in range(n):
            t0 = time.perf_counter()
            if len(contexts) > 1:
                rows = addresses()
                pair.mixer.mix_terms_in_place(rows[0], rows, [LAM, 1 - LAM], pair.n_vocab)
            t1 = time.perf_counter()
            token = chain.sample_at(contexts[0].ptr, -1)
            t2 = time.perf_counter()
            model.token_bytes(token)
            model.is_end_of_generation(token)
            t3 = time.perf_counter()
            contexts[0].decode([token])
            t4 = time.perf_counter()
            for ctx in contexts[1:]:
                ctx.decode([token])
            t5 = time.perf_counter()
            for key, value in (
                ("mixing", t1 - t0),
                ("sampling", t2 - t1),
                ("detokenize", t3 - t2),
                ("aligned decode", t4 - t3),
                ("reference decode", t5 - t4),
            ):
                sums[key] += value
        chain.close()
        for key in parts:
            parts[key].append(sums[key] / n * 1000)
    pair.clear_cache()
    return {key: statistics.median(values) for key, values in parts.items()}


def bench_pair(spec: PairSpec, n: int, threads: int, runs: int) -> str:
    with dera_local.load_pair(spec.aligned, spec.reference, lora=spec.lora, n_ctx=1024) as pair:
        prompt = pair.tokenize(PROMPT)
    m = measure_interleaved(spec, prompt, n, threads, runs)
    a = {"per_token": m["a"], "prefill": m["prefill a"]}
    r = {"per_token": m["r"], "prefill": m["prefill r"]}
    c = {"per_token": m["c"], "ttft": m["ttft"], "breakdown": m["breakdown"]}
    before = []
    if "c0" in m:
        rate_before = 1 / m["c0"]
        before = [
            [
                f"(c0) dera-local before ({BASELINE[1]})",
                f"{rate_before:.1f}",
                f"{rate_before * a['per_token'] + rate_before * r['per_token']:.3f}x",
            ]
        ]
    d = m["d"]
    rate = {
        "a": 1 / a["per_token"],
        "b": 1 / (a["per_token"] + r["per_token"]),
        "c": 1 / c["per_token"],
        "d": 1 / d,
    }
    out = [
        f"### {spec.name}\n",
        f"{len(prompt)}-token prompt, {n} new tokens, {threads} threads, median of {runs} runs\n",
    ]
    out.append(
        table(
            ["", "tokens/s", "vs (b)"],
            [
                [
                    "(a) aligned alone, llama-cpp-python Llama",
                    f"{rate['a']:.1f}",
                    f"{rate['a'] / rate['b']:.2f}x",
                ],
                ["(b) serial bound 1/(1/t_a + 1/t_r)", f"{rate['b']:.1f}", "1.00x"],
                ["(c) dera-local", f"{rate['c']:.1f}", f"**{rate['c'] / rate['b']:.3f}x**"],
                *before,
                [
                    "(d) two Llama + Python logits_processor",
                    f"{rate['d']:.1f}",
                    f"{rate['d'] / rate['b']:.2f}x",
                ],
            ],
        )
    )
    bound_ttft = max(a["prefill"], r["prefill"]) + max(a["per_token"], r["per_token"])
    serial_ttft = a["prefill"] + r["prefill"] + a["per_token"] + r["per_token"]
    out.append(
        "\n"
        + table(
            ["prefill / first token", "ms"],
            [
                ["prefill, aligned alone", f"{a['prefill'] * 1000:.1f}"],
                ["prefill, reference alone", f"{r['prefill'] * 1000:.1f}"],
                ["slower prefill + one decode (target basis)", f"{bound_ttft * 1000:.1f}"],
                ["both prefills + one decode each (serial work)", f"{serial_ttft * 1000:.1f}"],
                [
                    "dera-local time to first token",
                    f"{c['ttft'] * 1000:.1f} ({c['ttft'] / bound_ttft:.2f}x target basis)",
                ],
                *(
                    [[f"dera-local before ({BASELINE[1]}), first token", f"{m['ttft0'] * 1e3:.1f}"]]
                    if "ttft0" in m
                    else []
                ),
            ],
        )
    )
    if "c0" in m:
        out.append(
            f"\nNew path / before: tokens/s **{m['c0'] / m['c']:.3f}x**, "
            f"time to first token **{m['ttft'] / m['ttft0']:.3f}x**"
        )
    parts = c["breakdown"]
    engine_ms = c["per_token"] * 1000
    overhead = engine_ms - sum(parts.values())
    rows = [[name, f"{ms:.3f}", f"{ms / engine_ms * 100:.1f}%"] for name, ms in parts.items()]
    rows.append(
        ["Python loop, bookkeeping (rest)", f"{overhead:.3f}", f"{overhead / engine_ms * 100:.1f}%"]
    )
    rows.append(["dera-local per token (engine)", f"{engine_ms:.3f}", "100%"])
    out.append("\n" + table(["per-token part", "ms", "share"], rows))
    return "\n".join(out)


def main() -> None:
    run_pairs("Decode throughput", bench_pair, __doc__, tokens=64, baseline=BASELINE)


if __name__ == "__main__":
    main()
