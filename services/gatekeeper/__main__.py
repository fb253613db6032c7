"""`python -m services.gatekeeper`: admits or rejects every offered call."""

from callplane.config import from_env
from callplane.service import run, serve

from .app import wire
from .config import GatekeeperSettings


def main() -> None:
    run("gatekeeper", lambda: serve("gatekeeper", from_env(GatekeeperSettings), wire))


if __name__ == "__main__":
    main()
