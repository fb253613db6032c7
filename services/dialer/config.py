"""Dialer settings, from the environment."""

from callplane.config import NatsSettings


class DialerSettings(NatsSettings, frozen=True, kw_only=True):
    pass
