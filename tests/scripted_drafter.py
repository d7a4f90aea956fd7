"""A draft source for tests: drafts from a known continuation of the prompt."""

from __future__ import annotations


class ScriptedDrafter:
    """Drafts from a known continuation of the prompt: the truth (all right), the truth
    shifted by one id (all wrong), or anything else a test scripts."""

    cheap = True
    source = "scripted"

    def __init__(self, continuation: list[int], shift: int = 0, n_vocab: int = 263) -> None:
        self.continuation = continuation
        self.shift = shift
        self.n_vocab = n_vocab
        self.n_prompt = 0
        self.history: list[int] = []

    def reset(self, tokens) -> None:
        self.history = list(tokens)
        self.n_prompt = len(tokens)

    def extend(self, tokens) -> None:
        self.history.extend(tokens)

    def draft(self, k: int) -> list[int]:
        done = len(self.history) - self.n_prompt
        upcoming = self.continuation[done : done + k]
        return [(t + self.shift) % self.n_vocab for t in upcoming]
