"""One generated sequence's output and the single set of rules for when it ends, and
the text it may show as it arrives.

Every slot of the batched decoder (one stream, a sweep point, a server request, a
speculating slot walking its drafts) feeds each sampled token to
`SequenceOutput.advance` and stops when it returns a finish reason, so the rules live
here only. `TextStream` holds back the bytes of a UTF-8 character split across tokens
and any tail that could still grow into a stop string.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from ..llama.backend import LoadedModel

FINISH_STOP = "stop"  # an end-of-generation token or a stop string
FINISH_LENGTH = "length"  # max_tokens reached or the context is full


class SequenceOutput:
    """Tokens and text of one sequence so far. `tokens` never holds the end-of-generation
    token; `new_text` is what the last advance made safe to show."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        n_prompt: int,
        n_ctx: int,
        max_tokens: int,
        stop: Sequence[str] = (),
        shown_special: Sequence[int] = (),
    ) -> None:
        """max_tokens: -1 = no limit but the context. n_ctx: positions this sequence may
        use, its prompt included. shown_special: control tokens written as their text
        (others are empty, as llama.cpp detokenizes by default)."""
        self._model = model
        self._n_prompt = n_prompt
        self._n_ctx = n_ctx
        self._max_tokens = max_tokens
        self._text = TextStream(stop)
        self.tokens: list[int] = []
        self.pieces: list[str] = []
        self.new_text = ""
        self.finish_reason: str | None = None
        self.end_token: int | None = None  # the end-of-generation token, when one ended it
        self._shown_special = frozenset(shown_special)

    def advance(self, token: int) -> str | None:
        """Takes one sampled token; returns the finish reason if the sequence ends with
        it (the token is then not decoded any further), else None."""
        self.new_text = ""
        if self._model.is_end_of_generation(token):
            self.end_token = token
            return self.end(FINISH_STOP)
        self.tokens.append(token)
        piece = self._text.push(
            self._model.token_bytes(token, special=token in self._shown_special)
        )
        if piece:
            self.pieces.append(piece)
            self.new_text = piece
        if self._text.stopped:
            return self.end(FINISH_STOP)
        if len(self.tokens) == self._max_tokens:
            return self.end(FINISH_LENGTH)
        # The newest token would be decoded at position n_prompt + len(tokens) - 1.
        if self._n_prompt + len(self.tokens) - 1 >= self._n_ctx:
            return self.end(FINISH_LENGTH)
        return None

    @property
    def tokens_left(self) -> int | None:
        """How many more tokens max_tokens allows (None: no limit but the context)."""
        return None if self._max_tokens < 0 else self._max_tokens - len(self.tokens)

    def end(self, reason: str) -> str:
        """Ends the sequence here for a reason decided outside these rules (an exact
        realignment attempt killed at this token)."""
        self.finish_reason = reason
        return reason

    def flush(self) -> str:
        """At the end: the held-back tail (an unfinished character becomes U+FFFD)."""
        tail = self._text.finish()
        if tail:
            self.pieces.append(tail)
        return tail

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def _longest_stop_prefix_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


class TextStream:
    """Feed token bytes in; get back the text that can be shown now."""

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stop if s]
        self._pending = ""  # decoded text not yet emitted (it may start a stop string)
        self.stopped = False  # a stop string was found; nothing more will be emitted

    def push(self, data: bytes) -> str:
        """Adds one token's bytes; returns the text that became safe to emit."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(data)
        return self._release(final=False)

    def finish(self) -> str:
        """Flushes at the end of generation (an unfinished character becomes U+FFFD)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._stops:
            hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
            if hits:
                self.stopped = True
                out, self._pending = self._pending[: min(hits)], ""
                return out
        keep = 0 if final else _longest_stop_prefix_suffix(self._pending, self._stops)
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out
