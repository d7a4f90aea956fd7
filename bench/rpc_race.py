"""Why dera-local never overlaps two models' decodes on a shared RPC worker device: with
the overlap forced, a pair split over two shared workers is compared with the same pair
on this machine, generation by generation (10 prompts, greedy). llama.cpp's RPC client
keeps per device the id of the last graph sent and two threads race on it, so some
generations differ; taking turns, none do. The race depends on timing: load the machine
(e.g. two `python -c "while True: pass"`) to see it on a 2-core box.

    python bench/rpc_race.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import tiny_pair  # noqa: E402
from rpc import worker  # noqa: E402

import dera_local  # noqa: E402
import dera_local.model_sets.pair  # noqa: E402

GREEDY = dera_local.SamplingParams(temperature=0)


def generations(spec, **placement) -> list[list[int]]:
    with dera_local.load_pair(spec.aligned, spec.reference, n_ctx=256, n_threads=1,
                              **placement) as pair:  # fmt: skip
        return [
            pair.generate(f"Once upon a time {i}", lam=1.5, max_tokens=24, sampling=GREEDY).tokens
            for i in range(10)
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    spec = tiny_pair()
    local = generations(spec)
    dera_local.model_sets.pair.check_overlap = lambda models: None  # force the racy overlap
    with worker() as one, worker() as two:
        for _ in range(args.rounds):
            for overlap in (True, False):
                got = generations(spec, rpc=f"{one},{two}", overlap_decodes=overlap)
                differing = sum(a != b for a, b in zip(got, local, strict=True))
                print(f"overlap {overlap}: {differing} of 10 generations differ from the local run")


if __name__ == "__main__":
    main()
