"""The jitted ``shard_map`` programs of the transfer engine: every stage moves its own layers.

All programs take the pools as ``{kind: [pp, Lk, P, *row]}`` sharded ``P('pp', ...)``
(:func:`jaxhicache.mesh.pool_partition_spec`) and ids as replicated int32
``[nb]`` arrays padded with the sentinel ``P`` (one compile per bucket).

| program | in | out |
|---|---|---|
| ``gather_all`` | pools, device ids | staging ``{kind: [pp, Lk, nb, *row]}`` (layer-first) |
| ``scatter_all`` | pools (donated), device ids, staging | new pools, completion token |
| ``direct_load`` | pools (donated), slab aliases, device ids, host ids | new pools, token |
| ``layer_load`` | pools (donated), :class:`LayerwiseLoad`, stage-local layer | new pools, token |

A completion token is an int32 ``[pp]`` output of the same executable: it is
ready exactly when the writes are, and it survives the next load's donation of
the pools.
"""

from __future__ import annotations

import functools
from typing import final

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxhicache.layer_map import StackedLayerMap
from jaxhicache.mesh import PP
from jaxhicache.spec import PoolKind
from jaxhicache.transfer.layerwise import LayerwiseLoad, copy_slab_rows, load_layer
from kernels_pallas.common import Backend, Layout, PagedCopyTuning
from kernels_pallas.paged_gather import paged_gather
from kernels_pallas.paged_scatter import paged_scatter

__all__ = ["TransferPrograms"]


def _token() -> jax.Array:
    return jnp.zeros((1,), jnp.int32)


@final
class TransferPrograms:
    """Builds the engine's programs once for a mesh, its stacked layer maps and the kernels."""

    def __init__(
        self,
        mesh: Mesh,
        stacked: StackedLayerMap,
        pool_specs: dict[PoolKind, P],
        *,
        backend: Backend,
        tuning: PagedCopyTuning,
        slab_layout: Layout,
    ):
        self.mesh = mesh
        self.stacked = stacked
        self.pool_specs = dict(pool_specs)
        self.kinds = tuple(pool_specs)
        self.backend = backend
        self.tuning = tuning
        self.slab_layout = slab_layout
        self.gather_all = self._gather_all()
        self.scatter_all = self._scatter_all()
        self.direct_load = self._direct_load()
        self.layer_load = self._layer_load()

    def _smap(self, body, in_specs, out_specs):
        return jax.shard_map(
            body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )

    def _gather_all(self):
        """Every stage gathers its pages of every sub-pool, all layers (one compile per bucket)."""

        def body(arrays, ids):
            out = {}
            for kind in self.kinds:
                # Padding layers of a shorter stage gather too; their rows are dropped on landing.
                out[kind] = paged_gather(
                    arrays[kind][0],
                    ids[kind.page_space],
                    layout=Layout.LAYER_FIRST,
                    backend=self.backend,
                    tuning=self.tuning,
                )[None]
            return out

        return jax.jit(self._smap(body, (self.pool_specs, P()), self.pool_specs))

    def _scatter_all(self):
        """Pools donated: every stage scatters its layer-first staging into all its layers."""

        def body(arrays, ids, staging):
            out = {}
            for kind in self.kinds:
                out[kind] = paged_scatter(
                    arrays[kind][0],
                    ids[kind.page_space],
                    staging[kind][0],
                    layout=Layout.LAYER_FIRST,
                    backend=self.backend,
                    tuning=self.tuning,
                )[None]
            return out, _token()

        specs = self.pool_specs  # staging is layer-first [pp, Lk, nb, *row]: the pools' axes
        smap = self._smap(body, (specs, P(), specs), (specs, P(PP)))
        return jax.jit(smap, donate_argnums=(0,))

    def _direct_load(self):
        """Pools donated (CPU): per stage, copy slab rows straight into pool pages, all layers."""

        def body(arrays, slabs, dev_ids, host_ids):
            out = {}
            for kind in self.kinds:
                space = kind.page_space
                out[kind] = copy_slab_rows(
                    arrays[kind][0],
                    slabs[kind][0],
                    dev_ids[space],
                    host_ids[space],
                    layout=self.slab_layout,
                )[None]
            return out, _token()

        specs = self.pool_specs  # slabs keep the row axes at 3+, like the pools
        smap = self._smap(body, (specs, specs, P(), P()), (specs, P(PP)))
        return jax.jit(smap, donate_argnums=(0,))

    def _layer_load(self):
        """Pools donated: every stage applies :func:`load_layer` for its local layer ``layer``."""
        stacked = self.stacked

        def body(arrays, load: LayerwiseLoad, layer):
            pools = {k: a[0] for k, a in arrays.items()}
            pools = load_layer(pools, load.stage_local(), stacked.stage(PP), layer)
            return {k: a[None] for k, a in pools.items()}, _token()

        @functools.partial(jax.jit, donate_argnums=(0,))
        def run(arrays, load: LayerwiseLoad, layer):
            specs = self.pool_specs
            smap = self._smap(body, (specs, load.specs(), P()), (specs, P(PP)))
            return smap(arrays, load, layer)

        return run
