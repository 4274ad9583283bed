"""jsonb travels in PostgreSQL's binary form (COPY needs it): a version byte,
then the JSON text."""

from services.common.db import _jsonb_decode, _jsonb_encode


def test_jsonb_round_trips_in_binary_form() -> None:
    value = {"tokens": 150, "region": "eu", "ratio": 0.1, "ok": True, "none": None}
    encoded = _jsonb_encode(value)
    assert encoded[:1] == b"\x01"
    assert _jsonb_decode(encoded) == value


def test_integers_beyond_64_bits_are_still_encoded() -> None:
    value = {"big": 2**70, "negative": -(2**70)}
    assert _jsonb_decode(_jsonb_encode(value)) == value
