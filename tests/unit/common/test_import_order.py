"""Each module imports on its own in a fresh interpreter: an import cycle that only
bites in one order (config -> readiness -> metrics -> config) broke `make run`."""

from __future__ import annotations

import subprocess
import sys

import pytest

MODULES = [
    "services.common.config",
    "services.common.metrics",
    "services.common.readiness",
    "tools.run_suite",
]


@pytest.mark.parametrize("module", MODULES)
def test_imports_first(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
