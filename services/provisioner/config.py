"""Provisioner settings, from the environment."""

from callplane.config import NatsSettings


class ProvisionerSettings(NatsSettings, frozen=True, kw_only=True):
    sip_domain: str = "sip.callplane.dev"  # SIP_DOMAIN: the domain in every number's SIP URI
