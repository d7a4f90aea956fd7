"""`dera-local extract`: an aligned model as a LoRA adapter on its reference (see
dera_local/extract.py), so that the pair runs in the memory of one model."""

from __future__ import annotations

import json
import sys

import click

from ..extract import describe, extract
from ..llama.gguf_inspect import read_gguf


@click.command("extract")
@click.argument("aligned", metavar="ALIGNED.gguf")
@click.argument("reference", metavar="REFERENCE.gguf")
@click.option("-o", "--output", required=True, metavar="OUT.lora.gguf", help="The adapter.")
@click.option(
    "--rank",
    type=click.IntRange(1, 4096),
    default=16,
    show_default=True,
    help="Rank of each matrix's difference kept (higher: closer, larger).",
)
@click.option(
    "--type",
    "dtype",
    type=click.Choice(["f16", "f32"]),
    default="f16",
    show_default=True,
    help="Adapter tensor type.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
@click.option("--force", is_flag=True, help="Replace OUT.lora.gguf if it exists.")
def extract_command(
    aligned: str, reference: str, output: str, rank: int, dtype: str, as_json: bool, force: bool
) -> None:
    """Extract ALIGNED as a rank-R LoRA adapter on REFERENCE.

    Then: dera-local chat -mr REFERENCE.gguf --lora OUT.lora.gguf (one copy of the
    weights). Prints how much of the difference the adapter keeps, per layer and overall,
    and every difference it cannot carry."""
    total = read_gguf(reference).n_tensors
    bars = []

    def advance(_name: str) -> None:
        # Opened at the first finished tensor: input errors come first, as one line.
        if not bars:
            bars.append(click.progressbar(length=total, label="extract", file=sys.stderr))
            bars[0].__enter__()
        bars[0].update(1)

    try:
        report = extract(
            aligned, reference, output, rank=rank, dtype=dtype, progress=advance, overwrite=force
        )
    finally:
        for bar in bars:
            bar.__exit__(None, None, None)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        click.echo("\n".join(describe(report)))
