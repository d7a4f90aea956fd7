"""Loads what the model flags of a command name: a DeRa pair (the built-in one when no
flag is given), a proxy-tuned model (--proxy-base) or a mixture (--mix)."""

from __future__ import annotations

import click
from click.core import ParameterSource

from ..errors import DeraError
from ..model_sets.mixture import MixTerm, Mixture, Source, load_mixture, load_proxy, parse_mix
from ..model_sets.pair import DeraPair, load_pair
from ..sources.resolve import model_path, resolve_models
from ..speculation.drafts import SpeculationParams


def speculation_from(
    draft_max: int, draft_min: int, draft_fixed: bool = False
) -> SpeculationParams:
    return SpeculationParams(
        draft_max=draft_max, draft_min=min(draft_min, draft_max), adaptive=not draft_fixed
    )


def open_model_set(
    aligned: str | None,
    reference: str | None,
    lora: str | None,
    lora_scale: float,
    pair: str | None,
    quant: str,
    draft_model: str | None,
    draft_max: int,
    draft_min: int,
    draft_fixed: bool = False,
    proxy_base: str | None = None,
    mix: str | None = None,
    one_model_ok: bool = False,
    **settings,
) -> DeraPair | Mixture:
    """Loads what the flags name: a pair (see resolve_models; no flags: the demo pair), a
    proxy-tuned model (--proxy-base) or a mixture (--mix). `one_model_ok`: -m alone is
    that model by itself (it is steered by a negative prompt)."""
    speculation = speculation_from(draft_max, draft_min, draft_fixed)
    if mix is not None:
        given = {"aligned": aligned, "reference": reference, "lora": lora, "pair": pair}
        if proxy_base or any(value and _from_flag(name) for name, value in given.items()):
            raise DeraError(
                "--mix names every model itself: drop -m/-mr/--lora/--pair/--proxy-base"
            )
        if draft_model:
            raise DeraError("--mix drafts by prompt lookup only: drop -md")
        _refuse_roles(settings, ("rpc_aligned", "rpc_reference", "rpc_draft"), "--mix")
        return load_mixture(_resolved_mix(mix), speculation=speculation, **settings)
    if aligned and not (reference or lora or pair) and one_model_ok and not proxy_base:
        reference = aligned  # the model alone: DeRa of a model with itself is that model
    aligned, reference, lora = resolve_models(aligned, reference, lora, pair, quant)
    if proxy_base is not None:
        if draft_model:
            raise DeraError("proxy-tuning drafts by prompt lookup only: drop -md")
        _refuse_roles(settings, ("rpc_draft",), "--proxy-base")
        return load_proxy(
            model_path(proxy_base),
            aligned,
            reference,
            lora=lora,
            lora_scale=lora_scale,
            speculation=speculation,
            **settings,
        )
    return load_pair(
        aligned,
        reference,
        lora=lora,
        lora_scale=lora_scale,
        draft_model=model_path(draft_model) if draft_model else None,
        speculation=speculation,
        **settings,
    )


def _refuse_roles(settings: dict, names: tuple[str, ...], mode: str) -> None:
    """Per-model placement flags that do not apply in `mode` are refused if given, and
    dropped from the settings either way."""
    for name in names:
        if settings.pop(name, None) is not None:
            flag = "--" + name.replace("_", "-")
            where = "place a term with MODEL.gguf@HOST:PORT" if mode == "--mix" else "no draft"
            raise DeraError(f"{flag} does not apply with {mode} ({where})")


def _from_flag(name: str) -> bool:
    """Whether an option was typed rather than taken from its DERA_* variable (an
    environment default gives way to --mix)."""
    ctx = click.get_current_context(silent=True)
    return ctx is None or ctx.get_parameter_source(name) != ParameterSource.ENVIRONMENT


def _resolved_mix(spec: str) -> list[MixTerm]:
    """The spec's terms with hub names (owner/repo:file.gguf) fetched to local paths."""
    terms = parse_mix(spec)
    return [
        MixTerm(
            Source(
                model_path(t.source.model),
                model_path(t.source.lora) if t.source.lora else None,
                t.source.lora_scale,
            ),
            t.weight,
            t.lam_weight,
        )
        for t in terms
    ]
