"""The values a backend's object operations pass around (futures, reads, queries)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from jaxhicache.spec import PageSpace

from .keys import Namespace

__all__ = ["Done", "ExistsQuery", "ObjectRead", "Pending", "Raised"]


class Pending(Protocol):
    """A started object operation (a future)."""

    def result(self) -> Any:
        """Blocks until the operation finished.

        Returns:
          The operation's value (what it is depends on the operation).

        Raises:
          Exception: the operation's own error (e.g. an ``OSError``), unchanged.
        """
        ...


class Done:
    """An operation that already finished with ``value`` (a :class:`Pending` run inline)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def result(self):
        """Returns the value."""
        return self.value


class Raised:
    """An operation that already failed with ``exc`` (a :class:`Pending` run inline)."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc

    def result(self):
        """Raises the error."""
        raise self.exc


class ObjectRead(NamedTuple):
    """Result of reading one object.

    Attributes:
      value: the object's bytes, ``None`` if it is missing (direct reads: the
        header only). May be a view of a backend-owned buffer.
      generation: the store's version of the object (for a conditional delete),
        if the store has one.
      release: when given, the caller calls it once it no longer needs ``value``.
      size: the object's length in bytes.
    """

    value: bytes | memoryview | None
    generation: bytes | None = None
    release: Callable[[], None] | None = None
    size: int = 0  # object bytes (direct reads: ``value`` is then the header)


class ExistsQuery(NamedTuple):
    """Pages of one (namespace, page space) that :meth:`StorageBackend.exists_batch`
    checks. ``pages``: a page index per hash (default ``0..n-1``). ``prefix``: the
    pages are a prefix to find the present run of (``exists_prefix``): counts
    ``hit_*`` for the leading run of present pages and ``miss_*`` for the rest, and
    with ``stop_at_absent`` an absent page of it ends every query of the batch there."""

    ns: Namespace
    space: PageSpace
    hashes: Sequence[str]
    pages: Sequence[int] | None = None
    prefix: bool = False


class _Failed:
    """A pending operation that failed when it was started."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def result(self):
        raise self.exc


def _leading(mask: np.ndarray) -> int:
    """Length of the leading run of ``True`` in ``mask``."""
    bad = np.flatnonzero(~np.asarray(mask, bool))
    return int(bad[0]) if bad.size else int(np.asarray(mask).size)


def _release(r: ObjectRead) -> None:
    if r.release is not None:
        r.release()


def _jobs(n: int, m: int):
    return ((i, j) for i in range(n) for j in range(m))


def _safe(fn: Callable[[], Pending | None]) -> Pending | None:
    try:
        return fn()
    except Exception as e:  # a failure when starting becomes a failed result
        return _Failed(e)
