"""Stage-local layer maps: the three layer-index spaces of a pipeline stage.

Spaces (DESIGN §3)::

    global layer id   g  in [0, num_layers)          lists spanning the whole model
    stage-local id    l  = g - start_layer           a stage's transfers and signals
    sub-pool id       k  in [0, n_kind_on_stage)     rows of one sub-pool of one stage

    local_to_global[l]      = g            (= start_layer + l)
    local_to_subpool(K)[l]  = k  or -1     (-1: layer l has no row in sub-pool K)
    subpool_to_global(K)[k] = g
    kind_local_ids(K)       = [l with local_to_subpool(K)[l] >= 0], ascending

Invariants, asserted with chex when a map is built: every global layer lands
in exactly one stage; the round trips local -> global -> local and
sub-pool -> global -> local -> sub-pool are identities; sub-pool ids are dense
``0..n-1``; ``subpool_to_global(K) == start_layer + kind_local_ids(K)``. The
MTP slot of ``compress_ratios`` is never a layer.

The reference system's bug (a stage's local ids used to index a global-length
list of per-layer state pools) cannot be written against this API: a global
list is indexed with :meth:`StageLayerMap.global_id`, a stage's sub-pool with
:meth:`StageLayerMap.subpool_id`, and both reject ids of the wrong space.

:class:`StackedLayerMap` is the same information for all stages at once, with a
leading ``pp`` axis padded to the largest stage; inside ``jax.shard_map``
:meth:`StackedLayerMap.stage` selects the running stage with
``jax.lax.axis_index('pp')``.

The package has two modules: ``layer_map/stage.py`` (one stage's maps
on the host: the partition, :class:`StageLayerMap`, the builders and their checks)
and ``layer_map/stacked.py`` (every stage's maps as padded arrays, and
the traced view of one stage). Import the names from here.
"""

from __future__ import annotations

from jaxhicache.layer_map.stacked import (
    StackedLayerMap,
    StageView,
    check_stage_view,
    stack_layer_maps,
)
from jaxhicache.layer_map.stage import (
    StageLayerMap,
    as_index,
    build_layer_maps,
    build_stage_layer_map,
    pp_partition,
)
from jaxhicache.layer_map.stage import (
    check_stage_layer_map as check_stage_layer_map,
)

__all__ = [
    "StackedLayerMap",
    "StageLayerMap",
    "StageView",
    "as_index",
    "build_layer_maps",
    "build_stage_layer_map",
    "check_stage_view",
    "pp_partition",
    "stack_layer_maps",
]
