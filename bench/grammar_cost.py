"""What a grammar costs per decode step on the built-in pair (49,152-token vocabulary),
by the shape the limits of dera_local/grammar_bounds.py bound: the JSON-object grammar,
enums up to MAX_ALTERNATIVES values (sharing a long prefix, so that every value stays
alive for many steps: the worst case), the deepest repetition allowed, the most optional
properties. Also the time to compile each grammar once (what a server does off the decode
thread). Median of RUNS generations of TOKENS tokens each, greedy, lam 0.5.

    python bench/grammar_cost.py
"""

from __future__ import annotations

import statistics
import time

from common import machine, smollm2_pair, table

import dera_local
from dera_local.sampling.chain import SamplingParams, check_grammar
from dera_local.sampling.grammar_bounds import MAX_ALTERNATIVES, MAX_REPEAT
from dera_local.sampling.json_schema import json_schema_grammar

RUNS = 3
TOKENS = 24


def _enum(n: int) -> dict:
    return {"enum": [f"a-long-prefix-that-every-value-shares-{i:04d}" for i in range(n)]}


SHAPES = [
    ("no grammar", None),
    ("any JSON object ({})", {}),
    ("enum of 16", _enum(16)),
    ("enum of 64", _enum(64)),
    (f"enum of {MAX_ALTERNATIVES} (the limit)", _enum(MAX_ALTERNATIVES)),
    (f"string, maxLength {MAX_REPEAT} (the limit)", {"type": "string", "maxLength": MAX_REPEAT}),
    (
        f"array, maxItems {MAX_REPEAT} (the limit)",
        {"type": "array", "items": {"type": "integer"}, "maxItems": MAX_REPEAT},
    ),
    (
        f"object, {MAX_ALTERNATIVES - 1} optional properties",
        {"type": "object", "properties": {f"p{i}": {} for i in range(MAX_ALTERNATIVES - 1)}},
    ),
]


def main() -> None:
    spec = smollm2_pair()
    if spec is None:
        return
    with dera_local.load_pair(spec.aligned, spec.reference, lora=spec.lora, n_threads=2) as pair:
        prompt = pair.tokenize("Answer in JSON:")
        rows, base = [], None
        for name, schema in SHAPES:
            grammar = None if schema is None else json_schema_grammar(schema)
            sampling = SamplingParams(temperature=0, grammar=grammar)
            pair.generate(prompt, sampling=sampling, max_tokens=4)  # warm-up
            per_token = []
            for _ in range(RUNS):
                started = time.perf_counter()
                result = pair.generate(prompt, sampling=sampling, max_tokens=TOKENS, lam=0.5)
                per_token.append((time.perf_counter() - started) / len(result.tokens) * 1000)
            step = statistics.median(per_token)
            base = base or step
            compile_ms = "-"
            if grammar is not None:
                started = time.perf_counter()
                check_grammar(grammar, pair.model.vocab)
                compile_ms = f"{(time.perf_counter() - started) * 1000:.1f}"
            rows.append([name, f"{len(grammar or ''):,}", compile_ms, f"{step:.1f}",
                         f"{step / base:.2f}"])  # fmt: skip
    print(f"Grammar cost per step, {spec.name}; {machine()}")
    print(table(["grammar", "GBNF chars", "compile ms", "ms per token", "x no grammar"], rows))


if __name__ == "__main__":
    main()
