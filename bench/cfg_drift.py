"""Exactness of the general K-term path on a real model: greedy answers of the SmolLM2
pair through (a) classifier-free guidance at scale 1 (the negative prompt's terms have
weight 0, so the mixture is plain DeRa, but the prompt is decoded in a two-sequence
batch) and (b) the same two DeRa terms as a `Mixture` (one-slot batched decoder, K-term
kernel), each against the pair's own generation (`DeraPair.generate`: one prompt per
step, no negative sequence). Where an answer parts, the pair run's
mixed-logit gap between the two tokens there says whether batched rounding flipped a
near-tie.

    python bench/cfg_drift.py [--tokens 96]
"""

from __future__ import annotations

import argparse

from batch_drift import LAMS, PLAIN, QUESTIONS
from common import demo_pair_or_exit, divergence_gap, machine, table

import dera_local
from dera_local.chat import ChatTemplate
from dera_local.model_sets.mixture import MixTerm, Source, load_mixture

NEGATIVE = "Answer in one short sentence."


def _where(pair, prompt, lam, greedy, solo, other) -> tuple[str, bool]:
    found = divergence_gap(pair, prompt, lam, greedy, solo.tokens, other.tokens)
    if found is None:
        return f"identical ({len(solo.tokens)} tokens)", False
    if found["gap"] is None:
        return f"part at token {found['step']} (an answer ended)", True
    return (
        f"part at token {found['step']} (gap {found['gap']:.3f} of max {found['max_logit']:.1f})",
        True,
    )  # noqa: E501


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=96)
    args = parser.parse_args()
    spec = demo_pair_or_exit()
    greedy = dera_local.SamplingParams(temperature=0.0, seed=0)
    settings = dict(sampling=greedy, max_tokens=args.tokens)
    rows, parted = [], {"cfg": 0, "mix": 0}
    with dera_local.load_pair(spec.aligned, spec.reference, lora=spec.lora, n_ctx=1024) as pair:
        template = ChatTemplate.for_pair(pair)
        for index, question in enumerate(QUESTIONS):
            lam = LAMS[index % len(LAMS)]
            turn = [{"role": "user", "content": question}]
            prompt = template.tokens(pair, turn)
            negative = template.tokens(pair, [{"role": "system", "content": NEGATIVE}, *turn])
            terms = [
                MixTerm(Source(spec.reference, spec.lora), lam),
                MixTerm(Source(spec.reference), 1.0 - lam),
            ]
            pair.clear_cache()
            solo = pair.generate(prompt, lam=lam, speculation=PLAIN, **settings)
            guided = pair.generate(
                prompt, lam=lam, negative_prompt=negative, cfg_scale=1.0, **settings
            )
            with load_mixture(terms, n_ctx=1024) as mixture:
                mixed = mixture.generate(prompt, **settings)
            cfg_where, cfg_parted = _where(pair, prompt, lam, greedy, solo, guided)
            mix_where, mix_parted = _where(pair, prompt, lam, greedy, solo, mixed)
            parted["cfg"] += cfg_parted
            parted["mix"] += mix_parted
            rows.append([question, f"{lam:g}", cfg_where, mix_where])
    print(f"## Guided and Mixture vs the pair, greedy, up to {args.tokens} tokens, SmolLM2\n")
    print(f"Machine: {machine()}\n")
    headers = ["question", "lam", "CFG scale 1 vs the pair", "two-term Mixture vs the pair"]
    print(table(headers, rows))
    print(
        f"\nCFG at scale 1: {parted['cfg']} of {len(rows)} answers part; two-term Mixture: "
        f"{parted['mix']} of {len(rows)}."
    )


if __name__ == "__main__":
    main()
