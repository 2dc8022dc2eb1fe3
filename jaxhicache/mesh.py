"""The ``('pp', 'tp')`` device mesh and the shardings of cache state.

A sub-pool's device array is ``[pp, max_layers_of_kind, pages, *row]``; its
leading stage axis is sharded over ``'pp'``. Sub-pools follow
:attr:`PoolKind.tp_sharding`: DSV4's single KV head, the MLA latent and the DSA
indexer keys are replicated over ``'tp'``; an MHA ``FULL_KV`` row
``(2, page, heads, head_dim)`` shards its heads over ``'tp'``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxhicache.spec import ModelCacheSpec, PoolKind

__all__ = ["PP", "TP", "make_mesh", "pool_partition_spec", "pool_sharding"]

PP = "pp"
"""The mesh axis of pipeline stages."""
TP = "tp"
"""The mesh axis of tensor-parallel ranks."""


def make_mesh(pp: int, tp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``('pp', 'tp')`` mesh with Auto axes over the first ``pp * tp`` devices.

    Args:
      pp: pipeline stages (rows of the device grid).
      tp: tensor-parallel ranks per stage (columns).
      devices: the devices to take, in order; ``None``: ``jax.devices()``. Stage
        ``s`` gets ``devices[s * tp : (s + 1) * tp]``; devices past ``pp * tp`` are
        left out.

    Returns:
      The ``Mesh`` with axes ``('pp', 'tp')``, both ``AxisType.Auto``.

    Raises:
      ValueError: ``pp`` or ``tp`` below 1, or more than ``len(devices)`` devices
        asked for.
    """
    if pp < 1 or tp < 1:
        raise ValueError(f"pp and tp must be >= 1, got pp={pp}, tp={tp}")
    devices = list(jax.devices() if devices is None else devices)
    if pp * tp > len(devices):
        raise ValueError(f"pp*tp = {pp * tp} exceeds the {len(devices)} available devices")
    grid = np.asarray(devices[: pp * tp], dtype=object).reshape(pp, tp)
    return Mesh(grid, (PP, TP), axis_types=(AxisType.Auto, AxisType.Auto))


def pool_partition_spec(spec: ModelCacheSpec, kind: PoolKind, tp: int = 1) -> PartitionSpec:
    """``P('pp', None, None, *row)``; a split row axis over ``'tp'`` when ``tp > 1``.

    Args:
      spec: the model's cache spec (gives ``kind``'s row shape).
      kind: the sub-pool.
      tp: the mesh's ``'tp'`` size. Only a kind whose :attr:`PoolKind.tp_sharding`
        is ``HEADS`` shards, along its :attr:`PoolKind.tp_axis`; every other row
        axis, and every axis when ``tp == 1``, is replicated.

    Returns:
      The partition spec of the pool array ``[pp, layers, pages, *row]``: stages
      over ``'pp'``, layers and pages unsharded.

    Raises:
      ValueError: a sharded kind whose split axis is not divisible by ``tp``.
    """
    row: list[str | None] = [None] * len(spec.row_shape(kind))
    axis = kind.tp_axis  # FULL_KV heads (axis 2), recurrent-state channels / heads (axis 0)
    if axis is not None and tp > 1:
        n = spec.row_shape(kind)[axis]
        if n % tp:
            raise ValueError(f"{kind.value} row axis {axis} ({n}) is not divisible by tp={tp}")
        row[axis] = TP
    return PartitionSpec(PP, None, None, *row)


def pool_sharding(spec: ModelCacheSpec, mesh: Mesh, kind: PoolKind) -> NamedSharding:
    """The ``NamedSharding`` of ``kind``'s device pool on ``mesh`` (:func:`pool_partition_spec`).

    Args:
      spec: the model's cache spec.
      mesh: a ``('pp', 'tp')`` mesh (:func:`make_mesh`); its ``'tp'`` size decides
        whether MHA heads are sharded.
      kind: the sub-pool.

    Returns:
      ``NamedSharding(mesh, pool_partition_spec(spec, kind, mesh.shape['tp']))``.

    Raises:
      ValueError: as :func:`pool_partition_spec` raises it (heads not divisible by
        ``'tp'``).
    """
    return NamedSharding(mesh, pool_partition_spec(spec, kind, mesh.shape[TP]))
