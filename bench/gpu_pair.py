"""GPU benchmarks on a synthetic pair (for the remote GPU machine: scripts/gpu/run-checks;
no weights can be fetched there, and speed does not depend on the values).

    python bench/gpu_pair.py [--shape 1b|small] [--tokens 64] [--runs 3] [--out DIR]

Two random f16 llama models of one shape (1b: n_embd 2048, 22 layers, ffn 5632, 32,000
tokens, ~1.1B parameters each; small: a shape for a CPU check of this script), every
layer offloaded. Tokens/s (median of --runs after a warm-up, greedy, no speculation
unless named), each with its ratio to (a) in the same run:
  (a) one model alone (dera-local's decoder at lam 1 over the pair's aligned side only:
      a plain generation of one model)
  (b) the DeRa pair at lam 0.5, decodes overlapped (the GPU default)
  (c) the same, decodes one after the other
  (d) 8 sequences at once (a sweep of 8 lams; tokens/s over all of them)
  (e) the pair with prompt-lookup speculation on a prompt it can copy from
  (f) 8 clients at once on `dera-local serve --parallel 8` (tokens/s over all)
and the host time per token outside llama_decode (mixing, sampling, the engine).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import gguf
import numpy as np
from common import machine, table
from engine_overhead import DecodeClock

SHAPES = {
    "1b": dict(n_embd=2048, n_layers=22, n_ff=5632, n_vocab=32000, n_head=32, n_head_kv=4),
    "small": dict(n_embd=128, n_layers=2, n_ff=256, n_vocab=2000, n_head=4, n_head_kv=2),
}
COPYABLE = "def add(a, b):\n    return a + b\n\n" * 12 + "def add(a, b):\n"


def write_model(path: Path, shape: dict, seed: int) -> Path:
    """A random f16 llama model with a byte-level vocabulary padded to n_vocab."""
    rng = np.random.default_rng(seed)
    e, f, v = shape["n_embd"], shape["n_ff"], shape["n_vocab"]

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)).astype(
            np.float16
        )

    tokens = [f"<0x{b:02X}>" for b in range(256)] + [f"t{i}" for i in range(v - 256)]
    types = [int(gguf.TokenType.BYTE)] * 256 + [int(gguf.TokenType.NORMAL)] * (v - 256)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"synthetic-{seed}")
    writer.add_context_length(4096)
    writer.add_embedding_length(e)
    writer.add_block_count(shape["n_layers"])
    writer.add_feed_forward_length(f)
    writer.add_head_count(shape["n_head"])
    writer.add_head_count_kv(shape["n_head_kv"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(e // shape["n_head"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * v)
    writer.add_token_types(types)
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)
    kv = shape["n_head_kv"] * (e // shape["n_head"])
    writer.add_tensor("token_embd.weight", matrix(v, e))
    writer.add_tensor("output_norm.weight", np.ones(e, dtype=np.float32))
    writer.add_tensor("output.weight", matrix(v, e))
    for i in range(shape["n_layers"]):
        block = f"blk.{i}"
        writer.add_tensor(f"{block}.attn_norm.weight", np.ones(e, dtype=np.float32))
        writer.add_tensor(f"{block}.attn_q.weight", matrix(e, e))
        writer.add_tensor(f"{block}.attn_k.weight", matrix(kv, e))
        writer.add_tensor(f"{block}.attn_v.weight", matrix(kv, e))
        writer.add_tensor(f"{block}.attn_output.weight", matrix(e, e))
        writer.add_tensor(f"{block}.ffn_norm.weight", np.ones(e, dtype=np.float32))
        writer.add_tensor(f"{block}.ffn_gate.weight", matrix(f, e))
        writer.add_tensor(f"{block}.ffn_up.weight", matrix(f, e))
        writer.add_tensor(f"{block}.ffn_down.weight", matrix(e, f))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def timed(run, runs: int) -> float:
    """Median tokens/s of run() (which returns its token count) after one warm-up."""
    run()
    rates = []
    for _ in range(runs):
        started = time.perf_counter()
        n = run()
        rates.append(n / (time.perf_counter() - started))
    return statistics.median(rates)


def serve_rate(aligned: Path, reference: Path, tokens: int, clients: int) -> float:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from server_process import start_server

    process, base = start_server(
        ["-m", str(aligned), "-mr", str(reference), "--parallel", str(clients), "-c", "8192",
         "--draft-max", "0"]
    )  # fmt: skip

    def one(seed: int) -> int:
        body = dict(prompt="Once upon a time", max_tokens=tokens, temperature=1.0, seed=seed,
                    dera_lambda=0.5)  # fmt: skip
        request = urllib.request.Request(
            f"{base}/v1/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.load(response)["usage"]["completion_tokens"]

    try:
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, range(clients)))  # warm-up
            started = time.perf_counter()
            n = sum(pool.map(one, range(clients, 2 * clients)))
            return n / (time.perf_counter() - started)
    finally:
        process.terminate()
        process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import dera_local
    from dera_local.analysis.sweep import LambdaSweep
    from dera_local.llama import devices

    folder = Path(tempfile.mkdtemp(prefix="dera-gpu-"))
    started = time.perf_counter()
    aligned = write_model(folder / "aligned.gguf", SHAPES[args.shape], seed=1)
    reference = folder / "reference.gguf"
    shutil.copyfile(aligned, reference)  # same speed; another file, so loaded twice
    print(f"wrote the {args.shape} pair in {time.perf_counter() - started:.0f} s", flush=True)
    gpus = ", ".join(f"{d.name} ({d.description})" for d in devices.offload_devices()) or "none"
    greedy = dera_local.SamplingParams(temperature=0)
    plain = dera_local.SpeculationParams(draft_max=0)
    clock = DecodeClock()
    rows, rest = [], {}

    def generate(pair, lam, prompt="Once upon a time", speculation=plain, serial=True):
        # The rest (outside llama_decode) only where decodes do not overlap: overlapped,
        # two threads' decode seconds add up to more than the wall time.
        tokens = pair.tokenize(prompt)

        def run() -> int:
            pair.clear_cache()
            clock.seconds = 0.0
            t0 = time.perf_counter()
            result = pair.generate(tokens, lam=lam, sampling=greedy, max_tokens=args.tokens,
                                   speculation=speculation)  # fmt: skip
            n = len(result.tokens)
            if serial:
                rest[len(rows)] = ((time.perf_counter() - t0) - clock.seconds) / max(n, 1) * 1000
            return n

        return run

    with dera_local.load_pair(aligned, aligned, n_ctx=4096) as alone:  # one model, one copy
        base = timed(generate(alone, 1.0), args.runs)
        rows.append(["(a) one model alone", base])
    for label, overlap in (("(b) DeRa pair, overlapped", True), ("(c) DeRa pair, serial", False)):
        with dera_local.load_pair(aligned, reference, n_ctx=4096, overlap_decodes=overlap) as pair:
            rows.append([label, timed(generate(pair, 0.5, serial=not overlap), args.runs)])
    with dera_local.load_pair(aligned, reference, n_ctx=4096) as pair:
        lams = [i / 4 for i in range(8)]
        with LambdaSweep(pair, lams, max_tokens=args.tokens, speculation=plain) as sweep:
            prompt = pair.tokenize("Once upon a time")
            rows.append([
                "(d) 8 sequences (a sweep)",
                timed(lambda: sum(len(r.tokens) for r in sweep.run(prompt, sampling=greedy)),
                      args.runs),
            ])  # fmt: skip
        spec = dera_local.SpeculationParams(draft_max=8)
        rows.append(
            [
                "(e) DeRa pair, prompt lookup",
                timed(generate(pair, 0.5, COPYABLE, spec, serial=False), args.runs),
            ]
        )
    rows.append(["(f) 8 clients, --parallel 8", serve_rate(aligned, reference, args.tokens, 8)])
    lines = [
        f"## dera-local on a GPU ({args.shape} synthetic f16 pair)\n",
        f"Machine: {machine()}; devices: {gpus}\n",
        table(
            ["run", "tokens/s", "vs (a)", "host ms/token outside llama_decode"],
            [
                [label, f"{rate:.1f}", f"{rate / base:.2f}", f"{rest[i]:.3f}" if i in rest else ""]
                for i, (label, rate) in enumerate(rows)
            ],
        ),  # fmt: skip
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        (args.out / "gpu-bench.md").write_text(text + "\n")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
