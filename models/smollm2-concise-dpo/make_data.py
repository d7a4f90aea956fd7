"""Stage 1: preference pairs from the reference model, sampled with dera-local.

For each training prompt, sample the reference (SmolLM2-135M-Instruct) several times,
score each answer with the reward (fewer words is better; see reward.py), and keep the
best and worst answer as a (chosen, rejected) pair. Resumable: finished prompts are
appended to samples.jsonl and skipped on a rerun.

    python models/smollm2-concise-dpo/make_data.py [--samples 3] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from prompts import split_prompts  # noqa: E402
from reward import preference_pair  # noqa: E402

import dera_local  # noqa: E402
from dera_local.sources.default_pair import demo_reference_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=HERE / "data")
    args = parser.parse_args()
    args.out.mkdir(exist_ok=True)
    samples_path = args.out / "samples.jsonl"
    done = set()
    if samples_path.exists():
        done = {json.loads(line)["prompt"] for line in samples_path.open()}

    reference = demo_reference_path()
    train_prompts, _ = split_prompts()
    sampling_base = dict(temperature=0.9, top_k=0, top_p=1.0, min_p=0.05)
    started = time.time()
    with (
        dera_local.load_pair(reference, reference, n_ctx=1024) as pair,
        samples_path.open("a") as out,
    ):
        for index, prompt in enumerate(train_prompts):
            if prompt in done:
                continue
            session = dera_local.ChatSession(pair)
            session.messages = [{"role": "user", "content": prompt}]
            prompt_tokens = session.prompt_tokens()
            answers = []
            for k in range(args.samples):
                sampling = dera_local.SamplingParams(
                    **sampling_base, seed=args.seed + 1000 * index + k
                )
                result = pair.generate(
                    prompt_tokens, lam=1.0, sampling=sampling, max_tokens=args.max_tokens
                )
                answers.append(
                    {
                        "text": result.text,
                        "tokens": result.tokens,
                        "finish_reason": result.finish_reason,
                    }
                )
            out.write(
                json.dumps({"prompt": prompt, "prompt_tokens": prompt_tokens, "answers": answers})
                + "\n"
            )
            out.flush()
            print(
                f"[{index + 1}/{len(train_prompts)}] {time.time() - started:.0f}s {prompt}",
                file=sys.stderr,
                flush=True,
            )

    pairs = [p for p in (preference_pair(json.loads(line)) for line in samples_path.open()) if p]
    with (args.out / "pairs.jsonl").open("w") as handle:
        for pair_ in pairs:
            handle.write(json.dumps(pair_) + "\n")
    print(f"{len(pairs)} preference pairs -> {args.out / 'pairs.jsonl'}", file=sys.stderr)


if __name__ == "__main__":
    main()
