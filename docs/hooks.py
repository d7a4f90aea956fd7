"""MkDocs hook: puts the repository's own documents into the site where they already live
(the model card beside the adapter, the experiment's report beside its code, the
benchmark list beside the benchmarks), instead of copies in docs/ that would drift."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
# site path -> repository path
EXTERNAL = {
    "model-card.md": "models/smollm2-concise-dpo/README.md",
    "realignment/index.md": "experiments/realignment/README.md",
    "realignment/results/realignment.png": "experiments/realignment/results/realignment.png",
    "realignment/lam-meaning.md": "experiments/lam_meaning/README.md",
    "performance/benchmarks.md": "bench/README.md",
}


def on_files(files, config):
    for site_path, repo_path in EXTERNAL.items():
        source = ROOT / repo_path
        if not source.is_file():
            raise FileNotFoundError(f"{repo_path} is missing (docs/hooks.py lists it)")
        files.append(File.generated(config, site_path, abs_src_path=str(source)))
    return files
