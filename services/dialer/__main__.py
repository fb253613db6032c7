"""`python -m services.dialer`: outbound calls and campaigns."""

from callplane.config import from_env
from callplane.service import run, serve

from .app import wire
from .config import DialerSettings


def main() -> None:
    run("dialer", lambda: serve("dialer", from_env(DialerSettings), wire))


if __name__ == "__main__":
    main()
