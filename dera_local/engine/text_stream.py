"""Turns generated token bytes into text that is safe to show as it arrives.

Two things are held back until they resolve: the bytes of a UTF-8 character split across
tokens (so every chunk is valid text), and any tail that could still grow into a stop
string (so a partial stop string is never emitted).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


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
