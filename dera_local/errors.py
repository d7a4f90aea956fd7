"""The errors dera-local raises for bad input: each carries one line a user can act on."""


class DeraError(Exception):
    """Base class: the message is one line saying what was wrong and what to do."""


class ModelFileError(DeraError):
    """A model file is missing, not GGUF, truncated, or something llama.cpp cannot load."""


class IncompatibleModelsError(DeraError):
    """The aligned and reference models do not share one tokenizer."""


class BadParameterError(DeraError, ValueError):
    """A generation or mixing parameter is out of range (e.g. a non-finite lam)."""
