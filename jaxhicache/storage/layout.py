"""Which objects hold one page of one stage, and where their bytes sit in the host slabs.

Two object layouts (both measured by ``benchmarks/storage_bench.py``):

* ``PER_SPACE`` (default): one object per (page, stage, page space). The payload
  is the stage's rows of every sub-pool of that space, in canonical kind order
  (``spec.kinds()``), each as ``[n_kind, *row]`` in sub-pool layer order.
* ``PER_SUBPOOL``: one object per (page, stage, sub-pool) with payload
  ``[n_kind, *row]``.

The payload does not depend on the host slab layout: a ``page_first`` slab gives
each sub-pool's rows of one page as one contiguous block that is read from /
written to directly; a ``layer_first`` slab (or a TP shard of an MHA row) goes
through one gather / scatter copy. Sub-pools with no layer on the stage add
nothing (and have no object).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import final

import numpy as np

from jaxhicache.layer_map import StageLayerMap
from jaxhicache.pools.host import HostPools
from jaxhicache.spec import ModelCacheSpec, PageSpace, PoolKind
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
]


class ObjectLayout(enum.StrEnum):
    """How a stage's page is split into objects."""

    PER_SPACE = "per_space"
    PER_SUBPOOL = "per_subpool"


@final
@dataclasses.dataclass(frozen=True)
class Part:
    """One sub-pool's rows of one page inside an object's payload."""

    kind: PoolKind
    index: tuple[slice, ...]  # selects this TP shard inside a row; () = whole rows
    nbytes: int  # bytes per page


@final
@dataclasses.dataclass(frozen=True)
class Unit:
    """One object per page: its key unit and the parts of its payload, in order."""

    unit: PageSpace | PoolKind
    parts: tuple[Part, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


def _part(spec: ModelCacheSpec, m: StageLayerMap, ns: Namespace, kind: PoolKind) -> Part | None:
    n = m.num_layers_of(kind)
    if n == 0:
        return None
    row = spec.row_shape(kind)
    nbytes = n * spec.row_bytes(kind)
    index: tuple[slice, ...] = ()
    if kind in ns.tp_sharded:  # MHA FULL_KV row (2, page, heads, head_dim): heads on 'tp'
        heads = row[2]
        if heads % ns.tp_size:
            raise ValueError(f"{heads} KV heads do not split over tp={ns.tp_size}")
        per = heads // ns.tp_size
        r = ns.tp_rank or 0
        index = (slice(None), slice(None), slice(r * per, (r + 1) * per))
        nbytes //= ns.tp_size
    return Part(kind, index, nbytes)


def plan_units(
    spec: ModelCacheSpec,
    layer_map: StageLayerMap,
    ns: Namespace,
    space: PageSpace,
    layout: ObjectLayout = ObjectLayout.PER_SPACE,
) -> tuple[Unit, ...]:
    """The objects of one page of ``space`` on stage ``layer_map`` (empty: nothing stored)."""
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
    """Payload bytes one page of ``space`` stores (one stage, or the whole model if ``None``)."""
    total = 0
    for k in spec.kinds():
        if k.page_space is PageSpace(space):
            n = len(spec.layers_with(k)) if layer_map is None else layer_map.num_layers_of(k)
            total += n * spec.row_bytes(k)
    return total


class StagePages:
    """Byte views of one stage's host pages for the objects ``units`` (slabs looked up once)."""

    def __init__(self, host: HostPools, rank: int, units: Sequence[Unit]):
        self.units = tuple(units)
        self._slabs = {p.kind: host.slab(rank, p.kind) for u in self.units for p in u.parts}
        self._page_first = host.layout is Layout.PAGE_FIRST
        # contiguity of a page's rows depends on the layout and the part, not on the page
        self.contiguous = all(
            self.view(p, 0).flags.c_contiguous for u in self.units for p in u.parts
        )
        # fast byte views: page h of a page_first stage is row h of a 2-D uint8 view of
        # the stage's (contiguous) part of the stacked array; its first nbytes are ours
        self._rows: list[list[tuple[np.ndarray, int]]] | None = None
        if (
            self.contiguous
            and self._page_first
            and not any(p.index for u in self.units for p in u.parts)
        ):
            rows = []
            for u in self.units:
                per = []
                for p in u.parts:
                    stage = host.stacked(p.kind)[host.position(rank)]  # [pages, max_k, *row]
                    per.append((stage.reshape(stage.shape[0], -1).view(np.uint8), p.nbytes))
                rows.append(per)
            self._rows = rows

    def view(self, part: Part, host_id: int) -> np.ndarray:
        """``[n_kind, *row_part]`` view of one page's rows of ``part`` in its slab."""
        slab = self._slabs[part.kind]
        page = slab[host_id] if self._page_first else slab[:, host_id]
        return page[(slice(None), *part.index)] if part.index else page

    def direct(self, j: int, host_id: int) -> list[memoryview]:
        """Writable byte views of unit ``j``'s rows of page ``host_id`` (needs ``contiguous``)."""
        if self._rows is not None:
            return [memoryview(u8[host_id, :n]) for u8, n in self._rows[j]]
        return [
            memoryview(self.view(p, host_id).reshape(-1).view(np.uint8))
            for p in self.units[j].parts
        ]

    def source(self, j: int, host_id: int) -> list[memoryview]:
        """Unit ``j``'s payload of page ``host_id`` as contiguous byte buffers.

        Zero-copy views of the slab where the rows are contiguous (page_first, whole
        rows); a gathered copy otherwise.
        """
        out = []
        for p in self.units[j].parts:
            v = self.view(p, host_id)
            if not v.flags.c_contiguous:
                v = np.ascontiguousarray(v)
            out.append(memoryview(v.reshape(-1).view(np.uint8)))
        return out

    def write(self, j: int, host_id: int, payload: memoryview) -> None:
        """Copies a verified payload of unit ``j`` into page ``host_id`` (one copy per part)."""
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
        """Zeroes every row of page ``host_id`` these units cover."""
        for u in self.units:
            for p in u.parts:
                self.view(p, host_id)[...] = 0


def check_host_ids(host: HostPools, space: PageSpace, host_ids, n: int, *, unique: bool):
    """``host_ids`` as an int64 array of ``n`` valid slots of ``space``, else ``ValueError``."""
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
