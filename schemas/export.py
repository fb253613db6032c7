"""Publish the wire contract: JSON Schemas, an AsyncAPI 3 document and a Markdown catalog."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Final

import msgspec
from msgspec import inspect as mi

from .events import E164, EVENT_TYPES, INT64_MAX, TYPES_BY_TAG, Caller, Event, Timestamp, Token, tag_of
from .subjects import STREAMS, stream_of

JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
GOLDEN_DIR: Final = Path(__file__).parent / "golden"
CATALOG_START: Final = "<!-- catalog:start -->"
CATALOG_END: Final = "<!-- catalog:end -->"
ENVELOPE: Final = ("type", "event_id", "occurred_at", "v")

# Who produces and who consumes what (SPEC section 1). `family.*` means every tag of it.
SERVICES: Final[dict[str, dict[str, tuple[str, ...]]]] = {
    "provisioner": {"produces": ("number.*", "account.*"), "consumes": ()},
    "gatekeeper": {
        "consumes": ("call.offered", "call.answered", "call.missed", "call.ended", "number.*", "account.*"),
        "produces": ("call.accepted", "call.rejected", "call.missed"),
    },
    "meter": {
        "consumes": ("call.accepted", "call.agent_replied", "call.ended", "account.*"),
        "produces": ("ledger.*", "call.cutoff"),
    },
    "fraud": {"consumes": ("call.offered", "number.*"), "produces": ("fraud.alert",)},
    "dialer": {
        "consumes": ("call.accepted", "call.rejected", "call.answered", "call.ended"),
        "produces": ("call.offered",),
    },
}

FAMILIES: Final[dict[str, str]] = {
    "number": "Numbers (provisioner)",
    "account": "Accounts (provisioner)",
    "call": "Calls (edge, gatekeeper, meter, dialer)",
    "ledger": "Ledger (meter)",
    "fraud": "Alerts (fraud)",
}

KEYS: Final[dict[str, tuple[str, str]]] = {  # family -> (placeholder, what the key is)
    "number": ("number", "The E.164 number without '+', e.g. 48123456789."),
    "call": (
        "number",
        "The callplane number without '+', e.g. 48123456789: the callee of an inbound call,"
        " the caller of an outbound one.",
    ),
    "fraud": ("number", "The alerted E.164 number without '+', e.g. 48123456789."),
    "account": ("account_id", "The account id, e.g. acct_42."),
    "ledger": ("account_id", "The account id, e.g. acct_42."),
}

DESCRIPTIONS: Final[dict[str, str]] = {
    "number.registered": "A number was registered to an account with its provider and trunks (no secrets).",
    "number.assigned": "A number was assigned to an agent (agent_id null: unassigned).",
    "number.policy_set": "A number's admission policy was replaced; policy_version increments.",
    "number.unregistered": "A number was removed; its calls are refused from now on.",
    "number.label_set": "A number's label was changed.",
    "number.synced": "A number's provider configuration (trunks, credential references) was refreshed.",
    "account.configured": "An account's voice rate, text price, caps and timezone were set.",
    "account.credited": "Credits were bought for an account; reference is the idempotency key.",
    "call.offered": "A call reached the edge (inbound) or was placed by the dialer (outbound).",
    "call.accepted": "The gatekeeper admitted a call: agent, limits, variables and the decision.",
    "call.rejected": "The gatekeeper refused a call with a reason, SIP status and the decision.",
    "call.answered": "The agent answered the call.",
    "call.missed": "Nobody answered within ring_timeout_s.",
    "call.agent_replied": "The agent produced responses (billed per response as text).",
    "call.ended": "The call hung up; duration_ms runs from answer to hang-up (0 if never answered).",
    "call.cutoff": "An order to the edge to hang up: credit exhausted or a cap reached.",
    "call.transferred": "The call was handed to another destination.",
    "ledger.held": "Credits were reserved for a call when it was accepted.",
    "ledger.charged": "A finished call was charged (voice plus text).",
    "ledger.released": "A call's hold was released.",
    "ledger.credited": "Purchased credits were added to the balance.",
    "fraud.alert": (
        "One alert per episode of a fraud detector, named by rule: call_spike, scanner_sweep,"
        " account_spike, irsf_destination or baseline_jump."
    ),
}


def _dump(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _components(ref_prefix: str) -> dict[str, Any]:
    _, components = msgspec.json.schema_components(EVENT_TYPES, ref_template=ref_prefix + "{name}")
    return json.loads(json.dumps(components))  # plain JSON values (tuples become lists)


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(_refs(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(value) for value in node))
    return set()


def event_schemas() -> dict[str, dict]:
    """One standalone JSON Schema (2020-12) per event tag, carrying only the $defs it uses."""
    components = _components("#/$defs/")
    schemas: dict[str, dict] = {}
    for cls in EVENT_TYPES:
        tag, needed, todo = tag_of(cls), set(), [cls.__name__]
        while todo:
            name = todo.pop()
            if name not in needed:
                needed.add(name)
                todo.extend(ref.rsplit("/", 1)[-1] for ref in _refs(components[name]))
        schemas[tag] = {
            "$schema": JSON_SCHEMA_DIALECT,
            "title": tag,
            "description": DESCRIPTIONS[tag],
            "$ref": f"#/$defs/{cls.__name__}",
            "$defs": {name: copy.deepcopy(components[name]) for name in sorted(needed)},
        }
    return schemas


def expand(patterns: tuple[str, ...]) -> list[str]:
    """Tags matched by 'call.offered' or 'number.*'; a pattern matching nothing is an error."""
    tags: list[str] = []
    for pattern in patterns:
        matched = [
            tag
            for tag in TYPES_BY_TAG
            if tag == pattern or (pattern.endswith(".*") and tag.startswith(pattern[:-1]))
        ]
        if not matched:
            raise ValueError(f"{pattern!r} matches no event type")
        tags.extend(tag for tag in matched if tag not in tags)
    return tags


def _golden(tag: str) -> list[dict]:
    path = GOLDEN_DIR / f"{tag}.json"
    return [{"name": f"{tag} (golden v1)", "payload": json.loads(path.read_text())}] if path.exists() else []


def _message(cls: type[Event]) -> dict[str, Any]:
    tag = tag_of(cls)
    stream = stream_of(tag)
    return {
        "name": tag,
        "title": cls.__name__,
        "summary": DESCRIPTIONS[tag],
        "description": (
            f"Stored in stream `{stream}` (`{STREAMS[stream]}`). "
            "The `Nats-Msg-Id` header equals the payload's `event_id` (JetStream dedup)."
        ),
        "contentType": "application/json",
        "headers": {
            "type": "object",
            "properties": {"Nats-Msg-Id": {"type": "string", "description": "Equals event_id."}},
            "required": ["Nats-Msg-Id"],
        },
        "payload": {"$ref": f"#/components/schemas/{cls.__name__}"},
        "examples": _golden(tag),
        "x-stream": stream,
    }


def asyncapi() -> dict:
    """An AsyncAPI 3.0.0 document of every event channel and each service's operations."""
    channels: dict[str, Any] = {}
    for cls in EVENT_TYPES:
        tag = tag_of(cls)
        placeholder, key_doc = KEYS[tag.split(".", 1)[0]]
        channels[tag] = {
            "address": f"{tag}.{{key}}",
            "title": tag,
            "description": f"{DESCRIPTIONS[tag]} Key: {placeholder}.",
            "parameters": {"key": {"description": key_doc}},
            "messages": {cls.__name__: {"$ref": f"#/components/messages/{cls.__name__}"}},
            "servers": [{"$ref": "#/servers/nats"}],
        }
    operations: dict[str, Any] = {}
    for service, roles in SERVICES.items():
        for role, action in (("consumes", "receive"), ("produces", "send")):
            for tag in expand(roles.get(role, ())):
                name = TYPES_BY_TAG[tag].__name__
                operations[f"{service}.{action}.{tag}"] = {
                    "action": action,
                    "channel": {"$ref": f"#/channels/{tag}"},
                    "messages": [{"$ref": f"#/channels/{tag}/messages/{name}"}],
                    "summary": f"{service} {role} {tag}",
                    "tags": [{"name": service}],
                }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "callplane",
            "version": "1.0.0",
            "description": "Event-sourced call control plane on NATS JetStream (wire contract v1).",
            "tags": [{"name": service} for service in SERVICES],
        },
        "defaultContentType": "application/json",
        "servers": {
            "nats": {
                "host": "localhost:4222",
                "protocol": "nats",
                "description": "NATS with JetStream: nats://localhost:4222",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": _components("#/components/schemas/"),
            "messages": {cls.__name__: _message(cls) for cls in EVENT_TYPES},
        },
    }


