"""`python -m services.meter`: bills calls into an exactly-once DuckDB ledger."""

from callplane.config import from_env
from callplane.service import run, serve

from .app import wire
from .config import MeterSettings


def main() -> None:
    run("meter", lambda: serve("meter", from_env(MeterSettings), wire))


if __name__ == "__main__":
    main()
