"""`callplane alerts list`: recent fraud alerts with their evidence, read from the ALERTS stream.

    callplane alerts list                                # the 20 newest, oldest first
    callplane alerts list --number +48123456789 --rule call_spike --limit 5
    callplane alerts list --json                         # one fraud.alert event per line

Alerts are rare, so the stream (one number's subject with --number) is read from its
start and the newest --limit kept. Exit codes: 0 done (no alerts: a line on stderr),
2 bad arguments or NATS unreachable (one line, no traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # loaded when a command runs: `callplane --help` stays fast
    from nats.aio.client import Client

    from schemas import FraudAlert

E164 = re.compile(r"^\+[1-9]\d{1,14}$")
FETCH = 500  # messages per fetch while reading the stream


class AlertsError(RuntimeError):
    """Bad arguments or an unusable stream: one line on stderr, exit 2 (callplane.cli)."""


def add_alerts_commands(commands: argparse._SubParsersAction) -> None:
    group = commands.add_parser("alerts", help="fraud alerts: list recent ones with their evidence")
    alerts = group.add_subparsers(title="alerts commands", metavar="COMMAND")
    listing = alerts.add_parser("list", help="recent fraud.alert events, oldest first, with their evidence")
    listing.add_argument("--number", help="only this number's alerts (E.164)")
    listing.add_argument("--rule", help="only this detector's alerts, e.g. call_spike, scanner_sweep")
    listing.add_argument("--limit", type=int, default=20, metavar="N", help="the newest N alerts (default 20)")
    listing.add_argument("--json", action="store_true", help="print each alert event as one JSON line")
    listing.add_argument("--url", default=None, help="NATS URL (default $NATS_URL or nats://127.0.0.1:4222)")
    listing.set_defaults(run=cmd_alerts_list)

    def usage(_args: argparse.Namespace) -> None:
        group.print_help(sys.stderr)
        sys.exit(2)

    group.set_defaults(run=usage)


def cmd_alerts_list(args: argparse.Namespace) -> None:
    from schemas import encode

    from .client import connect

    if args.number is not None and not E164.match(args.number):
        raise AlertsError(f"--number: {args.number!r} is not an E.164 number (like +48123456789)")
    if args.limit < 1:
        raise AlertsError("--limit: 1 or more")

    async def run() -> list[FraudAlert]:
        nc = await connect(args.url)
        try:
            return await recent_alerts(nc, number=args.number, rule=args.rule, limit=args.limit)
        finally:
            await nc.close()

    found = asyncio.run(run())
    if not found:
        where = "".join([f" for {args.number}" if args.number else "", f" of rule {args.rule}" if args.rule else ""])
        print(f"no fraud alerts{where} in the ALERTS stream", file=sys.stderr)
        return
    if args.json:
        for alert in found:
            print(encode(alert).decode())
    else:
        print("\n\n".join(render(alert) for alert in found))


async def recent_alerts(nc: Client, *, number: str | None = None, rule: str | None = None, limit: int = 20) -> list[FraudAlert]:
    """The newest `limit` fraud.alert events (of one number, of one rule), oldest first."""
    import nats.errors
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
    from nats.js.errors import NotFoundError

    from schemas import DecodeError, FraudAlert, decode, number_token

    js = nc.jetstream()
    subject = f"fraud.alert.{number_token(number) if number else '*'}"
    config = ConsumerConfig(
        filter_subject=subject, deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=30.0
    )
    try:
        sub = await js.pull_subscribe(subject, stream="ALERTS", config=config)
    except NotFoundError:
        raise AlertsError("the ALERTS stream does not exist: run `callplane nats setup` first") from None
    newest: deque[FraudAlert] = deque(maxlen=limit)
    try:
        remaining = (await sub.consumer_info()).num_pending
        while remaining > 0:
            try:
                batch = await sub.fetch(min(FETCH, remaining), timeout=2.0)
            except nats.errors.TimeoutError:
                break
            for msg in batch:
                try:
                    event = decode(msg.data)
                except DecodeError:
                    continue  # not ours to judge here; the stream keeps it
                if isinstance(event, FraudAlert) and (rule is None or event.rule == rule):
                    newest.append(event)
            remaining = batch[-1].metadata.num_pending
    finally:
        await sub.unsubscribe()
    return list(newest)


def render(alert: FraudAlert) -> str:
    """A few lines per alert: what, where, when, and the evidence to judge it by."""
    minutes = alert.window_s / 60
    window = f"{minutes:g} min" if alert.window_s % 60 == 0 else f"{alert.window_s} s"
    account = f"  account {alert.account_id}" if alert.account_id else ""
    lines = [f"{alert.occurred_at}  {alert.rule}  {alert.number}  {alert.count} > {alert.threshold} in {window}{account}"]
    if alert.summary:
        lines.append(f"  {alert.summary}")
    ev = alert.evidence
    first = f"first call {ev.first_call_id} at {alert.first_at}" if ev.first_call_id else f"first at {alert.first_at}"
    last = f"last call {ev.last_call_id} at {alert.last_at}" if ev.last_call_id else f"last at {alert.last_at}"
    lines.append(f"  {first}; {last}")
    if ev.top_source_ips:
        lines.append("  top source IPs: " + ", ".join(f"{t.value} ({t.count})" for t in ev.top_source_ips))
    if ev.top_caller_prefixes:
        # The other party's prefix: the caller of an inbound call, the destination of an outbound one.
        prefixes = ", ".join(f"{t.value} ({t.count})" for t in ev.top_caller_prefixes)
        lines.append(f"  top remote-party prefixes (the caller, or the destination of an outbound call): {prefixes}")
    details = [
        ("source IP", ev.source_ip),
        ("user agent", ev.user_agent),
        ("numbers touched", ev.distinct_numbers or None),
        ("destination prefix", ev.destination_prefix),
        ("baseline per minute", None if ev.baseline_per_minute is None else f"{ev.baseline_per_minute:.2f}"),
        ("z-score", None if ev.z_score is None else f"{ev.z_score:.1f}"),
    ]
    shown = [f"{name} {value}" for name, value in details if value]
    if shown:
        lines.append("  " + "; ".join(shown))
    lines.append(f"  alert id {alert.event_id}")
    return "\n".join(lines)
