"""The L3 interface: ``StorageBackend`` (page operations on host slabs).

A backend moves pages straight between one stage's host slabs
(:class:`~jaxhicache.pools.host.HostPools`) and storage objects. Subclasses
implement five object primitives that start an operation and return something
with ``.result()`` (a future); this class runs them pipelined, at most
``max_in_flight`` objects at a time, verifies every object it reads, and keeps
the counters (:class:`~jaxhicache.storage.stats.StorageStats`, re-exported here).

Fault model: an I/O error, a missing object, or an object that fails a check
(:mod:`jaxhicache.storage.format`) makes its page fail — ``False`` in the
returned mask, the host slot untouched, a counter incremented — and never raises.
A corrupt object is deleted (conditionally on the generation that was read, so
a good object written meanwhile is kept). Only caller bugs (bad ids, a
namespace that does not match the slabs) raise ``ValueError``.

This module owns the interface, the validation and the plans (which objects a
page is, their keys, their slab views, cached per host pools), the pipeline
driver and the counters; the per-call state machines it drives live beside it:
:class:`~jaxhicache.storage.existence.ExistsCheck` (``exists*``) and
:class:`~jaxhicache.storage.page_io.PageWrites` /
:class:`~jaxhicache.storage.page_io.PageReads` (``put`` / ``get``).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from jaxhicache.pools.host import HostPools
from jaxhicache.spec import PageSpace, PoolKind

from .existence import ExistsCheck
from .format import Buffer, header_length
from .groups import PageGroups
from .keys import Namespace, object_key, object_keys
from .layout import ObjectLayout, StagePages, check_host_ids, plan_units
from .ops import ExistsQuery, ObjectRead, Pending, _Failed, _leading, _safe
from .page_io import PageReads, PageWrites, read_direct_sync
from .stats import StorageStats

__all__ = [
    "ExistsQuery",
    "ObjectRead",
    "Pending",
    "StorageBackend",
    "StorageStats",
    "_Failed",
]


class StorageBackend(abc.ABC):
    """Abstract L3 backend: page operations on host slabs over object primitives.

    Args:
      max_in_flight: objects started but not yet finished, at most (bounds memory
        to about ``max_in_flight`` objects).
      object_layout: one object per (page, stage, page space) (default) or per
        (page, stage, sub-pool).

    Calls are thread-safe (counters are merged under a lock); one call runs its
    objects pipelined on the calling thread. Object I/O errors are not raised by
    the page operations: they count in :meth:`stats` and fail the page.

    Raises:
      ValueError: ``max_in_flight < 1`` or an unknown ``object_layout``.
    """

    def __init__(
        self,
        *,
        max_in_flight: int = 16,
        object_layout: ObjectLayout = ObjectLayout.PER_SPACE,
    ):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.max_in_flight = int(max_in_flight)
        self.object_layout = ObjectLayout(object_layout)
        self._stats = StorageStats()
        self._lock = threading.Lock()
        self._plans: weakref.WeakKeyDictionary[HostPools, dict] = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------ primitives

    @abc.abstractmethod
    def _start_read(self, key: str) -> Pending:
        """Start reading object ``key``; ``result()`` -> :class:`ObjectRead`, raises on I/O error."""

    @abc.abstractmethod
    def _start_stat(self, key: str) -> Pending:
        """Start an existence check; ``result()`` -> ``bool``, raises on I/O error."""

    @abc.abstractmethod
    def _start_write(self, key: str, parts: Sequence[Buffer]) -> Pending:
        """Start an atomic write of a whole object, the concatenation of ``parts``
        (views of the host slab: used before the call returns, never kept);
        ``result()`` raises on I/O error."""

    @abc.abstractmethod
    def _start_delete(self, key: str, generation: bytes | None = None) -> Pending:
        """Start deleting ``key`` (only if still at ``generation`` when given);
        ``result()`` -> ``False`` if the condition did not hold, raises on I/O error."""

    @abc.abstractmethod
    def _clear(self, prefix: str) -> None:
        """Delete every object whose key starts with ``prefix``."""

    _reads_into = False  # whether _start_read_into is implemented

    def _start_read_into(self, key: str, header: bytearray, views: list[memoryview]) -> Pending:
        """Optional scatter read: the object's first ``len(header)`` bytes into
        ``header``, the next ones into ``views`` in order (nothing past them);
        ``result()`` -> :class:`ObjectRead` with ``value`` the header (``None`` if
        missing) and ``size`` the object's full length. Set ``_reads_into = True``."""
        raise NotImplementedError

    # ------------------------------------------------------------- page API

    def exists(
        self,
        ns: Namespace,
        space: PageSpace,
        hashes: Sequence[str],
        *,
        max_in_flight: int | None = None,
    ) -> np.ndarray:
        """Whether every object of each page is present (no integrity check).

        Args:
          ns: the stage's namespace.
          space: the page space of the pages.
          hashes: the page hashes (a sequence, not one string).
          max_in_flight: checks issued at once (default: the backend's).

        Returns:
          bool ``[n]``, one per hash; an I/O error reads as absent.

        Raises:
          ValueError: a malformed hash, ``hashes`` given as one string, or a bad
            ``max_in_flight``.
        """
        (present,) = self.exists_batch(
            [ExistsQuery(ns, space, hashes)], max_in_flight=max_in_flight
        )
        return present

    def exists_prefix(
        self,
        ns: Namespace,
        space: PageSpace,
        hashes: Sequence[str],
        *,
        max_in_flight: int | None = None,
    ) -> int:
        """Number of consecutive pages, from the first, whose objects are all present.

        Stops issuing requests after the first absent page. Counts ``hit_*`` for
        the prefix and ``miss_*`` for the rest of ``hashes``.

        Args:
          ns, space, hashes, max_in_flight: as in :meth:`exists`.

        Returns:
          The length of the leading run of present pages.

        Raises:
          ValueError: as :meth:`exists` raises it.
        """
        (present,) = self.exists_batch(
            [ExistsQuery(ns, space, hashes, prefix=True)],
            max_in_flight=max_in_flight,
            stop_at_absent=True,
        )
        return _leading(present)

    def exists_batch(
        self,
        queries: Sequence[ExistsQuery],
        *,
        max_in_flight: int | None = None,
        stop_at_absent: bool = False,
        started: list[int] | None = None,
        finished: list[float] | None = None,
    ) -> list[np.ndarray]:
        """The existence checks of several (namespace, space, pages) queries in ONE pipeline.

        Every object of every query is checked, at most ``max_in_flight`` at a
        time, in page-index order across the queries: a lookup over all stages and
        both page spaces costs about ``ceil(objects / max_in_flight)`` sequential
        round trips, not one pipeline per query. An I/O error is an absent page
        plus ``read_errors_total``.

        Args:
          queries: :class:`ExistsQuery` tuples (namespace, space, hashes, optional
            page indices, whether the pages are a prefix).
          max_in_flight: checks issued at once (default: the backend's).
          stop_at_absent: once an object of page index ``p`` of a ``prefix`` query
            is found absent, objects of pages ``>= p`` (of every query) not yet
            started are not started (their pages read ``False``).
          started: if given, the number of checks issued is appended to it.
          finished: if given, the ``time.perf_counter()`` at which each issued
            check's answer was taken is appended, in order.

        Returns:
          One bool mask per query (``True``: every object of the page is present).

        Raises:
          ValueError: a query's page indices and hashes differ in number, or as
            :meth:`exists` raises it.
        """
        check = ExistsCheck(
            [ExistsQuery(*q) for q in queries],
            lambda q: self._keys(q.ns, self._unit_names(q.ns, q.space), q.hashes),
            self._start_stat,
            stop_at_absent=stop_at_absent,
            finished=finished,
        )
        self._pipelined(check.items, check.start, check.finish, limit=max_in_flight)
        if started is not None:
            started.append(check.issued)
        self._merge(check.stats())
        return check.masks

    def page_objects(
        self, ns: Namespace, space: PageSpace, host: HostPools, rank: int
    ) -> tuple[int, int]:
        """What one page (one object's group of pages, :meth:`Namespace.group`) of
        ``space`` on stage ``rank`` is stored as.

        Args:
          ns: the stage's namespace (must describe stage ``rank`` of ``host``).
          space: the page space.
          host: the host slabs.
          rank: the stage.

        Returns:
          ``(objects, bytes)``, object headers included; ``(0, 0)`` for a stage
          without a sub-pool of ``space``.

        Raises:
          ValueError: ``rank`` is not a stage of ``host`` or ``ns`` does not
            describe it.
        """
        units = self._plan(ns, space, host, rank).units
        g = ns.group(space)
        return len(units), sum(
            g * u.nbytes + header_length(object_key(ns, u.unit, "0" * 64)) for u in units
        )

    def units_per_page(self, ns: Namespace, space: PageSpace) -> int:
        """How many objects one page of ``space`` is stored as on the stage of ``ns``.

        Args:
          ns: the stage's namespace.
          space: the page space.

        Returns:
          1 per page space, or one per sub-pool of ``space`` with ``PER_SUBPOOL``;
          0 when the stage has no sub-pool of ``space``.
        """
        return len(self._unit_names(ns, space))

    @property
    def concurrent(self) -> bool:
        """Whether this backend overlaps object operations (a started operation returns
        before it finishes): worth issuing several calls at once."""
        return self._window() > 1

    def put(
        self,
        ns: Namespace,
        space: PageSpace,
        hashes: Sequence[str],
        host: HostPools,
        rank: int,
        host_ids,
    ) -> np.ndarray:
        """Write host pages ``host_ids`` of stage ``rank`` as pages ``hashes``.

        One object per page (and per sub-pool with ``PER_SUBPOOL``), serialised
        straight from the slab rows into the object bytes. Existing objects are
        overwritten (callers skip pages :meth:`exists` reports).

        Args:
          ns: the stage's namespace (must describe stage ``rank`` of ``host``).
          space: the page space.
          hashes: one page hash per page written.
          host: the host slabs to read.
          rank: the stage.
          host_ids: one host page id of ``space`` per hash (repeats allowed); with
            :meth:`Namespace.group` ``g > 1``, ``g`` per hash in page order (the
            hash is the group's last page's).

        Returns:
          bool ``[n]``: ``True`` where every object of the page was written (a
          failed write counts in ``write_errors_total``).

        Raises:
          ValueError: a bad rank, namespace, hash or host id (named).
        """
        t0 = time.perf_counter()
        pages, ids = self._slots(ns, space, host, rank, host_ids, len(hashes), unique=False)
        keys = self._keys(ns, [u.unit for u in pages.units], hashes)
        writes = PageWrites(keys, pages, ids, self._start_write)
        self._write_pages(writes)
        st = writes.settle(ns.page_size, ns.group(space))
        st.write_seconds_total = time.perf_counter() - t0
        self._merge(st)
        return writes.ok

    def get(
        self,
        ns: Namespace,
        space: PageSpace,
        hashes: Sequence[str],
        host: HostPools,
        rank: int,
        host_ids,
        *,
        max_in_flight: int | None = None,
    ) -> np.ndarray:
        """Load pages ``hashes`` into host pages ``host_ids`` of stage ``rank``.

        Args:
          ns: the stage's namespace (must describe stage ``rank`` of ``host``).
          space: the page space.
          hashes: one page hash per page loaded.
          host: the host slabs to write.
          rank: the stage.
          host_ids: one host page id of ``space`` per hash, no repeats; ``g`` per
            hash with :meth:`Namespace.group` ``g > 1``, as for :meth:`put`.
          max_in_flight: objects read at once in this call (default: the backend's).

        Returns:
          bool ``[n]``; a ``True`` page passed every check of every one of its
          objects. A corrupt object is counted and deleted.

        Raises:
          ValueError: a bad rank, namespace, hash, ``max_in_flight`` or host id
            (repeats included).

        What a ``False`` page's slot holds afterwards:

        * staged reads (backends without :meth:`_start_read_into`, or rows that are
          not contiguous in the slab): the slot is untouched — objects are
          verified in a staging buffer before one copy into the slab;
        * direct reads (:class:`~jaxhicache.storage.FileBackend`, page_first
          slabs): the object is read straight into the slot's rows and verified
          there; a page that failed after bytes arrived (corrupt object, I/O
          error mid-read) has its rows zeroed, so the slot never keeps unverified
          bytes; a page whose objects are absent is untouched. Slots given to
          ``get`` are the load's own fresh slots; callers free the failed ones.
        """
        t0 = time.perf_counter()
        pages, ids = self._slots(ns, space, host, rank, host_ids, len(hashes), unique=True)
        keys = self._keys(ns, [u.unit for u in pages.units], hashes)
        reads = PageReads(
            keys,
            pages,
            ids,
            self._reads_into and pages.contiguous,
            self._start_read,
            self._start_read_into,
            self._start_delete,
        )
        limit = _check_limit(max_in_flight)
        shards = self._direct_shards(limit) if reads.direct else 0
        if shards:
            self._get_direct_sync(
                keys, pages, ids.tolist(), reads.ok, reads.touched, reads.st, reads.corrupt, shards
            )
        else:
            self._pipelined(reads.jobs(), reads.start, reads.finish, limit=max_in_flight)
        st = reads.settle(ns.page_size, ns.group(space))
        st.read_seconds_total = time.perf_counter() - t0
        self._merge(st)
        return reads.ok

    def _write_pages(self, writes: PageWrites) -> None:
        """Writes every object of one :meth:`put`: pipelined, at most ``max_in_flight``
        at a time (a backend may override it, as ``FileBackend`` does with threads,
        with the same outcome and counters)."""
        self._pipelined(writes.jobs(), writes.start, writes.finish)

    def _direct_shards(self, limit: int | None) -> int:
        """How many tight loops (:meth:`_get_direct_sync`) :meth:`get`'s direct reads
        run as, each over a share of the pages; 0: through the pipeline instead. Here
        1 when operations complete as they start, else 0."""
        return 1 if self._window() == 1 else 0

    def _get_direct_sync(
        self, keys, pages: StagePages, ids, ok, touched, st, corrupt, shards: int = 1
    ) -> None:
        """The direct-read path of :meth:`get` when operations complete as they start:
        one tight loop, and a page stops at its first failed object
        (:func:`~jaxhicache.storage.page_io.read_direct_sync`; a backend may
        override it, as ``FileBackend`` does, with the same outcome and counters)."""
        read_direct_sync(self._read_into_sync, keys, pages, ids, ok, touched, st, corrupt)

    def _read_into_sync(self, key: str, header: bytearray, views: list[memoryview]) -> ObjectRead:
        return self._start_read_into(key, header, views).result()

    def delete(self, ns: Namespace, space: PageSpace, hashes: Sequence[str]) -> int:
        """Delete every object of pages ``hashes``.

        Args:
          ns: the stage's namespace.
          space: the page space.
          hashes: the pages.

        Returns:
          How many objects were deleted (a failure counts in
          ``delete_errors_total``).

        Raises:
          ValueError: a malformed hash or ``hashes`` given as one string.
        """
        keys = self._keys(ns, self._unit_names(ns, space), hashes)
        st = StorageStats()

        def finish(_item, pend):
            try:
                if pend.result() is not False:
                    st.deleted_objects_total += 1
            except Exception:
                st.delete_errors_total += 1

        self._pipelined([k for ks in keys for k in ks], self._start_delete, finish)
        self._merge(st)
        return st.deleted_objects_total

    def clear(self, ns: Namespace | None = None) -> bool:
        """Delete all jaxhicache objects (or only those of one namespace).

        Args:
          ns: the namespace to clear; ``None``: every key under ``jaxhicache/``.

        Returns:
          ``True``, or ``False`` (and a delete error counted) if the store failed.
        """
        prefix = "jaxhicache/" if ns is None else ns.prefix + "/"
        try:
            self._clear(prefix)
            return True
        except Exception:
            self._merge(StorageStats(delete_errors_total=1))
            return False

    def stats(self) -> StorageStats:
        """A snapshot of the counters.

        Returns:
          A copy of this backend's :class:`StorageStats` (later calls do not change it).
        """
        with self._lock:
            return dataclasses.replace(self._stats)

    def close(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """Release resources (nothing by default)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------- internals

    def _unit_names(self, ns: Namespace, space: PageSpace) -> list[PageSpace | PoolKind]:
        space = PageSpace(space)
        kinds = [k for k in ns.stage_kinds if k.page_space is space]
        if not kinds:
            return []
        return [space] if self.object_layout is ObjectLayout.PER_SPACE else [*kinds]

    def _slots(self, ns, space, host, rank, host_ids, n: int, *, unique: bool):
        """``(pages, ids)`` for ``n`` objects of ``space``: the stage's page views and
        the validated host slots (``g`` per object, :meth:`Namespace.group`, as
        :class:`~jaxhicache.storage.groups.PageGroups` over their ``[n, g]`` table
        and ids ``0 .. n-1`` when ``g > 1``)."""
        pages = self._plan(ns, space, host, rank)
        g = ns.group(space)
        ids = check_host_ids(host, space, host_ids, n * g, unique=unique)
        if g == 1:
            return pages, ids
        return PageGroups(pages, ids.reshape(n, g)), np.arange(n, dtype=np.int64)

    def _plan(self, ns: Namespace, space: PageSpace, host: HostPools, rank: int) -> StagePages:
        """The objects of one page of ``space`` on stage ``rank`` and their slab views.

        Validated once per (slabs, stage, space, namespace) and cached while ``host``
        lives (a weak key: dropping the host pools drops the entry).
        """
        space = PageSpace(space)
        with self._lock:
            per_host = self._plans.setdefault(host, {})
            hit = per_host.get((rank, space))
        if hit is not None and hit[0] == ns:
            return hit[1]
        if not 0 <= rank < len(host.layer_maps):
            raise ValueError(f"stage rank {rank} not in [0, {len(host.layer_maps)})")
        m = host.layer_maps[rank]
        if not ns.matches(host.spec, m):
            raise ValueError(
                f"namespace {ns.prefix!r} does not describe stage {rank} "
                f"[{m.start_layer}, {m.end_layer}) of spec {host.spec.name!r}"
            )
        units = plan_units(host.spec, m, ns, space, self.object_layout)
        assert [u.unit for u in units] == self._unit_names(ns, space)
        pages = StagePages(host, rank, units)
        with self._lock:
            per_host[(rank, space)] = (ns, pages)
        return pages

    @staticmethod
    def _keys(
        ns: Namespace, units: Sequence[PageSpace | PoolKind], hashes: Sequence[str]
    ) -> list[list[str]]:
        return object_keys(ns, units, hashes)

    def _pipelined(
        self,
        items: Iterable,
        start: Callable[[Any], Pending | None],
        finish: Callable[[Any, Pending | None], None],
        limit: int | None = None,
    ) -> None:
        """``finish(item, start(item))`` for every item, in order, with at most
        ``limit`` (default ``max_in_flight``) started and not finished; a backend whose
        operations complete when started keeps its window of 1. ``start`` may return
        ``None``."""
        window: deque = deque()
        own = self._window()
        limit = _check_limit(limit)
        limit = own if limit is None or own == 1 else limit
        for item in items:
            if len(window) >= limit:
                finish(*window.popleft())
            window.append((item, _safe(functools.partial(start, item))))
        while window:
            finish(*window.popleft())

    def _window(self) -> int:
        """Objects started ahead of the one being finished (``max_in_flight`` unless a
        backend whose operations complete when started says otherwise)."""
        return self.max_in_flight

    def _merge(self, st: StorageStats) -> None:
        with self._lock:
            self._stats.add(st)


def _check_limit(limit: int | None) -> int | None:
    """``limit`` (a call's ``max_in_flight``) if ``None`` or an int >= 1, else ValueError."""
    if limit is not None and (type(limit) is bool or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"max_in_flight must be an int >= 1, got {limit!r}")
    return limit
