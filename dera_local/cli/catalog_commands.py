"""`dera-local list` and `dera-local pull`: the catalog of real DeRa pairs."""

from __future__ import annotations

import click

from ..sources import hub
from ..sources.catalog import DEFAULT_QUANT, SIDES, load_catalog
from ..sources.resolve import pull


@click.command("list")
def list_command() -> None:
    """Show the catalog of DeRa pairs and which are already downloaded."""
    for name, entry in load_catalog().items():
        kind = "exact" if entry.exact else "approximate (base -> instruct)"
        click.echo(f"{name}: {entry.description}")
        click.echo(f"  {kind}; {entry.strength_note()}; license {entry.license}")
        click.echo(f"  {entry.checked_note()}")
        for quant in entry.quants:
            sides = entry.candidates(quant)
            present = [any(hub.cached_path(r) for r in side) for side in sides]
            state = (
                "downloaded"
                if all(present)
                else "partly downloaded"
                if any(present)
                else "not downloaded"
            )
            sizes = " + ".join(f"{entry.approx_gb.get(side, 0):g}" for side in SIDES)
            click.echo(f"  {quant}: ~{sizes} GB, {state}")
            for side, candidates in zip(SIDES, sides, strict=True):
                fallbacks = f" (fallbacks: {', '.join(map(str, candidates[1:]))})"
                click.echo(f"    {side}: {candidates[0]}{fallbacks if candidates[1:] else ''}")


@click.command("pull")
@click.argument("name")
@click.option("--quant", default=DEFAULT_QUANT, show_default=True)
def pull_command(name: str, quant: str) -> None:
    """Download both models of catalog pair NAME (resumable, into the Hugging Face cache).
    A side whose repository is gone (404) comes from its next fallback repository."""
    for pulled in pull(name, quant):
        for line in pulled.gone:
            click.echo(f"{pulled.side}: gone: {line}", err=True)
        if pulled.gone:
            click.echo(f"{pulled.side}: using the fallback {pulled.remote}", err=True)
        click.echo(f"{pulled.side + ':':<10} {pulled.path}")
    click.echo(f"use it with: dera-local chat --pair {name} --quant {quant}", err=True)
