"""Unit tests of the wire contract: golden fixtures, validation, subjects, time and export."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, get_args

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

import schemas
from schemas import (
    EVENT_TYPES,
    STREAMS,
    TYPES_BY_TAG,
    decode,
    derived_id,
    encode,
    parse_timestamp,
    stream_of,
    subject_for,
    tag_of,
    timestamp,
)
from schemas.events import (
    AccountConfigured,
    AccountCredited,
    CallEnded,
    CallOffered,
    EndReason,
    FraudAlert,
    LedgerCharged,
    LedgerHeld,
    NumberAssigned,
    Transport,
)
from schemas.export import SERVICES, asyncapi, catalog_markdown, event_schemas, expand, export, update_readme

GOLDEN = Path(schemas.__file__).parent / "golden"
FIXTURES = sorted(GOLDEN.glob("*.json"))
TAGS = sorted(TYPES_BY_TAG)
T = "2026-11-21T09:59:07.123Z"


def golden(tag: str) -> dict[str, Any]:
    return json.loads((GOLDEN / f"{tag}.json").read_text())


def with_changes(tag: str, **changes: Any) -> bytes:
    body = golden(tag)
    body.update(changes)
    return json.dumps(body).encode()


# -- golden fixtures ---------------------------------------------------------------


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_golden_fixture_decodes_to_its_class_and_round_trips(path: Path) -> None:
    raw = path.read_bytes()
    event = decode(raw)
    tag = json.loads(raw)["type"]
    assert type(event) is TYPES_BY_TAG[tag]
    assert path.stem == tag or path.stem.startswith(tag + ".")
    again = decode(encode(event))
    assert again == event
    assert json.loads(encode(again)) == json.loads(encode(event))


@pytest.mark.parametrize("tag", TAGS)
def test_every_event_type_has_a_golden_fixture(tag: str) -> None:
    assert (GOLDEN / f"{tag}.json").is_file()


def test_no_golden_fixture_without_an_event_type() -> None:
    assert FIXTURES
    for path in FIXTURES:
        assert json.loads(path.read_bytes())["type"] in TYPES_BY_TAG, path.name


@pytest.mark.parametrize("tag", TAGS)
def test_unknown_extra_fields_are_ignored(tag: str) -> None:
    event = decode(with_changes(tag, added_in_v9="whatever", nested_extra={"a": [1, 2]}))
    assert event == decode((GOLDEN / f"{tag}.json").read_bytes())


# -- validation --------------------------------------------------------------------


@pytest.mark.parametrize("tag", TAGS)
def test_missing_required_field_is_rejected(tag: str) -> None:
    for name in ("event_id", "occurred_at"):
        body = golden(tag)
        del body[name]
        with pytest.raises(msgspec.ValidationError):
            decode(json.dumps(body))


@pytest.mark.parametrize(
    ("tag", "field"),
    [
        ("call.offered", "to"),
        ("call.offered", "from"),
        ("call.ended", "duration_ms"),
        ("call.accepted", "agent_id"),
        ("number.assigned", "agent_id"),
        ("ledger.charged", "balance_millicredits"),
        ("fraud.alert", "window_s"),
    ],
)
def test_missing_event_specific_required_field_is_rejected(tag: str, field: str) -> None:
    body = golden(tag)
    del body[field]
    with pytest.raises(msgspec.ValidationError):
        decode(json.dumps(body))


@pytest.mark.parametrize("bad_type", ["call.offerd", "call", "", "CallOffered", None, 7])
def test_wrong_type_tag_is_rejected(bad_type: Any) -> None:
    with pytest.raises(msgspec.ValidationError):
        decode(with_changes("call.offered", type=bad_type))


def test_missing_type_tag_is_rejected() -> None:
    body = golden("call.offered")
    del body["type"]
    with pytest.raises(msgspec.ValidationError):
        decode(json.dumps(body))


@pytest.mark.parametrize(
    ("tag", "field", "value"),
    [
        ("call.offered", "to", "48123456789"),
        ("call.offered", "to", "+0123456789"),
        ("call.offered", "to", "+1234567890123456"),
        ("call.offered", "to", "+48 123 456 789"),
        ("call.offered", "to", "anonymous"),
        ("call.offered", "from", "+4812345678x"),
        ("number.registered", "number", "0048123456789"),
        ("call.ended", "number", "+"),
        ("fraud.alert", "number", ""),
    ],
)
def test_bad_e164_is_rejected(tag: str, field: str, value: str) -> None:
    with pytest.raises(msgspec.ValidationError):
        decode(with_changes(tag, **{field: value}))


def test_anonymous_caller_is_accepted() -> None:
    assert decode(with_changes("call.offered", **{"from": "anonymous"})).from_ == "anonymous"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("occurred_at", "2026-11-21T09:59:07Z"),
        ("occurred_at", "2026-11-21T09:59:07.123456Z"),
        ("occurred_at", "2026-11-21 09:59:07.123Z"),
        ("occurred_at", "2026-11-21T09:59:07.123+00:00"),
        ("occurred_at", "1763719147123"),
        ("first_at", "21/11/2026 09:59"),
        ("last_at", "2026-11-21T09:59:07.123"),
    ],
)
def test_bad_timestamp_format_is_rejected(field: str, value: str) -> None:
    with pytest.raises(msgspec.ValidationError):
        decode(with_changes("fraud.alert", **{field: value}))


@pytest.mark.parametrize(
    ("tag", "field"),
    [
        ("account.credited", "amount_millicredits"),
        ("account.configured", "rate_millicredits_per_minute"),
        ("account.configured", "text_price_millicredits"),
        ("ledger.held", "amount_millicredits"),
        ("ledger.charged", "amount_millicredits"),
        ("ledger.charged", "voice_millicredits"),
        ("ledger.charged", "text_millicredits"),
        ("ledger.released", "amount_millicredits"),
        ("ledger.credited", "amount_millicredits"),
        ("call.ended", "duration_ms"),
    ],
)
def test_negative_money_or_duration_is_rejected(tag: str, field: str) -> None:
    with pytest.raises(msgspec.ValidationError):
        decode(with_changes(tag, **{field: -1}))


def test_negative_balance_is_allowed() -> None:
    assert decode(with_changes("ledger.charged", balance_millicredits=-500)).balance_millicredits == -500


@pytest.mark.parametrize("raw", [b"", b"{", b"null", b"[]", b'"call.offered"'])
def test_malformed_body_raises_a_decode_error(raw: bytes) -> None:
    with pytest.raises(schemas.DecodeError):
        decode(raw)


# -- subjects and streams ----------------------------------------------------------


def offer(direction: str, to: str = "+48123456789", caller: str = "+15551234567") -> CallOffered:
    return CallOffered(event_id="e1", occurred_at=T, call_id="c1", direction=direction, to=to, from_=caller)


@pytest.mark.parametrize(
    ("event", "subject"),
    [
        (offer("inbound"), "call.offered.48123456789"),
        (offer("outbound"), "call.offered.15551234567"),
        (
            CallEnded(event_id="e", occurred_at=T, call_id="c1", number="+48123456789", duration_ms=0),
            "call.ended.48123456789",
        ),
        (NumberAssigned(event_id="e", occurred_at=T, number="+48123456789", agent_id=None), "number.assigned.48123456789"),
        (AccountConfigured(event_id="e", occurred_at=T, account_id="acct_42"), "account.configured.acct_42"),
        (
            AccountCredited(event_id="e", occurred_at=T, account_id="acct_42", amount_millicredits=1000, reference="r"),
            "account.credited.acct_42",
        ),
        (
            LedgerCharged(
                event_id="e",
                occurred_at=T,
                account_id="acct_42",
                amount_millicredits=1,
                balance_millicredits=0,
                call_id="c1",
                number="+48123456789",
            ),
            "ledger.charged.acct_42",
        ),
        (
            LedgerHeld(
                event_id="e",
                occurred_at=T,
                account_id="acct_7",
                amount_millicredits=1,
                balance_millicredits=0,
                call_id="c1",
                hold_id="h",
            ),
            "ledger.held.acct_7",
        ),
        (
            FraudAlert(
                event_id="e",
                occurred_at=T,
                number="+48123456789",
                account_id="acct_42",
                rule="r",
                count=1,
                threshold=1,
                window_s=60,
                first_at=T,
                last_at=T,
            ),
            "fraud.alert.48123456789",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else tag_of(type(value)),
)
def test_subject_for_uses_the_right_key(event: schemas.Event, subject: str) -> None:
    assert subject_for(event) == subject


@pytest.mark.parametrize("tag", TAGS)
def test_every_golden_event_has_a_subject_in_its_stream(tag: str) -> None:
    subject = subject_for(decode((GOLDEN / f"{tag}.json").read_bytes()))
    assert subject.startswith(tag + ".")
    assert "+" not in subject and " " not in subject
    assert len(subject.split(".")) == 3
    prefix = STREAMS[stream_of(subject)].removesuffix(">")
    assert subject.startswith(prefix)


@pytest.mark.parametrize(
    ("subject", "stream"),
    [
        ("call.offered.48123456789", "CALLS"),
        ("call.ended.48123456789", "CALLS"),
        ("number.registered.48123456789", "NUMBERS"),
        ("account.configured.acct_42", "ACCOUNTS"),
        ("ledger.charged.acct_42", "LEDGER"),
        ("fraud.alert.48123456789", "ALERTS"),
        ("dlq.call.offered.48123456789", "DLQ"),
    ],
)
def test_stream_of_maps_a_subject_to_its_stream(subject: str, stream: str) -> None:
    assert stream_of(subject) == stream


@pytest.mark.parametrize("subject", ["rpc.provisioner.register_number", "calls.offered.1", ""])
def test_stream_of_rejects_subjects_no_stream_captures(subject: str) -> None:
    with pytest.raises(ValueError):
        stream_of(subject)


# -- time and ids ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (datetime(2026, 11, 21, 9, 59, 7, 123456, tzinfo=UTC), "2026-11-21T09:59:07.123Z"),
        (datetime(2026, 1, 2, 3, 4, 5, 0, tzinfo=UTC), "2026-01-02T03:04:05.000Z"),
        (datetime(2026, 11, 21, 10, 59, 7, 999999, tzinfo=timezone(timedelta(hours=1))), "2026-11-21T09:59:07.999Z"),
    ],
)
def test_timestamp_is_millisecond_utc_and_round_trips(moment: datetime, text: str) -> None:
    assert timestamp(moment) == text
    parsed = parse_timestamp(text)
    assert parsed.tzinfo is not None and parsed.utcoffset() == timedelta(0)
    assert parsed == moment.replace(microsecond=moment.microsecond // 1000 * 1000)
    assert timestamp(parsed) == text
    assert decode(with_changes("call.answered", occurred_at=text)).occurred_at == text


def test_derived_id_is_deterministic_and_distinct_per_role() -> None:
    assert derived_id("evt_1", "accept") == derived_id("evt_1", "accept")
    assert derived_id("evt_1", "accept") != derived_id("evt_1", "hold")
    assert derived_id("evt_1", "accept") != derived_id("evt_2", "accept")


# -- property tests ----------------------------------------------------------------

e164 = st.from_regex(r"\+[1-9][0-9]{1,14}", fullmatch=True)
tokens = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
event_ids = st.text(min_size=1, max_size=200)
stamps = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
).map(timestamp)
non_negative = st.integers(min_value=0, max_value=2**53)


@given(
    st.builds(
        CallEnded,
        event_id=event_ids,
        occurred_at=stamps,
        v=st.integers(min_value=1, max_value=1000),
        call_id=tokens,
        number=e164,
        duration_ms=non_negative,
        silent_ms=non_negative,
        end_reason=st.sampled_from(get_args(EndReason)),
    )
)
def test_any_valid_call_ended_round_trips(event: CallEnded) -> None:
    assert decode(encode(event)) == event


@given(
    st.builds(
        CallOffered,
        event_id=event_ids,
        occurred_at=stamps,
        call_id=tokens,
        direction=st.sampled_from(["inbound", "outbound"]),
        to=e164,
        from_=e164,
        source_ip=st.ip_addresses().map(str),
        transport=st.sampled_from(get_args(Transport)),
        srtp=st.booleans(),
        user_agent=st.text(max_size=100),
        sip_headers=st.dictionaries(st.text(min_size=1, max_size=30), st.text(max_size=100), max_size=5),
    )
    | st.builds(CallOffered, event_id=event_ids, occurred_at=stamps, call_id=tokens, to=e164, from_=st.just("anonymous"))
)
def test_any_valid_call_offered_round_trips(event: CallOffered) -> None:
    assert decode(encode(event)) == event


def test_an_outbound_call_from_anonymous_breaks_the_contract() -> None:
    body = {
        "type": "call.offered",
        "event_id": "ev_1",
        "occurred_at": "2026-11-21T10:00:00.000Z",
        "call_id": "call_1",
        "direction": "outbound",
        "to": "+48123456789",
        "from": "anonymous",
    }
    with pytest.raises(msgspec.ValidationError, match="anonymous"):
        decode(msgspec.json.encode(body))


# -- export ------------------------------------------------------------------------


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in refs(value)]
    return []


def resolve(document: dict, ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_export_writes_a_schema_for_every_tag_and_the_asyncapi_document(tmp_path: Path) -> None:
    written = export(tmp_path)
    assert sorted(written) == sorted(
        [tmp_path / "events" / f"{tag}.schema.json" for tag in TAGS] + [tmp_path / "asyncapi.json"]
    )
    for path in written:
        text = path.read_text()
        assert text.endswith("}\n")
        assert json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n" == text


def test_export_is_deterministic(tmp_path: Path) -> None:
    first = {p.name: p.read_bytes() for p in export(tmp_path / "a")}
    second = {p.name: p.read_bytes() for p in export(tmp_path / "b")}
    assert first == second


@pytest.mark.parametrize("tag", TAGS)
def test_event_schema_is_standalone_and_accepts_its_golden_fixture(tag: str) -> None:
    schema = event_schemas()[tag]
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    for ref in refs(schema):
        assert ref.startswith("#/$defs/")
        resolve(schema, ref)
    body = resolve(schema, schema["$ref"])
    fixture = golden(tag)
    assert body["properties"]["type"]["enum"] == [tag]
    assert set(body["required"]) <= set(fixture), set(body["required"]) - set(fixture)
    assert set(fixture) <= set(body["properties"])
    for name, value in fixture.items():
        pattern = body["properties"][name].get("pattern")
        if pattern is not None:
            assert re.search(pattern, value), (name, value)


def test_asyncapi_has_a_channel_for_every_tag() -> None:
    document = asyncapi()
    assert document["asyncapi"] == "3.0.0"
    assert document["servers"]["nats"]["protocol"] == "nats"
    assert set(document["channels"]) == set(TAGS)
    for tag, channel in document["channels"].items():
        assert channel["address"] == f"{tag}.{{key}}"
        assert channel["parameters"]["key"]["description"]
        for message in channel["messages"].values():
            resolved = resolve(document, message["$ref"])
            assert resolved["name"] == tag
            assert "Nats-Msg-Id" in resolved["description"] and "event_id" in resolved["description"]
            assert stream_of(tag) in resolved["description"]
            resolve(document, resolved["payload"]["$ref"])


def test_asyncapi_operations_reference_existing_channels_and_their_messages() -> None:
    document = asyncapi()
    assert document["operations"]
    for name, operation in document["operations"].items():
        channel_ref = operation["channel"]["$ref"]
        assert channel_ref.startswith("#/channels/"), name
        resolve(document, channel_ref)
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/"), name
            resolve(document, message["$ref"])
    for ref in refs(document):
        resolve(document, ref)


def test_asyncapi_operations_follow_the_service_table() -> None:
    operations = asyncapi()["operations"].values()
    pairs = {(op["tags"][0]["name"], op["action"], op["channel"]["$ref"].rsplit("/", 1)[1]) for op in operations}
    assert ("gatekeeper", "receive", "call.offered") in pairs
    assert ("gatekeeper", "send", "call.missed") in pairs and ("gatekeeper", "receive", "call.missed") in pairs
    assert {("meter", "send", tag) for tag in TAGS if tag.startswith("ledger.")} <= pairs
    assert ("dialer", "send", "call.offered") in pairs
    assert not any(service == "provisioner" and action == "receive" for service, action, _ in pairs)


def test_service_table_patterns_all_match_event_types() -> None:
    for roles in SERVICES.values():
        for patterns in roles.values():
            assert set(expand(patterns)) <= set(TAGS)
    assert expand(("number.*",)) == [tag for tag in TYPES_BY_TAG if tag.startswith("number.")]
    with pytest.raises(ValueError):
        expand(("nubmer.*",))


def test_catalog_lists_every_event_with_subject_and_stream() -> None:
    catalog = catalog_markdown()
    for cls in EVENT_TYPES:
        tag = tag_of(cls)
        row = next(line for line in catalog.splitlines() if line.startswith(f"| `{tag}` |"))
        assert stream_of(tag) in row
        assert f"`{tag}.<" in row
    assert "`from` (E.164 or anonymous)" in catalog
    assert "`amount_millicredits` (int > 0)" in catalog


def test_update_readme_replaces_the_catalog_between_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# callplane\n\n<!-- catalog:start -->\nSTALE CATALOG\n<!-- catalog:end -->\n\nafter\n")
    assert update_readme(readme) is True
    text = readme.read_text()
    assert "STALE CATALOG" not in text and catalog_markdown() in text
    assert text.startswith("# callplane\n") and text.endswith("<!-- catalog:end -->\n\nafter\n")
    assert update_readme(readme) is False
    assert readme.read_text() == text


def test_update_readme_without_markers_changes_nothing(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# callplane\n")
    assert update_readme(readme) is False
    assert readme.read_text() == "# callplane\n"
