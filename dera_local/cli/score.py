"""`dera-local score`: teacher-forced log-likelihood and KL of given responses under a
lam grid, from one forward pass of each model per response."""

from __future__ import annotations

import json
import sys

import click

from ..datafiles import read_pairs
from ..score import score
from ..sweep import parse_lambdas
from .options import model_options, open_output, open_pair, split_options
from .prompts import chat_options, prompt_encoder


@click.command("score")
@click.option(
    "--lambdas", default="0,0.5,1,1.5,2", show_default=True, help="Comma-separated lam grid."
)
@click.option(
    "--data", "data_file", required=True, help='JSONL of {"prompt": ..., "response": ...} objects.'
)
@click.option("--out", default=None, help="Write JSONL rows here (default: stdout).")
@click.option("--per-token", is_flag=True, help="Include per-token values in each row.")
@chat_options
@model_options
def score_command(
    lambdas: str,
    data_file: str,
    out: str | None,
    per_token: bool,
    chat: bool | None,
    system: str | None,
    **kwargs,
) -> None:
    """Score each response under every lam: log-likelihood, KL to reference and aligned
    (with --chat: each prompt as a user turn, the response as the assistant's)."""
    model, _, _ = split_options(kwargs)
    grid = parse_lambdas(lambdas)
    pairs = read_pairs(data_file)
    with (
        open_pair(**model) as pair,
        open_output(out) as sink,
        click.progressbar(pairs, label="score", file=sys.stderr) as bar,
    ):
        encode = prompt_encoder(pair, chat, system, [p for _, p, _ in pairs])
        for pair_id, prompt, response in bar:
            for row in score(pair, encode(prompt), response, grid):
                record = {
                    "id": pair_id,
                    "lam": row.lam,
                    "n_tokens": len(row.token_logprobs),
                    "logprob": row.logprob,
                    "kl_reference": row.kl_reference_total,
                    "kl_aligned": row.kl_aligned_total,
                }
                if per_token:
                    record.update(
                        token_logprobs=row.token_logprobs,
                        token_kl_reference=row.kl_reference,
                        token_kl_aligned=row.kl_aligned,
                    )
                sink.write(json.dumps(record) + "\n")
