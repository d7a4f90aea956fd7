"""Peak resident memory (RSS) of one model alone, a LoRA pair and a separate pair.

Each case runs in its own process (peak RSS is per process), loads, prefills a prompt
and generates a few tokens, then reports ru_maxrss. Default models: the built-in demo
pair (SmolLM2-135M-Instruct Q4_1 + the shipped conciseness adapter); the separate pair
is the base model and a byte-identical copy under another name, loaded twice.

    python bench/memory.py [--base BASE.gguf --lora ADAPTER.gguf] [--n-ctx 2048]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPT = "Explain how a bicycle stays upright."


def _child(case: str, base: str, lora: str, copy: str, n_ctx: int) -> None:
    import dera_local
    from dera_local.llama import backend, context

    if case == "single":
        model = backend.LoadedModel(Path(base), backend.LoadOptions())
        ctx = context.Context(model, context.ContextOptions(n_ctx=n_ctx))
        ctx.decode(model.tokenize(PROMPT, add_special=True, parse_special=True))
        for token in range(100, 116):
            ctx.decode([token])
    else:
        aligned, adapter = (None, lora) if case == "lora pair" else (copy, None)
        with dera_local.load_pair(aligned, base, lora=adapter, n_ctx=n_ctx) as pair:
            pair.generate(PROMPT, max_tokens=16, sampling=dera_local.SamplingParams(temperature=0))
    print(
        json.dumps(
            {"case": case, "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base")
    parser.add_argument("--lora")
    parser.add_argument("--n-ctx", default="512,2048,4096", help="context sizes to try")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--copy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.base, args.lora, args.copy, int(args.n_ctx))
        return
    if not args.base:
        from dera_local.sources.default_pair import demo_pair

        base, lora = (str(p) for p in demo_pair())
    else:
        base, lora = args.base, args.lora
    adapter_name = Path(lora).name if lora else "-"
    print(f"Peak RSS (MiB), base={Path(base).name}, lora={adapter_name}\n")
    print(
        "| n_ctx | single model, one context | LoRA pair | vs single | separate pair | vs single |"
    )
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        copy = str(Path(tmp) / "copy-of-base.gguf")
        shutil.copyfile(base, copy)
        for n_ctx in args.n_ctx.split(","):
            results = {}
            for case in ("single", "lora pair", "separate pair"):
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        case,
                        "--base",
                        base,
                        "--lora",
                        lora or "",
                        "--copy",
                        copy,
                        "--n-ctx",
                        n_ctx,
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                last = out.stdout.strip().splitlines()[-1]
                results[case] = json.loads(last)["max_rss_kib"] / 1024
            single = results["single"]
            print(
                f"| {n_ctx} | {single:.0f} | {results['lora pair']:.0f} | "
                f"{results['lora pair'] / single:.2f}x | {results['separate pair']:.0f} | "
                f"{results['separate pair'] / single:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
