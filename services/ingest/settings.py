"""ingest's configuration, read from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from services.common.config import CommonSettings, EnvReader, read_common


@dataclass(frozen=True)
class IngestSettings:
    common: CommonSettings
    billing_addr: str
    backdate_window: timedelta


def read(reader: EnvReader) -> IngestSettings:
    return IngestSettings(
        common=read_common(reader, "ingest"),
        billing_addr=reader.text("USAGEBILLING_BILLING_ADDR", "127.0.0.1:50053"),
        backdate_window=reader.duration("USAGEBILLING_BACKDATE_WINDOW", timedelta(days=35)),
    )


def load(env: Mapping[str, str] = os.environ) -> IngestSettings:
    reader = EnvReader(env)
    settings = read(reader)
    reader.check()
    return settings
