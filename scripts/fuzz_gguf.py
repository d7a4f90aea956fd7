#!/usr/bin/env python3
"""Fuzzes dera-local's GGUF loading: N seeded mutations of valid tiny models and a LoRA
adapter, each run through `dera-local info` and `generate` in a forked child with a time
and memory limit, and prints the outcome table (markdown) for the README.

    python scripts/fuzz_gguf.py --cases 10000            # ~5 min on 2 cores
    python scripts/fuzz_gguf.py --only 4711 --keep DIR   # one case again, file kept

Case n is the same file on every machine (the mutator is seeded by n). Files of bad
cases are kept in --keep (default: a temporary folder that is printed).
"""

from __future__ import annotations

import argparse
import collections
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / d) for d in ("tests", "tests/fuzz")]

import runner  # noqa: E402
from seeds import make_cases, write_seeds  # noqa: E402

RESULTS = ("loads", "one-line error", "bad")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--start", type=int, default=0, help="first case number")
    parser.add_argument("--only", type=int, help="run just this case number")
    parser.add_argument("--parallel", type=int, default=2, help="children at a time")
    parser.add_argument("--keep", type=Path, help="folder for the files of bad cases")
    args = parser.parse_args()

    workdir = args.keep or Path(tempfile.mkdtemp(prefix="dera-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    seeds, reference = write_seeds(workdir / "seeds")
    numbers = (
        range(args.only, args.only + 1)
        if args.only is not None
        else range(args.start, args.start + args.cases)
    )
    keep = "all" if args.only is not None else "bad"
    table: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    bad = []
    started = time.monotonic()
    cases = make_cases(seeds, numbers, workdir)
    for done, outcome in enumerate(
        runner.run_cases(cases, reference, parallel=args.parallel, keep=keep), 1
    ):
        table[outcome.case.family][outcome.result] += 1
        if outcome.result == "bad" or args.only is not None:
            bad.append(outcome) if outcome.result == "bad" else None
            print(
                f"case {outcome.case.number} [{outcome.case.what}]: {outcome.result}"
                f"{': ' + outcome.reason if outcome.reason else ''}  ({outcome.case.path})",
                file=sys.stderr,
            )
        if done % 500 == 0:
            rate = done / (time.monotonic() - started)
            print(
                f"{done}/{len(numbers)} cases, {len(bad)} bad, {rate:.0f} cases/s",
                file=sys.stderr,
                flush=True,
            )

    elapsed = time.monotonic() - started
    cpu = _cpu_name()
    print(
        f"Cases {numbers.start}..{numbers.stop - 1} ({len(numbers)}), seeds: "
        f"{', '.join(s.name for s in seeds)}; {elapsed:.0f} s on {cpu}, "
        f"{args.parallel} at a time.\n"
    )
    print("| mutation | cases | loads | one-line error | bad |")
    print("|---|---|---|---|---|")
    total: collections.Counter = collections.Counter()
    for family in sorted(table, key=lambda f: -sum(table[f].values())):
        counts = table[family]
        total.update(counts)
        print(
            f"| {family} | {sum(counts.values())} | "
            + " | ".join(str(counts[r]) for r in RESULTS)
            + " |"
        )
    print(
        f"| **all** | **{sum(total.values())}** | "
        + " | ".join(f"**{total[r]}**" for r in RESULTS)
        + " |"
    )
    if bad:
        print(f"\n{len(bad)} bad cases; their files are in {workdir}", file=sys.stderr)
    return 1 if bad else 0


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


if __name__ == "__main__":
    sys.exit(main())
