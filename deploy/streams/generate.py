"""Write the JSON definitions of every stream and durable consumer from callplane/topology.py.

For platform teams who manage JetStream with their own tooling (the `nats` CLI, Terraform,
an operator). topology.py stays the source of truth: never edit the JSON by hand, rerun
this script (tests/test_deploy.py fails when the files drift from topology.py).

    .venv/bin/python deploy/streams/generate.py                 # rewrite deploy/streams/*.json
    .venv/bin/python deploy/streams/generate.py --replicas 3 --out /tmp/r3   # cluster variant

Each file is the JetStream API config (nats-py `as_dict()`, durations in nanoseconds), which
`nats stream add <NAME> --config stream.<NAME>.json` and
`nats consumer add <STREAM> <DURABLE> --config consumer.<STREAM>.<DURABLE>.json` accept.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run as a plain script from a checkout

from callplane.topology import CONSUMERS, stream_config  # noqa: E402
from schemas import STREAMS  # noqa: E402


def _dump(config: dict) -> str:
    return json.dumps(config, indent=2) + "\n"


def definitions(replicas: int = 1) -> dict[str, str]:
    """File name -> file text, for every stream then every consumer."""
    files = {f"stream.{name}.json": _dump(stream_config(name, replicas=replicas).as_dict()) for name in STREAMS}
    for spec in CONSUMERS:
        # Consumers inherit the stream's replica count; the config leaves it unset.
        files[f"consumer.{spec.stream}.{spec.durable}.json"] = _dump(spec.config().as_dict())
    return files


def write(out: Path, replicas: int = 1) -> list[str]:
    """Rewrite `out` so it holds exactly the current definitions; returns the file names."""
    out.mkdir(parents=True, exist_ok=True)
    files = definitions(replicas)
    for stale in out.glob("*.json"):  # a stream or consumer removed from topology.py
        if stale.name not in files:
            stale.unlink()
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    return sorted(files)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="directory to write (default: deploy/streams)")
    parser.add_argument("--replicas", type=int, default=1, help="stream replicas (3 on the 3-node cluster)")
    args = parser.parse_args(argv)
    for name in write(args.out, args.replicas):
        print(args.out / name)


if __name__ == "__main__":
    main()
