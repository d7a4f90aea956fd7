"""The `dera-local` command: a thin click dispatcher over the Python API.

Every DeraError (bad input) becomes one line on stderr and exit status 1, no traceback.
"""

from __future__ import annotations

import warnings

import click

from ..errors import DeraError
from .chat import chat
from .generate import generate
from .info import info


class _OneLineErrors(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DeraError as exc:
            raise click.ClickException(str(exc)) from None


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


@click.group(cls=_OneLineErrors)
@click.version_option(package_name="dera-local")
def cli() -> None:
    """Decoding-time realignment (DeRa) of local GGUF models on llama.cpp.

    Mixes an aligned model's logits with its reference model's at every step,
    h = lam * aligned + (1 - lam) * reference, to turn alignment up or down
    without retraining.
    """
    warnings.formatwarning = _warning_line


cli.add_command(generate)
cli.add_command(chat)
cli.add_command(info)


def main() -> None:
    cli()
