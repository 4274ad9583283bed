"""examples/typescript/walkthrough.ts, the README walkthrough over HTTP/JSON
with fetch, run by Node against the test suite: the invoice total is 3000
minor units (2,500 calls, 1,000 free, 0.02 each). Skipped only where Node is
not installed; its packages come from the npm registry (package-lock.json)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from tools.devstack import REPO_ROOT
from tools.suite import SERVICES, Suite

EXAMPLE = REPO_ROOT / "examples" / "typescript"


def test_typescript_walkthrough(suite: Suite) -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not installed: the TypeScript example needs Node 20 or newer")
    if not (EXAMPLE / "node_modules" / ".bin" / "tsx").exists():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=EXAMPLE, check=True, timeout=600
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("USAGEBILLING_")}
    env["USAGEBILLING_ADMIN_TOKEN"] = suite.admin_token
    for service in SERVICES:
        env[f"USAGEBILLING_{service.upper()}_HTTP_URL"] = suite.http_url(service)
    # Type-checked (tsc --strict), then run.
    subprocess.run(["npx", "tsc", "--noEmit"], cwd=EXAMPLE, check=True, timeout=300, env=env)
    run = subprocess.run(
        ["npx", "tsx", "walkthrough.ts"],
        cwd=EXAMPLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    last = run.stdout.strip().splitlines()[-1]
    assert json.loads(last) == {"total_minor": "3000"}, run.stdout
