"""Secrets at rest: sealed, rotated to a new key, masked everywhere they could be printed."""

from __future__ import annotations

import traceback

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from callplane.secrets import (
    Secret,
    SecretBox,
    SecretKeyError,
    SecretUnreadable,
    mask,
    new_secret_ref,
)

TOKEN = "9f86d081884c7d659a2feaa0c55ad015"  # a Twilio-auth-token-shaped plaintext
OLD, NEW = SecretBox.generate_key(), SecretBox.generate_key()


def test_a_sealed_secret_unseals_to_the_same_text():
    box = SecretBox.from_keys(NEW)
    assert box.unseal(box.seal(TOKEN)) == TOKEN
    assert box.unseal(box.seal(Secret("pässwörd ✓"))) == "pässwörd ✓"
    assert box.unseal(box.seal("")) == ""


def test_the_ciphertext_does_not_contain_the_plaintext_and_differs_each_time():
    box = SecretBox.from_keys(NEW)
    first, second = box.seal(TOKEN), box.seal(TOKEN)
    assert TOKEN.encode() not in first
    assert first != second  # a fresh IV each time: equal secrets do not look equal at rest


def test_rotation_end_to_end_old_key_sealed_new_key_prepended_old_key_dropped():
    sealed_long_ago = SecretBox.from_keys(OLD).seal(TOKEN)

    during_rotation = SecretBox.from_keys(f"{NEW},{OLD}")
    assert during_rotation.unseal(sealed_long_ago) == TOKEN
    rotated = during_rotation.rotate(sealed_long_ago)
    assert rotated != sealed_long_ago

    after_rotation = SecretBox.from_keys(NEW)
    assert after_rotation.unseal(rotated) == TOKEN
    with pytest.raises(SecretUnreadable):
        after_rotation.unseal(sealed_long_ago)
    with pytest.raises(SecretUnreadable):
        after_rotation.rotate(sealed_long_ago)
    with pytest.raises(SecretUnreadable):  # the new key really sealed it: the old one cannot open it
        SecretBox.from_keys(OLD).unseal(rotated)


def test_the_first_key_seals_and_every_key_opens():
    sealed = SecretBox.from_keys(f"{NEW}, {OLD}").seal(TOKEN)
    assert SecretBox.from_keys(NEW).unseal(sealed) == TOKEN
    with pytest.raises(SecretUnreadable):
        SecretBox.from_keys(OLD).unseal(sealed)


@pytest.mark.parametrize("ciphertext", [b"", b"not a token", b"gAAAAA" + b"A" * 80])
def test_garbage_or_tampered_ciphertext_is_unreadable(ciphertext):
    with pytest.raises(SecretUnreadable):
        SecretBox.from_keys(NEW).unseal(ciphertext)


def test_a_flipped_byte_in_the_ciphertext_is_detected():
    box = SecretBox.from_keys(NEW)
    sealed = bytearray(box.seal(TOKEN))
    sealed[40] = ord("A") if sealed[40] != ord("A") else ord("B")
    with pytest.raises(SecretUnreadable):
        box.unseal(bytes(sealed))


@pytest.mark.parametrize(
    "keys",
    [
        None,
        "",
        "   ",
        "not-a-fernet-key-but-secret-material",
        NEW[:-4],  # truncated
        f"{NEW},",  # a stray comma
        f"{NEW},,{OLD}",
        f"{NEW},hunter2-secret-material",
        "kłucz-secret-material",
    ],
)
def test_bad_keys_raise_secret_key_error_without_echoing_the_key(keys):
    with pytest.raises(SecretKeyError) as caught:
        SecretBox.from_keys(keys)
    assert isinstance(caught.value, ValueError)
    # The whole printed traceback, chained exceptions included, is what would reach a log.
    printed = "".join(traceback.format_exception(caught.value))
    for part in (keys or "").split(","):
        if part.strip():
            assert part.strip()[:8] not in printed


def test_a_bad_key_is_named_by_position():
    with pytest.raises(SecretKeyError, match="key 2 of 2"):
        SecretBox.from_keys(f"{NEW},nope")


def test_the_box_never_shows_its_keys():
    box = SecretBox.from_keys(f"{NEW},{OLD}")
    assert repr(box) == "SecretBox(2 keys)"
    assert NEW not in repr(box) and NEW not in str(box)


def test_generated_keys_are_distinct_and_usable():
    assert OLD != NEW
    assert SecretBox.from_keys(SecretBox.generate_key()).seal("x")


# -- mask and Secret ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "masked"),
    [
        (TOKEN, "••••••••d015"),
        ("0123456789ab", "••••••••89ab"),
        ("0123456789a", "••••••••"),  # short: the last four would be too much of it
        ("f00d", "••••••••"),
        ("abc", "••••••••"),
        ("", "••••••••"),
    ],
)
def test_mask_shows_at_most_the_last_four_characters_of_a_long_secret(secret, masked):
    assert mask(secret) == masked


@given(st.text(max_size=200))
def test_mask_never_shows_more_than_four_characters_nor_the_length(secret):
    masked = mask(secret)
    assert masked.startswith("••••••••")
    shown = masked.removeprefix("••••••••")
    assert len(shown) <= 4
    assert secret.endswith(shown)
    assert len(masked) in (8, 12)  # two widths only, whatever the secret's length


def test_a_secret_never_prints_its_plaintext():
    secret = Secret(TOKEN)
    assert secret.reveal() == TOKEN
    for shown in (repr(secret), str(secret), f"{secret}", f"{secret!r}", "%s" % secret, str([secret])):
        assert TOKEN not in shown
        assert TOKEN[:-4] not in shown
    assert str(secret) == "••••••••d015"


def test_a_secret_logged_by_accident_is_masked_in_the_log_event():
    log = structlog.get_logger()
    with capture_logs() as events:
        log.info("number.registered", auth_token=Secret(TOKEN), nested={"password": Secret("sip-pass-123456")})
    assert len(events) == 1
    assert TOKEN not in repr(events) and TOKEN not in str(events)
    assert "sip-pass-123456" not in repr(events)


def test_secrets_compare_by_value_but_cannot_be_hashed():
    assert Secret(TOKEN) == Secret(TOKEN)
    assert Secret(TOKEN) != Secret(TOKEN + "x")
    assert Secret(TOKEN) != TOKEN  # a Secret is not its plaintext
    with pytest.raises(TypeError):
        hash(Secret(TOKEN))


def test_a_secret_holds_only_text():
    with pytest.raises(TypeError):
        Secret(b"bytes")  # type: ignore[arg-type]


# -- references ----------------------------------------------------------------------


@pytest.mark.parametrize(("new_id", "ref"), [("1", "sec_1"), ("01HZX3K9", "sec_01HZX3K9"), ("a_b-c", "sec_a_b-c")])
def test_secret_refs_are_sec_and_the_given_id(new_id, ref):
    assert new_secret_ref(new_id) == ref


@pytest.mark.parametrize("new_id", ["", "a.b", "a b", "x" * 65, None])
def test_secret_ref_ids_must_be_subject_safe_tokens(new_id):
    with pytest.raises(ValueError):
        new_secret_ref(new_id)
