"""`callplane calls explain`: why was a call admitted or refused? Read from the decision
event itself (call.accepted / call.rejected carry every check with its inputs)."""

from __future__ import annotations

import nats.errors
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from schemas import CallAccepted, CallRejected, DecodeError, decode, number_token


async def find_decision(nc: Client, call_id: str, number: str | None = None) -> CallAccepted | CallRejected | None:
    """Scan the CALLS stream's decisions (of one number, when given: much faster)."""
    key = number_token(number) if number else "*"
    js = nc.jetstream()
    config = ConsumerConfig(
        filter_subjects=[f"call.accepted.{key}", f"call.rejected.{key}"],
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=30.0,
    )
    sub = await js.pull_subscribe("", stream="CALLS", config=config)
    found = None
    try:
        while True:
            try:
                batch = await sub.fetch(500, timeout=1.0)
            except nats.errors.TimeoutError:
                break
            for msg in batch:
                try:
                    event = decode(msg.data)
                except DecodeError:
                    continue
                if getattr(event, "call_id", None) == call_id:
                    found = event  # keep the last: a redelivery republishes the same decision
            if batch and batch[-1].metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return found


def render(decision: CallAccepted | CallRejected) -> str:
    if isinstance(decision, CallAccepted):
        verdict = f"ACCEPTED for agent {decision.agent_id} (hold {decision.hold_id}, max {decision.max_duration_s} s)"
    else:
        verdict = f"REJECTED: {decision.reason} (SIP {decision.sip_status})"
    lines = [
        f"call {decision.call_id} to {decision.number} at {decision.occurred_at}",
        verdict,
        f"policy version {decision.decision.policy_version}; checks in order:",
    ]
    for check in decision.decision.checks:
        inputs = ", ".join(f"{k}={v}" for k, v in check.inputs.items() if v is not None)
        lines.append(f"  {'pass' if check.passed else 'FAIL'}  {check.name}" + (f"  ({inputs})" if inputs else ""))
    return "\n".join(lines)
