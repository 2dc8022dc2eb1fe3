"""Host (L2) pools: preallocated numpy slabs for every sub-pool of every stage.

A process holds the slabs of its own stages only (``ranks``): every stage under
single-controller JAX, the stages whose devices it owns under multi-controller
JAX (:func:`jaxhicache.distributed.local_stages`); it never holds another
stage's bytes. ``layer_maps`` are every stage's maps (the global facts). Per
stage and sub-pool the slab is one numpy array — never one array per page::

    Layout.PAGE_FIRST  (default, storage friendly)   [host_pages, n_kind_on_stage, *row]
    Layout.LAYER_FIRST                               [n_kind_on_stage, host_pages, *row]

``host_pages`` is the host capacity of the sub-pool's page space (full pages or
SWA pages). The full-page id space itself is the logical anchor: it allocates
ids and holds no bytes. Capacity is the same for every stage (the minimum over
stages when sized by bytes), so every stage can hold the same token runs.

Invariant: slabs are zero-initialised, so a host page never shows bytes of a
page written before the slab existed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, final

import numpy as np

from jaxhicache.layer_map import StageLayerMap
from jaxhicache.spec import ModelCacheSpec, PageSpace, PoolKind
from kernels_pallas.common import Layout

__all__ = ["HostPools", "aligned_zeros", "available_host_memory"]

DEFAULT_RESERVE_BYTES = 2 << 30  # keep 2 GiB of the machine's memory for everything else


def available_host_memory() -> int:
    """Bytes of host memory available now (``MemAvailable``), or total if unknown.

    Returns:
      ``MemAvailable`` from ``/proc/meminfo`` in bytes; where that file or line is
      missing, the machine's physical memory (``sysconf``).
    """
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def aligned_zeros(shape: tuple[int, ...], dtype: np.dtype, align: int = 4096) -> np.ndarray:
    """A zeroed numpy array whose data starts on an ``align``-byte boundary (lazily backed).

    The bytes come from one ``np.zeros`` buffer ``align`` bytes larger than needed
    (the OS maps its pages on first touch); the result is a view into it.

    Args:
      shape: the array's shape.
      dtype: its dtype.
      align: the byte boundary of the first element (``> 0``; 4096: a page).

    Returns:
      A C-contiguous zeroed array of ``shape`` and ``dtype``.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.zeros(nbytes + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off : off + nbytes].view(dtype).reshape(shape)


