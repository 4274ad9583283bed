"""Shared fixtures: real PostgreSQL and NATS servers.

`make test` runs pytest under tools.with_stack, which sets DATABASE_URL and
NATS_URL to a private stack; run directly, pytest starts its own stack."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.devstack import DevStack


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
