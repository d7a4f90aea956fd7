"""Issue 26, part 1: DeRa at lam against the exact target Pi_lam ∝ pi_ref^(1-lam) pi_1^lam
on the built-in pair, by importance sampling (no training).

    pip install -e ".[demo]"
    python experiments/lam_meaning/importance.py --seeds 24   # sample, verify, report
    python experiments/lam_meaning/importance.py --check      # a fresh slice vs the stored run

Proposals: DeRa at every lam' of PROPOSALS on one prompt per held-out topic (20), --seeds
seeds each (12 planned, 24 reported), temperature 1 and no truncation samplers, answers
capped at 96 tokens (the target lives on the same capped answers). Stages, each
resumable (rows are appended to results/importance-*.jsonl and reused on a rerun; every
stage stops cleanly on Ctrl-C):
  sample  every proposal's answer per (prompt, seed), one batched sweep: the answer's
          tokens, words, finish reason, and its log-probabilities summed while sampling
          under the aligned model (A), the reference (R), its own proposal (M) and every
          other proposal (what multiple importance sampling needs; LambdaSweep's
          logprob_lams), ~45 min;
  verify  24 answers teacher-forced through both models (dera_local.analysis.score, each
          model's own logits): how far the sampled sums are from it;
  report  results/importance-<N>-seeds.md and .json (the first --seeds N seeds of every
          prompt): for each target lam, log Z, KL(DeRa_lam' ‖ Pi_lam), effective sample
          sizes, Pi_lam's words and KL to the reference, the calibration lam'*(lam), with
          bootstrap CIs over prompts (weights.py), and the verdict by the rule written in
          README.md before the run; the calibration also goes to the built-in pair's model
          card metadata (models/smollm2-concise-dpo/lam-calibration.json, dera-local info).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from check import check
from report import report
from stages import HERE, held_out_prompts, record_provenance, result_files, sample, verify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["all", "sample", "verify", "report"], default="all")
    parser.add_argument("--prompts", type=int, default=20, help="first N held-out topics")
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--seed", type=int, default=2026, help="base sampling seed")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument(
        "--check", action="store_true",
        help="sample a fresh slice (other seeds) and say whether its statistics "
        "fall within the stored results' intervals",
    )  # fmt: skip
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped; rerun to resume"))
    args.results.mkdir(parents=True, exist_ok=True)
    files = result_files(args.results, "importance")
    prompts = held_out_prompts(args.prompts)
    try:
        if args.check:
            sys.exit(check(args, files, prompts))
        if args.stage in ("all", "sample"):
            record_provenance(files, "sample")
            sample(files, prompts, range(args.seeds), args.seed)
        if args.stage in ("all", "verify"):
            verify(files)
        if args.stage in ("all", "report"):
            report(files, args.results, args.seeds)
    except KeyboardInterrupt:
        sys.exit("stopped; rerun to resume")


if __name__ == "__main__":
    main()
