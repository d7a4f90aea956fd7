"""Importing a script's module by file path (experiments and training scripts live
outside the package, in folders whose names are not Python identifiers)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_module(name: str, relative_path: str) -> ModuleType:
    """Loads ROOT/relative_path as module `name`, registered in sys.modules (dataclasses
    look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