def export(directory: Path) -> list[Path]:
    """Write events/<tag>.schema.json and asyncapi.json under `directory`; return the paths."""
    directory = Path(directory)
    (directory / "events").mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for tag, schema in sorted(event_schemas().items()):
        path = directory / "events" / f"{tag}.schema.json"
        path.write_text(_dump(schema), encoding="utf-8")
        written.append(path)
    path = directory / "asyncapi.json"
    path.write_text(_dump(asyncapi()), encoding="utf-8")
    written.append(path)
    return written


_PATTERN_NAMES = {
    meta.pattern: name
    for alias, name in ((E164, "E.164"), (Caller, "E.164 or anonymous"), (Timestamp, "timestamp"), (Token, "token"))
    for meta in alias.__metadata__
}


def type_name(t: mi.Type) -> str:
    """A short human name of a field type for the catalog, e.g. 'int >= 0' or 'E.164'."""
    match t:
        case mi.Metadata():
            return type_name(t.type)
        case mi.StrType():
            return _PATTERN_NAMES.get(t.pattern, "string")
        case mi.IntType():
            bounds = [f">= {t.ge}"] * (t.ge is not None) + [f"> {t.gt}"] * (t.gt is not None)
            # The int64 ceiling every amount has is storage, not meaning: leave it out of the catalog.
            bounds += [f"<= {t.le}"] * (t.le not in (None, INT64_MAX)) + [f"< {t.lt}"] * (t.lt is not None)
            return "int " + ", ".join(bounds) if bounds else "int"
        case mi.LiteralType():
            if len(t.values) > 6:
                return f"one of {len(t.values)} values"
            return " or ".join(f'"{value}"' if isinstance(value, str) else str(value) for value in t.values)
        case mi.UnionType():
            return " or ".join(type_name(member) for member in t.types)
        case mi.NoneType():
            return "null"
        case mi.DictType():
            return f"map of {type_name(t.value_type)}"
        case mi.ListType() | mi.VarTupleType():
            return f"list of {type_name(t.item_type)}"
        case mi.StructType():
            return t.cls.__name__
    return type(t).__name__.removesuffix("Type").lower()


