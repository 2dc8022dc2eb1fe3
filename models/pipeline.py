"""Model-independent pieces of the paged, pipeline-parallel models.

Shared by :class:`models.paged.PagedModel` (DSV4),
:class:`models.mla_paged.PagedMLAModel` (MLA + DSA) and
:class:`models.hybrid_paged.PagedHybridModel` (recurrent hybrid):

* :func:`place`: a model's mesh, layer maps and weights placed on it (the head
  replicated, the per-stage stacks sharded over ``'pp'``);
* :func:`pipeline`: inside ``jax.shard_map``, a loop of ``pp`` steps where step
  ``s`` runs stage ``s`` (``lax.cond`` on ``axis_index('pp')``) and
  ``lax.ppermute`` hands the activations (any pytree: the residual stream, plus
  whatever a model carries with it) to the next stage; after ``pp`` steps the
  last stage's output is back on stage 0. :func:`stage0_logits` replicates it.
* :func:`stack_rows`: per-layer weight trees stacked on the host, zero-padded.
* :func:`program_key`: the key of a model's forward program in the program cache
  (:func:`jaxhicache.program_cache.cached_jit`): everything its body closes over.
* host-side helpers addressed with the library's layer maps: :func:`check_load`
  (a fused layer-wise load fits the pools), :func:`global_layer_rows` and
  :func:`pools_from_global` (per-global-layer rows of any PP layout),
  :func:`page_tables` (one request's two tables as host arrays).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxhicache.distributed import put_global_tree
from jaxhicache.layer_map import StackedLayerMap, StageLayerMap, build_layer_maps, stack_layer_maps
from jaxhicache.mesh import PP, make_mesh
from jaxhicache.pools.device import DevicePools
from jaxhicache.spec import ModelCacheSpec, PoolKind
from jaxhicache.transfer import LayerwiseLoad
from models.chunk import PageTables

__all__ = [
    "Placement",
    "check_load",
    "global_layer_rows",
    "page_tables",
    "pipeline",
    "place",
    "pools_from_global",
    "program_key",
    "stack_rows",
    "stage0_logits",
]


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a paged model lives: its mesh, every stage's layer map, and its weights.

    Attributes:
      mesh: the ``('pp', 'tp')`` mesh.
      layer_maps: every stage's map, in rank order.
      stacked: the maps stacked (``[pp, ...]``).
      head: the stage-independent weights, replicated.
      stages: the per-stage weight stacks, sharded over ``'pp'``.
      replicated: the mesh's replicated sharding.
    """

    mesh: Mesh
    layer_maps: list[StageLayerMap]
    stacked: StackedLayerMap
    head: dict
    stages: dict
    replicated: NamedSharding


def place(
    spec: ModelCacheSpec,
    mesh: Mesh | None,
    pp: int | None,
    partition,
    stack: Callable[[list[StageLayerMap]], dict],
    head_keys: Sequence[str],
) -> Placement:
    """A model's mesh (``make_mesh(pp or 1)`` when none is given), layer maps and weights.

    ``stack(layer_maps)`` returns the model's weights as per-stage stacks plus the
    stage-independent entries named in ``head_keys``; each process fills its own shards.
    ``ValueError`` when ``pp`` contradicts the mesh (or the partition does not fit).
    """
    if mesh is None:
        mesh = make_mesh(pp or 1)
    elif pp is not None and mesh.shape[PP] != pp:
        raise ValueError(f"pp={pp} but the mesh has pp={mesh.shape[PP]}")
    maps = build_layer_maps(spec, mesh.shape[PP], partition)
    sp = stack(maps)
    head = {k: sp.pop(k) for k in head_keys}
    rep = NamedSharding(mesh, P())
    return Placement(
        mesh=mesh,
        layer_maps=maps,
        stacked=stack_layer_maps(maps),
        head=put_global_tree(head, rep),
        stages=put_global_tree(sp, NamedSharding(mesh, P(PP))),
        replicated=rep,
    )


def pipeline(pp: int, run: Callable, act, *state):
    """Runs every stage's ``run(act, *state) -> (act, *state)`` in stage order.

    Inside ``shard_map`` over ``'pp'``: step ``s`` runs ``run`` on stage ``s`` only,
    then ``act`` moves one stage on (a ring, so after ``pp`` steps the last stage's
    ``act`` is on stage 0). ``state`` (pools, scratch) stays on its stage.
    Returns ``(act, *state)``.
    """
    stage = jax.lax.axis_index(PP)
    perm = [(i, (i + 1) % pp) for i in range(pp)]

    def step(s, carry):
        carry = jax.lax.cond(stage == s, run, lambda *c: c, *carry)
        if pp == 1:
            return carry
        return (jax.lax.ppermute(carry[0], PP, perm), *carry[1:])

    return jax.lax.fori_loop(0, pp, step, (act, *state))


