"""The byte format of one L3 object: a small header, then the payload.

::

    offset  size  field
    0       4     magic b"JHC3"
    4       2     format version (little-endian u16) = FORMAT_VERSION
    6       2     checksum algorithm (u16): 1 = xxh3_64 (package ``xxhash``)
    8       4     key length K in bytes (u32)
    12      4     header length H (u32) = round_up(32 + K, 64)
    16      8     payload length N (u64)
    24      8     checksum (u64) of key || payload
    32      K     the object's own key (utf-8)
    32+K    ...   zero padding up to H
    H       N     payload

An object is accepted only if the magic, version and algorithm are known, the
header length is the one its key length gives, the key inside equals the key it
was read under (so an object copied under another key — another page, pool kind
or stage — is rejected), the total length is exactly ``H + N`` (no truncation, no
trailing bytes), ``N`` is the length the reader expects, and the checksum
matches. Anything else raises :class:`IntegrityError` with a short reason.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, final

xxhash: Any
try:
    import xxhash
except ImportError:  # pragma: no cover - the storage extra is not installed
    xxhash = None

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "HeaderCheck",
    "IntegrityError",
    "checksum",
    "decode",
    "encode",
    "encode_parts",
    "header_length",
    "verify_header",
    "verify_payload",
]

MAGIC = b"JHC3"
FORMAT_VERSION = 1
_ALGO_XXH3_64 = 1
_FIXED = struct.Struct("<4sHHIIQQ")  # 32 bytes
_DIGEST = 24  # offset of the checksum in the header
_ALIGN = 64

Buffer = bytes | bytearray | memoryview


class IntegrityError(ValueError):
    """An object failed a check.

    Args:
      reason: one short word for counters and logs (``truncated``,
        ``bad_magic``, ``key_mismatch``, ...); kept as ``self.reason``.
      detail: appended to the message, after ``reason`` and a colon.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def header_length(key: str) -> int:
    """Bytes before the payload of the object stored under ``key``."""
    return -(-(_FIXED.size + len(key.encode("utf-8"))) // _ALIGN) * _ALIGN


def checksum(key: bytes, parts: Sequence[Buffer]) -> int:
    """xxh3_64 of ``key || parts[0] || parts[1] ...`` (streamed, no concatenation)."""
    if xxhash is None:  # pragma: no cover
        raise ImportError("L3 checksums need the xxhash package: pip install 'jaxhicache[storage]'")
    h = xxhash.xxh3_64()
    h.update(key)
    for p in parts:
        h.update(p)
    return h.intdigest()


def encode_parts(key: str, parts: Sequence[Buffer]) -> list[Buffer]:
    """The object as buffers: ``[header + key + padding, *parts]`` (no payload copy).

    ``parts`` are contiguous byte buffers (e.g. ``memoryview`` of slab rows); the
    payload is their concatenation. Write them in order (``writev``) or join them.
    """
    kb = key.encode("utf-8")
    n = sum(memoryview(p).nbytes for p in parts)
    hlen = header_length(key)
    head = _FIXED.pack(MAGIC, FORMAT_VERSION, _ALGO_XXH3_64, len(kb), hlen, n, checksum(kb, parts))
    return [head + kb + b"\x00" * (hlen - len(head) - len(kb)), *parts]


def encode(key: str, parts: Sequence[Buffer]) -> bytes:
    """Header + payload as one ``bytes`` (one copy of the payload)."""
    return b"".join(encode_parts(key, parts))


def verify_header(
    key: str, header: Buffer, total: int, expected_payload: int | None = None
) -> tuple[int, int, int]:
    """Checks the header of an object of ``total`` bytes read under ``key``.

    ``header`` holds (at least) the object's first ``min(total, header_length(key))``
    bytes. Returns ``(header length, payload length, checksum)``; raises
    :class:`IntegrityError` on any mismatch except the checksum (the caller hashes
    the payload wherever it was read to).
    """
    mv = memoryview(header).cast("B")
    if total < _FIXED.size or mv.nbytes < _FIXED.size:
        raise IntegrityError("truncated", f"{total} bytes, shorter than a header")
    magic, version, algo, klen, hlen, n, digest = _FIXED.unpack_from(mv, 0)
    if magic != MAGIC:
        raise IntegrityError("bad_magic", repr(bytes(magic)))
    if version != FORMAT_VERSION:
        raise IntegrityError("bad_version", str(version))
    if algo != _ALGO_XXH3_64:
        raise IntegrityError("bad_checksum_algorithm", str(algo))
    kb = key.encode("utf-8")
    if klen != len(kb) or hlen != header_length(key):
        raise IntegrityError("key_mismatch", f"key length {klen}, header length {hlen}")
    if total < hlen or mv.nbytes < _FIXED.size + klen:
        raise IntegrityError("truncated", f"{total} bytes, header needs {hlen}")
    if mv[_FIXED.size : _FIXED.size + klen] != kb:
        stored = bytes(mv[_FIXED.size : _FIXED.size + klen]).decode("utf-8", "replace")
        raise IntegrityError("key_mismatch", f"object holds {stored!r}")
    if expected_payload is not None and n != expected_payload:
        raise IntegrityError("length_mismatch", f"payload {n} bytes, expected {expected_payload}")
    if total != hlen + n:
        reason = "truncated" if total < hlen + n else "trailing_bytes"
        raise IntegrityError(reason, f"{total} bytes, header says {hlen + n}")
    return hlen, n, digest


@final
class HeaderCheck:
    """:func:`verify_header` for many objects of one unit, in two byte comparisons.

    The objects of one unit (page space or sub-pool) of one namespace have keys of
    one length and payloads of one length, so their headers agree in every field
    before the checksum; only the key text and the checksum differ. A header that
    fails the comparison goes to :func:`verify_header` for its reason.

    Args:
      key: any key of the unit.
      nbytes: the unit's payload length.
    """

    def __init__(self, key: str, nbytes: int):
        kb = key.encode("utf-8")
        self.length = header_length(key)
        self.nbytes = nbytes
        self._klen = len(kb)
        self._fields = _FIXED.pack(
            MAGIC, FORMAT_VERSION, _ALGO_XXH3_64, len(kb), self.length, nbytes, 0
        )
        self._fields = self._fields[:_DIGEST]

    def digest(self, key: str, kb: bytes, header: Buffer, total: int) -> int:
        """The checksum stored in ``header`` of a ``total``-byte object read under
        ``key`` (``kb``: its utf-8 bytes), every other header check passed.

        Raises:
          IntegrityError: as :func:`verify_header` raises it.
        """
        if (
            total == self.length + self.nbytes
            and header[:_DIGEST] == self._fields
            and header[_FIXED.size : _FIXED.size + self._klen] == kb
        ):
            return int.from_bytes(header[_DIGEST : _FIXED.size], "little")
        return verify_header(key, header, total, self.nbytes)[2]


def verify_payload(key: str, parts: Sequence[Buffer], digest: int) -> None:
    """Raises :class:`IntegrityError` unless ``key || parts`` hashes to ``digest``."""
    if checksum(key.encode("utf-8"), parts) != digest:
        raise IntegrityError("checksum_mismatch")


def decode(key: str, blob: Buffer, expected_payload: int | None = None) -> memoryview:
    """The payload of ``blob`` read under ``key``, or :class:`IntegrityError`.

    Returns a zero-copy ``memoryview`` into ``blob``.
    """
    mv = memoryview(blob).cast("B")
    hlen, _n, digest = verify_header(key, mv, mv.nbytes, expected_payload)
    payload = mv[hlen:]
    verify_payload(key, [payload], digest)
    return payload
