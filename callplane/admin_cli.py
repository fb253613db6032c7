"""`callplane numbers ...`, `callplane accounts ...`: admin commands against a running stack.

Each subcommand turns its arguments into provisioner commands, sends them over NATS
request/reply and prints the answer: key: value lines or a table, JSON with --json.
Exit codes: 0 done, 1 the provisioner refused (the reason goes to stderr), 2 usage
errors and an unreachable NATS or provisioner (one line, no traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import re
import sys
from argparse import SUPPRESS
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the imports below wait until a command runs: `callplane --help` stays fast
    from schemas.commands import AccountView, Command, NumberView, Reply

MAX_MILLICREDITS = 2**63 - 1


class UsageError(RuntimeError):
    """Arguments that make no command; callplane.cli prints it as one line, exit 2."""


class Refused(Exception):
    """The provisioner answered ok=False."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.message)
        self.reply = reply


def add_admin_commands(commands: argparse._SubParsersAction) -> None:
    """Register the admin subcommands (they talk to the provisioner over NATS)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None, help="NATS URL (default $NATS_URL or nats://127.0.0.1:4222)")
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    numbers = commands.add_parser("numbers", help="phone numbers: register, assign, policy")
    _add_numbers(numbers.add_subparsers(title="numbers commands", metavar="COMMAND"), common)
    accounts = commands.add_parser("accounts", help="accounts: rates, limits, credits")
    _add_accounts(accounts.add_subparsers(title="accounts commands", metavar="COMMAND"), common)
    for group in (numbers, accounts):  # `callplane numbers` alone: that group's help, not the top one
        group.set_defaults(run=_usage_of(group))


def _usage_of(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], None]:
    def usage(_args: argparse.Namespace) -> None:
        parser.print_help(sys.stderr)
        sys.exit(2)

    return usage


def _add_numbers(numbers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    register = numbers.add_parser("register", parents=[common], help="register (import) a number")
    register.add_argument("number", metavar="NUMBER", help="E.164, e.g. +48123456789")
    register.add_argument("--account", required=True, metavar="ID")
    register.add_argument("--label", default="", metavar="L")
    register.add_argument("--provider", choices=("sip_trunk", "twilio"), default="sip_trunk")
    register.add_argument("--sid", metavar="SID", help="Twilio account SID (AC...)")
    register.add_argument(
        "--token-stdin", action="store_true", help="read the Twilio auth token from stdin (never from arguments)"
    )
    register.set_defaults(run=numbers_register)

    listing = numbers.add_parser("list", parents=[common], help="list numbers")
    listing.add_argument("--account", metavar="ID", help="only this account's numbers")
    listing.set_defaults(run=numbers_list)

    show = numbers.add_parser("show", parents=[common], help="show one number")
    show.add_argument("number", metavar="NUMBER_OR_ID", help="E.164 number or pn_... id")
    show.set_defaults(run=numbers_show)

    assign = numbers.add_parser("assign", parents=[common], help="route a number's calls to an agent")
    assign.add_argument("number", metavar="NUMBER")
    assign.add_argument("agent_id", metavar="AGENT_ID")
    assign.set_defaults(run=numbers_assign)

    unassign = numbers.add_parser("unassign", parents=[common], help="take a number's agent away")
    unassign.add_argument("number", metavar="NUMBER")
    unassign.set_defaults(run=numbers_assign, agent_id=None)

    policy = numbers.add_parser(
        "policy",
        parents=[common],
        help="show or change a number's security policy",
        description="With no change given, shows the policy. Flags change the current policy: "
        "prefixes and CIDRs are added to its lists, limits and hours replaced.",
    )
    policy.add_argument("number", metavar="NUMBER")
    policy.add_argument("--show", action="store_true", help="print the policy (the default with no change)")
    policy.add_argument("--set", metavar="JSON_OR_@FILE", help="replace the whole policy (JSON text, or @path)")
    for flag, dest, metavar, what in (
        ("--block-prefix", "blocked_prefixes", "P", "refuse callers whose number starts with P"),
        ("--allow-prefix", "allowed_prefixes", "P", "accept only callers starting with an allowed prefix"),
        ("--allow-cidr", "allowed_cidrs", "C", "accept SIP traffic only from an allowed address or network"),
    ):
        policy.add_argument(flag, dest=dest, action="extend", nargs="+", default=[], metavar=metavar, help=what)
    # SUPPRESS: a flag left out is absent from args, while a given 'none' is None (lift the limit).
    for flag, dest, what in (
        ("--max-concurrent", "max_concurrent_calls", "calls at once"),
        ("--max-per-hour", "max_calls_per_hour", "calls in an hour"),
        ("--max-per-day", "max_calls_per_day", "calls in a day"),
    ):
        text = f"{what}; 'none' lifts it"
        policy.add_argument(flag, dest=dest, type=_limit, default=SUPPRESS, metavar="N", help=text)
    policy.add_argument(
        "--hours", type=_hours, default=SUPPRESS, metavar="HH:MM-HH:MM", help="accept calls only then; 'none' lifts it"
    )
    policy.add_argument("--timezone", metavar="TZ", help="IANA zone of --hours (default: the current one, else UTC)")
    policy.set_defaults(run=numbers_policy)

    unregister = numbers.add_parser("unregister", parents=[common], help="delete a number")
    unregister.add_argument("number", metavar="NUMBER")
    unregister.add_argument("--force", action="store_true", help="even if an agent is assigned")
    unregister.set_defaults(run=numbers_unregister)


def _add_accounts(accounts: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    configure = accounts.add_parser(
        "configure",
        parents=[common],
        help="set an account's rates and limits",
        description="Settings not given keep their current value (or the default, for a new account).",
    )
    configure.add_argument("account_id", metavar="ID")
    for flag, dest, kind, metavar, what in (
        ("--rate-per-minute", "rate_millicredits_per_minute", _count, "MILLICREDITS", "voice price per minute"),
        ("--text-price", "text_price_millicredits", _count, "MILLICREDITS", "price per text reply"),
        ("--daily-voice-cap-s", "daily_voice_cap_s", _limit, "S", "voice seconds per day; 'none' lifts it"),
        ("--per-call-max-s", "per_call_max_s", _limit, "S", "longest call; 'none' lifts it"),
        ("--timezone", "timezone", str, "TZ", "IANA zone the daily cap resets in"),
    ):
        configure.add_argument(flag, dest=dest, type=kind, default=SUPPRESS, metavar=metavar, help=what)
    configure.set_defaults(run=accounts_configure)

    credit = accounts.add_parser("credit", parents=[common], help="top an account up (once per reference)")
    credit.add_argument("account_id", metavar="ID")
    credit.add_argument(
        "amount", metavar="AMOUNT_CREDITS", type=millicredits, help="credits, e.g. 12.5 (3 decimals at most)"
    )
    credit.add_argument("--reference", required=True, metavar="REF", help="payment id: the same one credits once")
    credit.set_defaults(run=accounts_credit)

    show = accounts.add_parser("show", parents=[common], help="show an account")
    show.add_argument("account_id", metavar="ID")
    show.set_defaults(run=accounts_show)


# -- argument types ---------------------------------------------------------------------


def millicredits(text: str) -> int:
    """'12.5' credits -> 12500 millicredits, exactly: a 4th decimal other than 0 is refused."""
    match = re.fullmatch(r"([0-9]*)(?:\.([0-9]*))?", text.strip())
    if not match or not (match.group(1) or match.group(2)):
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount of credits like 12.5")
    decimals = (match.group(2) or "").rstrip("0")
    if len(decimals) > 3:
        raise argparse.ArgumentTypeError(f"{text!r} has more than 3 decimals: 1 millicredit is the smallest amount")
    amount = int(match.group(1) or "0") * 1000 + int(decimals.ljust(3, "0"))
    if not 0 < amount <= MAX_MILLICREDITS:
        raise argparse.ArgumentTypeError(f"{text!r}: the amount must be more than 0")
    return amount


def credits(amount: int) -> str:
    """12500 millicredits -> '12.5'."""
    whole, fraction = divmod(amount, 1000)
    return f"{whole}.{fraction:03d}".rstrip("0").rstrip(".")


def _count(text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def _limit(text: str) -> int | None:
    return None if text.lower() == "none" else _count(text)


def _hours(text: str) -> tuple[str, str] | None:
    if text.lower() == "none":
        return None
    if not (match := re.fullmatch(r"([0-9]{2}:[0-9]{2})-([0-9]{2}:[0-9]{2})", text)):
        raise argparse.ArgumentTypeError(f"{text!r} is not HH:MM-HH:MM, e.g. 09:00-17:30")
    return match.group(1), match.group(2)


# -- talking to the provisioner ------------------------------------------------------------

Ask = Callable[["Command"], Awaitable["Reply"]]


def _converse(args: argparse.Namespace, conversation: Callable[[Ask], Awaitable[Any]]) -> Any:  # noqa: ANN401
    """Run `conversation(ask)` on one connection; a refusal prints one line and exits 1."""
    import nats.errors

    from .client import connect, send

    async def run() -> Any:  # noqa: ANN401
        nc = await connect(args.url)
        try:

            async def ask(command: Command) -> Reply:
                reply = await send(nc, "provisioner", command)
                if not reply.ok:
                    raise Refused(reply)
                return reply

            return await conversation(ask)
        finally:
            await nc.close()

    try:
        return asyncio.run(run())
    except Refused as refusal:
        print(f"callplane: {_refusal_line(refusal.reply)}", file=sys.stderr)
        sys.exit(1)
    except nats.errors.Error as exc:  # e.g. the connection dropped mid-conversation
        raise RuntimeError(f"NATS: {str(exc) or type(exc).__name__}") from None


def _refusal_line(reply: Reply) -> str:
    where = ", ".join(f"{name} {value}" for name, value in (("field", reply.field), ("rule", reply.rule)) if value)
    return f"{reply.code}: {reply.message}" + (f" ({where})" if where else "")


def _one(args: argparse.Namespace, command: Command) -> Reply:
    async def conversation(ask: Ask) -> Reply:
        return await ask(command)

    return _converse(args, conversation)


# -- numbers ----------------------------------------------------------------------------


def numbers_register(args: argparse.Namespace) -> None:
    from schemas.commands import RegisterNumber, TwilioCredentials

    twilio = None
    if args.provider == "twilio":
        if not (args.sid and args.token_stdin):
            raise UsageError("--provider twilio needs --sid SID and --token-stdin (the auth token on stdin)")
        twilio = TwilioCredentials(account_sid=args.sid, auth_token=_read_token())
    elif args.sid or args.token_stdin:
        raise UsageError("--sid and --token-stdin go with --provider twilio")
    command = RegisterNumber(
        number=args.number, account_id=args.account, provider=args.provider, label=args.label, twilio=twilio
    )
    _print_number(args, _one(args, command))


def _read_token() -> str:
    """From a pipe or file as is; at a terminal, prompted without echo."""
    token = getpass.getpass("Twilio auth token: ") if sys.stdin.isatty() else sys.stdin.read()
    token = token.strip()
    if not token:
        raise UsageError("--token-stdin: stdin held no token")
    return token


def numbers_list(args: argparse.Namespace) -> None:
    from schemas.commands import ListNumbers

    views = _one(args, ListNumbers(account_id=args.account)).numbers or []
    if args.json:
        _print_json(views)
    elif not views:
        print("no numbers")
    else:
        header = ("NUMBER", "ID", "ACCOUNT", "PROVIDER", "AGENT", "LABEL")
        rows = [(v.phone_number, v.phone_number_id, v.account_id, v.provider, v.agent_id or "-", v.label)
                for v in views]  # fmt: skip
        print(_table(header, rows))


def numbers_show(args: argparse.Namespace) -> None:
    from schemas.commands import GetNumber

    is_id = args.number.startswith("pn_")
    query = GetNumber(number_id=args.number) if is_id else GetNumber(number=args.number)
    reply = _one(args, query)
    _print_json(reply.number) if args.json else _print_lines(_number_lines(reply.number))


def numbers_assign(args: argparse.Namespace) -> None:
    from schemas.commands import UpdateNumber

    _print_number(args, _one(args, UpdateNumber(number=args.number, agent_id=args.agent_id)))


def numbers_policy(args: argparse.Namespace) -> None:
    from schemas.commands import GetNumber, SetPolicy

    changes = _policy_changes(args)
    if args.show and changes:
        raise UsageError("--show goes alone: leave it out to change the policy")

    async def conversation(ask: Ask) -> Reply:
        current = await ask(GetNumber(number=args.number))
        if not changes:
            return current
        policy = _apply(current.number.policy, changes)
        return await ask(SetPolicy(
            number=current.number.phone_number,
            policy=policy,
            expected_policy_version=current.number.policy_version,  # refused if changed meanwhile
        ))

    reply = _converse(args, conversation)
    if args.json:
        _print_json(reply.number.policy)
    else:
        _print_lines([("policy_version", reply.number.policy_version), *_policy_lines(reply.number.policy)])


def _policy_changes(args: argparse.Namespace) -> dict[str, Any]:
    """What the flags ask for; `set` is a whole policy the rest is applied on top of."""
    changes: dict[str, Any] = {}
    if args.set is not None:
        changes["set"] = _read_policy(args.set)
    for name in ("blocked_prefixes", "allowed_prefixes", "allowed_cidrs"):
        if getattr(args, name):
            changes[name] = getattr(args, name)
    for name in ("max_concurrent_calls", "max_calls_per_hour", "max_calls_per_day"):
        if name in vars(args):
            changes[name] = getattr(args, name)
    if "hours" in vars(args) or args.timezone is not None:
        changes["hours"] = (getattr(args, "hours", None), args.timezone, "hours" in vars(args))
    return changes


def _apply(policy: Any, changes: dict[str, Any]) -> Any:  # noqa: ANN401
    import msgspec

    from schemas import Hours

    policy = changes.get("set", policy)
    updates: dict[str, Any] = {}
    for name in ("blocked_prefixes", "allowed_prefixes", "allowed_cidrs"):
        if name in changes:
            updates[name] = tuple(dict.fromkeys((*getattr(policy, name), *changes[name])))
    for name in ("max_concurrent_calls", "max_calls_per_hour", "max_calls_per_day"):
        if name in changes:
            updates[name] = changes[name]
    if "hours" in changes:
        span, timezone, span_given = changes["hours"]
        current = policy.hours
        if span_given and span is None:
            if timezone is not None:
                raise UsageError("--timezone goes with hours: not with --hours none")
            updates["hours"] = None
        elif span_given:
            timezone = timezone or (current.timezone if current else "UTC")
            updates["hours"] = Hours(start=span[0], end=span[1], timezone=timezone)
        elif current is None:
            raise UsageError("--timezone is the zone of the hours, and this number has none: add --hours")
        else:
            updates["hours"] = msgspec.structs.replace(current, timezone=timezone)
    return msgspec.structs.replace(policy, **updates)


def _read_policy(text: str) -> Any:  # noqa: ANN401
    import msgspec

    from schemas import SecurityPolicy

    if text.startswith("@"):
        try:
            with open(text[1:], "rb") as file:
                data = file.read()
        except OSError as exc:
            raise UsageError(f"--set: cannot read {text[1:]}: {exc.strerror}") from None
    else:
        data = text.encode()
    try:
        return msgspec.json.decode(data, type=SecurityPolicy)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise UsageError(f"--set: not a policy: {exc}") from None


def numbers_unregister(args: argparse.Namespace) -> None:
    from schemas.commands import UnregisterNumber

    reply = _one(args, UnregisterNumber(number=args.number, force=args.force))
    _print_json(reply) if args.json else print(f"unregistered {args.number}")


def _print_number(args: argparse.Namespace, reply: Reply) -> None:
    if args.json:
        _print_json(reply)
    elif reply.number is not None:
        _print_lines(_number_lines(reply.number))


# -- accounts ---------------------------------------------------------------------------


def accounts_configure(args: argparse.Namespace) -> None:
    from schemas.commands import ConfigureAccount, GetAccount

    names = [name for name in ConfigureAccount.__struct_fields__ if name != "account_id"]
    given = {name: value for name, value in vars(args).items() if name in names}

    async def conversation(ask: Ask) -> Reply:
        try:
            current = (await ask(GetAccount(account_id=args.account_id))).account
        except Refused as refusal:
            if refusal.reply.code != "not_found":
                raise
            current = None
        settings = {name: getattr(current, name) for name in names} if current else {}
        return await ask(ConfigureAccount(account_id=args.account_id, **{**settings, **given}))

    reply = _converse(args, conversation)
    _print_json(reply) if args.json else _print_account(reply.account)


def accounts_credit(args: argparse.Namespace) -> None:
    from schemas.commands import CreditAccount

    command = CreditAccount(account_id=args.account_id, amount_millicredits=args.amount, reference=args.reference)
    reply = _one(args, command)
    if args.json:
        _print_json(reply)
    elif reply.event_ids:
        print(f"credited {credits(args.amount)} credits to {args.account_id} (reference {args.reference})")
    else:
        print(f"reference {args.reference} was credited to {args.account_id} before: nothing changed")


def accounts_show(args: argparse.Namespace) -> None:
    from schemas.commands import GetAccount

    account = _one(args, GetAccount(account_id=args.account_id)).account
    _print_json(account) if args.json else _print_account(account)


def _print_account(account: AccountView | None) -> None:
    if account is not None:
        _print_lines(_flatten(account))


# -- output -----------------------------------------------------------------------------


def _print_json(value: object) -> None:
    import msgspec

    print(msgspec.json.format(msgspec.json.encode(value), indent=2).decode())


def _print_lines(lines: list[tuple[str, object]]) -> None:
    width = max((len(key) for key, _ in lines), default=0)
    for key, value in lines:
        print(f"{key + ':':<{width + 1}} {value}")


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


def _number_lines(view: NumberView) -> list[tuple[str, object]]:
    lines = [line for line in _flatten(view) if not line[0].startswith("policy.")]
    return [*lines, *_policy_lines(view.policy)]


def _policy_lines(policy: Any) -> list[tuple[str, object]]:  # noqa: ANN401
    return _flatten(policy, "policy") or [("policy", "none (every call is accepted)")]


def _flatten(value: object, prefix: str = "") -> list[tuple[str, object]]:
    """A Struct as dotted key: value pairs; what is unset or empty is left out."""
    import msgspec

    lines: list[tuple[str, object]] = []
    items = msgspec.to_builtins(value) if not isinstance(value, dict) else value
    for name, item in items.items():
        key = f"{prefix}.{name}" if prefix else name
        if item is None or (isinstance(item, (list, tuple, dict)) and not item):
            continue
        if isinstance(item, dict):
            lines += _flatten(item, key)
        elif isinstance(item, (list, tuple)):
            lines.append((key, ", ".join(map(str, item))))
        elif "millicredits" in name and isinstance(item, int):
            lines.append((key, f"{item} ({credits(item)} credits)"))
        else:
            lines.append((key, item))
    return lines
