"""Meter settings, from the environment."""

from callplane.config import NatsSettings


class MeterSettings(NatsSettings, frozen=True, kw_only=True):
    callplane_data_dir: str = ".callplane/data"  # CALLPLANE_DATA_DIR: the DuckDB ledger lives under meter/
