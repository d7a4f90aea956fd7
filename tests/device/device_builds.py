"""The two builds the device suite compares (see conftest.py) and the exact comparison
of their tokens."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Builds:
    device: str  # the GPU build's Python (this one)
    cpu: str

    def run(self, python: str, case: dict) -> dict:
        done = subprocess.run(
            [python, str(HERE / "run_case.py"), json.dumps(case)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if done.returncode != 0:
            raise AssertionError(f"run_case failed ({python}):\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.splitlines()[-1])

    def both(self, case: dict, **device_settings) -> tuple[dict, dict]:
        """(device result, CPU result): the device build with device_settings (default
        all layers offloaded), the CPU build with none offloaded."""
        device = self.run(self.device, {"n_gpu_layers": -1, **case, **device_settings})
        cpu = self.run(self.cpu, {**case, "n_gpu_layers": 0})
        return device, cpu


def missing() -> list[str]:
    from dera_local.llama import backend

    reasons = []
    if not backend.supports_gpu_offload():
        reasons.append(
            "this llama.cpp has no GPU device (a Vulkan build on lavapipe needs "
            "GGML_VK_VISIBLE_DEVICES=0)"
        )
    cpu = os.environ.get("DERA_CPU_PYTHON")
    if not cpu:
        reasons.append("DERA_CPU_PYTHON (a Python with the CPU build, to compare with) is unset")
    elif not Path(cpu).exists():
        reasons.append(f"DERA_CPU_PYTHON={cpu} does not exist")
    return reasons


def assert_same_tokens(device: list[int], cpu: list[int], device_top=None, cpu_top=None):
    """Exact equality; at the first difference, each build's two best tokens there and
    their gap (nats, in the mixture's log-probabilities), so a near-tie shows itself."""
    if device == cpu:
        return
    at = next(
        (i for i, (a, b) in enumerate(zip(device, cpu, strict=False)) if a != b),
        min(len(device), len(cpu)),
    )
    detail = ""
    if device_top is not None and cpu_top is not None and at < min(len(device_top), len(cpu_top)):
        (d1, dv1), (d2, dv2) = device_top[at][:2]
        (c1, cv1), (c2, cv2) = cpu_top[at][:2]
        detail = (
            f"; device's best two there: {d1} {dv1:.6f}, {d2} {dv2:.6f} (gap {dv1 - dv2:.2e}); "
            f"CPU's: {c1} {cv1:.6f}, {c2} {cv2:.6f} (gap {cv1 - cv2:.2e})"
        )
    raise AssertionError(
        f"tokens part at position {at}: device {device[at : at + 4]}..., CPU {cpu[at : at + 4]}..."
        + detail
    )