@final
class HostPools:
    """Host slabs of all sub-pools of all stages of one model.

    Every slab is allocated, zeroed, at construction; the bytes needed (real
    layers only: padding rows are never touched) are first checked against the
    memory available.

    Args:
      spec: the model's cache spec; one slab per kind it caches.
      layer_maps: every stage's map in rank order (all stages, whichever this
        process holds).
      num_pages: host pages of the full-page space (``>= 1``).
      num_swa_pages: host pages of the SWA space (``>= 1`` when the spec has an
        SWA kind).
      layout: ``PAGE_FIRST`` (``[pages, n_kind, *row]`` per stage) or
        ``LAYER_FIRST`` (``[n_kind, pages, *row]``).
      num_state_slots: host snapshot slots of the recurrent-state space (``>= 1``
        when the spec has recurrent states; rows ``[slots, n_kind, *row]``).
      reserve_bytes: host memory to leave free for everything else.
      ranks: the stages this process holds, strictly increasing; ``None``: all.

    Raises:
      ValueError: a page count below its minimum; ``ranks`` empty, not strictly
        increasing or out of ``[0, pp)``; or the slabs need more than the
        available host memory minus ``reserve_bytes``.
    """

    def __init__(
        self,
        spec: ModelCacheSpec,
        layer_maps: Sequence[StageLayerMap],
        num_pages: int,
        num_swa_pages: int = 0,
        *,
        layout: Layout = Layout.PAGE_FIRST,
        num_state_slots: int = 0,
        reserve_bytes: int = DEFAULT_RESERVE_BYTES,
        ranks: Sequence[int] | None = None,
    ):
        if num_pages < 1:
            raise ValueError(f"host num_pages must be >= 1, got {num_pages}")
        spaces = {k.page_space for k in spec.kinds()}
        if PageSpace.SWA in spaces and num_swa_pages < 1:
            raise ValueError(f"host num_swa_pages must be >= 1, got {num_swa_pages}")
        if PageSpace.STATE in spaces and num_state_slots < 1:
            raise ValueError(f"host num_state_slots must be >= 1, got {num_state_slots}")
        self.spec = spec
        self.layer_maps = tuple(layer_maps)
        pp = len(self.layer_maps)
        self.ranks = tuple(range(pp)) if ranks is None else tuple(int(r) for r in ranks)
        if (
            not self.ranks
            or sorted(set(self.ranks)) != list(self.ranks)
            or not all(0 <= r < pp for r in self.ranks)
        ):
            raise ValueError(f"ranks must be increasing stage ranks in [0, {pp}), got {ranks!r}")
        self._pos = {r: i for i, r in enumerate(self.ranks)}
        self.num_pages = int(num_pages)
        self.num_swa_pages = int(num_swa_pages)
        self.num_state_slots = int(num_state_slots) if PageSpace.STATE in spaces else 0
        self.layout = Layout(layout)
        need = sum(self.nbytes_per_stage())
        avail = available_host_memory()
        if need > avail - reserve_bytes:
            raise ValueError(
                f"host pools need {need:,} bytes ({need / 2**30:.2f} GiB) but only "
                f"{max(0, avail - reserve_bytes):,} bytes are available after a reserve of "
                f"{reserve_bytes:,} (reserve_bytes, HiCacheConfig.host_reserve_bytes); lower "
                f"the host page counts ({num_pages} full, {num_swa_pages} SWA) or the reserve"
            )
        # One zeroed, page-aligned array per sub-pool holding every local stage, padded to the
        # largest stage (the rows of padding layers are never touched, so the OS never
        # backs them with memory); ``slab(rank, kind)`` is a view of the stage's part.
        # A device array can alias it without a copy where device memory is host memory.
        self._stacked = {
            k: aligned_zeros(self._stacked_shape(k), spec.row_dtype(k)) for k in spec.kinds()
        }

    # ---------------------------------------------------------------- sizing

    @classmethod
    def from_ratio(
        cls,
        spec: ModelCacheSpec,
        layer_maps: Sequence[StageLayerMap],
        device_pages: int,
        device_swa_pages: int,
        ratio: float,
        *,
        device_state_slots: int = 0,
        **kw,
    ) -> HostPools:
        """Host capacity = ``ratio`` × the device capacity of each page space.

        Each count is ``max(1, int(device * ratio))`` (rounded down); the SWA and
        state counts stay 0 when the device has none.

        Args:
          spec: the model's cache spec.
          layer_maps: every stage's map, in rank order.
          device_pages: device pages of the full-page space.
          device_swa_pages: device pages of the SWA space.
          ratio: host pages per device page (``> 0``).
          device_state_slots: device snapshot slots of the recurrent-state space.
          **kw: the constructor's keywords (``layout``, ``reserve_bytes``, ``ranks``).

        Returns:
          The new :class:`HostPools`.

        Raises:
          ValueError: ``ratio`` is not positive, or as the constructor raises it.
        """
        if not ratio > 0:
            raise ValueError(f"host ratio must be > 0, got {ratio}")
        return cls(
            spec,
            layer_maps,
            max(1, int(device_pages * ratio)),
            max(1, int(device_swa_pages * ratio)) if device_swa_pages else 0,
            num_state_slots=max(1, int(device_state_slots * ratio)) if device_state_slots else 0,
            **kw,
        )

    @classmethod
    def from_bytes(
        cls,
        spec: ModelCacheSpec,
        layer_maps: Sequence[StageLayerMap],
        bytes_per_stage: int,
        **kw,
    ) -> HostPools:
        """As many pages as ``bytes_per_stage`` holds on the largest stage.

        A page is sized by ``spec.page_bytes(stage)`` (every real sub-pool, one
        SWA page per full page); the capacity is the minimum over stages.

        Args:
          spec: the model's cache spec.
          layer_maps: every stage's map, in rank order.
          bytes_per_stage: the host byte budget of one stage.
          **kw: the constructor's keywords (``layout``, ``reserve_bytes``, ``ranks``).

        Returns:
          The new :class:`HostPools`, with as many SWA pages as full pages (none
          when the spec has no SWA kind).

        Raises:
          ValueError: the budget holds no page of the largest stage, or as the
            constructor raises it.
        """
        per_page = max(spec.page_bytes(m) for m in layer_maps)
        pages = bytes_per_stage // per_page
        if pages < 1:
            raise ValueError(
                f"{bytes_per_stage:,} bytes per stage hold no page of {per_page:,} bytes"
            )
        has_swa = any(k.page_space is PageSpace.SWA for k in spec.kinds())
        return cls(spec, layer_maps, pages, pages if has_swa else 0, **kw)

    def pages_of(self, space: PageSpace) -> int:
        """Host ids of ``space``: full pages, SWA pages or snapshot slots.

        Args:
          space: the page space.

        Returns:
          ``num_pages``, ``num_swa_pages`` or ``num_state_slots``.
        """
        return {
            PageSpace.FULL: self.num_pages,
            PageSpace.SWA: self.num_swa_pages,
            PageSpace.STATE: self.num_state_slots,
        }[PageSpace(space)]

    def _stacked_shape(self, kind: PoolKind) -> tuple[int, ...]:
        pp = len(self.ranks)
        max_k = max(1, max(m.num_layers_of(kind) for m in self.layer_maps))
        pages = self.pages_of(kind.page_space)
        if self.layout is Layout.PAGE_FIRST:
            return (pp, pages, max_k, *self.spec.row_shape(kind))
        return (pp, max_k, pages, *self.spec.row_shape(kind))

    def stacked(self, kind: PoolKind) -> np.ndarray:
        """The local stages' slabs of ``kind`` as one page-aligned array.

        Args:
          kind: a sub-pool the spec caches.

        Returns:
          The array itself (not a copy), padded to the largest stage of all:
          ``[len(ranks), pages, max_k, *row]`` (page_first) or
          ``[len(ranks), max_k, pages, *row]``; row ``i`` is stage ``ranks[i]``.

        Raises:
          ValueError: ``kind`` is not cached by the spec.
        """
        return self._stacked[self.spec.check_kind(kind)]

    def _slab_shape(self, m: StageLayerMap, kind: PoolKind) -> tuple[int, ...]:
        n = m.num_layers_of(kind)
        pages = self.pages_of(kind.page_space)
        if self.layout is Layout.PAGE_FIRST:
            return (pages, n, *self.spec.row_shape(kind))
        return (n, pages, *self.spec.row_shape(kind))

    def nbytes_per_stage(self) -> list[int]:
        """Bytes of every local stage's slabs (its real layers; padding rows are never touched).

        Returns:
          One count per stage this process holds, in ``ranks`` order.
        """
        return [
            sum(
                math.prod(self._slab_shape(m, k)) * self.spec.row_dtype(k).itemsize
                for k in self.spec.kinds()
            )
            for m in self.local_maps
        ]

    @property
    def local_maps(self) -> tuple[StageLayerMap, ...]:
        """The layer maps of the stages this process holds slabs for."""
        return tuple(self.layer_maps[r] for r in self.ranks)

    def position(self, rank: int) -> int:
        """Row of stage ``rank`` in :meth:`stacked`; ``ValueError`` for a stage held elsewhere.

        Args:
          rank: a pipeline stage.

        Returns:
          Its index in ``ranks``.

        Raises:
          ValueError: this process holds no slabs of stage ``rank``.
        """
        try:
            return self._pos[rank]
        except KeyError:
            raise ValueError(
                f"stage {rank}'s host slabs live in another process (this one holds stages "
                f"{list(self.ranks)})"
            ) from None

    # ---------------------------------------------------------------- access

    def slab(self, rank: int, kind: PoolKind) -> np.ndarray:
        """The slab of sub-pool ``kind`` on stage ``rank`` (layout ``self.layout``).

        Args:
          rank: a stage this process holds.
          kind: a sub-pool the spec caches.

        Returns:
          A writable view of the stage's real rows: ``[pages, n_kind, *row]``
          (page_first) or ``[n_kind, pages, *row]``.

        Raises:
          ValueError: ``rank`` is held by another process, or ``kind`` is not cached.
        """
        big = self.stacked(kind)
        i = self.position(rank)
        nk = self.layer_maps[rank].num_layers_of(kind)
        return big[i, :, :nk] if self.layout is Layout.PAGE_FIRST else big[i, :nk]

    def read(self, rank: int, kind: PoolKind, host_ids: np.ndarray) -> np.ndarray:
        """Pages ``host_ids`` of one stage's sub-pool as ``[n, n_kind, *row]``.

        Args:
          rank: a stage this process holds.
          kind: a sub-pool the spec caches.
          host_ids: int host page ids of ``kind``'s page space (``n`` of them).

        Returns:
          A copy (fancy indexing), page-major whatever the layout.

        Raises:
          ValueError: as :meth:`slab` raises it.
        """
        s = self.slab(rank, kind)
        if self.layout is Layout.PAGE_FIRST:
            return s[host_ids]
        return np.swapaxes(s[:, host_ids], 0, 1)

    def read_into(self, rank: int, kind: PoolKind, host_ids: np.ndarray, out: np.ndarray) -> int:
        """Copies pages ``host_ids`` into layer-first ``out [n_kind, n, *row]`` without temporaries.

        One ``np.take`` for a layer-first slab and a C-contiguous ``out``, else one
        copy per page.

        Args:
          rank: a stage this process holds.
          kind: a sub-pool the spec caches.
          host_ids: int host page ids (``n`` of them).
          out: the destination, ``[n_kind, n, *row]`` of the slab's dtype.

        Returns:
          ``out.nbytes``.

        Raises:
          ValueError: as :meth:`slab` raises it.
        """
        s = self.slab(rank, kind)
        if self.layout is Layout.LAYER_FIRST and out.flags.c_contiguous:
            np.take(s, host_ids, axis=1, out=out)
        else:
            for i, h in enumerate(host_ids.tolist()):
                out[:, i] = s[h] if self.layout is Layout.PAGE_FIRST else s[:, h]
        return out.nbytes

    def write_from_pool(
        self,
        rank: int,
        kind: PoolKind,
        host_ids: np.ndarray,
        pool: np.ndarray,
        device_ids: np.ndarray,
        row_index: tuple[slice, ...] = (),
    ) -> int:
        """Copies pages of a pool view into host pages, one row copy per page (no temporaries).

        Args:
          rank: a stage this process holds.
          kind: a sub-pool the spec caches.
          host_ids: int host page ids to write, one per device id.
          pool: a host view of the stage's device pool, ``[n_kind, P, *row_part]``.
          device_ids: int page ids into ``pool``'s axis 1.
          row_index: the part of each host row ``pool`` holds (slices over the row
            axes, e.g. one ``'tp'`` shard's heads); empty: whole rows.

        Returns:
          Bytes copied: ``len(host_ids) * pool[:, 0].nbytes``.

        Raises:
          ValueError: ``host_ids`` and ``device_ids`` differ in length, or as
            :meth:`slab` raises it.
        """
        s = self.slab(rank, kind)
        for h, d in zip(host_ids.tolist(), device_ids.tolist(), strict=True):
            if self.layout is Layout.PAGE_FIRST:
                s[(h, slice(None), *row_index)] = pool[:, d]
            else:
                s[(slice(None), h, *row_index)] = pool[:, d]
        return int(host_ids.size) * pool[:, 0].nbytes

    def write(
        self,
        rank: int,
        kind: PoolKind,
        host_ids: np.ndarray,
        data: np.ndarray,
        row_index: tuple[slice, ...] = (),
    ) -> None:
        """Writes layer-first ``data [n_kind, n, *row_part]`` into pages ``host_ids`` of one stage.

        Args:
          rank: a stage this process holds.
          kind: a sub-pool the spec caches.
          host_ids: int host page ids (``n`` of them; a repeated id keeps the last
            write).
          data: ``[n_kind, n, *row_part]``, cast to the slab's dtype.
          row_index: the part of each row ``data`` holds (e.g. the heads of one
            ``'tp'`` shard); empty: whole rows.

        Raises:
          ValueError: as :meth:`slab` raises it.
        """

        s = self.slab(rank, kind)
        index: tuple[Any, ...]
        if self.layout is Layout.PAGE_FIRST:
            index = (host_ids, slice(None), *row_index)
            s[index] = np.swapaxes(data, 0, 1)
        else:
            index = (slice(None), host_ids, *row_index)
            s[index] = data
