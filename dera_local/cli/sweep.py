"""`dera-local sweep`: every lam of a grid on every prompt of a file, batched."""

from __future__ import annotations

import itertools
import json
import sys
from dataclasses import asdict

import click

from ..analysis.report import plot, summarize, write_csv
from ..analysis.sweep import parse_cfg_scales, parse_lambdas, sweep
from ..errors import DeraError
from ..sources.datafiles import load_reward, read_prompts
from .files import open_output
from .open_models import open_model_set
from .options import model_options, split_options
from .prompts import (
    chat_options,
    hint_if_raw_prompts_ended_at_once,
    negative_for,
    prompt_encoder,
)
from .sampling_options import (
    exact_options,
    exact_sampling,
    exact_settings,
    lam_grid,
    lambdas_option,
    negative_prompt_from,
    negative_prompt_options,
    sampling_from,
    sampling_options,
)

EXACT_LAM_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


@click.command("sweep")
@lambdas_option
@click.option(
    "--prompts",
    "prompts_file",
    required=True,
    help='Prompts: .jsonl with a "prompt" field, or one prompt per line.',
)
@click.option("--out", default=None, help="Write JSONL rows here (default: stdout).")
@click.option("--reward", default=None, help="module:function scoring a text (adds mean reward).")
@click.option("--summary-csv", default=None, help="Write the per-lam summary as CSV.")
@click.option(
    "--plot",
    "plot_path",
    default=None,
    help="Draw mean reward against KL(pi_lam||pi_ref) to this PNG (needs --reward).",
)
@click.option(
    "--cfg-scales",
    default=None,
    help="Also sweep classifier-free guidance over these scales (comma-separated; needs "
    "--cfg-negative-prompt): one row per (prompt, lam, scale).",
)
@negative_prompt_options
@exact_options
@chat_options
@model_options
@sampling_options
def sweep_command(
    lambdas: str | None,
    cfg_scales: str | None,
    negative_prompt: str | None,
    negative_prompt_file: str | None,
    prompts_file: str,
    out: str | None,
    reward: str | None,
    summary_csv: str | None,
    plot_path: str | None,
    chat: bool | None,
    system: str | None,
    exact: bool,
    exact_budget: int,
    exact_parallel: int,
    **kwargs,
) -> None:
    """Decode each prompt at every lam in one batch; one JSONL row per (prompt, lam).
    With --exact, each answer is drawn by exact realignment (one lam after another;
    every lam in [0, 1])."""
    model, sampling, rest = split_options(kwargs)
    grid = parse_lambdas(lambdas) if lambdas is not None else None
    scales = parse_cfg_scales(cfg_scales) if cfg_scales is not None else None
    negative = negative_prompt_from(negative_prompt, negative_prompt_file)
    if (scales is None) != (negative is None):
        raise DeraError("--cfg-scales and --cfg-negative-prompt go together: give both")
    prompts = read_prompts(prompts_file)
    reward_fn = load_reward(reward) if reward else None
    if plot_path and reward_fn is None:
        raise DeraError("--plot needs --reward: the picture is reward against KL")
    params = sampling_from(**(exact_sampling(sampling) if exact else sampling))
    rows = []
    with (
        open_model_set(**model, one_model_ok=negative is not None) as pair,
        open_output(out) as sink,
    ):
        if exact and grid is None:  # exact realignment's range
            grid = list(EXACT_LAM_GRID)
        grid = lam_grid(pair, grid)
        encode = prompt_encoder(pair, chat, system, [p for _, p in prompts])
        generator = sweep(
            pair,
            (
                (prompt_id, encode(prompt), negative_for(encode, chat, prompt, negative))
                for prompt_id, prompt in prompts
            ),
            grid,
            cfg_scales=scales,
            sampling=params,
            max_tokens=rest["max_tokens"],
            stop=rest["stop"],
            reward=reward_fn,
            **exact_settings(exact, exact_budget, exact_parallel),
        )
        # The first row before the progress bar: a sweep that cannot start fails with its
        # one line, not after a bar's label.
        first = next(generator, None)
        rest_rows = generator if first is None else itertools.chain([first], generator)
        with click.progressbar(
            length=len(prompts) * len(grid) * len(scales or [1]), label="sweep", file=sys.stderr
        ) as bar:
            for row in rest_rows:
                rows.append(row)
                record = asdict(row)
                record["kl_to_reference"] = row.kl_to_reference
                if row.mismatch is None:  # CFG rows: no exact target to compare with
                    del record["mismatch"]
                if row.exact is None:
                    del record["exact"]
                if row.mismatch_steps is None:
                    del record["mismatch_steps"]
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                sink.flush()
                bar.update(1)
        hint_if_raw_prompts_ended_at_once(pair, chat, sum(not row.tokens for row in rows))
    summary = summarize(rows)
    for entry in summary:
        reward_text = "" if entry["mean_reward"] is None else f"  reward {entry['mean_reward']:.3f}"
        scale = "" if entry.get("cfg_scale") is None else f" cfg {entry['cfg_scale']:g}"
        click.echo(
            f"lam {entry['lam']:g}{scale}: KL {entry['mean_kl_to_reference']:.3f}  "
            f"tokens {entry['mean_tokens']:.1f}{reward_text}",
            err=True,
        )
    if summary_csv:
        write_csv(summary, summary_csv)
    if plot_path:
        plot(summary, plot_path)
