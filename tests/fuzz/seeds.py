"""The valid files the fuzzer mutates, and the numbered cases made from them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf_mutator import mutate
from runner import Case
from tiny_models import write_tiny_lora, write_tiny_model


@dataclass(frozen=True)
class Seed:
    name: str
    kind: str  # "model" (loaded as both sides of a pair) or "lora" (on the reference)
    blob: bytes


def write_seeds(directory: Path) -> tuple[list[Seed], Path]:
    """The seeds (a float model, a Q8_0 model, a LoRA adapter) and the clean reference
    model that LoRA cases are applied to."""
    directory.mkdir(parents=True, exist_ok=True)
    reference = write_tiny_model(directory / "reference.gguf", seed=1)
    quantized = write_tiny_model(
        directory / "q8.gguf", seed=2, matrix_type=gguf.GGMLQuantizationType.Q8_0
    )
    lora = write_tiny_lora(directory / "lora.gguf", seed=9)
    seeds = [
        Seed("tiny llama F32", "model", reference.read_bytes()),
        Seed("tiny llama Q8_0", "model", quantized.read_bytes()),
        Seed("tiny LoRA", "lora", lora.read_bytes()),
    ]
    return seeds, reference


def make_cases(seeds: list[Seed], numbers: range, directory: Path) -> Iterator[Case]:
    """Case n mutates seed n mod len(seeds) with the mutator's case n: reproducible one at
    a time (`scripts/fuzz_gguf.py --only N`)."""
    for number in numbers:
        seed = seeds[number % len(seeds)]
        blob, family, what = mutate(seed.blob, number)
        path = directory / f"case-{number}.gguf"
        path.write_bytes(blob)
        yield Case(number, path, seed.kind, family, f"{seed.name}: {what}")
