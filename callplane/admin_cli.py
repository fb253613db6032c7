"""`callplane numbers ...`, `callplane accounts ...`: admin commands against a running stack."""

from __future__ import annotations

import argparse


def add_admin_commands(commands: argparse._SubParsersAction) -> None:
    """Register the admin subcommands (they talk to the provisioner over NATS)."""
