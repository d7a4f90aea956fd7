"""Turns what a user names into local model files: a path, a hub 'owner/repo:file.gguf'
(downloaded into the hub cache if missing), a catalog pair (from the cache, offline once
pulled), or nothing at all (the built-in demo pair)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DeraError
from . import hub
from .catalog import DEFAULT_QUANT, SIDES, RemoteFile, find_pair, parse_remote
from .default_pair import demo_pair


def model_path(spec: str) -> str:
    """A local path as it is; 'owner/repo:file.gguf' from the hub cache or the hub."""
    try:
        if Path(spec).expanduser().exists():
            return spec
    except OSError:  # e.g. a name too long for the file system: not a local file
        pass
    remote = parse_remote(spec)
    return str(hub.download(remote)) if remote else spec


def pulled_pair(name: str, quant: str = DEFAULT_QUANT) -> tuple[str, str]:
    """(aligned, reference) paths of a catalog pair already in the cache (from whichever
    of each side's repositories it was pulled)."""
    paths = []
    for candidates in find_pair(name).candidates(quant):
        path = next((p for p in map(hub.cached_path, candidates) if p is not None), None)
        if path is None:
            raise DeraError(
                f"pair {name!r} ({quant}) is not downloaded: "
                f"run dera-local pull {name} --quant {quant}"
            )
        paths.append(str(path))
    return paths[0], paths[1]


def pulled_quants(name: str) -> list[str]:
    """The quantizations of catalog pair NAME whose both sides are in the cache."""
    entry = find_pair(name)
    return [
        quant
        for quant in entry.quants
        if all(any(map(hub.cached_path, side)) for side in entry.candidates(quant))
    ]


@dataclass
class PulledFile:
    """One side of a pulled pair: the file used and the repositories that were gone."""

    side: str
    remote: RemoteFile
    path: Path
    gone: list[str] = field(default_factory=list)  # one line per candidate that 404'd


def pull(name: str, quant: str = DEFAULT_QUANT) -> list[PulledFile]:
    """Downloads both files of a catalog pair (resuming, checked). A side whose repository
    answers 404 falls back to its next repository, with the same checks."""
    pulled = []
    for side, candidates in zip(SIDES, find_pair(name).candidates(quant), strict=True):
        gone: list[str] = []
        for remote in candidates:
            try:
                path = hub.download(remote)
            except hub.RemoteMissingError as exc:
                gone.append(str(exc))
                continue
            pulled.append(PulledFile(side, remote, path, gone))
            break
        else:
            tried = "; ".join(gone)
            raise DeraError(f"no repository of the {side} model of {name!r} serves it: {tried}")
    return pulled


def resolve_models(
    aligned: str | None,
    reference: str | None,
    lora: str | None,
    pair: str | None = None,
    quant: str = DEFAULT_QUANT,
) -> tuple[str | None, str, str | None]:
    """(aligned, reference, lora) local paths from command-line style arguments."""
    if pair:
        if aligned or reference or lora:
            raise DeraError("give either --pair or model files (-m/-mr/--lora), not both")
        aligned_path, reference_path = pulled_pair(pair, quant)
        return aligned_path, reference_path, None
    if not (aligned or reference or lora):
        reference_path, adapter = demo_pair()
        return None, str(reference_path), str(adapter)
    if not reference:
        raise DeraError("no reference model: pass -mr/--reference FILE.gguf or set DERA_REFERENCE")
    if not (aligned or lora):
        raise DeraError(
            "no aligned model: pass -m/--aligned FILE.gguf (or --lora ADAPTER.gguf) "
            "or set DERA_ALIGNED"
        )
    return (
        model_path(aligned) if aligned else None,
        model_path(reference),
        model_path(lora) if lora else None,
    )
