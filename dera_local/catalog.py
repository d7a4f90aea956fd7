"""The curated catalog of DeRa pairs (models/catalog.json) and its look-ups."""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import DeraError

DEFAULT_QUANT = "Q4_K_M"


@dataclass(frozen=True)
class RemoteFile:
    repo: str
    filename: str
    sha256: str | None = None
    size: int | None = None

    def __str__(self) -> str:
        return f"{self.repo}:{self.filename}"


@dataclass(frozen=True)
class CatalogPair:
    name: str
    description: str
    exact: bool
    beta: float | None
    license: str
    verified: bool
    quants: tuple[str, ...]
    approx_gb: dict[str, float]
    entry: dict

    def files(self, quant: str = DEFAULT_QUANT) -> tuple[RemoteFile, RemoteFile]:
        """(aligned, reference) files of one quantization."""
        spec = self.entry["quants"].get(quant)
        if spec is None:
            raise DeraError(
                f"pair {self.name!r} has no quantization {quant!r}; "
                f"available: {', '.join(self.quants)}"
            )

        def remote(side: str) -> RemoteFile:
            template = self.entry[side]["file"]
            return RemoteFile(
                self.entry[side]["repo"],
                template.format(quant=quant, quant_lower=quant.lower()),
                (spec.get("sha256") or {}).get(side),
                (spec.get("bytes") or {}).get(side),
            )

        return remote("aligned"), remote("reference")


def load_catalog() -> dict[str, CatalogPair]:
    """The bundled catalog, or the JSON file DERA_CATALOG names (same format)."""
    override = os.environ.get("DERA_CATALOG")
    try:
        if override:
            text = Path(override).read_text("utf-8")
        else:
            text = (resources.files("dera_local.bundled_models") / "catalog.json").read_text(
                "utf-8"
            )
        data = json.loads(text)
    except (OSError, json.JSONDecodeError) as exc:
        raise DeraError(f"cannot read the catalog {override or 'catalog.json'}: {exc}") from None
    pairs = {}
    for name, entry in data["pairs"].items():
        first_quant = next(iter(entry["quants"].values()))
        pairs[name] = CatalogPair(
            name=name,
            description=entry["description"],
            exact=entry["exact"],
            beta=entry.get("beta"),
            license=entry["license"],
            verified=entry.get("verified", False),
            quants=tuple(entry["quants"]),
            approx_gb=first_quant.get("approx_gb", {}),
            entry=entry,
        )
    return pairs


def find_pair(name: str) -> CatalogPair:
    """The catalog pair called `name`, or a one-line error with a did-you-mean."""
    catalog = load_catalog()
    if name in catalog:
        return catalog[name]
    close = difflib.get_close_matches(name, list(catalog), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise DeraError(f"unknown pair {name!r}{hint} (dera-local list shows the catalog)")


def parse_remote(spec: str) -> RemoteFile | None:
    """'owner/repo:file.gguf' (as llama.cpp's -hf takes it) -> RemoteFile; else None."""
    repo, sep, filename = spec.partition(":")
    if not sep or repo.count("/") != 1 or not filename.endswith(".gguf") or "/" in repo[:1]:
        return None
    return RemoteFile(repo, filename)
