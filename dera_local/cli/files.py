"""The files a command is given: read as text with one-line errors, or written
(standard output for "-")."""

from __future__ import annotations

import contextlib
import sys

from ..errors import DeraError


def open_output(path: str | None):
    """The file to write rows to (stdout when no path is given)."""
    if path is None:
        return contextlib.nullcontext(sys.stdout)
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise DeraError(f"cannot write {path}: {exc.strerror}") from None


def read_text_file(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError as exc:
        raise DeraError(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise DeraError(f"{what} {path} is not UTF-8 text") from None
