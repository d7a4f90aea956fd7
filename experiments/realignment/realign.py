"""Does DeRa at lam reach the model retrained at beta/lam? The DeRa paper's central claim,
measured on the built-in pair (SmolLM2-135M-Instruct + the conciseness DPO LoRA).

    pip install -e ".[demo,plot]"
    python experiments/realignment/realign.py            # ~25 min on 2 cores

Policies, on the 60 held-out questions, one answer each, sampled from the policy itself
(temperature 1, no truncation; question i uses seed 2024 + i under every policy):
  - DeRa from the shipped beta = 0.1 adapter over a lam grid (0 = the reference);
  - adapters retrained at beta = 0.05 and 0.2 (and 0.1 again), each at lam = 1.

Stages (each resumable: rows are appended to results/*.jsonl and reused on a rerun):
  sample  answers, words (reward = -words), one-sample KL to the reference;
  score   teacher-forced passes of every compared policy's answers through all models:
          the exact per-token KL(source || target) between every two policies, summed
          along each answer;
  report  results/results.md (tables) and results/realignment.png (reward against KL).

The retrained adapters come from models/smollm2-concise-dpo/train.py --beta B --out
experiments/realignment/adapters/beta-B.lora.gguf (same data, LoRA shape, steps, seed
and learning rate as the shipped adapter).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL_DIR = HERE.parents[1] / "models" / "smollm2-concise-dpo"
sys.path[:0] = [str(HERE), str(MODEL_DIR)]

from prompts import split_prompts  # noqa: E402
from reward import word_count  # noqa: E402
from stats import dera_log_probs, kl_row, mean_se, nearest, relative_gap  # noqa: E402

import dera_local  # noqa: E402
from dera_local.analysis.score import teacher_forced_logits  # noqa: E402
from dera_local.analysis.sweep import LambdaSweep  # noqa: E402
from dera_local.sources.default_pair import demo_adapter_path, demo_reference_path  # noqa: E402

PURE_SAMPLING = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0]
SHIPPED_BETA = 0.1


def adapter_paths(folder: Path) -> dict[str, Path]:
    """Adapter name -> file; "0.1" is the shipped adapter, "0.1 rerun" the same recipe
    and seed trained again here (how exactly training reproduces), "0.1 seed 1" the same
    recipe with another seed (how far apart two runs of one beta land: the noise floor)."""
    paths = {"0.1": demo_adapter_path()}
    for name, file in (
        ("0.05", "beta-0.05"),
        ("0.2", "beta-0.2"),
        ("0.1 rerun", "beta-0.1"),
        ("0.1 seed 1", "beta-0.1-seed1"),
    ):
        path = folder / f"{file}.lora.gguf"
        if path.exists():
            paths[name] = path
    return paths


@dataclass(frozen=True)
class Policy:
    name: str
    adapter: str  # key of adapter_paths()
    lam: float
    beta: float | None  # the KL strength it stands for (None: the reference)


def policies(adapters: dict[str, Path]) -> list[Policy]:
    compared = [
        Policy("reference", "0.1", 0.0, None),
        Policy("DeRa λ=0.5", "0.1", 0.5, SHIPPED_BETA / 0.5),
        Policy("DeRa λ=1 (shipped β=0.1)", "0.1", 1.0, SHIPPED_BETA),
        Policy("DeRa λ=2", "0.1", 2.0, SHIPPED_BETA / 2.0),
        Policy("retrained β=0.2", "0.2", 1.0, 0.2),
        Policy("retrained β=0.1 (rerun)", "0.1 rerun", 1.0, 0.1),
        Policy("retrained β=0.1 (seed 1)", "0.1 seed 1", 1.0, 0.1),
        Policy("retrained β=0.05", "0.05", 1.0, 0.05),
    ]
    return [p for p in compared if p.adapter in adapters]


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sample(args, adapters: dict[str, Path], questions: list[str]) -> None:
    path = args.results / "samples.jsonl"
    done = {(r["adapter"], r["lam"], r["question"]) for r in _read_rows(path)}
    started = time.time()
    for name, adapter in adapters.items():
        lambdas = GRID if name == "0.1" else [1.0]
        todo = [
            i for i in range(len(questions))
            if any((name, lam, i) not in done for lam in lambdas)
        ]  # fmt: skip
        if not todo:
            continue
        _log(f"sampling adapter β={name} at λ {lambdas}: {len(todo)} questions")
        with (
            dera_local.load_pair(None, demo_reference_path(), lora=adapter, n_ctx=1024) as pair,
            LambdaSweep(pair, lambdas, max_tokens=args.max_tokens) as runner,
            path.open("a") as out,
        ):
            for i in todo:
                session = dera_local.ChatSession(pair)
                session.messages = [{"role": "user", "content": questions[i]}]
                prompt_tokens = session.prompt_tokens()
                sampling = dera_local.SamplingParams(**PURE_SAMPLING, seed=args.seed + i)
                for row in runner.run(prompt_tokens, sampling=sampling):
                    record = {
                        "adapter": name,
                        "lam": row.lam,
                        "question": i,
                        "prompt_tokens": prompt_tokens,
                        "tokens": row.tokens,
                        "end_token": row.end_token,
                        "finish_reason": row.finish_reason,
                        "words": word_count(row.text),
                        "kl_one_sample": row.kl_to_reference,
                        "text": row.text,
                    }
                    out.write(json.dumps(record) + "\n")
                out.flush()
                _log(f"  [{name} {i + 1}/{len(questions)}] {time.time() - started:.0f}s")


def score(args, adapters: dict[str, Path], compared: list[Policy]) -> None:
    samples = {
        (r["adapter"], r["lam"], r["question"]): r
        for r in _read_rows(args.results / "samples.jsonl")
    }
    path = args.results / "scores.jsonl"
    done = {(r["source"], r["question"]) for r in _read_rows(path)}
    todo = [
        (source, key[2])
        for source in compared
        for key in sorted(samples)
        if key[:2] == (source.adapter, source.lam) and (source.name, key[2]) not in done
    ]
    if not todo:
        return
    _log(f"scoring {len(todo)} answers against {len(compared)} policies")
    started = time.time()
    with ExitStack() as stack, path.open("a") as out:
        pairs = {
            name: stack.enter_context(
                dera_local.load_pair(None, demo_reference_path(), lora=adapter, n_ctx=1024)
            )
            for name, adapter in adapters.items()
        }
        for n, (source, question) in enumerate(todo, 1):
            row = samples[(source.adapter, source.lam, question)]
            answer = row["tokens"] + ([row["end_token"]] if row["end_token"] is not None else [])
            totals = {p.name: 0.0 for p in compared}
            streams = {
                name: teacher_forced_logits(pair, row["prompt_tokens"], answer)
                for name, pair in pairs.items()
            }
            names = list(streams)
            # The same tokens and batch size: every pair yields the same chunks in step.
            for chunks in zip(*streams.values(), strict=True):
                aligned = {name: chunk[0] for name, chunk in zip(names, chunks, strict=True)}
                reference = chunks[0][1]
                log_probs = {
                    p.name: dera_log_probs(aligned[p.adapter], reference, p.lam) for p in compared
                }
                for target, kl in kl_row(log_probs[source.name], log_probs).items():
                    totals[target] += kl
            record = {
                "source": source.name,
                "question": question,
                "n_tokens": len(answer),
                "kl": totals,
            }
            out.write(json.dumps(record) + "\n")
            out.flush()
            if n % 20 == 0:
                _log(f"  {n}/{len(todo)} scored, {time.time() - started:.0f}s")


def _fmt(mean: float, se: float, digits: int = 1) -> str:
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def report(args, compared: list[Policy]) -> None:
    samples = _read_rows(args.results / "samples.jsonl")
    scores = _read_rows(args.results / "scores.jsonl")

    def answers(adapter: str, lam: float) -> list[dict]:
        return [r for r in samples if r["adapter"] == adapter and r["lam"] == lam]

    lines = [
        f"Held-out questions: {len({r['question'] for r in samples})}; "
        f"at most {args.max_tokens} tokens per answer; seeds {args.seed} + question.\n"
    ]
    lines += [
        "| policy | stands for β | reward (−words) | KL to reference, one-sample (nats) "
        "| KL to reference, exact per token, summed (nats) | cut at the cap |",
        "|---|---|---|---|---|---|",
    ]
    summary = {}
    for policy in compared:
        mine = answers(policy.adapter, policy.lam)
        own = [s for s in scores if s["source"] == policy.name]
        reward = mean_se([-r["words"] for r in mine])
        kl = mean_se([r["kl_one_sample"] for r in mine])
        exact = mean_se([s["kl"]["reference"] for s in own])
        cut = sum(r["finish_reason"] == "length" for r in mine)
        summary[policy.name] = {"reward": reward, "kl": kl, "exact": exact}
        beta = "∞ (no alignment)" if policy.beta is None else f"{policy.beta:g}"
        lines.append(
            f"| {policy.name} | {beta} | {_fmt(*reward)} | {_fmt(*kl)} | {_fmt(*exact)} "
            f"| {cut}/{len(mine)} |"
        )

    lines += [
        "",
        "Mean per-token KL(row ‖ column), on the row policy's own answers "
        "(teacher-forced, exact over the vocabulary; mean over answers ± s.e.):",
        "",
    ]
    lines.append("| answers of ↓ vs → | " + " | ".join(p.name for p in compared) + " |")
    lines.append("|---|" + "---|" * len(compared))
    matrix = {}
    for source in compared:
        own = [s for s in scores if s["source"] == source.name]
        cells = []
        for target in compared:
            # Answers scored before a policy joined have no KL to it (scoring is
            # resumable per answer): such a cell is left out, not filled in.
            per_token = [
                s["kl"][target.name] / s["n_tokens"] for s in own if target.name in s["kl"]
            ]
            if not per_token:
                cells.append("not scored")
                continue
            mean, se = mean_se(per_token)
            matrix.setdefault(source.name, {})[target.name] = mean
            cells.append(f"{mean:.3f} ± {se:.3f}")
        lines.append(f"| {source.name} | " + " | ".join(cells) + " |")

    lines += ["", "Nearest policy to each (smallest per-token KL on its own answers):", ""]
    for source in compared:
        if source.name in matrix:
            lines.append(f"- {source.name} → {nearest(matrix[source.name], source.name)}")
    lines += ["", "Gaps of DeRa(λ) to the adapter retrained at β/λ:", ""]
    for lam, beta in ((2.0, 0.05), (0.5, 0.2)):
        dera, retrained = f"DeRa λ={lam:g}", f"retrained β={beta:g}"
        if dera in summary and retrained in summary:
            d, r = summary[dera], summary[retrained]
            lines.append(
                f"- λ={lam:g} vs β={beta:g}: reward {d['reward'][0]:.1f} vs {r['reward'][0]:.1f} "
                f"({100 * relative_gap(d['reward'][0], r['reward'][0]):.0f}% apart); "
                f"exact KL to reference {d['exact'][0]:.1f} vs {r['exact'][0]:.1f} "
                f"({100 * relative_gap(d['exact'][0], r['exact'][0]):.0f}% apart)"
            )
    lines += ["", *training_table(args.adapters)]
    text = "\n".join(lines) + "\n"
    (args.results / "results.md").write_text(text)
    print(text)
    _figure(args, samples, compared, summary)


def training_table(folder: Path) -> list[str]:
    """The retrained adapters' DPO curves, from their training logs: loss, preference
    margin (log-ratio of chosen minus rejected, summed over tokens) and accuracy, by
    quarter of training."""
    lines = [
        "DPO training of the retrained adapters (56 steps of 4 pairs; mean per quarter):",
        "",
        "| adapter | quarter | loss | margin (nats) | β × margin | accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for log in sorted(folder.glob("beta-*.train.log")):
        # beta-B.train.log, or beta-B-seedS.train.log for another seed
        beta_text, _, seed = (
            log.name.removeprefix("beta-").removesuffix(".train.log").partition("-")
        )
        beta = float(beta_text)
        label = f"β={beta:g}" + (f" ({seed.replace('seed', 'seed ')})" if seed else "")
        steps = [line.split() for line in log.read_text().splitlines() if line.startswith("step ")]
        for quarter in range(4):
            part = steps[quarter * len(steps) // 4 : (quarter + 1) * len(steps) // 4]
            if not part:
                continue
            loss = mean_se([float(s[3]) for s in part])[0]
            margin = mean_se([float(s[5]) for s in part])[0]
            accuracy = mean_se([float(s[7]) for s in part])[0]
            lines.append(
                f"| {label} | {quarter + 1} | {loss:.4f} | {margin:.1f} | "
                f"{beta * margin:.1f} | {accuracy:.2f} |"
            )
    return lines


def _figure(args, samples: list[dict], compared: list[Policy], summary: dict) -> None:
    from dera_local.analysis.report import plot

    grid = []
    for lam in GRID:
        mine = [r for r in samples if r["adapter"] == "0.1" and r["lam"] == lam]
        if not mine:
            continue
        reward, kl = (
            mean_se([-r["words"] for r in mine]),
            mean_se([r["kl_one_sample"] for r in mine]),
        )
        grid.append(
            {
                "lam": lam,
                "mean_reward": reward[0],
                "se_reward": reward[1],
                "mean_kl_to_reference": kl[0],
                "se_kl_to_reference": kl[1],
            }
        )
    markers = [
        {"label": p.name, "mean_reward": summary[p.name]["reward"][0],
         "se_reward": summary[p.name]["reward"][1],
         "mean_kl_to_reference": summary[p.name]["kl"][0],
         "se_kl_to_reference": summary[p.name]["kl"][1]}
        for p in compared if p.name.startswith("retrained")
    ]  # fmt: skip
    plot(grid, args.results / "realignment.png", markers=markers,
         title="DeRa (β=0.1 adapter) vs retrained adapters")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["all", "sample", "score", "report"], default="all")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--questions", type=int, default=60, help="first N held-out questions")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--adapters", type=Path, default=HERE / "adapters")
    args = parser.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    adapters = adapter_paths(args.adapters)
    missing = {"0.05", "0.2"} - set(adapters)
    if missing:
        sys.exit(
            f"error: no retrained adapter for β {', '.join(sorted(missing))}; train it with "
            "models/smollm2-concise-dpo/train.py --beta B "
            "--out experiments/realignment/adapters/beta-B.lora.gguf"
        )
    compared = policies(adapters)
    _, heldout = split_prompts()
    if args.stage in ("all", "sample"):
        sample(args, adapters, heldout[: args.questions])
    if args.stage in ("all", "score"):
        score(args, adapters, compared)
    if args.stage in ("all", "report"):
        report(args, compared)


if __name__ == "__main__":
    main()
