"""The terms of a mixture, and the spec that names them: a `--mix` string such as
'1.5*aligned.gguf - 0.5*reference.gguf', a JSON/TOML file, or (weight, path) pairs."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import tomllib

from ..errors import BadParameterError
from ..rpc.endpoints import parse_endpoints


@dataclass(frozen=True)
class Source:
    """A model file, optionally with a LoRA adapter applied in its context, and the RPC
    workers holding its layers (None: the mixture's default; (): this machine)."""

    model: str
    lora: str | None = None
    lora_scale: float = 1.0
    rpc: tuple[str, ...] | None = None

    @property
    def label(self) -> str:
        name = Path(self.model).name
        return name if self.lora is None else f"{name}+{Path(self.lora).name}"


@dataclass(frozen=True)
class MixTerm:
    """One source of a mixture; its weight is `weight + lam_weight * lam`."""

    source: Source
    weight: float = 0.0
    lam_weight: float = 0.0


# -- the --mix spec ---------------------------------------------------------------------
_OPERATOR = re.compile(r"\s+([+-])\s+")  # operators need spaces: file names hold - and +
_TERM = re.compile(r"^(?:(?P<weight>[^*]+?)\s*\*\s*)?(?P<source>[^*\s][^*]*)$")


def parse_mix(spec: str) -> list[MixTerm]:
    """A mixture spec: '1.5*aligned.gguf - 0.5*reference.gguf' (weights default to 1;
    operators between terms need spaces around them; BASE.gguf+ADAPTER.gguf is a base
    with a LoRA adapter; MODEL.gguf@HOST:PORT[,HOST:PORT] puts that model's layers on
    llama.cpp RPC workers, @local on this machine), or the path of a .json/.toml file:
    {"terms": [{"model": "a.gguf", "weight": 1.5, "lora": "x.gguf", "lora_scale": 1.0,
    "rpc": "HOST:PORT"}]} (paths relative to the file). Raises BadParameterError with
    one line."""
    text = spec.strip()
    if text.endswith((".json", ".toml")) and not _OPERATOR.search(text):
        return _parse_mix_file(Path(text).expanduser())
    if not text:
        raise BadParameterError("the mixture spec is empty; give e.g. '1.5*a.gguf - 0.5*b.gguf'")
    parts = _OPERATOR.split(text)
    signs = ["+"] + parts[1::2]
    terms = []
    for sign, part in zip(signs, parts[0::2], strict=True):
        negative = sign == "-"
        if part.startswith("-") and not Path(part).exists():  # a leading '-0.5*a.gguf'
            negative, part = not negative, part[1:].lstrip()
        match = _TERM.match(part)
        if match is None:
            raise BadParameterError(f"mixture term {part!r} names no model")
        weight = _weight(match["weight"] or "1", part)
        text, rpc = _split_rpc(match["source"].strip(), part)
        model, lora = _split_lora(text)
        terms.append(MixTerm(Source(model, lora, rpc=rpc), -weight if negative else weight))
    return terms


def _weight(text: str, term: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadParameterError(
            f"mixture term {term!r}: {text!r} is not a number (write WEIGHT*MODEL.gguf)"
        ) from None
    if not math.isfinite(value) or abs(value) > 1000:
        raise BadParameterError(f"mixture term {term!r}: the weight must be finite and <= 1000")
    return value


def _split_rpc(source: str, term: str) -> tuple[str, tuple[str, ...] | None]:
    """'MODEL@HOST:PORT,...' -> (MODEL, endpoints); a file whose name holds '@' stays."""
    if "@" not in source or Path(source).exists():
        return source, None
    model, endpoints = source.rsplit("@", 1)
    return model, parse_endpoints(endpoints, f"mixture term {term!r}")


def _split_lora(source: str) -> tuple[str, str | None]:
    if "+" in source and not Path(source).exists():
        model, lora = source.split("+", 1)
        return model, lora
    return source, None


def _parse_mix_file(path: Path) -> list[MixTerm]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BadParameterError(f"cannot read the mixture file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode()) if path.suffix == ".toml" else json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadParameterError(f"the mixture file {path} does not parse: {detail}") from None
    entries = data.get("terms") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise BadParameterError(f"the mixture file {path} has no list of terms")
    terms = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise BadParameterError(f'term {index} of {path} needs a "model" path')
        unknown = set(entry) - {"model", "weight", "lora", "lora_scale", "rpc"}
        if unknown:
            raise BadParameterError(f"term {index} of {path}: unknown key {sorted(unknown)[0]!r}")
        label = f"term {index} of {path.name}"
        weight = _weight(str(entry.get("weight", 1)), label)
        lora = entry.get("lora")
        if lora is not None and not isinstance(lora, str):
            raise BadParameterError(f'{label}: "lora" must be a path')
        rpc = entry.get("rpc")
        if rpc is not None and not isinstance(rpc, (str, list)):
            raise BadParameterError(f'{label}: "rpc" must be "HOST:PORT,..." or a list')
        source = Source(
            str(path.parent / entry["model"]),
            None if lora is None else str(path.parent / lora),
            _weight(str(entry.get("lora_scale", 1)), label),
            None if rpc is None else parse_endpoints(rpc, label),
        )
        terms.append(MixTerm(source, weight))
    return terms


def as_terms(spec) -> list[MixTerm]:
    if isinstance(spec, str):
        return parse_mix(spec)
    terms = []
    for item in spec:
        if isinstance(item, MixTerm):
            terms.append(item)
        else:
            weight, model = item
            terms.append(MixTerm(Source(str(model)), float(weight)))
    if not terms:
        raise BadParameterError("the mixture has no terms")
    return terms


def merge_repeats(terms: list[MixTerm]) -> list[MixTerm]:
    """A source named twice is one context with the summed weight."""
    merged: dict[Source, MixTerm] = {}
    for term in terms:
        seen = merged.get(term.source)
        if seen is None:
            merged[term.source] = term
        else:
            merged[term.source] = MixTerm(
                term.source, seen.weight + term.weight, seen.lam_weight + term.lam_weight
            )
    return list(merged.values())
