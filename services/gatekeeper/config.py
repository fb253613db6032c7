"""Gatekeeper settings, from the environment."""

from callplane.config import NatsSettings


class GatekeeperSettings(NatsSettings, frozen=True, kw_only=True):
    # HOLD_TIMEOUT_MS: how long to wait for the meter's credit hold before refusing the
    # call as billing_unavailable (never admit on a guess).
    hold_timeout_ms: int = 500
    # HOLD_BATCHING: ask the meter for the holds of offers admitted in the same turn of the
    # event loop in one hold_credits request (off: one hold_credit request per offer).
    hold_batching: bool = True
    lifecycle_tick_ms: int = 250  # LIFECYCLE_TICK_MS: how often ring timeouts are checked
    # CALLPLANE_SECRET_KEYS: the provisioner's Fernet keys, to open pre-call webhook signing
    # secrets. Without them, a webhook counts as failed (fail-open or fail-closed per account).
    callplane_secret_keys: str | None = None
    # GATEKEEPER_PARTITION: this instance's partition (0..N-1) when `callplane nats setup
    # --gatekeeper-partitions N` split admission by number; unset: the single consumer.
    gatekeeper_partition: int | None = None
