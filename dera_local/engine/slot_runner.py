"""The one-slot decoders a model set generates with: every single generation (a pair's
plain one, with a negative prompt, a mixture's) is the one slot of a batched decoder
(batch.BatchDecoder), kept with its caches so that the next call reads only what is new.
"""

from __future__ import annotations

from ..llama.backend import Context
from .decoder import BatchDecoder


class SlotRunner:
    """`home`: a decoder over the generation contexts opened at load (a pair's: one
    prompt, room for its drafts), used by every generation that fits it, so no second KV
    cache is allocated and nothing is opened before the first token. Generations that
    need more (a negative prompt's second sequence, more drafts), or model sets without
    load-time contexts, use a second decoder opened on first use and reopened bigger when
    a generation first asks for more (its old caches are dropped then)."""

    def __init__(self, models, contexts: list[Context] | None = None, max_drafts: int = 0):
        self.models = models
        self.home = None
        if contexts is not None:
            self.home = BatchDecoder(
                models, 1, models.n_ctx, max_drafts=max_drafts, contexts=contexts
            )
        self.extra: BatchDecoder | None = None

    def decoder_for(self, n_prompts: int, max_drafts: int = 0) -> BatchDecoder:
        home = self.home
        if home is not None and n_prompts == 1 and max_drafts <= home.opened_for_drafts:
            return home
        extra = self.extra
        if (
            extra is None
            or extra.prompts_per_slot < n_prompts
            or extra.opened_for_drafts < max_drafts
        ):
            self._close_extra()
            self.extra = BatchDecoder(
                self.models,
                1,
                self.models.n_ctx,
                prompts_per_slot=n_prompts,
                max_drafts=max_drafts,
            )
        return self.extra

    def forget(self) -> None:
        """Forgets every cached prompt: the next call reads its whole prompt."""
        if self.home is not None:
            self.home.forget_cached()
        self._close_extra()

    def close(self) -> None:
        if self.home is not None:
            self.home.close()
            self.home = None
        self._close_extra()

    def _close_extra(self) -> None:
        if self.extra is not None:
            self.extra.close()
            self.extra = None
