"""`dera-local chat`: an interactive, streaming conversation with commands to turn
alignment up or down mid-conversation."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import click

from ..chat import ChatSession
from ..engine.exact import ExactBudgetError
from ..engine.guidance import validate_cfg_scale
from ..engine.mixing import validate_lam
from ..errors import BadParameterError, DeraError
from .files import read_text_file
from .open_models import open_model_set
from .options import model_options, split_options
from .sampling_options import (
    cfg_options,
    exact_cost_line,
    exact_options,
    exact_sampling,
    exact_settings,
    negative_prompt_from,
    sampling_from,
    sampling_options,
)

HELP = """commands:
  /lambda X      set lam (1 = aligned, 0 = reference, >1 extrapolates)
  /system TEXT   set the system prompt and start over
  /negative TEXT set the negative prompt (classifier-free guidance; empty: off)
  /cfg S         set the guidance scale (1 = off, >1 steers away from the negative)
  /exact on|off  draw replies from the retrained target itself (0 <= lam <= 1)
  /reset         forget the conversation
  /help          this text
  /quit          leave (Ctrl-D too); Ctrl-C stops the current reply"""


def _lines(interactive: bool) -> Iterator[str]:
    if sys.stdin is None:  # started with stdin closed
        raise DeraError("chat reads what you type from stdin, and stdin is closed")
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        except KeyboardInterrupt:
            click.echo()
            continue
        except UnicodeDecodeError:
            raise DeraError("stdin is not UTF-8 text") from None
        if not interactive and not line:
            return
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # bytes Python kept as surrogate escapes
            raise DeraError("stdin is not UTF-8 text") from None
        yield line.rstrip("\n")


def _command(session: ChatSession, line: str, sampling: dict | None = None) -> bool:
    """Runs a /command; returns False when the session should end. `sampling`: the
    SamplingParams for replies with /exact off and on."""
    name, _, argument = line.partition(" ")
    argument = argument.strip()
    if name in ("/quit", "/exit"):
        return False
    if name in ("/lambda", "/lam"):
        try:
            session.lam = validate_lam(argument)
        except DeraError as exc:
            click.echo(f"error: {exc}", err=True)
        else:
            click.echo(f"lam = {session.lam:g}", err=True)
    elif name == "/negative":
        session.negative_prompt = argument or None
        click.echo(f"negative prompt {'set' if argument else 'off'}", err=True)
    elif name == "/cfg":
        try:
            scale = validate_cfg_scale(argument)
            if scale != 1 and session.negative_prompt is None:
                raise DeraError("a CFG scale needs a negative prompt: set /negative TEXT first")
            session.cfg_scale = scale
        except DeraError as exc:
            click.echo(f"error: {exc}", err=True)
        else:
            click.echo(f"cfg scale = {session.cfg_scale:g}", err=True)
    elif name == "/exact":
        if argument not in ("on", "off"):
            click.echo("error: /exact on or /exact off", err=True)
        else:
            session.exact = argument == "on"
            if sampling is not None:
                session.sampling = sampling[session.exact]
            click.echo(f"exact realignment {argument}", err=True)
    elif name == "/reset":
        session.reset()
        click.echo("conversation cleared", err=True)
    elif name == "/system":
        session.system = argument or None
        session.reset()
        click.echo("system prompt set; conversation cleared", err=True)
    elif name == "/help":
        click.echo(HELP, err=True)
    else:
        click.echo(f"unknown command {name}; /help lists them", err=True)
    return True


def _reply(session: ChatSession, line: str) -> None:
    """Streams the reply to a user turn; a reply refused for its settings (a lam exact
    realignment cannot sample, its spent budget) is one error line and the turn is
    forgotten; anything else (a lost RPC worker) ends the chat as before."""
    try:
        stream = session.send(line)
    except BadParameterError as exc:  # refused before anything ran: the turn is gone
        click.echo(f"error: {exc}", err=True)
        return
    try:
        for chunk in stream:
            click.echo(chunk, nl=False)
    except KeyboardInterrupt:
        stream.close()
        click.echo(" [stopped]", nl=False)
    except (BadParameterError, ExactBudgetError) as exc:  # this turn's; the chat goes on
        session.drop_last_turn()
        click.echo(f"error: {exc}", err=True)
        return
    click.echo()
    if stream.result is not None and stream.result.exact is not None:
        click.echo(exact_cost_line(stream.result.exact), err=True)


@click.command()
@click.option("--system", "system", default=None, help="System prompt.")
@click.option(
    "--chat-template",
    "template",
    default=None,
    help="Jinja chat template (text) instead of the aligned model's.",
)
@click.option("--chat-template-file", default=None, help="Read the chat template from a file.")
@cfg_options
@exact_options
@model_options
@sampling_options
def chat(
    system: str | None,
    template: str | None,
    chat_template_file: str | None,
    negative_prompt: str | None,
    negative_prompt_file: str | None,
    cfg_scale: float,
    exact: bool,
    exact_budget: int,
    exact_parallel: int,
    **kwargs,
) -> None:
    """Chat with the DeRa pair; /lambda X changes lam as you go, /help lists commands."""
    model, sampling, rest = split_options(kwargs)
    if chat_template_file:
        template = read_text_file(chat_template_file, "chat template file")
    # replies' sampling with /exact off and on (on: truncation the user did not set off)
    by_exact = {False: sampling_from(**sampling), True: sampling_from(**exact_sampling(sampling))}
    params = by_exact[exact]
    lam = validate_lam(rest["lam"])
    negative = negative_prompt_from(negative_prompt, negative_prompt_file)
    cfg_scale = validate_cfg_scale(cfg_scale)
    interactive = sys.stdin is not None and sys.stdin.isatty()
    with open_model_set(**model, one_model_ok=negative is not None) as pair:
        session = ChatSession(
            pair,
            system=system,
            template=template,
            lam=lam,
            sampling=params,
            max_tokens=rest["max_tokens"],
            negative_prompt=negative,
            cfg_scale=cfg_scale,
            **exact_settings(exact, exact_budget, exact_parallel),
        )
        if interactive:
            click.echo(f"lam = {lam:g}; /help for commands, /quit to leave", err=True)
        for line in _lines(interactive):
            if not line.strip():
                continue
            if line.startswith("/"):
                if not _command(session, line, by_exact):
                    break
                continue
            _reply(session, line)
