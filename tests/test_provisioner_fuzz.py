"""Property-based fuzzing of the admin API against its own OpenAPI document (schemathesis).

Every operation gets valid and invalid requests; no answer may be a 5xx, and every answer
must match the document (status, content type, headers, body schema). A Provisioner on the
real nats-server stands behind the API.

schemathesis serves an ASGI app from an event loop on a thread of its own, and a NATS
connection belongs to the loop that made it: so the provisioner starts on that loop, with the
first request (`ProvisionerOnItsOwnLoop`), on freshly emptied streams.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterator

import nats
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case, GenerationMode
from schemathesis.core.parameters import ParameterLocation
from schemathesis.python import asgi
from schemathesis.schemas import BaseSchema
from schemathesis.specs.openapi.checks import positive_data_acceptance

from services.provisioner.app import Provisioner
from services.provisioner.config import ProvisionerSettings
from services.provisioner.http import AdminApi, build_app
from callplane.secrets import SecretBox
from tests.conftest import fresh_streams

# Per operation and mode; raise it for a longer hunt: FUZZ_EXAMPLES=1000 pytest tests/test_provisioner_fuzz.py
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
ADMIN_TOKEN = "fuzz-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SEED = {"phone_number": "+48123456700", "account_id": "acct_seed", "provider": "sip_trunk"}


class ProvisionerOnItsOwnLoop:
    """ASGI app: fresh streams and a started Provisioner behind build_app, on the serving loop.

    schemathesis ends the lifespan after every test; the next request starts afresh.
    """

    def __init__(self, nats_url: str, settings: ProvisionerSettings) -> None:
        self.nats_url, self.settings = nats_url, settings
        self.app = None
        self.lock = asyncio.Lock()

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.stop()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        async with self.lock:
            if self.app is None:
                await self.start()
        await self.app(scope, receive, send)

    async def start(self) -> None:
        self.nc = await nats.connect(self.nats_url)
        js = self.nc.jetstream()
        await fresh_streams(js)
        self.provisioner = Provisioner(js, self.settings)
        await self.provisioner.start()
        self.app = build_app(self.provisioner, self.settings)

    async def stop(self) -> None:
        if self.app is not None:
            self.app = None
            await self.provisioner.stop()
            await self.nc.drain()


SETTINGS = ProvisionerSettings(
    callplane_secret_keys=SecretBox.generate_key(), http_port=-1, admin_token=ADMIN_TOKEN, max_numbers_per_account=5
)
# Valid requests for every operation; invalid ones too where there is input to spoil.
CASES = [
    pytest.param(op.method, op.path, mode, id=f"{mode}-{op.method} {op.path}")
    for op in AdminApi(None, SETTINGS).operations()
    for mode in ("positive", "negative")
    if mode == "positive" or op.body or op.params or "{" in op.path
]


@pytest.fixture(scope="module")
def api_schema(nats_url: str) -> Iterator[BaseSchema]:
    app = ProvisionerOnItsOwnLoop(nats_url, SETTINGS)
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    asgi.shutdown_lifespans()


@pytest.fixture(scope="module")
def client(api_schema: BaseSchema) -> asgi.ASGIClient:
    return asgi.get_client(api_schema.app)


def seeded_number(client: asgi.ASGIClient) -> str:
    """The id of a registered number, registering it again if a fuzzed DELETE removed it."""
    listed = client.get("/v1/phone-numbers", params={"account_id": SEED["account_id"]}, headers=AUTH).json()
    if listed["phone_numbers"]:
        return listed["phone_numbers"][0]["phone_number_id"]
    return client.post("/v1/phone-numbers", json=SEED, headers=AUTH).json()["phone_number_id"]


# schemathesis.pytest.from_fixture() cannot run under pytest 9 (it sets the removed
# Function._nodeid), so each operation is driven with its Hypothesis strategy instead.
@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_no_input_gets_a_5xx_or_an_answer_off_the_schema(
    api_schema: BaseSchema, client: asgi.ASGIClient, method: str, path: str, mode: str
) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def fuzz(case: Case) -> None:
        if mode == "positive" and "phone_number_id" in (case.path_parameters or {}):
            # A valid request also goes to a number that exists, so the code past the lookup runs.
            case.path_parameters["phone_number_id"] = seeded_number(client)
        # Every check but positive_data_acceptance: a schema cannot say which numbers
        # libphonenumber knows or which time zones exist, so valid-looking input may get a 422.
        headers = case.meta.components.get(ParameterLocation.HEADER)
        spoiled = headers is not None and headers.mode.is_negative  # e.g. Authorization left out
        case.call_and_validate(headers=None if spoiled else AUTH, excluded_checks=[positive_data_acceptance])

    fuzz()


def test_the_fuzzed_document_covers_every_route(api_schema: BaseSchema) -> None:
    paths = set(api_schema.raw_schema["paths"])
    assert {p for p in paths if re.match(r"^/v1/", p)} == {
        "/v1/phone-numbers",
        "/v1/phone-numbers/{phone_number_id}",
        "/v1/phone-numbers/{phone_number_id}/security-policy",
        "/v1/phone-numbers/{phone_number_id}/usage",
        "/v1/phone-numbers/{phone_number_id}/sync",
        "/v1/sip-uri-template",
        "/v1/accounts/{account_id}",
        "/v1/accounts/{account_id}/credits",
    }
