"""Exactness of continuous batching on a real model: greedy answers decoded together in
one batch (as the server's slots are) against each answer decoded alone, on the SmolLM2
pair. Where they part, the solo run's mixed-logit gap between the two tokens there says
whether it was a near-tie that batched rounding flipped.

    python bench/batch_drift.py [--slots 4 --tokens 96]
"""

from __future__ import annotations

import argparse

from common import demo_pair_or_exit, divergence_gap, machine, table

import dera_local
from dera_local.chat import ChatTemplate
from dera_local.engine.decoder import BatchDecoder
from dera_local.engine.request import GenerationRequest

QUESTIONS = [
    "What is democracy?",
    "How does the immune system work?",
    "Explain photosynthesis.",
    "Why is the sky blue?",
    "What causes earthquakes?",
    "How do airplanes fly?",
    "What is a black hole?",
    "Describe the water cycle.",
]
LAMS = [0.0, 0.5, 1.0, 2.0]
PLAIN = dera_local.SpeculationParams(draft_max=0)  # one token per step, as the slots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=96)
    args = parser.parse_args()
    spec = demo_pair_or_exit()
    greedy = dera_local.SamplingParams(temperature=0.0, seed=0)
    rows, parted = [], 0
    with dera_local.load_pair(spec.aligned, spec.reference, lora=spec.lora, n_ctx=1024) as pair:
        template = ChatTemplate.for_pair(pair)
        jobs = [
            (template.tokens(pair, [{"role": "user", "content": q}]), LAMS[i % len(LAMS)], q)
            for i, q in enumerate(QUESTIONS)
        ]
        with BatchDecoder(pair, args.slots, 1024) as decoder:
            for start in range(0, len(jobs), args.slots):
                group = jobs[start : start + args.slots]
                slots = [
                    decoder.admit(
                        GenerationRequest(p, lam=lam, sampling=greedy, max_tokens=args.tokens)
                    )
                    for p, lam, _ in group
                ]
                while any(s.finish_reason is None for s in slots):
                    decoder.step()
                for slot, (prompt, lam, question) in zip(slots, group, strict=True):
                    decoder.retire(slot)
                    pair.clear_cache()
                    solo = pair.generate(prompt, lam=lam, sampling=greedy,
                                         max_tokens=args.tokens, speculation=PLAIN)  # fmt: skip
                    found = divergence_gap(pair, prompt, lam, greedy, solo.tokens,
                                           slot.output.tokens)  # fmt: skip
                    if found is None:
                        where = f"identical ({len(solo.tokens)} tokens)"
                    else:
                        parted += 1
                        gap = "an answer ended" if found["gap"] is None else (
                            f"gap {found['gap']:.3f} of max {found['max_logit']:.1f}")  # fmt: skip
                        where = f"part at token {found['step']} ({gap})"
                    rows.append([question, f"{lam:g}", where])
    print(f"## Batched vs solo greedy answers ({args.slots} slots, up to {args.tokens} tokens, "
          f"SmolLM2 pair)\n\nMachine: {machine()}\n")  # fmt: skip
    print(table(["question", "lam", "batched vs solo"], rows))
    print(f"\n{parted} of {len(rows)} answers part from their solo run.")


if __name__ == "__main__":
    main()
