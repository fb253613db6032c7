"""Secrets at rest (Twilio auth tokens, SIP passwords): sealed with rotating keys, never shown.

    SecretError
    ├── SecretKeyError(ValueError)   the configured keys are missing or malformed
    └── SecretUnreadable             no configured key opens this ciphertext (or it was altered)

Keys come from the environment as one comma-separated list of Fernet keys, newest first: the
first key seals, every key opens. To rotate, prepend a new key, `rotate` each stored ciphertext,
then drop the old key. Messages never contain a key or a plaintext.
"""

from __future__ import annotations

import hmac
import re

import msgspec
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

_MASK = "\u2022" * 8  # fixed width, so the mask does not tell the secret's length
_SHOW_LAST = 4
# Below this length the last four characters would give away too much of the secret.
_MIN_LEN_TO_SHOW = 12


class SecretError(Exception):
    """Base of every error about secrets."""


class SecretKeyError(SecretError, ValueError):
    """The key list is missing or malformed. The message names the position, never the key."""


class SecretUnreadable(SecretError):
    """No configured key opens this ciphertext: a key was dropped too early, or it was altered."""


def mask(secret: str) -> str:
    """'••••••••f00d': at most the last four characters, and only of a long secret."""
    if len(secret) < _MIN_LEN_TO_SHOW:
        return _MASK
    return _MASK + secret[-_SHOW_LAST:]


class Secret:
    """A plaintext secret that prints masked, so logging it by accident shows nothing."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("a Secret holds a str")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret('{mask(self._value)}')"

    def __str__(self) -> str:
        return mask(self._value)

    def __eq__(self, other: object) -> bool:
        # Constant time: comparing secrets must not leak how many leading characters match.
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    __hash__ = None  # type: ignore[assignment]  # a hash of the plaintext would be a leak of sorts


class SecretBox:
    """Seals and opens secrets with a list of Fernet keys; the first key seals, all of them open."""

    __slots__ = ("_fernet", "_key_count")

    def __init__(self, keys: list[Fernet]) -> None:
        if not keys:
            raise SecretKeyError("no secret key configured")
        self._fernet = MultiFernet(keys)
        self._key_count = len(keys)

    @classmethod
    def from_keys(cls, keys: str | Secret | None) -> SecretBox:
        """'newest,older,...' as set in the environment; surrounding spaces are ignored."""
        text = keys.reveal() if isinstance(keys, Secret) else keys
        if not isinstance(text, str) or not text.strip():
            raise SecretKeyError("no secret key configured")
        parts = [part.strip() for part in text.split(",")]
        fernets = []
        for position, part in enumerate(parts, start=1):
            # A stray comma is refused, not skipped: it usually means a key was cut in half.
            try:
                fernets.append(Fernet(part.encode("ascii")))
            except (ValueError, TypeError, UnicodeEncodeError):
                raise SecretKeyError(
                    f"secret key {position} of {len(parts)} is not a Fernet key "
                    "(32 url-safe base64-encoded bytes; make one with SecretBox.generate_key())"
                ) from None  # the cause would quote the key
        return cls(fernets)

    @staticmethod
    def generate_key() -> str:
        return Fernet.generate_key().decode("ascii")

    def seal(self, plaintext: str | Secret) -> bytes:
        text = plaintext.reveal() if isinstance(plaintext, Secret) else plaintext
        return self._fernet.encrypt(text.encode("utf-8"))

    def unseal(self, ciphertext: bytes) -> str:
        try:
            return self._fernet.decrypt(ciphertext).decode("utf-8")
        except InvalidToken:
            raise SecretUnreadable("no configured secret key opens this ciphertext") from None

    def rotate(self, ciphertext: bytes) -> bytes:
        """The same plaintext sealed under the first key, so older keys can be retired."""
        try:
            return self._fernet.rotate(ciphertext)
        except InvalidToken:
            raise SecretUnreadable("no configured secret key opens this ciphertext") from None

    def __repr__(self) -> str:
        return f"SecretBox({self._key_count} key{'s' if self._key_count != 1 else ''})"


_REF_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def new_secret_ref(new_id: str) -> str:
    """'sec_<id>': what events and API responses carry instead of the secret."""
    if not isinstance(new_id, str) or not _REF_ID.fullmatch(new_id):
        raise ValueError("a secret id is 1-64 letters, digits, '_' or '-'")
    return f"sec_{new_id}"


class SealedSecret(msgspec.Struct, frozen=True):
    """What the SECRETS key-value bucket holds under a secret_ref."""

    ciphertext: bytes
    hint: str  # mask(): at most the last four characters


async def put_sealed(kv: KeyValue, box: SecretBox, ref: str, plaintext: str) -> SealedSecret:
    sealed = SealedSecret(ciphertext=box.seal(plaintext), hint=mask(plaintext))
    await kv.put(ref, msgspec.json.encode(sealed))
    return sealed


async def read_sealed(kv: KeyValue, box: SecretBox, ref: str) -> str:
    """The plaintext behind a secret_ref; SecretUnreadable if missing or no key opens it."""
    try:
        entry = await kv.get(ref)
    except KeyNotFoundError:
        raise SecretUnreadable(f"no secret stored under {ref}") from None
    return box.unseal(msgspec.json.decode(entry.value, type=SealedSecret).ciphertext)
