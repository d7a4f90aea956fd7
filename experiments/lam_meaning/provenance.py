"""Where a result came from: the machine (CPU and ISA, as the benchmarks name it), the
commit, and the library versions. Samples at temperature 1 do not reproduce across CPUs
(llama.cpp's kernels round differently per ISA), so results say which one made them."""

from __future__ import annotations

import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from common import machine  # noqa: E402


def _commit() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" (with uncommitted changes)" if dirty else "")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def provenance() -> dict:
    return {
        "machine": machine(),
        "commit": _commit(),
        "versions": {p: _version(p) for p in ("dera-local", "llama_cpp_python", "numpy")},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
