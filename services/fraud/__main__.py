"""`python -m services.fraud`: windowed spike detection on the call stream."""

from callplane.config import from_env
from callplane.service import run, serve

from .app import wire
from .config import FraudSettings


def main() -> None:
    run("fraud", lambda: serve("fraud", from_env(FraudSettings), wire))


if __name__ == "__main__":
    main()
