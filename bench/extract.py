"""What low-rank extraction costs in quality, on a real full-weight pair: the built-in DPO
recipe with every weight trained (models/smollm2-concise-dpo/train_full.py) against its
reference. For each rank: adapter size, extraction time and peak memory (each extraction
in a child process), the share of the difference kept, and on held-out prompts the mean
per-token KL(pi_lam of the extracted pair || pi_lam of the true pair), teacher-forced on
the true pair's greedy answers and exact over the vocabulary, at lam 0.5, 1 and 2; plus
the model card's reward (words per answer, greedy) for both pairs.

Sanity case first: the shipped rank-8 adapter merged into the base as a full model and
extracted again at rank 8 must give back the same pair (KL at float noise).

    python models/smollm2-concise-dpo/train_full.py --out-dir ~/.cache/dera-local/bench/full-dpo
    python bench/extract.py --pair-dir ~/.cache/dera-local/bench/full-dpo
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "models" / "smollm2-concise-dpo"))
from common import machine, table  # noqa: E402
from prompts import split_prompts  # noqa: E402

import dera_local  # noqa: E402
from dera_local.analysis.score import teacher_forced_logits  # noqa: E402
from dera_local.chat import ChatTemplate  # noqa: E402
from dera_local.sources.default_pair import demo_adapter_path  # noqa: E402
from dera_local.speculation.drafts import SpeculationParams  # noqa: E402

LAMS = (0.5, 1.0, 2.0)
GREEDY = dera_local.SamplingParams(temperature=0)


def extract_in_child(aligned: Path, reference: Path, out: Path, rank: int) -> dict:
    """Runs the extraction in a child process: its report, and the child's own peak RSS
    (VmHWM, read in the child: the rusage of a forked child also counts the parent's
    pages it held before exec)."""
    code = (
        "import json, re; from dera_local.extract import extract; "
        f"r = extract({str(aligned)!r}, {str(reference)!r}, {str(out)!r}, rank={rank}); "
        "hwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]); "
        "print(json.dumps({'kept': r.kept_share, 'seconds': r.seconds, "
        "'bytes': r.adapter_bytes, 'not_carried': len(r.not_carried), 'peak_kib': hwm}))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"extraction at rank {rank} failed: {run.stderr[-500:]}")
    report = json.loads(run.stdout)
    report["peak_mib"] = report.pop("peak_kib") / 1024
    return report


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    peak = x.max(-1, keepdims=True)
    return x - peak - np.log(np.exp(x - peak).sum(-1, keepdims=True))


def mixture_rows(pair, prompt_tokens, answer, lam) -> np.ndarray:
    """log pi_lam at every answer position (teacher-forced), float64 [n, vocab]."""
    rows = []
    for aligned, reference, _ in teacher_forced_logits(pair, prompt_tokens, answer):
        rows.append(log_softmax(lam * aligned + (1 - lam) * reference))
    return np.concatenate(rows)


def answers(pair, prompts, tokens: int) -> dict[float, list[list[int]]]:
    out = {}
    for lam in LAMS:
        out[lam] = [
            pair.generate(
                p,
                lam=lam,
                sampling=GREEDY,
                max_tokens=tokens,
                speculation=SpeculationParams(draft_max=0),
            ).tokens  # fmt: skip
            for p in prompts
        ]
    return out


def words(pair, token_lists) -> float:
    return statistics.fmean(len(pair.detokenize(t).split()) for t in token_lists)


def compare(true_pair, candidate, prompts, true_answers) -> dict[float, float]:
    """Mean per-token KL(pi_lam candidate || pi_lam true) on the true pair's answers."""
    kls = {}
    for lam in LAMS:
        values = []
        for prompt, answer in zip(prompts, true_answers[lam], strict=True):
            if not answer:
                continue
            log_p = mixture_rows(candidate, prompt, answer, lam)
            log_q = mixture_rows(true_pair, prompt, answer, lam)
            values += list((np.exp(log_p) * (log_p - log_q)).sum(-1))
        kls[lam] = statistics.fmean(values)
    return kls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair-dir", type=Path, required=True)
    parser.add_argument("--ranks", default="4,8,16,32,64,128,576")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    reference = args.pair_dir / "reference.f16.gguf"
    aligned = args.pair_dir / "aligned-full.f16.gguf"
    print(f"machine: {machine()}")
    _, heldout = split_prompts()
    work = Path(tempfile.mkdtemp(prefix="dera-extract-"))

    with dera_local.load_pair(aligned, reference, n_ctx=1024) as true_pair:
        template = ChatTemplate.for_pair(true_pair)
        prompts = [template.tokens(true_pair, [{"role": "user", "content": q}])
                   for q in heldout[: args.prompts]]  # fmt: skip
        true_answers = answers(true_pair, prompts, args.tokens)
        true_words = {lam: words(true_pair, true_answers[lam]) for lam in LAMS}

        # Sanity: the shipped rank-8 adapter merged into the base, extracted at rank 8.
        sys.path.insert(0, str(HERE.parent / "tests"))
        from tiny_models import write_merged

        merged = write_merged(reference, demo_adapter_path(), work / "merged-rank8.gguf")
        sanity = extract_in_child(merged, reference, work / "sanity.lora.gguf", 8)
        with (
            dera_local.load_pair(merged, reference, n_ctx=1024) as merged_pair,
            dera_local.load_pair(
                None, reference, lora=work / "sanity.lora.gguf", n_ctx=1024
            ) as back,  # fmt: skip
        ):
            merged_answers = answers(merged_pair, prompts, args.tokens)
            sanity_kl = compare(merged_pair, back, prompts, merged_answers)
        print(f"sanity (shipped rank-8 adapter merged, extracted at rank 8): kept "
              f"{100 * sanity['kept']:.4f}%, KL per token "
              + ", ".join(f"lam {lam:g}: {kl:.2e}" for lam, kl in sanity_kl.items()))  # fmt: skip

        rows = []
        for rank in [int(r) for r in args.ranks.split(",")]:
            out = work / f"rank{rank}.lora.gguf"
            report = extract_in_child(aligned, reference, out, rank)
            with dera_local.load_pair(None, reference, lora=out, n_ctx=1024) as extracted:
                kl = compare(true_pair, extracted, prompts, true_answers)
                extracted_words = {
                    lam: words(extracted, answers(extracted, prompts, args.tokens)[lam])
                    for lam in (1.0,)
                }
            rows.append([
                str(rank), f"{report['bytes'] / 2**20:.1f}", f"{report['seconds']:.1f}",
                f"{report['peak_mib']:.0f}", f"{100 * report['kept']:.1f}%",
                *(f"{kl[lam]:.4f}" for lam in LAMS), f"{extracted_words[1.0]:.1f}",
            ])  # fmt: skip
            print(f"rank {rank} done", file=sys.stderr, flush=True)
    print("\ntrue pair: words per answer at lam 0.5 / 1 / 2: "
          + " / ".join(f"{true_words[lam]:.1f}" for lam in LAMS))  # fmt: skip
    print(table(
        ["rank", "adapter MiB", "extract s", "peak MiB", "difference kept",
         *(f"KL/token lam {lam:g}" for lam in LAMS), "words at lam 1"],
        rows,
    ))  # fmt: skip
    print(f"({args.prompts} held-out prompts, greedy answers of up to {args.tokens} tokens; "
          f"the true pair's are the teacher-forced targets)")  # fmt: skip


if __name__ == "__main__":
    main()
