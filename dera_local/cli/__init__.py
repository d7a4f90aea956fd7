"""The `dera-local` command: a thin click dispatcher over the Python API.

Every DeraError (bad input) becomes one line on stderr and exit status 1, no traceback;
a command line that does not parse (an unknown flag, a value of the wrong type) is one
line too, with exit status 2, as click and POSIX tools use it.
"""

from __future__ import annotations

import sys
import warnings

import click

from ..errors import DeraError
from .catalog_commands import list_command, pull_command
from .chat import chat
from .extract import extract_command
from .generate import generate
from .info import info
from .score import score_command
from .serve import serve
from .sweep import sweep_command
from .worker import worker


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


class _OneLineErrors(click.Group):
    """Bad input: one line on stderr, exit 1; warnings: one line each, no source lines."""

    def invoke(self, ctx: click.Context):
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            # llama_cpp._utils keeps two /dev/null files open for the process's life;
            # their ResourceWarning at exit is not the user's business.
            warnings.filterwarnings("ignore", category=ResourceWarning)
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except DeraError as exc:
                raise click.ClickException(exc.for_cli()) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """click's main, except that a usage error is one line (click prints the usage,
        a hint and the error on three): what was wrong and where the help is."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            status = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # bare `dera-local`: the help
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            where = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
            click.echo(f"Error: {exc.format_message()}{where}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:  # Ctrl-C or end of input at a prompt
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(status if isinstance(status, int) else 0)


@click.group(cls=_OneLineErrors)
@click.version_option(package_name="dera-local")
def cli() -> None:
    """Decoding-time realignment (DeRa) of local GGUF models on llama.cpp.

    Mixes an aligned model's logits with its reference model's at every step,
    h = lam * aligned + (1 - lam) * reference, to turn alignment up or down
    without retraining.
    """


cli.add_command(generate)
cli.add_command(chat)
cli.add_command(info)
cli.add_command(sweep_command)
cli.add_command(score_command)
cli.add_command(serve)
cli.add_command(list_command)
cli.add_command(pull_command)
cli.add_command(worker)
cli.add_command(extract_command)


def main() -> None:
    cli()
