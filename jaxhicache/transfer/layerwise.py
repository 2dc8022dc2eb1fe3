"""Layer-wise loads that run inside a forward: one layer's rows land right before it runs.

:meth:`TransferEngine.prepare_layerwise <jaxhicache.transfer.TransferEngine.prepare_layerwise>`
turns a :class:`~jaxhicache.transfer.PageMove` into a :class:`LayerwiseLoad`, a
pytree that a jitted forward takes as an argument. Inside ``shard_map`` the
forward calls :func:`load_layer` (or :func:`fetch_layer` one layer ahead and
:func:`apply_layer` when the layer runs) for stage-local layer ``l``, so the
forward of layer ``l`` depends only on the load of layer ``l``::

    staged (host memory rows)                    direct (CPU: the slabs themselves)
    rows[kind] [pp, Lk, nb, *row] pinned_host    rows[kind] = slab alias, host_ids pick pages
      | fetch_layer: row k = l2s[kind][l],         |
      |   device_put(Space.Device)  (H2D)          |
      v                                            v
    [nb, *row] on device --paged_scatter-->   pool[kind][k, device_ids]  <--row copies--

Index spaces: ``l`` is the stage-local layer; the row of kind ``K`` it loads is
the sub-pool id ``k = view.local_to_subpool[K][l]`` (``-1``: the layer has no
row in ``K``, nothing is written). Device ids are bucket-padded with the
sentinel (the page count of their space), which no copy writes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, cast

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec as P

from jaxhicache.layer_map import StageView
from jaxhicache.spec import PageSpace, PoolKind
from kernels_pallas.common import Backend, Layout, PagedCopyTuning
from kernels_pallas.paged_scatter import paged_scatter

__all__ = ["LayerwiseLoad", "apply_layer", "fetch_layer", "load_layer"]


@struct.dataclass
class LayerwiseLoad:
    """The pages of one (possibly merged) load-back, ready for a forward to apply per layer.

    Attributes:
      rows: per kind. Staged: the host rows, layer-first ``[pp, Lk, nb, *row]``,
        sharded like the pools, in host memory (``pinned_host``). Direct: the host
        slabs (``[pp, pages, Lk, *row]`` page-first or ``[pp, Lk, pages, *row]``)
        aliased as device arrays (CPU, no copy).
      device_ids: per page space, int32 ``[nb]``, padded with the sentinel.
      host_ids: direct only: per page space, int32 ``[nb]`` host pages (padding 0,
        never used: its device id is the sentinel). Empty when staged.
      slab_layout: static. ``None``: staged rows; else the slabs' layout.
      row_specs: static. The ``PartitionSpec`` of each kind's rows.
      num_pages: static. The device pools' full page count (the full sentinel).
      num_swa_pages: static. Their SWA page count (the SWA sentinel).
      nbytes: static. Real row bytes.
      backend: static. The scatter kernel's backend.
      tuning: static. The scatter kernel's launch parameters.
      guarded: static. Staged: copy a kind's rows only when the layer has a row in
        it.
    """

    rows: dict[PoolKind, jax.Array]
    device_ids: dict[PageSpace, jax.Array]
    host_ids: dict[PageSpace, jax.Array]
    slab_layout: Layout | None = struct.field(pytree_node=False)
    row_specs: tuple[tuple[PoolKind, P], ...] = struct.field(pytree_node=False)
    num_pages: int = struct.field(pytree_node=False)
    num_swa_pages: int = struct.field(pytree_node=False)
    nbytes: int = struct.field(pytree_node=False)
    backend: Backend = struct.field(pytree_node=False, default=Backend.XLA)
    tuning: PagedCopyTuning = struct.field(pytree_node=False, default=PagedCopyTuning())
    guarded: bool = struct.field(pytree_node=False, default=True)

    @property
    def staged(self) -> bool:
        """Whether the rows are staged host rows (else the host slabs, direct path)."""
        return self.slab_layout is None

    @property
    def kinds(self) -> tuple[PoolKind, ...]:
        """The pool kinds this load writes."""
        return tuple(self.rows)

    def specs(self) -> LayerwiseLoad:
        """The ``shard_map`` in_specs of this load.

        Returns:
          A load of the same pytree structure with ``PartitionSpec`` leaves.
        """
        specs = dict(self.row_specs)
        spec_of: dict[str, Any] = {  # the same pytree with PartitionSpec leaves
            "rows": {k: specs[k] for k in self.rows},
            "device_ids": {s: P() for s in self.device_ids},
            "host_ids": {s: P() for s in self.host_ids},
        }
        return dataclasses.replace(self, **spec_of)

    def stage_local(self) -> LayerwiseLoad:
        """Inside ``shard_map``: drop the stage axis of the rows.

        Returns:
          The load with rows ``[1, ...] -> [...]``.
        """
        return dataclasses.replace(self, rows={k: a[0] for k, a in self.rows.items()})


def _subpool_row(view: StageView, kind: PoolKind, local_layer) -> jax.Array:
    """Sub-pool id ``k`` of stage-local layer ``local_layer`` in ``kind`` (``-1``: none)."""
    l2s = view.local_to_subpool[kind]
    n = l2s.shape[0]
    inside = (local_layer >= 0) & (local_layer < n)
    return jnp.where(inside, jnp.asarray(l2s)[jnp.clip(local_layer, 0, n - 1)], -1)


def _kinds(load: LayerwiseLoad, kinds: Iterable[PoolKind] | None) -> tuple[PoolKind, ...]:
    return load.kinds if kinds is None else tuple(k for k in kinds if k in load.rows)


def fetch_layer(
    load: LayerwiseLoad, view: StageView, local_layer, kinds: Iterable[PoolKind] | None = None
) -> dict[PoolKind, jax.Array]:
    """Staged: moves stage-local layer ``local_layer``'s rows of each kind to device memory.

    Call it one layer ahead of :func:`apply_layer` to let the copy run under the
    previous layer's compute.

    Args:
      load: the stage-local load (:meth:`LayerwiseLoad.stage_local`).
      view: the running stage's layer map view (``StackedLayerMap.stage``).
      local_layer: the stage-local layer (int or traced int32).
      kinds: restrict to these sub-pools (default: every kind of the load).

    Returns:
      Per kind ``[nb, *row]`` on device (zeros where the layer has no row in that
      kind and the load is ``guarded``: no bytes move). Direct loads fetch nothing
      (``{}``): their rows are read from the slabs when applied.
    """
    if not load.staged:
        return {}
    out = {}
    for kind in _kinds(load, kinds):
        rows = load.rows[kind]  # [Lk, nb, *row], host memory
        k = _subpool_row(view, kind, local_layer)

        def move(k, rows=rows):
            host = jax.lax.dynamic_index_in_dim(rows, jnp.maximum(k, 0), keepdims=False)
            return jax.device_put(host, jax.memory.Space.Device)

        if load.guarded:
            zeros = jnp.zeros(rows.shape[1:], rows.dtype)
            out[kind] = jax.lax.cond(k >= 0, move, lambda k, z=zeros: z, k)
        else:
            out[kind] = move(k)
    return out


def apply_layer(
    pools: dict[PoolKind, jax.Array],
    load: LayerwiseLoad,
    fetched: dict[PoolKind, jax.Array],
    view: StageView,
    local_layer,
    kinds: Iterable[PoolKind] | None = None,
) -> dict[PoolKind, jax.Array]:
    """Writes stage-local layer ``local_layer``'s rows into row ``k`` of each sub-pool.

    Args:
      pools: one stage's ``{kind: [Lk, P, *row]}``.
      load: the stage-local load.
      fetched: what :func:`fetch_layer` returned for the same layer (staged).
      view: the running stage's layer map view.
      local_layer: the stage-local layer (int or traced int32).
      kinds: restrict to these sub-pools (default: every kind of the load).

    Returns:
      The new pools; kinds where the layer has no row (``k < 0``) are left as
      they are.
    """
    pools = dict(pools)
    for kind in _kinds(load, kinds):
        pool = pools[kind]
        k = _subpool_row(view, kind, local_layer)
        ids = jnp.where(k >= 0, load.device_ids[kind.page_space], pool.shape[1])
        row = jnp.maximum(k, 0)
        if load.staged:
            pools[kind] = paged_scatter(
                pool, ids, fetched[kind], layer=row, backend=load.backend, tuning=load.tuning
            )
        else:
            pools[kind] = copy_slab_rows(
                pool,
                load.rows[kind],
                ids,
                load.host_ids[kind.page_space],
                layer=row,
                layout=cast(Layout, load.slab_layout),  # direct loads always have one
            )
    return pools


def load_layer(
    pools: dict[PoolKind, jax.Array],
    load: LayerwiseLoad,
    view: StageView,
    local_layer,
    kinds: Iterable[PoolKind] | None = None,
) -> dict[PoolKind, jax.Array]:
    """:func:`fetch_layer` then :func:`apply_layer` for one stage-local layer (inside ``shard_map``).

    Args:
      pools: one stage's ``{kind: [Lk, P, *row]}``.
      load: the stage-local load.
      view: the running stage's layer map view.
      local_layer: the stage-local layer (int or traced int32).
      kinds: restrict the load to those sub-pools (default: every kind of the load).

    Returns:
      The new pools.
    """
    fetched = fetch_layer(load, view, local_layer, kinds)
    return apply_layer(pools, load, fetched, view, local_layer, kinds)


def copy_slab_rows(pool, slab, dev_ids, host_ids, *, layout: Layout, layer=None):
    """``pool [K, P, *row]`` with page ``dev_ids[j]`` := host page ``host_ids[j]`` of ``slab``.

    ``slab`` is ``[pages, K, *row]`` (page-first) or ``[K, pages, *row]``. With
    ``layer`` (a traced sub-pool id) only that row of the pool is written (none if
    it is outside ``[0, K)``), else all ``K``. Ids ``>= P`` (bucket padding) write
    nothing. One
    ``dynamic_update_slice`` per page, in place on a donated pool.
    """
    num_layers, num_pages = pool.shape[:2]
    zeros = (0,) * (pool.ndim - 2)
    width = num_layers if layer is None else 1
    first = jnp.int32(0) if layer is None else jnp.asarray(layer, jnp.int32)
    row_shape = pool.shape[2:]

    def body(j, pool):
        pid, hid = dev_ids[j], host_ids[j]

        def write(pool):
            if layout is Layout.PAGE_FIRST:
                rows = jax.lax.dynamic_slice(slab, (hid, first, *zeros), (1, width, *row_shape))
                rows = jnp.swapaxes(rows, 0, 1)  # [width, 1, *row]: a bitcast
            else:
                rows = jax.lax.dynamic_slice(slab, (first, hid, *zeros), (width, 1, *row_shape))
            return jax.lax.dynamic_update_slice(pool, rows, (first, pid, *zeros))

        ok = pid < num_pages
        if layer is not None:  # dynamic slices clamp: an out-of-range row must write nothing
            ok &= (first >= 0) & (first < num_layers)
        return jax.lax.cond(ok, write, lambda p: p, pool)

    return jax.lax.fori_loop(0, dev_ids.shape[0], body, pool)
