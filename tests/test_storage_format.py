"""The L3 object format: header round trip and every rejected corruption."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from jaxhicache.storage.format import (
    MAGIC,
    HeaderCheck,
    IntegrityError,
    checksum,
    decode,
    encode,
    header_length,
)

KEY = "jaxhicache/v1/m/float-0123456789abcdef/layers-0-3/full/ab/" + "ab" * 32


def _payload(n=1000, seed=0):
    return np.random.default_rng(seed).integers(1, 255, n, dtype=np.uint8)


def test_round_trip_from_several_buffers_without_concatenating_them():
    a, b = _payload(700, 1), _payload(300, 2).view(np.uint8)
    blob = encode(KEY, [memoryview(a), memoryview(b)])
    assert isinstance(blob, bytes)
    hlen = header_length(KEY)
    assert hlen % 64 == 0 and hlen >= 32 + len(KEY)
    assert len(blob) == hlen + 1000
    assert blob[:4] == MAGIC
    out = decode(KEY, blob, 1000)
    assert isinstance(out, memoryview)
    np.testing.assert_array_equal(np.frombuffer(out, np.uint8), np.concatenate([a, b]))
    assert decode(KEY, blob) == out  # the expected length is optional


def test_empty_payload_round_trips():
    assert decode(KEY, encode(KEY, []), 0).nbytes == 0


def _reason(blob, key=KEY, expected=1000):
    with pytest.raises(IntegrityError) as e:
        decode(key, blob, expected)
    return e.value.reason


@pytest.fixture
def blob():
    return encode(KEY, [memoryview(_payload())])


@pytest.mark.parametrize("cut", [0, 3, 31, 40, header_length(KEY), header_length(KEY) + 999])
def test_truncated_objects_are_rejected(blob, cut):
    assert _reason(blob[:cut]) == "truncated"


def test_trailing_bytes_are_rejected(blob):
    assert _reason(blob + b"\x00") == "trailing_bytes"


def test_every_single_flipped_payload_byte_is_caught(blob):
    hlen = header_length(KEY)
    for pos in range(hlen, len(blob), 37):
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        assert _reason(bytes(bad)) == "checksum_mismatch", pos


@pytest.mark.parametrize(
    ("offset", "reason"),
    [
        (0, "bad_magic"),
        (4, "bad_version"),
        (6, "bad_checksum_algorithm"),
        (8, "key_mismatch"),  # key length
        (12, "key_mismatch"),  # header length
        (16, "length_mismatch"),  # payload length
        (24, "checksum_mismatch"),  # the checksum itself
        (40, "key_mismatch"),  # a byte of the key
    ],
)
def test_header_corruptions_are_rejected(blob, offset, reason):
    bad = bytearray(blob)
    bad[offset] ^= 0x04
    assert _reason(bytes(bad)) == reason


def test_an_object_read_under_another_key_is_rejected(blob):
    other = KEY.replace("layers-0-3", "layers-3-6")  # same length, another stage
    assert _reason(blob, key=other) == "key_mismatch"
    assert _reason(blob, key=KEY.replace("/full/", "/swa/")) == "key_mismatch"


def test_a_payload_of_another_length_is_rejected_even_if_consistent():
    blob = encode(KEY, [memoryview(_payload(999))])
    assert _reason(blob, expected=1000) == "length_mismatch"


def test_header_fields_are_little_endian():
    blob = encode(KEY, [memoryview(_payload(5))])
    magic, version, algo, klen, hlen, n, _ = struct.unpack_from("<4sHHIIQQ", blob)
    assert (magic, version, algo, klen, hlen, n) == (MAGIC, 1, 1, len(KEY), header_length(KEY), 5)


def _fast_reason(blob, key=KEY, expected=1000):
    """What the file backend's read loop decides: :class:`HeaderCheck` on the header
    read, then the checksum of the payload read (``None``: accepted)."""
    check, kb = HeaderCheck(KEY, expected), key.encode()
    try:
        digest = check.digest(key, kb, blob[: check.length], len(blob))
        if checksum(kb, [blob[check.length :]]) != digest:
            raise IntegrityError("checksum_mismatch")
    except IntegrityError as e:
        return e.reason
    return None


def test_the_per_unit_header_check_decides_as_decode_on_every_header_byte(blob):
    """Every single-bit flip of every header byte (key and padding included), every
    cut, a trailing byte and another key: :class:`HeaderCheck` rejects exactly what
    :func:`decode` rejects, for the same reason (the padding is covered by neither:
    it is not part of the checksum)."""
    assert _fast_reason(blob) is None
    hlen = header_length(KEY)
    for pos in range(hlen):
        for bit in (0x01, 0x80):
            bad = bytearray(blob)
            bad[pos] ^= bit
            want = None
            try:
                decode(KEY, bytes(bad), 1000)
            except IntegrityError as e:
                want = e.reason
            assert _fast_reason(bytes(bad)) == want, (pos, bit)
            assert want is not None or pos >= 32 + len(KEY), (pos, bit)
    for cut in (0, 31, 40, hlen, hlen + 999):
        assert _fast_reason(blob[:cut]) == _reason(blob[:cut]) == "truncated"
    assert _fast_reason(blob + b"\x00") == "trailing_bytes"
    other = KEY.replace("layers-0-3", "layers-3-6")
    assert _fast_reason(blob, key=other) == _reason(blob, key=other) == "key_mismatch"
    short = encode(KEY, [memoryview(_payload(999))])
    assert _fast_reason(short) == _reason(short) == "length_mismatch"
