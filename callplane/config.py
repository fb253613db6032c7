"""Service configuration: one frozen Struct per service, read from the environment once."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TypeVar

import msgspec

T = TypeVar("T", bound=msgspec.Struct)


class ConfigError(ValueError):
    """An environment variable holds a value its setting cannot take."""


def from_env(cls: type[T], environ: Mapping[str, str] | None = None) -> T:
    """Build `cls` from environment variables named like its fields, upper-cased.

    Unset variables keep the field's default; values are converted from strings
    (numbers, booleans, comma-separated lists) by msgspec, and a bad value is a
    ConfigError that names the variable.
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, object] = {}
    for name in cls.__struct_fields__:
        value = environ.get(name.upper())
        if value is None:
            continue
        if _is_sequence(cls, name):
            raw[name] = [item.strip() for item in value.split(",") if item.strip()]
        else:
            raw[name] = value
    try:
        return msgspec.convert(raw, cls, strict=False)
    except msgspec.ValidationError as exc:
        field = str(exc).rsplit("$.", 1)[-1].rstrip("`").split("[")[0] if "$." in str(exc) else None
        where = f" in {field.upper()}" if field else ""
        raise ConfigError(f"bad configuration{where}: {str(exc).split(' - at ')[0]}") from None


def _is_sequence(cls: type[msgspec.Struct], name: str) -> bool:
    info = msgspec.inspect.type_info(cls)
    field = next(f for f in info.fields if f.name == name)  # type: ignore[attr-defined]
    return isinstance(field.type, (msgspec.inspect.ListType, msgspec.inspect.TupleType, msgspec.inspect.VarTupleType))


class NatsSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Settings every service shares."""

    nats_url: str = "nats://127.0.0.1:4222"  # NATS_URL: one or more servers, comma-separated
    nats_creds: str | None = None  # NATS_CREDS: path to a .creds file (NATS decentralized auth)
    log_level: str = "info"  # LOG_LEVEL: debug, info, warning, error
