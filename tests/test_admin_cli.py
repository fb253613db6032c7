"""`callplane numbers ...` and `callplane accounts ...` as a user runs them: the CLI as its own
process against a provisioner serving NATS request/reply in this test's process."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from callplane.admin_cli import credits, millicredits
from schemas import encode_message
from services.provisioner.app import Provisioner
from services.provisioner.config import ProvisionerSettings
from callplane.secrets import SecretBox
from tests.nats_server import free_port

NUMBER = "+48123456789"
OTHER = "+48123456780"
SID = "AC" + "0123456789abcdef" * 2
TOKEN = "canary-token-7d1f3e9a5b"

Cli = Callable[..., Awaitable[subprocess.CompletedProcess]]


async def run_cli(url: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "NATS_URL": url}
    env.pop("NATS_CREDS", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "callplane.cli", *args,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 30)
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


@pytest.fixture
async def cli(nats_url: str, nc: Client, js: JetStreamContext) -> AsyncIterator[Cli]:
    """A provisioner answering on rpc.provisioner.*; yields a runner of `callplane ...`."""
    provisioner = Provisioner(js, ProvisionerSettings(callplane_secret_keys=SecretBox.generate_key(), http_port=-1))
    await provisioner.start()

    async def serve(msg: Msg) -> None:
        await msg.respond(encode_message(await provisioner.handle_bytes(msg.data)))

    subscription = await nc.subscribe("rpc.provisioner.*", cb=serve)

    async def ok(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        done = await run_cli(nats_url, *args, stdin=stdin)
        assert done.returncode == 0, done.stderr
        return done

    ok.raw = lambda *args, stdin="": run_cli(nats_url, *args, stdin=stdin)  # type: ignore[attr-defined]
    yield ok
    await subscription.unsubscribe()
    await provisioner.stop()


def lines(output: str) -> dict[str, str]:
    """'key: value' lines as a dict."""
    return {k: v.strip() for k, v in (line.split(": ", 1) for line in output.splitlines() if ": " in line)}


async def test_registered_numbers_are_listed_and_shown_as_text_and_json(cli: Cli) -> None:
    registered = await cli("numbers", "register", NUMBER, "--account", "acct_1", "--label", "Support")
    assert lines(registered.stdout)["phone_number"] == NUMBER
    await cli(
        "numbers", "register", OTHER, "--account", "acct_2", "--provider", "twilio", "--sid", SID, "--token-stdin",
        stdin=TOKEN + "\n",
    )  # fmt: skip

    table = (await cli("numbers", "list")).stdout.splitlines()
    assert table[0].split() == ["NUMBER", "ID", "ACCOUNT", "PROVIDER", "AGENT", "LABEL"]
    assert [row.split()[0] for row in table[1:]] == [OTHER, NUMBER]
    assert (await cli("numbers", "list", "--account", "acct_1")).stdout.count("+48") == 1
    listed = json.loads((await cli("numbers", "list", "--json")).stdout)
    assert {n["phone_number"]: n["account_id"] for n in listed} == {NUMBER: "acct_1", OTHER: "acct_2"}

    shown = lines((await cli("numbers", "show", NUMBER)).stdout)
    assert (shown["label"], shown["provider"]) == ("Support", "sip_trunk")
    assert shown["policy"] == "none (every call is accepted)"
    by_id = json.loads((await cli("numbers", "show", shown["phone_number_id"], "--json")).stdout)
    assert by_id["phone_number"] == NUMBER and by_id["sip_uri"] == shown["sip_uri"]

    twilio = await cli("numbers", "show", OTHER)
    assert lines(twilio.stdout)["twilio.account_sid"] == SID
    assert lines(twilio.stdout)["twilio.auth_token_hint"].endswith(TOKEN[-4:])
    assert TOKEN not in twilio.stdout + json.dumps(listed)


async def test_assign_and_unassign_change_the_numbers_agent(cli: Cli) -> None:
    await cli("numbers", "register", NUMBER, "--account", "acct_1")
    assigned = await cli("numbers", "assign", NUMBER, "agent_7")
    assert lines(assigned.stdout)["agent_id"] == "agent_7"
    assert json.loads((await cli("numbers", "show", NUMBER, "--json")).stdout)["agent_id"] == "agent_7"
    await cli("numbers", "unassign", NUMBER)
    assert json.loads((await cli("numbers", "show", NUMBER, "--json")).stdout)["agent_id"] is None


async def test_policy_flags_build_on_the_current_policy(cli: Cli, tmp_path: Path) -> None:
    await cli("numbers", "register", NUMBER, "--account", "acct_1")

    async def policy(*flags: str) -> dict:
        return json.loads((await cli("numbers", "policy", NUMBER, *flags, "--json")).stdout)

    await policy("--block-prefix", "+1900", "--hours", "09:00-17:00", "--timezone", "Europe/Warsaw")
    await policy("--block-prefix", "+1976", "--allow-cidr", "10.0.0.1", "--max-concurrent", "2")
    now = await policy("--timezone", "UTC", "--max-per-day", "100")
    assert now["blocked_prefixes"] == ["+1900", "+1976"]
    assert now["allowed_cidrs"] == ["10.0.0.1/32"]  # stored normalized
    assert (now["max_concurrent_calls"], now["max_calls_per_day"]) == (2, 100)
    assert now["hours"] == {"start": "09:00", "end": "17:00", "timezone": "UTC"}
    assert await policy("--show") == now
    text = lines((await cli("numbers", "policy", NUMBER)).stdout)
    assert (text["policy_version"], text["policy.blocked_prefixes"]) == ("3", "+1900, +1976")

    lifted = await policy("--max-concurrent", "none", "--hours", "none")
    assert (lifted["max_concurrent_calls"], lifted["hours"], lifted["max_calls_per_day"]) == (None, None, 100)
    path = tmp_path / "policy.json"
    path.write_text('{"allowed_prefixes": ["+48"]}')
    replaced = await policy("--set", f"@{path}", "--block-prefix", "+4870")
    assert (replaced["allowed_prefixes"], replaced["blocked_prefixes"], replaced["max_calls_per_day"]) == (
        ["+48"],
        ["+4870"],
        None,
    )
    assert (await policy("--set", "{}"))["allowed_prefixes"] == []


async def test_an_assigned_number_is_unregistered_only_when_forced(cli: Cli) -> None:
    await cli("numbers", "register", NUMBER, "--account", "acct_1")
    await cli("numbers", "assign", NUMBER, "agent_1")
    refused = await cli.raw("numbers", "unregister", NUMBER)
    assert refused.returncode == 1
    assert refused.stderr.startswith("callplane: conflict: ") and "(field number, rule assigned)" in refused.stderr
    assert (await cli("numbers", "unregister", NUMBER, "--force")).stdout == f"unregistered {NUMBER}\n"
    gone = await cli.raw("numbers", "show", NUMBER)
    assert (gone.returncode, gone.stderr.split(":")[:2]) == (1, ["callplane", " not_found"])


async def test_accounts_are_configured_credited_once_per_reference_and_shown(cli: Cli) -> None:
    await cli("accounts", "configure", "acct_1", "--rate-per-minute", "25000", "--timezone", "Europe/Warsaw")
    configured = await cli("accounts", "configure", "acct_1", "--per-call-max-s", "600")
    assert lines(configured.stdout)["timezone"] == "Europe/Warsaw"  # settings not given are kept
    first = await cli("accounts", "credit", "acct_1", "12.5", "--reference", "inv-1")
    again = await cli("accounts", "credit", "acct_1", "12.5", "--reference", "inv-1")
    assert first.stdout.startswith("credited 12.5 credits") and "nothing changed" in again.stdout
    shown = json.loads((await cli("accounts", "show", "acct_1", "--json")).stdout)
    assert {k: shown[k] for k in ("rate_millicredits_per_minute", "per_call_max_s", "credited_millicredits")} == {
        "rate_millicredits_per_minute": 25_000,
        "per_call_max_s": 600,
        "credited_millicredits": 12_500,
    }
    text = lines((await cli("accounts", "show", "acct_1")).stdout)
    assert text["credited_millicredits"] == "12500 (12.5 credits)"


@pytest.mark.parametrize(
    ("args", "stdin", "expected"),
    [
        (("numbers", "register", "48123456789", "--account", "acct_1"), "", "callplane: invalid: number: "),
        (
            ("numbers", "register", NUMBER, "--account", "a", "--provider", "twilio", "--sid", "AC1", "--token-stdin"),
            TOKEN,
            "(field twilio.account_sid, rule twilio_sid)",
        ),
        (("numbers", "policy", OTHER, "--allow-cidr", "10.0.0.0/33"), "", "(field policy.allowed_cidrs[0], rule cidr)"),
        (("accounts", "show", "acct_none"), "", "callplane: not_found: "),
    ],
    ids=["not e164", "bad twilio sid", "bad cidr", "unknown account"],
)
async def test_a_refusal_exits_1_with_its_code_field_and_rule_on_stderr(
    cli: Cli, args: tuple[str, ...], stdin: str, expected: str
) -> None:
    await cli("numbers", "register", OTHER, "--account", "acct_1")
    refused = await cli.raw(*args, stdin=stdin)
    assert (refused.returncode, refused.stdout) == (1, "")
    assert expected in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert TOKEN not in refused.stderr


async def test_unreachable_nats_exits_2_with_one_line() -> None:
    done = await run_cli(f"nats://127.0.0.1:{free_port()}", "numbers", "list")
    assert done.returncode == 2
    assert done.stderr.startswith("callplane: cannot reach NATS") and len(done.stderr.splitlines()) == 1


async def test_no_provisioner_answering_exits_2_with_one_line(nats_url: str) -> None:
    done = await run_cli(nats_url, "accounts", "show", "acct_1")
    assert done.returncode == 2
    assert "provisioner service did not answer" in done.stderr and len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [
        ("accounts", "credit", "acct_1", "1.2345", "--reference", "r"),
        ("accounts", "credit", "acct_1", "0", "--reference", "r"),
        ("numbers", "register", NUMBER, "--account", "a", "--provider", "twilio", "--sid", SID),
        ("numbers", "policy", NUMBER, "--hours", "9-5"),
    ],
    ids=["4 decimals", "nothing", "twilio without a token", "bad hours"],
)
async def test_usage_errors_exit_2_before_anything_is_sent(args) -> None:  # noqa: ANN001
    done = await run_cli(f"nats://127.0.0.1:{free_port()}", *args)
    assert done.returncode == 2 and "cannot reach NATS" not in done.stderr


@pytest.mark.parametrize(
    ("text", "amount"),
    [("12.5", 12_500), ("0.001", 1), ("7", 7_000), ("3.", 3_000), (".25", 250), ("1.2500", 1_250)],
)
def test_credits_convert_to_millicredits_exactly(text: str, amount: int) -> None:
    assert millicredits(text) == amount
    assert millicredits(credits(amount)) == amount


@pytest.mark.parametrize("text", ["1.0001", "-1", "1e3", "nan", "", ".", "0.000"])
def test_amounts_that_are_not_whole_millicredits_are_refused(text: str) -> None:
    with pytest.raises(Exception, match="credits|decimals|more than 0"):
        millicredits(text)
