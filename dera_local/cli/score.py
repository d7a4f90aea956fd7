"""`dera-local score`: teacher-forced log-likelihood and KL of given responses under a
lam grid, from one forward pass of each model per response."""

from __future__ import annotations

import json
import sys

import click

from ..analysis.score import score, score_mixture
from ..analysis.sweep import parse_lambdas
from ..model_sets.pair import DeraPair
from ..sources.datafiles import read_pairs
from .files import open_output
from .open_models import open_model_set
from .options import model_options, split_options
from .prompts import chat_options, negative_for, prompt_encoder
from .sampling_options import cfg_options, lam_grid, lambdas_option, negative_prompt_from


@click.command("score")
@lambdas_option
@click.option(
    "--data", "data_file", required=True, help='JSONL of {"prompt": ..., "response": ...} objects.'
)
@click.option("--out", default=None, help="Write JSONL rows here (default: stdout).")
@click.option("--per-token", is_flag=True, help="Include per-token values in each row.")
@chat_options
@cfg_options
@model_options
def score_command(
    lambdas: str | None,
    data_file: str,
    out: str | None,
    per_token: bool,
    chat: bool | None,
    system: str | None,
    negative_prompt: str | None,
    negative_prompt_file: str | None,
    cfg_scale: float,
    **kwargs,
) -> None:
    """Score each response under every lam: log-likelihood, KL to reference and aligned
    (with --chat: each prompt as a user turn, the response as the assistant's). With
    --mix, --proxy-base or a negative prompt, under that mixture."""
    model, _, _ = split_options(kwargs)
    grid = parse_lambdas(lambdas) if lambdas is not None else None
    negative = negative_prompt_from(negative_prompt, negative_prompt_file)
    pairs = read_pairs(data_file)
    with (
        open_model_set(**model, one_model_ok=negative is not None) as pair,
        open_output(out) as sink,
        click.progressbar(pairs, label="score", file=sys.stderr) as bar,
    ):
        grid = lam_grid(pair, grid)
        encode = prompt_encoder(pair, chat, system, [p for _, p, _ in pairs])
        plain = isinstance(pair, DeraPair) and negative is None and cfg_scale == 1
        for pair_id, prompt, response in bar:
            if plain:  # one forward pass per model, the lam grid in the native kernel
                rows = score(pair, encode(prompt), response, grid)
            else:
                rows = score_mixture(
                    pair,
                    encode(prompt),
                    response,
                    grid,
                    negative_prompt=negative_for(encode, chat, prompt, negative),
                    cfg_scale=cfg_scale,
                )
            for row in rows:
                record = {
                    "id": pair_id,
                    "lam": row.lam,
                    "n_tokens": len(row.token_logprobs),
                    "logprob": row.logprob,
                    "kl_reference": row.kl_reference_total,
                    "kl_aligned": row.kl_aligned_total,
                }
                if negative is not None:
                    record["cfg_scale"] = cfg_scale
                if per_token:
                    record.update(
                        token_logprobs=row.token_logprobs,
                        token_kl_reference=row.kl_reference,
                        token_kl_aligned=row.kl_aligned,
                    )
                sink.write(json.dumps(record) + "\n")
