"""`callplane alerts list` as a user runs it: its own process, against a real nats-server."""

from __future__ import annotations

import json

from nats.js import JetStreamContext

from callplane.broker import publish_all
from schemas import AlertEvidence, FraudAlert, Tally
from tests.nats_server import free_port
from tests.test_admin_cli import run_cli

SPIKED = "+48123456789"
SWEPT = "+48221234567"


def alert(i: int, number: str, rule: str, **evidence: object) -> FraudAlert:
    return FraudAlert(
        event_id=f"ev_offer_{i}/{rule}",
        occurred_at=f"2026-05-04T12:0{i}:00.000Z",
        number=number,
        account_id="acct_1",
        rule=rule,
        count=11,
        threshold=10,
        window_s=300,
        first_at="2026-05-04T11:58:00.000Z",
        last_at=f"2026-05-04T12:0{i}:00.000Z",
        summary=f"11 calls to {number} within 5 min (threshold 10)",
        evidence=AlertEvidence(**evidence),
    )


async def test_alerts_are_listed_with_their_evidence_newest_last_and_filtered(nats_url: str, js: JetStreamContext) -> None:
    spike = alert(
        1, SPIKED, "call_spike", first_call_id="call_a", last_call_id="call_k",
        top_source_ips=(Tally(value="203.0.113.7", count=9), Tally(value="198.51.100.2", count=2)),
        top_caller_prefixes=(Tally(value="+4420", count=11),),
    )  # fmt: skip
    sweep = alert(2, SWEPT, "scanner_sweep", source_ip="203.0.113.7", user_agent="friendly-scanner", distinct_numbers=12)
    later_spike = alert(3, SPIKED, "call_spike")
    await publish_all(js, [spike, sweep, later_spike])

    table = await run_cli(nats_url, "alerts", "list")
    assert table.returncode == 0, table.stderr
    assert table.stdout.index("call_spike  +48123456789  11 > 10 in 5 min") < table.stdout.index("scanner_sweep")
    assert "first call call_a at 2026-05-04T11:58:00.000Z; last call call_k at 2026-05-04T12:01:00.000Z" in table.stdout
    assert "top source IPs: 203.0.113.7 (9), 198.51.100.2 (2)" in table.stdout
    assert "top remote-party prefixes (the caller, or the destination of an outbound call): +4420 (11)" in table.stdout
    assert "source IP 203.0.113.7; user agent friendly-scanner; numbers touched 12" in table.stdout
    assert "11 calls to +48123456789 within 5 min (threshold 10)" in table.stdout

    by_number = await run_cli(nats_url, "alerts", "list", "--number", SPIKED, "--json")
    assert [json.loads(line)["event_id"] for line in by_number.stdout.splitlines()] == [spike.event_id, later_spike.event_id]
    newest = await run_cli(nats_url, "alerts", "list", "--number", SPIKED, "--limit", "1", "--json")
    [only] = [json.loads(line) for line in newest.stdout.splitlines()]
    assert only["event_id"] == later_spike.event_id and only["type"] == "fraud.alert"
    by_rule = await run_cli(nats_url, "alerts", "list", "--rule", "scanner_sweep", "--json")
    [swept] = [json.loads(line) for line in by_rule.stdout.splitlines()]
    assert swept["evidence"]["user_agent"] == "friendly-scanner"


async def test_no_alerts_says_so_and_an_unreachable_nats_is_one_line(nats_url: str, js: JetStreamContext) -> None:
    none = await run_cli(nats_url, "alerts", "list", "--number", SPIKED)
    assert none.returncode == 0 and none.stdout == ""
    assert none.stderr.strip() == f"no fraud alerts for {SPIKED} in the ALERTS stream"

    down = await run_cli(f"nats://127.0.0.1:{free_port()}", "alerts", "list")
    assert down.returncode == 2
    assert down.stderr.startswith("callplane: cannot reach NATS") and "Traceback" not in down.stderr

    bad = await run_cli(nats_url, "alerts", "list", "--number", "48123")
    assert bad.returncode == 2 and "is not an E.164 number" in bad.stderr
