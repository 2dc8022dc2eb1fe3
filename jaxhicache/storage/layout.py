"""Which objects hold one page of one stage, and where their bytes sit in the host slabs.

Two object layouts (both measured by ``benchmarks/storage_bench.py``):

* ``PER_SPACE`` (default): one object per (page, stage, page space). The payload
  is the stage's rows of every sub-pool of that space, in canonical kind order
  (``spec.kinds()``), each as ``[n_kind, *selected rows]`` in sub-pool layer order.
* ``PER_SUBPOOL``: one object per (page, stage, sub-pool) with payload
  ``[n_kind, *selected rows]``.

What a page's object holds (layout version 2, :data:`~jaxhicache.storage.keys.LAYOUT_VERSION`):

* full-space sub-pools (``C4_KV``, ``C4_INDEXER``, ``C128_KV``, MHA ``FULL_KV``):
  the whole page row of every layer (a TP shard of an MHA row: its heads);
* SWA-space sub-pools: **only the rows a restore at the end of that page reads**
  (:func:`window_rows`; ``../../shared/DSV4_MODEL.md`` §3.6): the trailing
  ``window - 1`` tokens of ``SWA_KV``, and of each compressor-state ring
  (``C4_STATE``, ``C4_INDEXER_STATE``, slots ``[kv_A | kv_B | score_A | score_B]``)
  the A halves (``kv_A``, ``score_A``) of the last 4 slots, the tokens
  ``P-4 .. P-1`` the first compressed entry after ``P`` overlaps. A load writes
  those rows and leaves every other row of the slot untouched. For DSV4-Flash
  that is 3,619,304 B per page instead of 8,160,000.

The payload does not depend on the host slab layout: a ``page_first`` slab gives
each selected row block of one page as a few contiguous byte runs that are read
into / written from directly (:meth:`StagePages.direct`); a ``layer_first`` slab
goes through one gather / scatter copy per part. Sub-pools with no layer on the
stage add nothing (and have no object).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence
from typing import final

import numpy as np

from jaxhicache.layer_map import StageLayerMap
from jaxhicache.pools.host import HostPools
from jaxhicache.spec import C4_RATIO, KVFormat, ModelCacheSpec, PageSpace, PoolKind
from kernels_pallas.common import Layout

from .keys import Namespace

__all__ = [
    "ObjectLayout",
    "Part",
    "StagePages",
    "Unit",
    "check_host_ids",
    "plan_units",
    "stored_bytes_per_page",
    "window_rows",
]

MAX_DIRECT_RUNS = 1024
"""Most contiguous byte runs one object may have for direct (scatter) I/O; more go staged."""


class ObjectLayout(enum.StrEnum):
    """How a stage's page is split into objects.

    Attributes:
      PER_SPACE: one object per (page, stage, page space), the key unit the page
        space (the default: fewer objects, measured faster both ways).
      PER_SUBPOOL: one object per (page, stage, sub-pool), the key unit the pool
        kind.
    """

    PER_SPACE = "per_space"
    PER_SUBPOOL = "per_subpool"


@final
@dataclasses.dataclass(frozen=True)
class Part:
    """One sub-pool's rows of one page inside an object's payload.

    A layer's row (``spec.row_shape(kind)``) is viewed as ``shape`` (``()``: as it
    is), then ``index`` picks the stored elements (``()``: all of them); the
    payload part is ``[n_kind, *selected]`` in C order.

    Attributes:
      kind: the sub-pool.
      index: slices over the leading axes of the (reshaped) row that pick the
        stored elements: the SWA window (:func:`window_rows`) or this TP rank's
        block; ``()``: whole rows.
      nbytes: payload bytes of the part per page, all the stage's layers of
        ``kind`` together.
      shape: the shape a row is viewed as before ``index`` applies; ``()``: the
        row's own shape.
    """

    kind: PoolKind
    index: tuple[slice, ...]  # picks the stored elements of a (reshaped) row; () = whole rows
    nbytes: int  # payload bytes per page (all layers of the stage)
    shape: tuple[int, ...] = ()  # the row viewed as this shape before ``index``


@final
@dataclasses.dataclass(frozen=True)
class Unit:
    """One object per page: its key unit and the parts of its payload, in order.

    Attributes:
      unit: the key unit (:func:`~jaxhicache.storage.keys.object_key`): the page
        space with ``PER_SPACE``, the pool kind with ``PER_SUBPOOL``.
      parts: the payload's parts, in canonical kind order.
    """

    unit: PageSpace | PoolKind
    parts: tuple[Part, ...]

    @property
    def nbytes(self) -> int:
        """Payload bytes of the object (the parts' sum; the header excluded)."""
        return sum(p.nbytes for p in self.parts)


def window_rows(spec: ModelCacheSpec, kind: PoolKind) -> tuple[tuple[int, ...], tuple[slice, ...]]:
    """``(shape, index)``: the elements of one layer's row of SWA-space sub-pool ``kind``
    that a restore at the end of that SWA page reads (see the module docstring).

    ``SWA_KV``: the last ``window - 1`` tokens; ``C4_STATE`` / ``C4_INDEXER_STATE``
    (row ``[ring, 4 d]`` = ``[kv_A | kv_B | score_A | score_B]`` per slot): the row
    viewed as ``[ring, 2 (kv, score), 2 (A, B), d]``, slots ``ring-4 ..`` , A halves.

    Args:
      spec: the model's cache spec (its window must fit in one page).
      kind: an SWA-space sub-pool of ``spec``.

    Returns:
      ``(shape, index)`` as in :class:`Part`: for ``SWA_KV`` ``shape`` is ``()``
      and ``index`` slices the token axis (float KV) or the byte axis (fp8 rows:
      ``fp8_token_bytes`` per token); for the compressor-state rings ``shape`` is
      ``(ring, 2, 2, d)`` and ``index`` takes the last 4 slots' A halves.

    Raises:
      ValueError: ``kind`` is not a sub-pool of ``spec`` or not of the SWA page
        space, or ``spec.swa_trailing_pages`` is not 1 (the window spans several
        pages).
    """
    spec.check_kind(kind)
    if kind.page_space is not PageSpace.SWA:
        raise ValueError(f"{kind.value!r} is not an SWA-space sub-pool: stored whole")
    if spec.swa_trailing_pages != 1:  # a spec guarantees window <= page_size
        raise ValueError(
            f"window {spec.window} spans {spec.swa_trailing_pages} pages of {spec.page_size}"
        )
    page = spec.page_size
    if kind is PoolKind.SWA_KV:
        first = page - (spec.window - 1)  # keys P-W+1 .. P-1 of a restore at P
        if spec.kv_format is KVFormat.FLOAT:
            return (), (slice(first, page),)
        tok = spec.fp8_token_bytes
        return (), (slice(first * tok, page * tok),)
    ring, width = spec.row_shape(kind)
    d = width // 4
    # a restore at P (a multiple of the ring) reads tokens P-4..P-1: the last 4 slots
    return (ring, 2, 2, d), (slice(ring - C4_RATIO, ring), slice(None), slice(0, 1))


def _selected(shape: Sequence[int], index: Sequence[slice]) -> list[int]:
    out = list(shape)
    for ax, s in enumerate(index):
        out[ax] = len(range(*s.indices(out[ax])))
    return out


def _part(spec: ModelCacheSpec, m: StageLayerMap, ns: Namespace, kind: PoolKind) -> Part | None:
    n = m.num_layers_of(kind)
    if n == 0:
        return None
    row = spec.row_shape(kind)
    item = spec.row_dtype(kind).itemsize
    shape: tuple[int, ...] = ()
    index: tuple[slice, ...] = ()
    if kind.page_space is PageSpace.SWA:
        shape, index = window_rows(spec, kind)
    elif kind in ns.tp_sharded:  # this rank's block of the row's split axis
        axis = kind.tp_axis
        assert axis is not None
        if row[axis] % ns.tp_size:
            raise ValueError(
                f"{kind.value} axis {axis} ({row[axis]}) does not split over tp={ns.tp_size}"
            )
        per = row[axis] // ns.tp_size
        r = ns.tp_rank or 0
        index = (*(slice(None),) * axis, slice(r * per, (r + 1) * per))
    nbytes = n * math.prod(_selected(shape or row, index)) * item
    return Part(kind, index, nbytes, shape)


def plan_units(
    spec: ModelCacheSpec,
    layer_map: StageLayerMap,
    ns: Namespace,
    space: PageSpace,
    layout: ObjectLayout = ObjectLayout.PER_SPACE,
) -> tuple[Unit, ...]:
    """The objects of one page of ``space`` on stage ``layer_map``.

    Args:
      spec: the model's cache spec.
      layer_map: the stage's layer map; sub-pools without a layer on it store
        nothing.
      ns: the stage's namespace: its TP shard picks the block a TP-sharded
        sub-pool stores (the whole row otherwise).
      space: the page space.
      layout: one object for the space's sub-pools together, or one per sub-pool.

    Returns:
      The objects, each with its payload parts in canonical kind order (SWA-space
      parts hold the window rows only, :func:`window_rows`); empty when the stage
      has no layer of any sub-pool of ``space``.

    Raises:
      ValueError: ``space`` is not a page space, ``spec`` has no sub-pool in it, a
        TP-sharded row does not split over ``ns.tp_size``, or as
        :func:`window_rows` raises it.
    """
    space = PageSpace(space)
    kinds = [k for k in spec.kinds() if k.page_space is space]
    if not kinds:
        raise ValueError(
            f"spec {spec.name!r} has no sub-pool in page space {space.value!r} "
            f"(it has {[k.value for k in spec.kinds()]})"
        )
    parts = [p for k in kinds if (p := _part(spec, layer_map, ns, k)) is not None]
    if not parts:
        return ()
    if ObjectLayout(layout) is ObjectLayout.PER_SPACE:
        return (Unit(space, tuple(parts)),)
    return tuple(Unit(p.kind, (p,)) for p in parts)


def stored_bytes_per_page(
    spec: ModelCacheSpec, layer_map: StageLayerMap | None, space: PageSpace
) -> int:
    """Payload bytes one page of ``space`` stores (one stage, or the whole model if ``None``).

    SWA space: the window rows only (:func:`window_rows`). TP shards are not divided.

    Args:
      spec: the model's cache spec.
      layer_map: a stage's layer map, or ``None`` for every layer of the model.
      space: the page space.

    Returns:
      The summed payload bytes over the sub-pools of ``space`` and their layers
      (object headers excluded); 0 when there is none.

    Raises:
      ValueError: ``space`` is not a page space, or as :func:`window_rows` raises
        it.
    """
    total = 0
    for k in spec.kinds():
        if k.page_space is PageSpace(space):
            n = len(spec.layers_with(k)) if layer_map is None else layer_map.num_layers_of(k)
            per_row = spec.row_bytes(k)
            if k.page_space is PageSpace.SWA:
                shape, index = window_rows(spec, k)
                per_row = math.prod(_selected(shape or spec.row_shape(k), index))
                per_row *= spec.row_dtype(k).itemsize
            total += n * per_row
    return total


def _as_rows(page: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``page`` ``[n, *row]`` viewed as ``[n, *shape]`` (a view, never a copy)."""
    v = page.view()
    v.shape = (page.shape[0], *shape)  # splits the trailing (contiguous) row axes only
    return v


def _runs(v: np.ndarray, base: int) -> list[tuple[int, int]]:
    """``v``'s bytes in C order as ``(start, stop)`` byte offsets from address ``base``,
    adjacent runs merged."""
    k, run = v.ndim, v.itemsize
    while k and (v.shape[k - 1] == 1 or v.strides[k - 1] == run):
        run *= v.shape[k - 1]
        k -= 1
    offs = np.zeros(1, np.int64)
    for ax in range(k):
        offs = (offs[:, None] + np.arange(v.shape[ax], dtype=np.int64) * v.strides[ax]).ravel()
    out: list[tuple[int, int]] = []
    start = v.ctypes.data - base
    for o in (offs + start).tolist():
        if out and out[-1][1] == o:
            out[-1] = (out[-1][0], o + run)
        else:
            out.append((o, o + run))
    return out


class StagePages:
    """Byte views of one stage's host pages for the objects ``units`` (slabs looked up once).

    With page_first slabs whose parts have at most :data:`MAX_DIRECT_RUNS` byte
    runs per page (``contiguous``), a page's stored bytes are fixed runs of one row
    of each part's stage array, read into and written from in place; parts with
    more than one run per layer (compressor-state A halves, TP shards) can go
    through a small staging buffer (:meth:`direct_staged`). Otherwise every access
    goes through a gather / scatter copy per part.

    Args:
      host: the host slabs.
      rank: the stage.
      units: the objects of one page of one space (:func:`plan_units`).

    Raises:
      ValueError: as :meth:`HostPools.slab <jaxhicache.pools.host.HostPools.slab>`
        raises it (a stage of another process, a sub-pool not cached).
    """

    def __init__(self, host: HostPools, rank: int, units: Sequence[Unit]):
        self.units = tuple(units)
        self._slabs = {p.kind: host.slab(rank, p.kind) for u in self.units for p in u.parts}
        self._page_first = host.layout is Layout.PAGE_FIRST
        # page h of a page_first stage is row h of a 2-D uint8 view of the stage's
        # (contiguous) part of the stacked array; a part's stored bytes are a fixed
        # list of byte runs inside that row, the same for every page
        self._runs: list[list[tuple[np.ndarray, list[tuple[int, int]]]]] | None = None
        if self._page_first:
            runs = []
            for u in self.units:
                per = []
                for p in u.parts:
                    stage = host.stacked(p.kind)[host.position(rank)]  # [pages, max_k, *row]
                    u8 = stage.reshape(stage.shape[0], -1).view(np.uint8)
                    per.append((u8, _runs(self.view(p, 0), u8.ctypes.data)))
                runs.append(per)
            if all(sum(len(r) for _, r in per) <= MAX_DIRECT_RUNS for per in runs):
                self._runs = runs
        # whether direct() byte views exist (the name predates window-only objects)
        self.contiguous = self._runs is not None
        # parts stored as at most one byte run per layer (whole rows, the SWA KV window)
        # are moved in place; the others (compressor-state A halves, TP head shards:
        # many short runs) through one small contiguous buffer per part
        self._big = [
            [
                self._runs is not None and len(self._runs[j][i][1]) <= self.view(p, 0).shape[0]
                for i, p in enumerate(u.parts)
            ]
            for j, u in enumerate(self.units)
        ]
        self.staged_nbytes = [
            sum(p.nbytes for p, big in zip(u.parts, self._big[j], strict=True) if not big)
            for j, u in enumerate(self.units)
        ]
        # per unit, the staged parts' rows of every page at once: ``[pages, ...]`` views
        # (page h's rows are item h: one index per page, not a view built per page)
        self._staged: list[list[tuple[np.ndarray, int]]] = [
            [
                (self._every_page(p), p.nbytes)
                for p, big in zip(u.parts, self._big[j], strict=True)
                if not big
            ]
            if self._page_first
            else []
            for j, u in enumerate(self.units)
        ]
        # per unit, per part: (flat byte view of the stage, bytes per page, runs) for
        # in-place parts, (None, nbytes, None) for staged ones
        self._plan: list[list[tuple[memoryview | None, int, list[tuple[int, int]] | None]]] = []
        for j, u in enumerate(self.units):
            plan: list[tuple[memoryview | None, int, list[tuple[int, int]] | None]] = []
            for i, p in enumerate(u.parts):
                if self._big[j][i]:
                    u8, part_runs = self._runs[j][i]  # type: ignore[index]
                    plan.append((memoryview(u8.reshape(-1)), u8.shape[1], part_runs))
                else:
                    plan.append((None, p.nbytes, None))
            self._plan.append(plan)

    def _every_page(self, part: Part) -> np.ndarray:
        """``[pages, *view]``: :meth:`view` of every page at once (page_first slabs)."""
        slab = self._slabs[part.kind]
        v = slab.view()
        if part.shape:
            v.shape = (*slab.shape[:2], *part.shape)
        return v[(slice(None), slice(None), *part.index)] if part.index else v

    def view(self, part: Part, host_id: int) -> np.ndarray:
        """One page's stored elements of ``part`` in its slab.

        Args:
          part: a part of one of the units.
          host_id: the host page.

        Returns:
          A writable ``[n_kind, *selected]`` view (no copy).
        """
        slab = self._slabs[part.kind]
        page = slab[host_id] if self._page_first else slab[:, host_id]
        if part.shape:
            page = _as_rows(page, part.shape)
        return page[(slice(None), *part.index)] if part.index else page

    def direct(self, j: int, host_id: int) -> list[memoryview]:
        """Writable byte views of unit ``j``'s stored bytes of page ``host_id``.

        Args:
          j: the unit.
          host_id: the host page.

        Returns:
          One view per byte run, in payload order (needs ``contiguous``).
        """
        assert self._runs is not None
        out: list[memoryview] = []
        for u8, runs in self._runs[j]:
            row = memoryview(u8[host_id])
            out += [row[a:b] for a, b in runs]
        return out

    def source(self, j: int, host_id: int) -> list[memoryview]:
        """Unit ``j``'s payload of page ``host_id`` as contiguous byte buffers.

        Zero-copy views of the slab's byte runs for parts stored as one run per layer
        (page_first); one gathered copy per other part.

        Args:
          j: the unit.
          host_id: the host page.

        Returns:
          The buffers, in payload order (their concatenation is the payload).
        """
        out: list[memoryview] = []
        for i, p in enumerate(self.units[j].parts):
            if self._big[j][i]:
                u8, runs = self._runs[j][i]  # type: ignore[index]
                row = memoryview(u8[host_id])
                out += [row[a:b] for a, b in runs]
                continue
            v = self.view(p, host_id)
            if not v.flags.c_contiguous:
                v = np.ascontiguousarray(v)
            out.append(memoryview(v.reshape(-1).view(np.uint8)))
        return out

    def direct_staged(self, j: int, host_id: int, staging: memoryview) -> list[memoryview]:
        """Like :meth:`direct`, but the bytes of parts with many short runs go to
        ``staging`` (``staged_nbytes[j]`` bytes, in payload order); call
        :meth:`unstage` to move them into the slab. Fewer, longer buffers to read
        into and to hash.

        Args:
          j: the unit.
          host_id: the host page.
          staging: at least ``staged_nbytes[j]`` bytes.

        Returns:
          Writable views, in payload order: slab runs and pieces of ``staging``.
        """
        out: list[memoryview] = []
        off = 0
        run = None  # where the staged parts just before this one start in ``staging``
        for flat, n, runs in self._plan[j]:
            if runs is None or flat is None:  # staged (both None) or in place (neither)
                if run is None:
                    run = off
                    out.append(staging[off : off + n])
                else:  # adjacent staged parts: one buffer (one, longer, hash update)
                    out[-1] = staging[run : off + n]
                off += n
            else:
                run = None
                base = host_id * n
                out += [flat[base + a : base + b] for a, b in runs]
        return out

    def unstage(self, j: int, host_id: int, staging: np.ndarray) -> None:
        """Copies the staged parts of unit ``j`` (see :meth:`direct_staged`) into the slab.

        Args:
          j: the unit.
          host_id: the host page.
          staging: the buffer :meth:`direct_staged` was given, as uint8.
        """
        off = 0
        for every, n in self._staged[j]:
            v = every[host_id]
            v[...] = staging[off : off + n].view(v.dtype).reshape(v.shape)
            off += n

    def write(self, j: int, host_id: int, payload: memoryview) -> None:
        """Copies a verified payload of unit ``j`` into page ``host_id`` (one copy per part).

        Args:
          j: the unit.
          host_id: the host page.
          payload: the object's payload, exactly the unit's ``nbytes``.
        """
        off = 0
        for p in self.units[j].parts:
            v = self.view(p, host_id)
            src = np.frombuffer(payload, np.uint8, count=p.nbytes, offset=off)
            if v.flags.c_contiguous:
                np.copyto(v.reshape(-1).view(np.uint8), src)
            else:
                v[...] = src.view(v.dtype).reshape(v.shape)
            off += p.nbytes
        assert off == payload.nbytes, (off, payload.nbytes)

    def scrub(self, host_id: int) -> None:
        """Zeroes the stored rows of page ``host_id`` (of every unit); other rows stay.

        Args:
          host_id: the host page.
        """
        for u in self.units:
            for p in u.parts:
                self.view(p, host_id)[...] = 0


def check_host_ids(host: HostPools, space: PageSpace, host_ids, n: int, *, unique: bool):
    """Checks the host slots a page operation reads or writes.

    Args:
      host: the host slabs.
      space: the page space the slots belong to.
      host_ids: one slot per page.
      n: how many pages (keys) the operation has.
      unique: repeats are an error (a load: each page needs its own slot).

    Returns:
      ``host_ids`` as an int64 array of ``n`` slots.

    Raises:
      ValueError: not ``n`` integers, a slot outside ``[0, host.pages_of(space))``,
        or (``unique``) a repeated slot.
    """
    ids = np.asarray(host_ids)
    if ids.shape != (n,) or (n and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"host_ids must be {n} integers (one per key), got {host_ids!r}")
    ids = ids.astype(np.int64, copy=False)
    cap = host.pages_of(PageSpace(space))
    if n and (ids.min() < 0 or ids.max() >= cap):
        bad = ids[(ids < 0) | (ids >= cap)][:4].tolist()
        raise ValueError(f"host ids {bad} not in [0, {cap}) of page space {space.value!r}")
    if unique and np.unique(ids).size != n:
        raise ValueError(f"duplicate host ids in a load: {ids.tolist()}")
    return ids
