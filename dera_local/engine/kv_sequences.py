"""What each KV sequence of a batched decoder holds, the same in every source context: which
sequences are free, which tokens each one caches, and where a new prompt goes.

A prompt takes the free sequence with the longest cached common prefix (a conversation's
next turn lands where its last turn is cached) and reads only the rest; where another
sequence holds a longer start of it (a system prompt, a shared document), those
positions are shared in instead of read again (a unified KV cache tags the cells with
both sequences: nothing is computed or copied).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..llama.context import Context, TokenBatch
from .source_decodes import SourceDecodes


class KVSequences:
    def __init__(self, contexts: list[Context], n_sequences: int) -> None:
        self.contexts = contexts
        self.cached: list[list[int]] = [[] for _ in range(n_sequences)]  # per sequence
        self.free: set[int] = set(range(n_sequences))

    def take(self, prompt: list[int]) -> tuple[int, int]:
        """Takes the free sequence with the longest cached common prefix for `prompt`
        (or a longer prefix shared from another sequence) and cuts it there; returns
        (sequence, cached tokens kept). At least the last prompt token is always left to
        read: its logits are what the first answer token is sampled from."""
        common = [common_prefix(cached, prompt) for cached in self.cached]
        seq_id = max(self.free, key=lambda s: (common[s], -s))
        keep = min(common[seq_id], len(prompt) - 1)
        if not self._cut_all(seq_id, keep):
            keep = 0  # a model that cannot drop a tail (recurrent): start the sequence over
            self._cut_all(seq_id, 0)
        self.cached[seq_id] = prompt[:keep]
        keep = self._borrow(seq_id, prompt, keep, common)
        self.free.discard(seq_id)
        return seq_id, keep

    def _borrow(self, seq_id: int, prompt: list[int], keep: int, common: list[int]) -> int:
        """Shares a longer cached start of `prompt` from another sequence (free or
        running) into `seq_id` (already cut to `keep`); returns the new keep."""
        donor = max(range(len(self.cached)), key=common.__getitem__)
        shared = min(common[donor], len(prompt) - 1)
        if donor == seq_id or shared <= keep:
            return keep
        for ctx in self.contexts:
            ctx.copy_sequence(donor, seq_id, keep, shared)
        self.cached[seq_id] = prompt[:shared]
        return shared

    def release(self, seq_id: int, *, forget: bool = False) -> None:
        """Frees a sequence; `forget` also drops what it caches (after a failed decode,
        which may have left it half written)."""
        if forget:
            self._cut_all(seq_id, 0)
            self.cached[seq_id] = []
        self.free.add(seq_id)

    def forget_free(self) -> None:
        """Drops what every free sequence caches: the next prompts read in full."""
        for seq_id in self.free:
            self._cut_all(seq_id, 0)
            self.cached[seq_id] = []

    def cut(self, seq_id: int, position: int) -> None:
        """Drops the sequence's positions from `position` on (rejected drafts)."""
        self._cut_all(seq_id, position)
        del self.cached[seq_id][position:]

    def share_prefix(
        self,
        tokens: list[int],
        targets: list[int],
        batch: TokenBatch,
        decodes: SourceDecodes,
    ) -> None:
        """Reads `tokens` once into the target sequence that caches the longest start of
        them (only the rest is read, in chunks of the batch's capacity), and shares them
        with the others."""
        first = max(targets, key=lambda s: common_prefix(self.cached[s], tokens))
        keep = common_prefix(self.cached[first], tokens)
        if not self._cut_all(first, keep):
            keep = 0
            self._cut_all(first, 0)
        for start in range(keep, len(tokens), batch.capacity):
            chunk = tokens[start : start + batch.capacity]
            batch.fill([(t, start + i, first, False) for i, t in enumerate(chunk)])
            decodes.run(batch)
        self.cached[first] = tokens
        for seq_id in targets:
            if seq_id == first:
                continue
            for ctx in self.contexts:
                ctx.remove_positions(seq_id, 0)
                ctx.copy_sequence(first, seq_id)
            self.cached[seq_id] = list(tokens)

    def _cut_all(self, seq_id: int, position: int) -> bool:
        """Drops positions from `position` on in every context; False where a model
        cannot drop a partial tail."""
        return all([ctx.remove_positions(seq_id, position) for ctx in self.contexts])


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b):  # noqa: B905 - lengths differ on purpose
        if x != y:
            break
        n += 1
    return n