def stage0_logits(logits):
    """Stage 0's ``logits`` on every stage (a masked ``psum`` over ``'pp'``)."""
    stage = jax.lax.axis_index(PP)
    return jax.lax.psum(jnp.where(stage == 0, logits, 0.0), PP)


def stack_rows(trees: Sequence, count: int):
    """Stacks identical pytrees to ``count`` rows on the host (zero rows pad the end)."""
    pad = [jax.tree.map(np.zeros_like, trees[0])] * (count - len(trees))
    return jax.tree.map(lambda *xs: np.stack(xs), *trees, *pad)


def check_load(mesh: Mesh, pools: DevicePools, load: LayerwiseLoad) -> None:
    """``ValueError`` unless ``load`` was prepared for pools of this geometry and mesh."""
    if (load.num_pages, load.num_swa_pages) != (pools.num_pages, pools.num_swa_pages):
        raise ValueError(
            f"the load was prepared for pools of {load.num_pages}/{load.num_swa_pages} "
            f"full/SWA pages, these have {pools.num_pages}/{pools.num_swa_pages}"
        )
    extra = set(load.kinds) - set(pools.kinds())
    if extra:
        raise ValueError(f"the load has kinds the pools lack: {sorted(k.value for k in extra)}")
    for kind, arr in load.rows.items():
        other = getattr(arr.sharding, "mesh", None)
        if other is not None and other != mesh:
            raise ValueError(f"the load's {kind.value} rows live on another mesh: {other}")


def global_layer_rows(
    num_layers: int, maps: Sequence[StageLayerMap], pools: DevicePools, kind: PoolKind
) -> list:
    """Per global layer: its ``[pages, *row]`` host array of sub-pool ``kind`` (``None`` if none).

    Stage ``r``'s sub-pool row ``k`` is global layer ``subpool_to_global(kind)[k]``.
    """
    rows: list = [None] * num_layers
    arr = np.asarray(pools[kind])  # host copy: a test/transfer utility, not the hot path
    for m in maps:
        for k, g in enumerate(m.subpool_to_global(kind)):
            rows[int(g)] = arr[m.pp_rank, k]
    return rows


def pools_from_global(
    empty: DevicePools, maps: Sequence[StageLayerMap], rows_by_kind: dict
) -> DevicePools:
    """``empty`` pools filled from per-global-layer rows (``rows_by_kind[kind][g]``).

    Each stage's local layer ``l`` reads the global list at ``start_layer + l`` and
    lands in its sub-pool row ``subpool_id(kind, l)``.
    """
    pools = empty
    for kind in pools.kinds():
        arr = np.zeros(pools[kind].shape, pools[kind].dtype)
        glist = rows_by_kind[kind]
        for m in maps:
            for local in m.kind_local_ids(kind):
                arr[m.pp_rank, m.subpool_id(kind, int(local))] = np.asarray(
                    glist[m.global_id(int(local))]
                )
        pools = pools.replace_pool(kind, jax.device_put(arr, pools[kind].sharding))
    return pools


def page_tables(full, swa) -> PageTables:
    """One request's page tables as 1-D int32 host arrays of equal length."""
    full = np.asarray(full, np.int32).reshape(-1)
    swa = np.asarray(swa, np.int32).reshape(-1)
    if full.shape != swa.shape:
        raise ValueError(
            f"full_page_ids {full.shape} and swa_page_ids {swa.shape} differ in length"
        )
    return PageTables(full, swa)  # host arrays: checked on the host, sent with each chunk


def program_key(model, t: int, load: LayerwiseLoad | None, **extra) -> str:
    """What a paged model's forward program for chunk length ``t`` closes over, as text.

    The key :func:`jaxhicache.program_cache.cached_jit` needs: the model class, its
    config, cache spec and stage layer maps (the stacked maps, the mesh's ``pp`` and
    the pool kinds follow from them), ``t``, the structure of a fused ``load`` and
    ``extra`` (e.g. ``tp``). The mesh, weights and pools are arguments, keyed by the
    cache itself.
    """
    structure = None if load is None else jax.tree.structure(load)
    more = " ".join(f"{k}={v!r}" for k, v in sorted(extra.items()))
    return (
        f"{type(model).__module__}.{type(model).__qualname__} t={t} load={structure} "
        f"config={model.config!r} spec={model.spec!r} maps={list(model.layer_maps)!r} {more}"
    )
