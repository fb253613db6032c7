"""Two gatekeeper instances share admission by number partition, on a real nats-server,
and counting stays exact: each number's offers reach exactly one instance."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from callplane.broker import publish_all
from callplane.client import send
from callplane.embedded import Stack
from schemas import CallAccepted, SecurityPolicy
from schemas.commands import AssignAgent, ConfigureAccount, CreditAccount, RegisterNumber, SetPolicy
from tests.test_gatekeeper_e2e import Decisions, offers

NUMBERS = [f"+4812345678{i}" for i in range(6)]


@pytest.fixture
def two_gatekeepers(nats_url: str, js: JetStreamContext, tmp_path: Path) -> Iterator[tuple[Stack, Path]]:
    with Stack(
        home=tmp_path / "stack",
        nats_url=nats_url,
        services=("provisioner", "meter", "gatekeeper"),
        env={"GATEKEEPER_PARTITION": "0"},
        gatekeeper_partitions=2,
    ) as stack:
        log = tmp_path / "gatekeeper-1.log"
        with log.open("wb") as out:
            second = subprocess.Popen(
                [sys.executable, "-m", "services.gatekeeper"],
                env={**os.environ, "NATS_URL": nats_url, "GATEKEEPER_PARTITION": "1", "PYTHONUNBUFFERED": "1"},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            yield stack, log
        finally:
            second.terminate()
            second.wait(10)


async def test_two_instances_split_the_numbers_and_each_number_admits_exactly_its_cap(
    two_gatekeepers: tuple[Stack, Path], nc: Client, js: JetStreamContext
) -> None:
    stack, second_log = two_gatekeepers
    decisions = Decisions()
    for subject in ("call.accepted.*", "call.rejected.*", "ledger.credited.*"):
        await nc.subscribe(subject, cb=decisions.collect)
    commands = [
        ConfigureAccount(account_id="acct_p"),
        CreditAccount(account_id="acct_p", amount_millicredits=10**9, reference="topup"),
    ]
    for number in NUMBERS:
        commands += [
            RegisterNumber(number=number, account_id="acct_p"),
            AssignAgent(number=number, agent_id="agent_1"),
            SetPolicy(number=number, policy=SecurityPolicy(max_concurrent_calls=2)),
        ]
    for command in commands:
        assert (await send(nc, "provisioner", command)).ok
    await asyncio.wait_for(decisions.credited.wait(), 10)
    for _ in range(100):  # the second instance is ready once it logged so
        if b"service_started" in second_log.read_bytes():
            break
        await asyncio.sleep(0.1)

    burst = [
        msgspec.structs.replace(o, to=number, call_id=f"{o.call_id}_{i}", event_id=f"{o.event_id}_{i}")
        for i, number in enumerate(NUMBERS)
        for o in offers(0, 10)
    ]
    await publish_all(js, burst)
    await decisions.wait_for(len(burst))

    per_number = {n: sum(1 for d in decisions.by_call.values() if isinstance(d, CallAccepted) and d.number == n)
                  for n in NUMBERS}
    assert per_number == {n: 2 for n in NUMBERS}  # exactly the cap, on every number
    first = (stack.home / "logs" / "gatekeeper.log").read_text()
    second = second_log.read_text()
    decided_by = {n: ("first" if n in first else "") + ("second" if n in second else "") for n in NUMBERS}
    assert set(decided_by.values()) == {"first", "second"}  # both instances worked, each number on one
