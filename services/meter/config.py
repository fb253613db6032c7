"""Meter settings, from the environment."""

from callplane.config import NatsSettings


class MeterSettings(NatsSettings, frozen=True, kw_only=True):
    callplane_data_dir: str = ".callplane/data"  # CALLPLANE_DATA_DIR: the DuckDB ledger lives under meter/
    # SUPERVISE_MS: how often calls in progress are checked (hold extensions, cut-offs).
    supervise_ms: int = 1000
