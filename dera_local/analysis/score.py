"""Teacher-forced scoring of a response under a whole lam grid, from ONE forward pass of
each model: the log-likelihood of the response under every pi_lam, and the per-token
KL(pi_lam || pi_ref) and KL(pi_lam || pi_aligned) along it.

The per-lam arithmetic runs in the compiled kernel (native/dera_score.c) over the logits
rows llama.cpp returns, or in vectorised numpy when the kernel is not built.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import llama_cpp
import numpy as np

from ..engine.guidance import guidance_for, mixture_terms
from ..engine.mixing import NATIVE, _native, mix_numpy, mix_terms_numpy
from ..errors import BadParameterError
from ..llama.context import Context, TokenBatch
from ..model_sets.pair import DeraPair
from .sweep import parse_lambdas


@dataclass
class ScoreRow:
    """One lam's view of one response: per-token values and their sums."""

    lam: float
    token_logprobs: list[float]
    kl_reference: list[float]  # KL(pi_lam || pi_ref) at each response position
    kl_aligned: list[float]  # KL(pi_lam || pi_aligned) at each response position

    @property
    def logprob(self) -> float:
        return float(sum(self.token_logprobs))

    @property
    def kl_reference_total(self) -> float:
        return float(sum(self.kl_reference))

    @property
    def kl_aligned_total(self) -> float:
        return float(sum(self.kl_aligned))


def score_rows_numpy(
    aligned: np.ndarray, reference: np.ndarray, targets: np.ndarray, lambdas: Sequence[float]
) -> np.ndarray:
    """The numpy twin of dera_score_rows: float64 [n_lams, n_rows, 3]."""

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        peak = x.max(axis=-1, keepdims=True)
        return x - peak - np.log(np.exp(x - peak).sum(axis=-1, keepdims=True))

    log_pa, log_pr = log_softmax(aligned), log_softmax(reference)
    out = np.empty((len(lambdas), len(targets), 3))
    rows = np.arange(len(targets))
    for index, lam in enumerate(lambdas):
        mixed = np.empty_like(aligned)
        mix_numpy(mixed, aligned, reference, lam)
        log_p = log_softmax(mixed)
        p = np.exp(log_p)
        with np.errstate(invalid="ignore"):  # p = 0 where log p = -inf: no contribution
            kl_r = np.where(p > 0, p * (log_p - log_pr), 0.0).sum(-1)
            kl_a = np.where(p > 0, p * (log_p - log_pa), 0.0).sum(-1)
        out[index, :, 0] = log_p[rows, targets]
        out[index, :, 1] = kl_r
        out[index, :, 2] = kl_a
    return out


