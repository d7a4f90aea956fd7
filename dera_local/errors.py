"""The errors dera-local raises. Each carries one line a user can act on; which class it
is says whose fault it was, so that the server can answer 400, 500 or 503.

Library messages never name command-line flags (HTTP and API users have none); a
`cli_hint` says what to change on the command line, and only the CLI prints it.
"""

# Characters that end or break a line somewhere (terminals, str.splitlines, logs).
_LINE_BREAKING = {chr(c) for c in range(32)} | {"\x7f", "\x85", "\u2028", "\u2029"}


def one_line(text: str) -> str:
    """`text` with every line-breaking or control character escaped: a message that
    quotes a damaged file (a tensor name with a newline in it) stays one line."""
    if not any(c in _LINE_BREAKING for c in text):
        return text
    return "".join(
        c.encode("unicode_escape").decode("ascii") if c in _LINE_BREAKING else c for c in text
    )


class DeraError(Exception):
    """Base class: the message is one line saying what was wrong and what to do."""

    def __init__(self, message: str, *, cli_hint: str | None = None) -> None:
        super().__init__(one_line(message))
        self.cli_hint = cli_hint

    def for_cli(self) -> str:
        """The message with the command-line hint, for the CLI's one error line."""
        return f"{self} ({self.cli_hint})" if self.cli_hint else str(self)


class ModelFileError(DeraError):
    """A model file is missing, not GGUF, truncated, or something llama.cpp cannot load."""


class IncompatibleModelsError(DeraError):
    """The aligned and reference models do not share one tokenizer."""


class BadParameterError(DeraError, ValueError):
    """A request, generation or mixing parameter is unusable (e.g. a non-finite lam, a
    prompt that does not fit the context): the caller's input, fixable by the caller."""


class PromptError(BadParameterError):
    """A prompt (`which`: "prompt" or "negative prompt") is empty, names token ids outside
    the vocabulary, or does not fit the context; a server names the field that held it."""

    def __init__(self, message: str, *, which: str = "prompt", cli_hint: str | None = None):
        super().__init__(message, cli_hint=cli_hint)
        self.which = which


class RuntimeFailure(DeraError):
    """llama.cpp failed while running valid input (a failed llama_decode): not the
    caller's fault."""


class ContextFullError(RuntimeFailure):
    """The KV cache had no room for the batch; retrying later (or with less) can work."""


class WorkerError(RuntimeFailure):
    """An RPC worker (a machine serving layers over llama.cpp's RPC) cannot be reached,
    speaks another protocol version, or stopped answering."""
