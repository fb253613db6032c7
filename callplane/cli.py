"""`callplane`: run the stack, manage NATS topology, export the contract."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path



def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        sys.exit(2)
    try:
        args.run(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except (CliError, RuntimeError) as exc:  # Unreachable, ServiceUnavailable, StackError...
        print(f"callplane: {exc}", file=sys.stderr)
        sys.exit(2)


class CliError(Exception):
    """A failure the user can fix; printed as one line, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="callplane", description=__doc__)
    commands = parser.add_subparsers(title="commands")

    up = commands.add_parser("up", help="run NATS and every service locally (Ctrl-C stops all)")
    up.add_argument("--demo", action="store_true", help="provision demo numbers and drive demo traffic")
    up.add_argument("--duration", type=float, metavar="S", help="with --demo: stop after S seconds")
    up.add_argument("--port", type=int, default=4222, help="NATS client port (default 4222)")
    up.add_argument("--home", type=Path, default=Path(".callplane"), help="data and logs folder (default .callplane)")
    up.add_argument("--http-port", type=int, default=8080, help="the admin API's port (default 8080; 0: any free port)")
    up.set_defaults(run=cmd_up)

    nats_cmd = commands.add_parser("nats", help="NATS topology").add_subparsers(title="nats commands")
    setup = nats_cmd.add_parser("setup", help="create or update every stream and consumer (idempotent)")
    setup.add_argument("--url", default=None, help="NATS URL (default $NATS_URL or nats://127.0.0.1:4222)")
    setup.add_argument("--replicas", type=int, default=1, help="stream replicas: 1 single node, 3 on a cluster")
    setup.add_argument(
        "--gatekeeper-partitions",
        type=int,
        default=1,
        metavar="N",
        help="split admission across N gatekeeper instances by number (each runs with GATEKEEPER_PARTITION=0..N-1)",
    )
    setup.set_defaults(run=cmd_nats_setup)

    schemas_cmd = commands.add_parser("schemas", help="the event contract").add_subparsers(title="schemas commands")
    export = schemas_cmd.add_parser("export", help="write JSON Schema of every event and an AsyncAPI document")
    export.add_argument("directory", type=Path)
    export.set_defaults(run=cmd_schemas_export)
    catalog = schemas_cmd.add_parser("catalog", help="print the event catalog (Markdown), or update README.md")
    catalog.add_argument("--readme", type=Path, help="replace the catalog between the markers in this file")
    catalog.set_defaults(run=cmd_schemas_catalog)

    calls_cmd = commands.add_parser("calls", help="calls").add_subparsers(title="calls commands")
    explain = calls_cmd.add_parser("explain", help="why a call was admitted or refused, check by check")
    explain.add_argument("call_id")
    explain.add_argument("--number", help="the call's number (E.164): searches only its events, much faster")
    explain.add_argument("--json", action="store_true", help="print the decision event as JSON")
    explain.add_argument("--url", default=None, help="NATS URL (default $NATS_URL or nats://127.0.0.1:4222)")
    explain.set_defaults(run=cmd_calls_explain)

    secrets_cmd = commands.add_parser("secrets", help="secrets at rest").add_subparsers(title="secrets commands")
    rotate = secrets_cmd.add_parser("rotate", help="re-seal every stored secret under the newest key")
    rotate.add_argument("--url", default=None, help="NATS URL (default $NATS_URL or nats://127.0.0.1:4222)")
    rotate.set_defaults(run=cmd_secrets_rotate)

    from .admin_cli import add_admin_commands
    from .alerts_cli import add_alerts_commands
    from .ledger_cli import add_ledger_commands

    add_admin_commands(commands)
    add_ledger_commands(commands)
    add_alerts_commands(commands)
    return parser


def cmd_up(args: argparse.Namespace) -> None:
    from .demo import run_demo
    from .embedded import Stack

    if args.duration is not None and not args.demo:
        raise CliError("--duration goes with --demo")
    # Ctrl-C must stop the stack even when a launching shell ignored SIGINT (background jobs).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stack = Stack(home=args.home, port=args.port, log_to_files=args.demo, http_port=args.http_port)
        with stack:
            print(f"callplane is up: NATS at {stack.url}, data and logs in {args.home}/ (Ctrl-C stops everything)")
            if args.http_port:
                print(f"admin API: http://127.0.0.1:{args.http_port}/v1 (OpenAPI at /openapi.json)")
            if args.demo:
                print(f"service logs: {args.home}/logs/<service>.log")
                asyncio.run(run_demo(stack.url, duration=args.duration))
            else:
                _wait_forever(stack)
    except KeyboardInterrupt:
        print("\nstopped: every process is down")
    except RuntimeError as exc:
        raise CliError(str(exc)) from None


def _wait_forever(stack) -> None:  # noqa: ANN001
    import time

    while True:
        stack.check()
        time.sleep(1.0)


def cmd_nats_setup(args: argparse.Namespace) -> None:
    from . import topology
    from .client import connect

    async def run() -> None:
        nc = await connect(args.url)
        try:
            report = await topology.setup(
                nc.jetstream(), replicas=args.replicas, gatekeeper_partitions=args.gatekeeper_partitions
            )
        finally:
            await nc.close()
        for line in report.lines():
            print(line)
        print("changed" if report.changed else "no change")

    asyncio.run(run())


def cmd_calls_explain(args: argparse.Namespace) -> None:
    from schemas import encode

    from .client import connect
    from .explain import find_decision, render

    async def run() -> None:
        nc = await connect(args.url)
        try:
            decision = await find_decision(nc, args.call_id, args.number)
        finally:
            await nc.close()
        if decision is None:
            where = f" for {args.number}" if args.number else ""
            raise CliError(f"no decision for call {args.call_id}{where} in the CALLS stream")
        print(encode(decision).decode() if args.json else render(decision))

    asyncio.run(run())


def cmd_secrets_rotate(args: argparse.Namespace) -> None:
    from schemas.commands import RotateSecrets

    from .client import connect, send

    async def run() -> None:
        nc = await connect(args.url)
        try:
            reply = await send(nc, "provisioner", RotateSecrets(), timeout=60)
        finally:
            await nc.close()
        if not reply.ok:
            raise CliError(f"{reply.code}: {reply.message}")
        print(reply.message)

    asyncio.run(run())


def cmd_schemas_export(args: argparse.Namespace) -> None:
    from schemas.export import export

    written = export(args.directory)
    print(f"wrote {len(written)} files to {args.directory}")


def cmd_schemas_catalog(args: argparse.Namespace) -> None:
    from schemas.export import catalog_markdown, update_readme

    if args.readme is None:
        print(catalog_markdown())
    elif update_readme(args.readme):
        print(f"updated the event catalog in {args.readme}")
    else:
        print(f"{args.readme} is up to date (or has no catalog markers)")


if __name__ == "__main__":
    main()
