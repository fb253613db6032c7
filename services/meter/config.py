"""Meter settings, from the environment."""

from typing import Annotated

import msgspec

from callplane.config import NatsSettings


class MeterSettings(NatsSettings, frozen=True, kw_only=True):
    callplane_data_dir: str = ".callplane/data"  # CALLPLANE_DATA_DIR: the DuckDB ledger lives under meter/
    # SUPERVISE_MS: how often calls in progress are checked (hold extensions, cut-offs).
    supervise_ms: int = 1000
    # SNAPSHOT_CRON: when Parquet snapshots of the ledger are written for analysts (UTC; a 6th field is seconds).
    snapshot_cron: str = "* * * * *"
    # SNAPSHOT_KEEP: how many snapshots to keep (at least 2: a reader's snapshot outlives the next write).
    snapshot_keep: Annotated[int, msgspec.Meta(ge=2)] = 5
