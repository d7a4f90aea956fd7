"""Speculation as users run it: every `dera-local generate` a fresh process, so the
adaptive draft length starts from nothing each time. Each configuration runs in N fresh
processes, in rotation (drift hits all alike): plain decoding (--draft-max 0), the
adaptive default, and fixed draft lengths k = 1..8 (--draft-max k --draft-fixed) on
copy-heavy work, to find the best fixed k on this machine. Reports min / median / max
speed-up (each run's tokens/s over the plain runs' median) and drafted tokens.

    python bench/speculative.py --fresh 10 [--pairs smollm2,qwen] [--grid 1-8]
        [--results FILE.jsonl]   # resumable: runs already in FILE are not repeated

Goals (issue 25): on copy-heavy work, the adaptive speed-up's max/min <= 1.1 over the
fresh runs and its median >= 0.9x the best fixed k's; open chat never below 0.97x.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from common import BENCH_CACHE, machine, qwen_pair, smollm2_pair, table

COPY = (
    "Copy this passage exactly, but fix its two spelling mistakes. Reply with the passage "
    "only.\n\nThe old lighthouse stood at the end of the harbour wall for more than two "
    "hundred years. Every evening the keeper climbed the narrow stairs, trimmed the wick "
    "and lit the lamp, so that the fishing boats coming home in the dark could find their "
    "way past the rocks. In the winter storms the waves broke over the gallery and the "
    "whole tower shook, but the light never went out. The keepers kept a log of every ship "
    "they saw, the wether each day and the oil they burned, and those books are now kept "
    "in the town museum, where visiters can read them."
)
CHAT = "Write a short story about a dragon who is afraid of the dark."
WORKLOADS = {"copy (two spelling fixes)": COPY, "open chat (nothing to copy)": CHAT}
LAM, MAX_TOKENS = 0.5, 160


def configurations(workload: str, grid: list[int]) -> dict[str, list[str]]:
    configs = {"plain": ["--draft-max", "0"], "adaptive": []}
    if workload.startswith("copy"):
        for k in grid:
            configs[f"fixed k={k}"] = ["--draft-max", str(k), "--draft-fixed"]
    return configs


def pair_flags(key: str) -> tuple[str, list[str]] | None:
    if key == "smollm2":  # the built-in pair: no model flags, as users run it
        return ("SmolLM2-135M + DPO LoRA (built-in)", []) if smollm2_pair() else None
    spec = qwen_pair()
    if spec is None:
        return None
    return spec.name, ["-m", spec.aligned, "-mr", spec.reference]


def run_once(model_flags: list[str], config_flags: list[str], prompt: str, threads: int) -> dict:
    command = [
        _dera_local(), "generate", "--chat", "--json",
        "--lam", str(LAM), "--temp", "0", "-n", str(MAX_TOKENS), "-t", str(threads),
        *model_flags, *config_flags, prompt,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:8])}...: {done.stderr.strip()[-400:]}")
    data = json.loads(done.stdout)
    return {
        "tokens_per_second": data["tokens_per_second"],
        "tokens": len(data["tokens"]),
        "drafted": data["drafted"],
        "accepted": data["accepted"],
        "verify_steps": data["verify_steps"],
        "finish_reason": data["finish_reason"],
        "text": data["text"],
        # each run of decode steps that verified k drafts (k 0: plain), for the modeled time
        "steps": _steps(data),
    }


def _steps(data: dict) -> list[list[int]]:
    """[[k, steps], ...] of every decode step (the first token comes from the prompt's
    read; a run that ended on its end token decoded that one too)."""
    report = data.get("speculation")
    if report is not None:
        return [[d["k"], d["steps"]] for d in report["decisions"]]
    return [[0, len(data["tokens"]) - 1 + (data["finish_reason"] == "stop")]]


def cost_table(key: str, results: Path, done: dict) -> dict[int, float]:
    """Seconds per decode step by rows (1..17) for this pair, measured once in this
    process (dera_local.speculation.probe, 20 timed steps per shape; read off StepCosts, so
    one row's median and the line through the wider shapes) and kept in the results
    file: every run's steps are priced with it, so configurations compare by what they
    decided, free of the noise between processes."""
    if ("cost table", key) in done:
        return {int(rows): s for rows, s in done[("cost table", key)]["seconds"].items()}
    import dera_local
    from dera_local.speculation.probe import measure_draft_costs

    spec = smollm2_pair() if key == "smollm2" else qwen_pair()
    with dera_local.load_pair(spec.aligned, spec.reference, lora=spec.lora, n_ctx=2048) as pair:
        measure_draft_costs(pair, max_k=16, steps=20)
        costs = pair.step_costs()
        seconds = {rows: costs.seconds(rows) for rows in range(1, 18)}
    record = {"cost table": key, "seconds": seconds}
    with results.open("a") as out:
        out.write(json.dumps(record) + "\n")
    done[("cost table", key)] = record
    return seconds


def modeled_seconds(steps: list[list[int]], seconds: dict[int, float]) -> float:
    widest = max(seconds)
    return sum(n * seconds[min(1 + k, widest)] for k, n in steps)


def _dera_local() -> str:
    beside = Path(sys.executable).parent / "dera-local"  # this environment's command
    return str(beside) if beside.exists() else (shutil.which("dera-local") or "dera-local")


def main(fresh: int, pairs: str, grid: list[int], results: Path, threads: int) -> None:
    print(f"## Speculation in fresh processes\n\nMachine: {machine()}\n")
    print(
        f"Each row: {fresh} fresh `dera-local generate --chat --json` processes, greedy, "
        f"lam {LAM}, at most {MAX_TOKENS} tokens, {threads} threads. Wall-clock speed-up: "
        "the run's tokens/s over the plain runs' median. Modeled speed-up: the same, with "
        "each run's decode steps priced at one table of step costs measured once in the "
        "bench process, so it compares what each configuration decided, without the noise "
        "between processes (on a shared 2-core VM, plain decoding alone varies by more "
        "than 1.1x between fresh processes).\n"
    )
    done = _load(results)
    for key in pairs.split(","):
        found = pair_flags(key)
        if found is None:
            continue
        name, model_flags = found
        costs = cost_table(key, results, done)
        print(
            f"{name}: ms per decode step by rows (measured once, prices every run's steps): "
            + ", ".join(f"{rows}: {s * 1000:.1f}" for rows, s in costs.items())
            + "\n"
        )
        for workload, prompt in WORKLOADS.items():
            configs = configurations(workload, grid)
            for run in range(fresh):  # in rotation: drift hits every configuration alike
                for config, flags in configs.items():
                    record_key = (name, workload, config, run)
                    if record_key in done:
                        continue
                    outcome = run_once(model_flags, flags, prompt, threads)
                    fields = ("pair", "workload", "config", "run")
                    record = dict(zip(fields, record_key, strict=True))
                    record.update(outcome)
                    with results.open("a") as out:
                        out.write(json.dumps(record) + "\n")
                    done[record_key] = record
                    print(
                        f"{key} | {workload[:4]} | {config} | run {run}: "
                        f"{outcome['tokens_per_second']:.1f} tok/s, {outcome['tokens']} tokens, "
                        f"{outcome['accepted']}/{outcome['drafted']} accepted",
                        file=sys.stderr,
                        flush=True,
                    )
            print(_report(name, workload, configs, done, fresh, costs))


def _report(name: str, workload: str, configs: dict, done: dict, fresh: int, costs) -> str:
    runs = {
        config: [done[(name, workload, config, run)] for run in range(fresh)] for config in configs
    }

    def modeled(record: dict) -> float:  # tokens per second at the measured step costs
        return record["tokens"] / modeled_seconds(record["steps"], costs)

    plain = statistics.median(r["tokens_per_second"] for r in runs["plain"])
    plain_modeled = statistics.median(modeled(r) for r in runs["plain"])
    rows, medians, modeled_medians, spreads, lows = [], {}, {}, {}, {}
    for config, records in runs.items():
        speedups = sorted(r["tokens_per_second"] / plain for r in records)
        by_model = sorted(modeled(r) / plain_modeled for r in records)
        medians[config] = statistics.median(speedups)
        modeled_medians[config] = statistics.median(by_model)
        spreads[config] = (speedups[-1] / speedups[0], by_model[-1] / by_model[0])
        lows[config] = (speedups[0], by_model[0])
        drafted = sorted(r["drafted"] for r in records)
        accepted = sum(r["accepted"] for r in records) / max(sum(drafted), 1)
        tokens = sorted(r["tokens"] for r in records)
        rows.append(
            [
                config,
                f"{speedups[0]:.2f} / **{medians[config]:.2f}** / {speedups[-1]:.2f}",
                f"{spreads[config][0]:.2f}",
                f"{by_model[0]:.2f} / **{modeled_medians[config]:.2f}** / {by_model[-1]:.2f}",
                f"{spreads[config][1]:.2f}",
                f"{drafted[0]} / {statistics.median(drafted):g} / {drafted[-1]}",
                f"{accepted:.0%}" if drafted[-1] else "-",
                f"{tokens[0]}-{tokens[-1]}",
            ]
        )
    headers = [
        "configuration",
        "wall-clock speed-up min / median / max",
        "max/min",
        "modeled speed-up min / median / max",
        "max/min",
        "drafted min / median / max",
        "accepted",
        "tokens",
    ]
    verdict = _verdict(workload, medians, modeled_medians, spreads, lows)
    return f"### {name}: {workload}\n\n" + table(headers, rows) + "\n\n" + verdict + "\n"


def _verdict(workload: str, medians: dict, modeled: dict, spreads: dict, lows: dict) -> str:
    lines = []
    for label, figures, which in (("wall clock", medians, 0), ("modeled", modeled, 1)):
        spread, plain_spread = spreads["adaptive"][which], spreads["plain"][which]
        if not workload.startswith("copy"):
            slowest = lows["adaptive"][which]
            lines.append(
                f"{label}: adaptive slowest run {slowest:.2f}x, median "
                f"{figures['adaptive']:.2f}x (goal: never below 0.97x: "
                f"{'met' if slowest >= 0.97 else 'NOT met'}; plain's own slowest: "
                f"{lows['plain'][which]:.2f}x)"
            )
            continue
        fixed = {c: m for c, m in figures.items() if c.startswith("fixed")}
        best = max(fixed, key=fixed.__getitem__)
        ratio = figures["adaptive"] / fixed[best]
        lines.append(
            f"{label}: adaptive max/min {spread:.2f} (goal <= 1.1: "
            f"{'met' if spread <= 1.1 else 'NOT met'}; plain's own: {plain_spread:.2f}); best "
            f"fixed {best} at {fixed[best]:.2f}x, adaptive median {figures['adaptive']:.2f}x = "
            f"{ratio:.2f} of it (goal >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'})"
        )
    return "\n".join(f"- {line}" for line in lines)


def _load(results: Path) -> dict:
    done = {}
    if results.exists():
        for line in results.read_text().splitlines():
            record = json.loads(line)
            if "cost table" in record:
                done[("cost table", record["cost table"])] = record
                continue
            done[(record["pair"], record["workload"], record["config"], record["run"])] = record
    return done


def parse_grid(text: str) -> list[int]:
    low, _, high = text.partition("-")
    return list(range(int(low), int(high or low) + 1))


DEFAULT_RESULTS = BENCH_CACHE / "speculative-fresh.jsonl"
DEFAULT_THREADS = os.cpu_count() or 1
