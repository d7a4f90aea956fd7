"""Row (e) of the throughput table: the DeRa paper's own approach, Hugging Face
transformers + PyTorch generating with the aligned model and a LogitsProcessor that runs
the reference model (with its own KV cache) and mixes the logits; on the same GGUF pair,
which transformers loads dequantized. Compared with dera-local in the same run.

    pip install -e ".[bench]"      # transformers, torch
    python bench/transformers_baseline.py [--pairs qwen] [--runs 3] [--tokens 32]

Only pairs of two model files apply (transformers cannot apply a llama.cpp LoRA GGUF).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from common import PairSpec, bench_parser, machine, qwen_pair, table, tiny_pair

import dera_local

LAM = 0.5
PROMPT = "Write a long, detailed story about a lighthouse keeper. Begin:"


def transformers_per_token(spec: PairSpec, n: int, runs: int, threads: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor

    torch.set_num_threads(threads)

    def load(path: str):
        folder, name = str(Path(path).parent), Path(path).name
        return AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32
        ).eval()

    aligned, reference = load(spec.aligned), load(spec.reference)
    tokenizer = AutoTokenizer.from_pretrained(
        str(Path(spec.aligned).parent), gguf_file=Path(spec.aligned).name
    )

    class ReferenceMix(LogitsProcessor):
        """Feeds the reference the tokens it has not seen and mixes its next-token logits."""

        def __init__(self) -> None:
            self.past, self.seen = None, 0

        def __call__(self, input_ids, scores):
            with torch.no_grad():
                out = reference(
                    input_ids[:, self.seen :], past_key_values=self.past, use_cache=True
                )
            self.past, self.seen = out.past_key_values, input_ids.shape[1]
            return LAM * scores + (1 - LAM) * out.logits[:, -1, :].float()

    ids = tokenizer(PROMPT, return_tensors="pt").input_ids

    def generate(count: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            aligned.generate(
                ids,
                max_new_tokens=count,
                min_new_tokens=count,
                do_sample=False,
                logits_processor=[ReferenceMix()],
                pad_token_id=0,
            )
        return time.perf_counter() - start

    generate(2)  # warm-up
    samples = []
    for _ in range(runs):  # per token = (time for n tokens - time for 1 token) / (n - 1)
        samples.append((generate(n) - generate(1)) / (n - 1))
    return statistics.median(samples)


def dera_per_token(spec: PairSpec, n: int, runs: int, threads: int) -> float:
    greedy = dera_local.SamplingParams(temperature=0)
    with dera_local.load_pair(spec.aligned, spec.reference, n_ctx=1024, n_threads=threads) as pair:
        samples = []
        for _ in range(runs + 1):
            pair.clear_cache()
            result = pair.generate(PROMPT, lam=LAM, sampling=greedy, max_tokens=n)
            samples.append(result.generation_seconds / len(result.tokens))
    return statistics.median(samples[1:])


def main() -> None:
    parser = bench_parser(__doc__, runs=3, tokens=32, pairs="qwen")
    args = parser.parse_args()
    makers = {"tiny": tiny_pair, "qwen": qwen_pair}
    print(f"## dera-local vs transformers + LogitsProcessor\n\nMachine: {machine()}\n")
    for name in args.pairs.split(","):
        spec = makers[name]()
        if spec is None:
            continue
        t_hf = transformers_per_token(spec, args.tokens, args.runs, args.threads)
        t_dera = dera_per_token(spec, args.tokens, args.runs, args.threads)
        print(
            f"### {spec.name}\n\n{args.tokens} new tokens, greedy, lam {LAM}, "
            f"{args.threads} threads, median of {args.runs}\n"
        )
        print(
            table(
                ["", "tokens/s", "ratio"],
                [
                    [
                        "(e) transformers + LogitsProcessor (dequantized f32)",
                        f"{1 / t_hf:.1f}",
                        "1.00x",
                    ],
                    ["(c) dera-local", f"{1 / t_dera:.1f}", f"**{t_hf / t_dera:.2f}x**"],
                ],
            )
            + "\n",
            flush=True,
        )


if __name__ == "__main__":
    main()
