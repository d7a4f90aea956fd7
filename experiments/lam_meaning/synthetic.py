"""Issue 26, part 2: DeRa against the exact optimum at beta / lam on a synthetic model,
computed exactly (exact.py: backward and forward dynamic programs, no sampling).

    python experiments/lam_meaning/synthetic.py [--out experiments/lam_meaning/results]

Two rewards on the same Markov reference (50 tokens, answers capped at 400, ~150 tokens
long on average): a length reward (-1 per token: "shorter is better", like the built-in
pair's preference) and a per-token content reward (normal per state and token). For
each lam: DeRa's per-token mixture with the optimum at beta, and the exact optimum at
beta / lam, in expected reward, length and KL to the reference; KL(DeRa || exact); and
the effective lam, the exact optimum's lam with DeRa's KL to the reference. A closed
form for a geometric reference checks the length case. Runs in seconds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from exact import END, Chain, dera, effective_lam, geometric_continue, moments, optimum
from provenance import provenance

LAMS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5)


def reference(seed: int = 0, vocab: int = 50, mean_length: float = 150.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ref = rng.dirichlet(np.full(vocab - 1, 0.5), size=vocab + 1)
    end = np.clip(rng.normal(1 / mean_length, 0.3 / mean_length, size=vocab + 1), 1e-4, 0.5)
    return np.concatenate([end[:, None], ref * (1 - end[:, None])], axis=1)


def study(chain: Chain, beta: float) -> list[dict]:
    aligned = optimum(chain, beta)
    rows = []
    for lam in LAMS:
        mixed = dera(chain, aligned, lam)
        target = optimum(chain, beta / lam)
        ours, exact = moments(chain, mixed, target), moments(chain, target)
        rows.append(
            {
                "lam": lam,
                "dera_reward": ours.reward,
                "exact_reward": exact.reward,
                "dera_length": ours.length,
                "exact_length": exact.length,
                "dera_kl_to_ref": ours.kl_to_ref,
                "exact_kl_to_ref": exact.kl_to_ref,
                "kl_dera_to_exact": ours.kl_to_other,
                "effective_lam": effective_lam(chain, beta, ours.kl_to_ref),
            }
        )
    return rows


def table(title: str, rows: list[dict]) -> str:
    lines = [
        f"#### {title}",
        "",
        "| lam | reward DeRa / exact | length DeRa / exact | KL to ref DeRa / exact "
        "| KL(DeRa ‖ exact) | effective lam |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['lam']:g} | {r['dera_reward']:.2f} / {r['exact_reward']:.2f} "
            f"| {r['dera_length']:.1f} / {r['exact_length']:.1f} "
            f"| {r['dera_kl_to_ref']:.2f} / {r['exact_kl_to_ref']:.2f} "
            f"| {r['kl_dera_to_exact']:.3f} | {_effective(r['effective_lam'])} |"
        )
    return "\n".join(lines)


def _effective(lam: float) -> str:
    # the bisection searches lam up to 8: at the bound, no exact optimum is as far away
    return "> 8" if lam > 7.99 else f"{lam:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    ref = reference()
    vocab = ref.shape[1]
    length_reward = np.full((vocab + 1, vocab), -1.0)
    length_reward[:, END] = 0.0
    content_reward = np.random.default_rng(1).normal(size=(vocab + 1, vocab))
    content_reward[:, END] = 0.0
    results = {
        "length reward (-1 per token), beta 20": study(Chain(ref, length_reward, 400), 20.0),
        "content reward (normal per token), beta 2": study(Chain(ref, content_reward, 400), 2.0),
    }
    geometric = []
    for lam in LAMS:
        exact, mixed = geometric_continue(1 / 150, 1.0, 20.0, lam)
        geometric.append(
            {
                "lam": lam,
                "exact_mean_length": exact / (1 - exact),
                "dera_mean_length": mixed / (1 - mixed),
            }
        )
    results["closed form: geometric reference, length reward, beta 20"] = geometric
    args.out.mkdir(parents=True, exist_ok=True)
    # exact arithmetic in float64: the same on every machine up to rounding; recorded anyway
    results["provenance"] = provenance()
    (args.out / "synthetic.json").write_text(json.dumps(results, indent=1) + "\n")
    for title, rows in results.items():
        if title == "provenance":
            continue
        if title.startswith("closed form"):
            print(f"#### {title}\n\n| lam | mean length exact | mean length DeRa |\n|---|---|---|")
            for r in rows:
                exact, ours = r["exact_mean_length"], r["dera_mean_length"]
                print(f"| {r['lam']:g} | {exact:.1f} | {ours:.1f} |")
        else:
            print(table(title, rows))
        print()


if __name__ == "__main__":
    main()