def _score_chunk(
    path: str,
    aligned: np.ndarray,
    reference: np.ndarray,
    targets: np.ndarray,
    lambdas: np.ndarray,
    n_threads: int,
) -> np.ndarray:
    if path != NATIVE:
        return score_rows_numpy(aligned, reference, targets, lambdas)
    out = np.empty((len(lambdas), len(targets), 3))

    def run(part: slice) -> None:
        grid = np.ascontiguousarray(lambdas[part])
        block = out[part]  # contiguous: lams are the outer axis
        _native.score_rows(
            aligned.ctypes.data,
            reference.ctypes.data,
            len(targets),
            aligned.shape[1],
            targets.ctypes.data,
            grid.ctypes.data,
            len(grid),
            block.ctypes.data,
        )

    # The kernel releases the GIL and llama.cpp's threads are idle meanwhile, so the grid
    # is split across as many threads as the contexts use.
    work = len(lambdas) * aligned.size
    threads = n_threads if work >= 4_000_000 else 1  # small grids: a pool costs more
    step = -(-len(lambdas) // max(1, min(threads, len(lambdas))))
    parts = [slice(i, i + step) for i in range(0, len(lambdas), step)]
    if len(parts) == 1:
        run(parts[0])
    else:
        with ThreadPoolExecutor(len(parts)) as pool:
            list(pool.map(run, parts))
    return out


def _output_rows(ctx: Context, n_rows: int, n_vocab: int) -> np.ndarray:
    """The logits of the last batch's outputs, in batch order (no copy)."""
    pointer = llama_cpp.llama_get_logits(ctx.ptr)
    address = ctypes.cast(pointer, ctypes.c_void_p).value
    buffer = (ctypes.c_float * (n_rows * n_vocab)).from_address(address)
    return np.frombuffer(buffer, dtype=np.float32).reshape(n_rows, n_vocab)


def teacher_forced_logits(
    pair: DeraPair, prompt_tokens: Sequence[int], response_tokens: Sequence[int]
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Feeds prompt + response through both models in n_batch chunks and yields, per chunk
    with response positions, (aligned logits, reference logits, target tokens): row i
    holds the logits that predict target i. The rows are views of llama.cpp's buffers,
    valid until the next chunk: copy what must outlive the loop."""
    for rows, targets in teacher_forced_rows(
        pair, pair.scoring_contexts(), prompt_tokens, response_tokens
    ):
        yield rows[0], rows[1], targets


def teacher_forced_rows(
    models,
    contexts: Sequence[Context],
    prompt_tokens: Sequence[int],
    response_tokens: Sequence[int],
) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
    """teacher_forced_logits for any contexts of a model set: yields (one logits view per
    context, target tokens) per chunk."""
    tokens = list(prompt_tokens) + list(response_tokens)
    if not response_tokens:
        raise BadParameterError("the response is empty: nothing to score")
    models.check_prompt(list(prompt_tokens))
    if len(tokens) > models.n_ctx:
        raise BadParameterError(
            f"prompt and response have {len(tokens)} tokens but the context holds {models.n_ctx}",
            cli_hint="raise -c",
        )
    for ctx in contexts:
        ctx.clear()
    first_output = len(prompt_tokens) - 1  # position whose logits predict response[0]
    n_batch = contexts[0].n_batch
    batch = TokenBatch(n_batch)
    try:
        for start in range(0, len(tokens), n_batch):
            chunk = tokens[start : start + n_batch]
            entries = [
                (t, start + i, 0, start + i >= first_output and start + i < len(tokens) - 1)
                for i, t in enumerate(chunk)
            ]
            batch.fill(entries)
            n_rows = sum(e[3] for e in entries)
            rows = []
            for ctx in contexts:
                ctx.decode_batch(batch)
                rows.append(_output_rows(ctx, n_rows, models.n_vocab) if n_rows else None)
            if n_rows:
                first = max(start, first_output)
                targets = np.asarray(tokens[first + 1 : first + 1 + n_rows], dtype=np.int32)
                yield rows, targets
    finally:
        batch.close()


def score(
    pair: DeraPair,
    prompt: str | Sequence[int],
    response: str | Sequence[int],
    lambdas: Sequence[float],
) -> list[ScoreRow]:
    """Scores `response` after `prompt` under every lam; rows in grid order.

    Text is tokenized with the pair's tokenizer (the prompt with BOS, the response
    without); token ids are used as they are.
    """
    grid = np.asarray(parse_lambdas(lambdas), dtype=np.float64)
    prompt_tokens = pair.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
    response_tokens = (
        pair.tokenize(response, add_special=False) if isinstance(response, str) else list(response)
    )
    n_threads = pair.scoring_contexts()[0].n_threads
    results = [
        _score_chunk(pair.mixer.path, aligned, reference, targets, grid, n_threads)
        for aligned, reference, targets in teacher_forced_logits(
            pair, prompt_tokens, response_tokens
        )
    ]
    table = np.concatenate(results, axis=1)  # [n_lams, n_response, 3]
    return [
        ScoreRow(
            float(lam), table[i, :, 0].tolist(), table[i, :, 1].tolist(), table[i, :, 2].tolist()
        )
        for i, lam in enumerate(grid)
    ]


def _response_logits(models, contexts, prompt_tokens, response_tokens):
    """Per context, float32 [n_response, n_vocab] teacher-forced logits (copies)."""
    parts: list[list[np.ndarray]] = [[] for _ in contexts]
    targets = []
    for rows, chunk_targets in teacher_forced_rows(
        models, contexts, prompt_tokens, response_tokens
    ):
        for part, row in zip(parts, rows, strict=True):
            part.append(row.copy())
        targets.append(chunk_targets)
    return [np.concatenate(p) for p in parts], np.concatenate(targets)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    peak = x.max(axis=-1, keepdims=True)
    return x - peak - np.log(np.exp(x - peak).sum(axis=-1, keepdims=True))


def score_mixture(
    models,
    prompt: str | Sequence[int],
    response: str | Sequence[int],
    lambdas: Sequence[float] = (1.0,),
    *,
    negative_prompt: str | Sequence[int] | None = None,
    cfg_scale: float = 1.0,
) -> list[ScoreRow]:
    """Scores `response` under any model set's mixture (a Mixture, a proxy-tuned model,
    or a pair with a negative prompt) at each lam: per-token log-likelihood and KL to the
    sources its logprobs call aligned and reference (for a proxy: the small tuned and
    base models), each on the positive prompt. The rows are mixed with the same float32
    rules as generation (mixing.mix_terms_numpy), then normalised in float64."""
    grid = parse_lambdas(lambdas, models.check_lam)
    prompt_tokens = models.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
    response_tokens = (
        models.tokenize(response, add_special=False)
        if isinstance(response, str)
        else list(response)
    )
    guidance = guidance_for(models, negative_prompt, cfg_scale)
    contexts = models.scoring_source_contexts()
    rows_by_prompt = [_response_logits(models, contexts, prompt_tokens, response_tokens)[0]]
    targets = np.asarray(response_tokens, dtype=np.int64)
    if guidance is not None:
        negative = list(guidance.negative_tokens)
        rows_by_prompt.append(_response_logits(models, contexts, negative, response_tokens)[0])
    aligned, reference = models.logprob_sources
    log_pa = _log_softmax(rows_by_prompt[0][aligned])
    log_pr = _log_softmax(rows_by_prompt[0][reference])
    positions = np.arange(len(targets))
    results = []
    for lam in grid:
        terms = mixture_terms(
            models.source_weights(lam), None if guidance is None else guidance.scale
        )
        mixed = np.empty_like(rows_by_prompt[0][0])
        mix_terms_numpy(
            mixed,
            [rows_by_prompt[t.prompt][t.source] for t in terms],
            [t.weight for t in terms],
        )
        log_p = _log_softmax(mixed)
        p = np.exp(log_p)
        with np.errstate(invalid="ignore"):  # p = 0 where log p = -inf: no contribution
            kl_r = np.where(p > 0, p * (log_p - log_pr), 0.0).sum(-1)
            kl_a = np.where(p > 0, p * (log_p - log_pa), 0.0).sum(-1)
        results.append(
            ScoreRow(
                float(lam),
                log_p[positions, targets].tolist(),
                kl_r.tolist(),
                kl_a.tolist(),
            )
        )
    return results
