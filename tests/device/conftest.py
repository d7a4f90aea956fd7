"""The device suite: dera-local on a GPU build of llama.cpp (CI: Vulkan on Mesa's
lavapipe, a Vulkan driver that runs on the CPU) against the CPU build.

Runs where this Python's llama.cpp has a GPU device and DERA_CPU_PYTHON names a Python
with the CPU build (.ci/run: .venv-vulkan against .venv); skips elsewhere, and fails
instead of skipping under DERA_REQUIRE_DEVICE=1. Every case runs in a fresh process on
each build (run_case.py) and the tokens are compared exactly; where they
part, the failure gives each build's two best tokens and the gap between them there."""

from __future__ import annotations

import os
import sys

import pytest
from device_builds import Builds, missing


@pytest.fixture(scope="session")
def builds() -> Builds:
    reasons = missing()
    if reasons:
        if os.environ.get("DERA_REQUIRE_DEVICE") == "1":
            pytest.fail("device suite required but: " + "; ".join(reasons))
        pytest.skip("; ".join(reasons))
    return Builds(sys.executable, os.environ["DERA_CPU_PYTHON"])
