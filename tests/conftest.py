"""Shared fixtures: real PostgreSQL and NATS servers.

`make test` runs pytest under tools.with_stack, which sets DATABASE_URL and
NATS_URL to a private stack; run directly, pytest starts its own stack."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tools.devstack import DevStack

# Properties run on loaded CI machines (2 cores, `make bench` beside): a
# per-example deadline there fails on the machine's load, not on the code, and
# an example saved in .hypothesis/ would fail again on every run. So no
# deadline, and no health check on slow data generation, in every profile.
# HYPOTHESIS_PROFILE=ci (set by .ci/run) also derandomizes and uses no example
# database, so that a CI run is reproducible from the commit alone.
settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci", settings.get_profile("default"), derandomize=True, database=None, print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def stack_urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    database_url = os.environ.get("DATABASE_URL")
    nats_url = os.environ.get("NATS_URL")
    if database_url and nats_url:
        yield database_url, nats_url
        return
    stack = DevStack(Path(tmp_path_factory.mktemp("stack")))
    try:
        yield stack.start()
    finally:
        stack.stop()
