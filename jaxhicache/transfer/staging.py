"""Host-side staging: reused page-aligned buffers and numpy <-> sharded-array views.

* :class:`StagingBuffers` hands out one page-aligned numpy buffer per
  ``(kind, shape)`` and reuses it: a buffer is busy until the program (or
  transfer) that reads it is ready, and ``take`` waits for that before handing
  it out again. Reuse avoids first-touch page faults on every load.
* :func:`alias_sharded` makes a sharded device array over a ``[pp, ...]``
  numpy buffer; on the CPU backend each aligned, contiguous shard is used in
  place (no copy), elsewhere it is one H2D copy.
* :func:`replica0_views` gives numpy views of the replica-0 shards of sharded
  arrays, per stage: what a backup lands in the slabs.
"""

from __future__ import annotations

from typing import final

import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxhicache.pools.host import aligned_zeros
from jaxhicache.spec import PoolKind

__all__ = ["StagingBuffers", "alias_sharded", "replica0_views"]


@final
class StagingBuffers:
    """Reusable page-aligned host buffers, busy until the work that reads them is ready."""

    def __init__(self):
        self._buffers: dict[tuple, np.ndarray] = {}
        self._busy: dict[tuple, object] = {}
        self._taken: list[tuple] = []

    def take(self, kind: PoolKind, shape: tuple[int, ...], dtype) -> np.ndarray:
        """The buffer of ``(kind, shape)``; waits until its last reader is ready."""
        key = (kind, tuple(shape))
        if key in self._busy:
            jax.block_until_ready(self._busy.pop(key))
        if key not in self._buffers:
            self._buffers[key] = aligned_zeros(tuple(shape), dtype)
        self._taken.append(key)
        return self._buffers[key]

    def busy_until(self, token) -> None:
        """Every buffer taken since the last call stays busy until ``token`` is ready."""
        for key in self._taken:
            self._busy[key] = token
        self._taken.clear()


def alias_sharded(sharding: NamedSharding, buf: np.ndarray) -> jax.Array:
    """A device array over ``buf [pp, ...]`` sharded by ``sharding``.

    Each device's shard is put with ``may_alias=True``: on the CPU backend an
    aligned, contiguous shard is used in place (no copy); elsewhere it is one H2D
    copy. A caller that writes ``buf`` later must first wait for every program
    that reads the returned array.
    """
    arrays = [
        jax.device_put(buf[idx], d, may_alias=True)
        for d, idx in sharding.addressable_devices_indices_map(buf.shape).items()
    ]
    return jax.make_array_from_single_device_arrays(buf.shape, sharding, arrays)


def replica0_views(arrays: dict) -> dict:
    """``{kind: {rank: [(numpy view of the shard, row index)]}}`` of replica-0 shards.

    ``'tp'`` replicas of a stage hold the same bytes; MHA shards carry a slice of
    the heads (the row index beyond the ``[stage, pages|layers, layers|pages]``
    axes). Reading a view waits until the array is ready.
    """
    out = {}
    for kind, arr in arrays.items():
        views: dict[int, list] = {}
        for shard in arr.addressable_shards:
            if shard.replica_id:
                continue
            rank = shard.index[0].start or 0
            views.setdefault(rank, []).append((np.asarray(shard.data), tuple(shard.index[3:])))
        out[kind] = views
    return out
