"""Fraud settings, from the environment."""

from callplane.config import NatsSettings


class FraudSettings(NatsSettings, frozen=True, kw_only=True):
    pass
