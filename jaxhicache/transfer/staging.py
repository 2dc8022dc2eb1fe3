"""Host-side staging: reused page-aligned buffers and numpy <-> sharded-array views.

* :class:`StagingBuffers` hands out one page-aligned numpy buffer per
  ``(kind, shape)`` and reuses it: a buffer is busy until the program (or
  transfer) that reads it is ready, and ``take`` waits for that before handing
  it out again. Reuse avoids first-touch page faults on every load.
* :func:`alias_sharded` makes a global ``[pp, ...]`` device array over a numpy
  buffer of this process's stages; on the CPU backend each aligned, contiguous
  shard is used in place (no copy), elsewhere it is one H2D copy.
* :func:`replica0_views` gives numpy views of the replica-0 shards of sharded
  arrays, per stage: what a backup lands in the slabs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import final

import jax
import numpy as np
from jax.sharding import NamedSharding, SingleDeviceSharding

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


def alias_sharded(
    sharding: NamedSharding,
    buf: np.ndarray,
    ranks: Sequence[int],
    num_stages: int,
    *,
    may_alias: bool = True,
) -> jax.Array:
    """A global ``[num_stages, ...]`` device array over ``buf [len(ranks), ...]``.

    Row ``i`` of ``buf`` is stage ``ranks[i]``; this process's devices hold only
    those stages. Each device's shard is put with ``may_alias`` into the
    sharding's memory kind: on the CPU backend an aligned, contiguous shard is
    used in place (no copy); elsewhere it is one H2D copy. A caller that writes
    ``buf`` later must first wait for every program that reads the returned array.
    """
    pos = {r: i for i, r in enumerate(ranks)}
    shape = (num_stages, *buf.shape[1:])
    arrays = []
    for d, idx in sharding.addressable_devices_indices_map(shape).items():
        assert idx is not None, "a NamedSharding gives every device an index"
        rank = idx[0].start or 0
        i = pos[rank]
        target = SingleDeviceSharding(d, memory_kind=sharding.memory_kind)
        arrays.append(jax.device_put(buf[(slice(i, i + 1), *idx[1:])], target, may_alias=may_alias))
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


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
