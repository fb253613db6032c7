"""Gatekeeper settings, from the environment."""

from callplane.config import NatsSettings


class GatekeeperSettings(NatsSettings, frozen=True, kw_only=True):
    pass
