"""The curated catalog of DeRa pairs (models/catalog.json) and its look-ups."""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import BadParameterError, DeraError

DEFAULT_QUANT = "Q4_K_M"


@dataclass(frozen=True)
class RemoteFile:
    repo: str
    filename: str
    sha256: str | None = None
    size: int | None = None
    revision: str | None = None  # None: the repository's main branch

    def __str__(self) -> str:
        at = f"@{self.revision}" if self.revision else ""
        return f"{self.repo}{at}:{self.filename}"


SIDES = ("aligned", "reference")


@dataclass(frozen=True)
class CatalogPair:
    name: str
    description: str
    exact: bool
    beta: float | None
    loss: str | None  # "dpo", "dpo_norm" (length-normalized: beta is per token), None
    license: str
    checked: dict  # what was checked against public sources, and how
    quants: tuple[str, ...]
    approx_gb: dict[str, float]
    entry: dict

    @property
    def length_normalized(self) -> bool:
        return self.loss == "dpo_norm"

    def candidates(self, quant: str = DEFAULT_QUANT) -> tuple[list[RemoteFile], list[RemoteFile]]:
        """(aligned, reference) files of one quantization: each side's primary repository,
        then its fallbacks in the order to try them."""
        spec = self.entry["quants"].get(quant)
        if spec is None:
            raise BadParameterError(
                f"pair {self.name!r} has no quantization {quant!r}; "
                f"available: {', '.join(self.quants)}"
            )

        def remote(source: dict, sha256: str | None, size: int | None) -> RemoteFile:
            filename = source["file"].format(quant=quant, quant_lower=quant.lower())
            return RemoteFile(source["repo"], filename, sha256, size, source.get("revision"))

        def side_files(side: str) -> list[RemoteFile]:
            primary = self.entry[side]
            files = [
                remote(
                    primary,
                    (spec.get("sha256") or {}).get(side),
                    (spec.get("bytes") or {}).get(side),
                )
            ]
            for fallback in primary.get("fallbacks", []):
                files.append(remote(fallback, (fallback.get("sha256") or {}).get(quant), None))
            return files

        return side_files("aligned"), side_files("reference")

    def files(self, quant: str = DEFAULT_QUANT) -> tuple[RemoteFile, RemoteFile]:
        """(aligned, reference) primary files of one quantization."""
        aligned, reference = self.candidates(quant)
        return aligned[0], reference[0]

    def strength_note(self) -> str:
        """beta and what lam does to it, in one phrase."""
        if self.beta is None:
            return "beta unpublished"
        if self.length_normalized:
            return (
                f"beta {self.beta:g} with length-normalized DPO: a per-token KL strength, "
                "so beta/lam is only a rough scale"
            )
        return f"beta {self.beta:g} (DeRa at lam approximates beta/lam; not measured for this pair)"

    def checked_note(self) -> str:
        checked = self.checked
        if not checked:
            return "nothing checked against public sources"
        parts = [f"{key} {value}" for key, value in checked.items() if key != "source"]
        return "checked: " + "; ".join(str(p) for p in parts)


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
        pairs = {}
        for name, entry in data["pairs"].items():
            first_quant = next(iter(entry["quants"].values()))
            pairs[name] = CatalogPair(
                name=name,
                description=entry["description"],
                exact=entry["exact"],
                beta=entry.get("beta"),
                loss=entry.get("loss"),
                license=entry["license"],
                checked=entry.get("checked") or {},
                quants=tuple(entry["quants"]),
                approx_gb=first_quant.get("approx_gb", {}),
                entry=entry,
            )
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeraError(f"cannot read the catalog {override or 'catalog.json'}: {exc}") from None
    except (KeyError, TypeError, AttributeError, StopIteration) as exc:
        raise DeraError(
            f"the catalog {override or 'catalog.json'} is malformed "
            f"({type(exc).__name__}: {exc}); see models/catalog.json for the format"
        ) from None
    return pairs


def find_pair(name: str) -> CatalogPair:
    """The catalog pair called `name`, or a one-line error with a did-you-mean."""
    catalog = load_catalog()
    if name in catalog:
        return catalog[name]
    close = difflib.get_close_matches(name, list(catalog), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise DeraError(f"unknown pair {name!r}{hint} (dera-local list shows the catalog)")


# What the hub accepts: repository ids of letters, digits, '-', '_', '.' (at most 96
# characters each part), and file paths without '..' or a leading '/'.
_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_FILE_PART = re.compile(r"^[A-Za-z0-9._ +=@,()-]+$")


def parse_remote(spec: str) -> RemoteFile | None:
    """'owner/repo:file.gguf' (as llama.cpp's -hf takes it) -> RemoteFile; None when the
    spec does not look like one (it is then a local path). Raises a one-line error for a
    spec that is shaped like one but names what the hub could not hold."""
    repo, sep, filename = spec.partition(":")
    if not sep or repo.count("/") != 1 or not filename.endswith(".gguf") or "/" in repo[:1]:
        return None
    parts = filename.split("/")
    bad_repo = not all(_REPO_PART.match(part) for part in repo.split("/"))
    bad_file = len(filename) > 255 or any(
        p in ("", ".", "..") or not _FILE_PART.match(p) for p in parts
    )
    if bad_repo or bad_file:
        what = "repository id" if bad_repo else "file name"
        raise BadParameterError(
            f"{spec[:80]!r}{'...' if len(spec) > 80 else ''}: not a valid hub {what} "
            "(owner/repo:file.gguf, letters, digits, '-', '_', '.'; no '..')"
        )
    return RemoteFile(repo, filename)
