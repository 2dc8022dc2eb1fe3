"""Page-id and token-key arrays shared by the tree modules (numpy only).

Invariants: page ids are 1-D ``int32`` arrays, ``-1`` marks "no page" (an SWA
tombstone); token keys are ``int64`` bytes. :data:`EMPTY` and the views that
:class:`NegOnes` hands out are read-only, so they may be shared freely.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast, final

import numpy as np

__all__ = [
    "EMPTY",
    "I32",
    "I32_DT",
    "TOK",
    "TOK_BYTES",
    "TOK_DT",
    "NegOnes",
    "cat",
    "concat",
    "ids",
]

I32 = np.int32
I32_DT = np.dtype(np.int32)
TOK = np.int64
TOK_DT = np.dtype(np.int64)
TOK_BYTES = 8
EMPTY = np.zeros(0, dtype=I32)
EMPTY.setflags(write=False)
# np.concatenate without the __array_function__ dispatch layer (every input here is a
# plain int32 ndarray): ~0.25 µs less per call on the match path (numpy >= 1.17).
concat: Callable[..., np.ndarray] = cast(Any, np.concatenate)._implementation


def cat(parts: list[np.ndarray]) -> np.ndarray:
    """A fresh array holding ``parts`` one after the other (:data:`EMPTY` for none)."""
    if not parts:
        return EMPTY
    if len(parts) == 1:
        return parts[0].copy()
    return concat(parts)


def ids(x, what: str) -> np.ndarray:
    """``x`` as a 1-D int32 array of page ids; ``ValueError`` naming ``what`` otherwise."""
    if type(x) is np.ndarray and x.dtype is I32_DT and x.ndim == 1:
        return x
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array of page ids, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integer page ids, got dtype {arr.dtype}")
    if arr.dtype != I32:
        arr = arr.astype(I32)
    return arr


@final
class NegOnes:
    """Read-only views of ``k`` entries of ``-1`` from one growing buffer."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = EMPTY

    def __call__(self, k: int) -> np.ndarray:
        buf = self._buf
        if buf.size < k:
            buf = np.full(max(k, 2 * buf.size), -1, dtype=I32)
            buf.setflags(write=False)
            self._buf = buf
        return buf[:k]


def key_bytes(key, page_size: int, aligned: bool) -> tuple[bytes, int]:
    """``(int64 bytes of the whole pages of key, pages)``; with ``aligned`` a partial
    trailing page is a ``ValueError`` instead of being dropped."""
    if type(key) is np.ndarray and key.dtype is TOK_DT and key.ndim == 1:  # fast path
        n = len(key)
        pages = n // page_size
        if pages * page_size == n:
            return key.tobytes(), pages
        if not aligned:
            return key[: pages * page_size].tobytes(), pages
    arr = key if isinstance(key, np.ndarray) else np.asarray(key)
    if arr.ndim != 1:
        raise ValueError(f"key must be 1-D token ids, got shape {arr.shape}")
    n = arr.shape[0]
    if n and arr.dtype.kind not in "iu":
        raise ValueError(f"key must hold integer token ids, got dtype {arr.dtype}")
    pages = n // page_size
    if pages * page_size != n:
        if aligned:
            raise ValueError(
                f"key length {n} is not a multiple of page_size {page_size} "
                f"(insert needs whole pages; {n % page_size} trailing tokens)"
            )
        arr = arr[: pages * page_size]
    if arr.dtype != TOK:
        arr = arr.astype(TOK)
    return arr.tobytes(), pages


def common_pages(page_size: int, ck: bytes, kb: bytes, off: int) -> int:
    """Whole pages that key bytes ``ck`` share with ``kb`` from byte ``off`` on."""
    n = min(len(ck), len(kb) - off) // TOK_BYTES
    a = np.frombuffer(ck, dtype=TOK, count=n)
    b = np.frombuffer(kb, dtype=TOK, count=n, offset=off)
    neq = a != b
    i = int(neq.argmax())
    if not neq[i]:
        i = n
    return i // page_size
