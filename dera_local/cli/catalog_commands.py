"""`dera-local list` and `dera-local pull`: the catalog of real DeRa pairs."""

from __future__ import annotations

import click

from .. import hub
from ..catalog import DEFAULT_QUANT, load_catalog
from ..resolve import pull


@click.command("list")
def list_command() -> None:
    """Show the catalog of DeRa pairs and which are already downloaded."""
    for name, entry in load_catalog().items():
        kind = "exact" if entry.exact else "approximate (base -> instruct)"
        beta = f"beta {entry.beta:g}" if entry.beta is not None else "beta unpublished"
        click.echo(f"{name}: {entry.description}")
        click.echo(
            f"  {kind}; {beta}; license {entry.license}; "
            f"{'names checked' if entry.verified else 'file names not verified'}"
        )
        for quant in entry.quants:
            files = entry.files(quant)
            present = [hub.cached_path(remote) is not None for remote in files]
            state = (
                "downloaded"
                if all(present)
                else "partly downloaded"
                if any(present)
                else "not downloaded"
            )
            sizes = " + ".join(
                f"{entry.approx_gb.get(side, 0):g}" for side in ("aligned", "reference")
            )
            click.echo(f"  {quant}: ~{sizes} GB, {state}")
            for side, remote in zip(("aligned", "reference"), files, strict=True):
                click.echo(f"    {side}: {remote}")


@click.command("pull")
@click.argument("name")
@click.option("--quant", default=DEFAULT_QUANT, show_default=True)
def pull_command(name: str, quant: str) -> None:
    """Download both models of catalog pair NAME (resumable, into the Hugging Face cache)."""
    aligned, reference = pull(name, quant)
    click.echo(f"aligned:   {aligned}")
    click.echo(f"reference: {reference}")
    click.echo(f"use it with: dera-local chat --pair {name} --quant {quant}", err=True)
