"""`python -m services.provisioner`: the phone-number registry and accounts."""

from callplane.config import from_env
from callplane.service import run, serve

from .app import wire
from .config import ProvisionerSettings


def main() -> None:
    run("provisioner", lambda: serve("provisioner", from_env(ProvisionerSettings), wire))


if __name__ == "__main__":
    main()