def catalog_markdown() -> str:
    """The event catalog as Markdown: one table per subject family."""
    lines = [
        "Every event also carries `type` (the tag), `event_id` (= `Nats-Msg-Id`), "
        "`occurred_at` (RFC 3339 UTC, milliseconds) and `v` (schema version). "
        "Only required fields are listed; the JSON Schemas have the rest.",
    ]
    for family, title in FAMILIES.items():
        placeholder, _ = KEYS[family]
        lines += ["", f"### {title}", "", "| Event | Subject | Stream | Required fields | Description |"]
        lines.append("|---|---|---|---|---|")
        for tag, cls in TYPES_BY_TAG.items():
            if tag.split(".", 1)[0] != family:
                continue
            fields = [
                f"`{f.encode_name}` ({type_name(f.type)})"
                for f in mi.type_info(cls).fields
                if f.required and f.encode_name not in ENVELOPE
            ]
            row = [f"`{tag}`", f"`{tag}.<{placeholder}>`", stream_of(tag), ", ".join(fields), DESCRIPTIONS[tag]]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines) + "\n"


def update_readme(path: Path) -> bool:
    """Replace the text between the catalog markers; True if the file changed."""
    text = Path(path).read_text(encoding="utf-8")
    start, end = text.find(CATALOG_START), text.find(CATALOG_END)
    if start < 0 or end < start:
        return False
    new = text[: start + len(CATALOG_START)] + "\n" + catalog_markdown() + text[end:]
    if new == text:
        return False
    Path(path).write_text(new, encoding="utf-8")
    return True
