"""Provisioner settings, from the environment."""

from callplane.config import NatsSettings


class ProvisionerSettings(NatsSettings, frozen=True, kw_only=True):
    sip_domain: str = "sip.callplane.dev"  # SIP_DOMAIN: the domain in every number's SIP URI
    max_numbers_per_account: int = 100  # MAX_NUMBERS_PER_ACCOUNT: registration quota (sync uses none)
    # CALLPLANE_SECRET_KEYS: Fernet keys, comma-separated, newest first (rotation: prepend a
    # new key). Without it, imports that carry secrets are refused.
    callplane_secret_keys: str | None = None
    http_host: str = "127.0.0.1"  # HTTP_HOST: where the admin API listens
    http_port: int = 8080  # HTTP_PORT: 0 picks a free port; -1 turns the HTTP API off
    admin_token: str | None = None  # ADMIN_TOKEN: if set, the API wants `Authorization: Bearer <token>`
