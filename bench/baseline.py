"""Another checkout of dera-local, imported beside this one in the same process, so that a
benchmark measures the old and the new code in rotation (same machine state, same
llama.cpp build) instead of in two runs minutes apart.

    git worktree add /tmp/before <commit>
    python bench/throughput.py --baseline-checkout /tmp/before

The checkout's package is imported as `dera_local_baseline` (its imports inside the
package are relative, so it never touches this checkout's modules), with this
checkout's compiled hook copied in (the same C, built once).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parents[1]
NAME = "dera_local_baseline"


def load_baseline(checkout: str | Path) -> ModuleType:
    """The dera_local package of `checkout`, imported as dera_local_baseline."""
    package = Path(checkout).resolve() / "dera_local"
    if not (package / "__init__.py").is_file():
        raise SystemExit(f"{checkout}: no dera_local package there (give a dera-local checkout)")
    for native in (HERE / "dera_local").glob("_native*.so"):
        shutil.copy(native, package)
    spec = importlib.util.spec_from_file_location(
        NAME, package / "__init__.py", submodule_search_locations=[str(package)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module
    spec.loader.exec_module(module)
    return module


def add_argument(parser) -> None:
    parser.add_argument(
        "--baseline-checkout",
        help="also measure another checkout of dera-local in the same process, in rotation "
        "(e.g. `git worktree add /tmp/before <commit>`); its rows are marked 'before'",
    )
