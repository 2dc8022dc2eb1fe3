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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import final

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxhicache.spec import AttentionKind, ModelCacheSpec, PoolKind

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


def as_index(name: str, value) -> int:
    """``value`` as a Python ``int`` if it is an exact integer, else ``ValueError`` naming it.

    Accepted: ``int``, numpy integer scalars and 0-d integer numpy arrays.
    Rejected: ``bool`` (and ``numpy.bool_``), floats (even ``11.0``), strings,
    ``None`` and anything else. Layer ids, ranks and counts are never truncated.
    """
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]  # a 0-d array -> its numpy scalar
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise ValueError(
            f"{name} must be an integer (int or numpy integer), got {value!r} "
            f"of type {type(value).__name__}"
        )
    return int(value)


def pp_partition(
    num_layers: int, pp_size: int, partition: Sequence[int] | None = None
) -> list[tuple[int, int]]:
    """``(start, end)`` layer range of every stage.

    Default rule (the reference's): ``base = L // pp``, ``rem = L % pp``; the
    last ``rem`` stages get one extra layer. An explicit ``partition`` (layer
    count per stage, summing to ``num_layers``) overrides it.

    Every count must be an exact integer (:func:`as_index`): ``ValueError``
    naming the value otherwise, never a silent ``int()`` truncation.
    """
    num_layers = as_index("num_layers", num_layers)
    pp_size = as_index("pp_size", pp_size)
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if pp_size < 1:
        raise ValueError(f"pp_size must be >= 1, got {pp_size}")
    if partition is None:
        if pp_size > num_layers:
            raise ValueError(
                f"pp_size {pp_size} exceeds num_layers {num_layers}: a stage would have no layer"
            )
        base, rem = divmod(num_layers, pp_size)
        counts = [base + (1 if r >= pp_size - rem else 0) for r in range(pp_size)]
    else:
        if isinstance(partition, str | bytes) or not isinstance(partition, Sequence | np.ndarray):
            raise ValueError(
                f"partition must be a sequence of per-stage layer counts, got {partition!r}"
            )
        counts = [as_index(f"partition[{i}]", c) for i, c in enumerate(partition)]
        if len(counts) != pp_size:
            raise ValueError(
                f"partition {list(partition)} has {len(counts)} stages, pp_size is {pp_size}"
            )
        if any(c < 1 for c in counts):
            raise ValueError(f"every stage needs >= 1 layer, partition is {counts}")
        if sum(counts) != num_layers:
            raise ValueError(
                f"partition {counts} sums to {sum(counts)}, not num_layers {num_layers}"
            )
    bounds, start = [], 0
    for c in counts:
        bounds.append((start, start + c))
        start += c
    return bounds


@final
@dataclasses.dataclass(frozen=True, eq=False)
class StageLayerMap:
    """Layer maps of one pipeline stage. Build with :func:`build_stage_layer_map`."""

    spec: ModelCacheSpec
    pp_rank: int
    pp_size: int
    start_layer: int
    end_layer: int
    _subpool_of_local: dict[PoolKind, tuple[int, ...]]  # kind -> local_to_subpool

    @property
    def num_local_layers(self) -> int:
        """Layers of this stage (``end_layer - start_layer``)."""
        return self.end_layer - self.start_layer

    @property
    def local_to_global(self) -> np.ndarray:
        """int32 ``[num_local_layers]``: global id of each stage-local layer."""
        return np.arange(self.start_layer, self.end_layer, dtype=np.int32)

    @property
    def attention_kinds(self) -> tuple[AttentionKind, ...]:
        """Attention kind of each stage-local layer."""
        return self.spec.attention_kinds[self.start_layer : self.end_layer]

    def kinds(self) -> tuple[PoolKind, ...]:
        """Sub-pools of the spec (a stage may hold zero layers of some)."""
        return self.spec.kinds()

    def local_to_subpool(self, kind: PoolKind) -> np.ndarray:
        """int32 ``[num_local_layers]``: sub-pool id of each local layer, -1 where absent."""
        return np.asarray(self._subpool_of_local[self.spec.check_kind(kind)], dtype=np.int32)

    def kind_local_ids(self, kind: PoolKind) -> np.ndarray:
        """int32: stage-local ids of the layers that have sub-pool ``kind``, ascending."""
        return np.flatnonzero(self.local_to_subpool(kind) >= 0).astype(np.int32)

    def subpool_to_global(self, kind: PoolKind) -> np.ndarray:
        """int32 ``[n_kind]``: global ids of the sub-pool's layers (``start_layer + local``)."""
        return (self.start_layer + self.kind_local_ids(kind)).astype(np.int32)

    def num_layers_of(self, kind: PoolKind) -> int:
        """Layers of this stage that hold ``kind`` (the size of its sub-pool layer space)."""
        return int(self.kind_local_ids(kind).size)

    def global_to_local(self, global_layer: int) -> int:
        """Stage-local id of ``global_layer``; ``ValueError`` if another stage owns it."""
        global_layer = as_index("global layer", global_layer)
        if not self.start_layer <= global_layer < self.end_layer:
            raise ValueError(
                f"global layer {global_layer} is not on stage {self.pp_rank} "
                f"[{self.start_layer}, {self.end_layer})"
            )
        return int(global_layer - self.start_layer)

    def global_id(self, local_layer: int) -> int:
        """Global id of a stage-local layer: the index into any global-length list."""
        return self.start_layer + self._check_local(local_layer)

    def subpool_id(self, kind: PoolKind, local_layer: int) -> int:
        """Sub-pool row of a stage-local layer; ``ValueError`` if it has no row in ``kind``."""
        local_layer = self._check_local(local_layer)
        k = int(self.local_to_subpool(kind)[local_layer])
        if k < 0:
            raise ValueError(
                f"local layer {local_layer} (global {self.start_layer + local_layer}) has no "
                f"{kind.value} row"
            )
        return k

    def _check_local(self, local_layer: int) -> int:
        local_layer = as_index("local layer", local_layer)
        if not 0 <= local_layer < self.num_local_layers:
            raise ValueError(
                f"local layer {local_layer} not in [0, {self.num_local_layers}) on stage {self.pp_rank}"
            )
        return local_layer

    def __repr__(self) -> str:
        counts = ", ".join(f"{k.value}={self.num_layers_of(k)}" for k in self.kinds())
        return (
            f"StageLayerMap(rank={self.pp_rank}/{self.pp_size}, layers=[{self.start_layer}, "
            f"{self.end_layer}), {counts})"
        )


def build_stage_layer_map(
    spec: ModelCacheSpec,
    pp_rank: int,
    pp_size: int,
    partition: Sequence[int] | None = None,
) -> StageLayerMap:
    """The layer map of stage ``pp_rank`` of ``pp_size``; checked before it is returned."""
    bounds = pp_partition(spec.num_layers, pp_size, partition)
    pp_rank, pp_size = as_index("pp_rank", pp_rank), as_index("pp_size", pp_size)
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank {pp_rank} not in [0, {pp_size})")
    start, end = bounds[pp_rank]
    subpool_of_local = {}
    for kind in spec.kinds():
        ids, k = [], 0
        for g in range(start, end):
            if spec.layer_has(kind, g):
                ids.append(k)
                k += 1
            else:
                ids.append(-1)
        subpool_of_local[kind] = tuple(ids)
    m = StageLayerMap(spec, pp_rank, pp_size, start, end, subpool_of_local)
    check_stage_layer_map(m)
    return m


def check_stage_layer_map(m: StageLayerMap) -> None:
    """chex-assert the invariants of one stage's maps (raises ``AssertionError``)."""
    n = m.num_local_layers
    l2g = m.local_to_global
    chex.assert_shape(l2g, (n,))
    np.testing.assert_array_equal(l2g - m.start_layer, np.arange(n))
    for kind in m.kinds():
        l2s = m.local_to_subpool(kind)
        local_ids = m.kind_local_ids(kind)
        s2g = m.subpool_to_global(kind)
        chex.assert_shape(l2s, (n,))
        chex.assert_equal(l2s.dtype, np.int32)
        # dense sub-pool ids 0..n_kind-1, in local order
        np.testing.assert_array_equal(l2s[local_ids], np.arange(local_ids.size))
        # sub-pool -> global -> local -> sub-pool is the identity
        np.testing.assert_array_equal(l2s[s2g - m.start_layer], np.arange(s2g.size))
        # state pools and any global list are addressed by start_layer + local
        np.testing.assert_array_equal(s2g, l2g[local_ids])
        # the spec agrees on which layers have the kind (never the MTP slot)
        expected = [g for g in range(m.start_layer, m.end_layer) if m.spec.layer_has(kind, g)]
        np.testing.assert_array_equal(s2g, np.asarray(expected, dtype=np.int32))


def build_layer_maps(
    spec: ModelCacheSpec, pp_size: int, partition: Sequence[int] | None = None
) -> tuple[StageLayerMap, ...]:
    """Maps of every stage; asserts every global layer lands in exactly one stage."""
    pp_partition(spec.num_layers, pp_size, partition)  # validates pp_size and partition
    maps = tuple(build_stage_layer_map(spec, r, pp_size, partition) for r in range(pp_size))
    owners = np.zeros(spec.num_layers, dtype=np.int32)
    for m in maps:
        owners[m.local_to_global] += 1
    chex.assert_trees_all_equal(owners, np.ones(spec.num_layers, dtype=np.int32))
    for kind in spec.kinds():
        joined = np.concatenate([m.subpool_to_global(kind) for m in maps])
        np.testing.assert_array_equal(joined, np.asarray(spec.layers_with(kind), dtype=np.int32))
    return maps


# ----------------------------------------------------------------- stacked form


@struct.dataclass
class StageView:
    """One stage's maps as (possibly traced) arrays; see :meth:`StackedLayerMap.stage`."""

    start_layer: jax.Array  # int32 []
    num_local_layers: jax.Array  # int32 []
    local_to_global: jax.Array  # int32 [max_local], -1 padding
    layer_valid: jax.Array  # bool [max_local]
    attention_kind: jax.Array  # int32 [max_local], AttentionKind value, -1 padding
    local_to_subpool: dict[PoolKind, jax.Array]  # int32 [max_local], -1 absent/padding
    subpool_to_global: dict[PoolKind, jax.Array]  # int32 [max_kind], -1 padding
    subpool_valid: dict[PoolKind, jax.Array]  # bool [max_kind]


@struct.dataclass
class StackedLayerMap:
    """All stages' maps with a leading ``pp`` axis, padded to the largest stage."""

    start_layer: np.ndarray  # int32 [pp]
    num_local_layers: np.ndarray  # int32 [pp]
    local_to_global: np.ndarray  # int32 [pp, max_local]
    layer_valid: np.ndarray  # bool [pp, max_local]
    attention_kind: np.ndarray  # int32 [pp, max_local]
    local_to_subpool: dict[PoolKind, np.ndarray]  # int32 [pp, max_local]
    subpool_to_global: dict[PoolKind, np.ndarray]  # int32 [pp, max_kind]
    subpool_valid: dict[PoolKind, np.ndarray]  # bool [pp, max_kind]
    pp_size: int = struct.field(pytree_node=False)
    max_local_layers: int = struct.field(pytree_node=False)

    def max_layers_of(self, kind: PoolKind) -> int:
        """Sub-pool rows per stage after padding (the pool array's layer axis)."""
        return int(self.subpool_to_global[kind].shape[1])

    def stage_at(self, rank: jax.Array | int) -> StageView:
        """The view of stage ``rank`` (``rank`` may be traced).

        A host ``rank`` must be an exact integer in ``[0, pp_size)``; a jax
        ``rank`` must be an integer scalar (its value is not checked when traced).
        """
        if isinstance(rank, jax.Array):
            if rank.shape != () or not jnp.issubdtype(rank.dtype, jnp.integer):
                raise ValueError(
                    f"rank must be an integer scalar, got a {rank.dtype} array of shape {rank.shape}"
                )
        else:
            rank = as_index("rank", rank)
            if not 0 <= rank < self.pp_size:
                raise ValueError(f"rank {rank} not in [0, {self.pp_size})")

        def pick(x):
            if isinstance(rank, int) and isinstance(x, np.ndarray):
                return x[rank]
            return jnp.asarray(x)[rank]

        return StageView(
            start_layer=pick(self.start_layer),
            num_local_layers=pick(self.num_local_layers),
            local_to_global=pick(self.local_to_global),
            layer_valid=pick(self.layer_valid),
            attention_kind=pick(self.attention_kind),
            local_to_subpool={k: pick(v) for k, v in self.local_to_subpool.items()},
            subpool_to_global={k: pick(v) for k, v in self.subpool_to_global.items()},
            subpool_valid={k: pick(v) for k, v in self.subpool_valid.items()},
        )

    def stage(self, axis_name: str = "pp") -> StageView:
        """Inside ``shard_map``: the running stage's view, via ``axis_index(axis_name)``."""
        return self.stage_at(jax.lax.axis_index(axis_name))


def stack_layer_maps(maps: Sequence[StageLayerMap]) -> StackedLayerMap:
    """Stack per-stage maps into the padded ``[pp, ...]`` form."""
    if not maps:
        raise ValueError("no stage maps to stack")
    pp = len(maps)
    if [m.pp_rank for m in maps] != list(range(pp)) or any(m.pp_size != pp for m in maps):
        raise ValueError(f"maps must be ranks 0..{pp - 1} of one pp_size={pp}")
    spec = maps[0].spec
    max_local = max(m.num_local_layers for m in maps)
    l2g = np.full((pp, max_local), -1, np.int32)
    att = np.full((pp, max_local), -1, np.int32)
    for r, m in enumerate(maps):
        l2g[r, : m.num_local_layers] = m.local_to_global
        att[r, : m.num_local_layers] = [int(a) for a in m.attention_kinds]
    l2s, s2g, sval = {}, {}, {}
    for kind in spec.kinds():
        max_kind = max(1, max(m.num_layers_of(kind) for m in maps))
        l2s[kind] = np.full((pp, max_local), -1, np.int32)
        s2g[kind] = np.full((pp, max_kind), -1, np.int32)
        for r, m in enumerate(maps):
            l2s[kind][r, : m.num_local_layers] = m.local_to_subpool(kind)
            s2g[kind][r, : m.num_layers_of(kind)] = m.subpool_to_global(kind)
        sval[kind] = s2g[kind] >= 0
    return StackedLayerMap(
        start_layer=np.asarray([m.start_layer for m in maps], np.int32),
        num_local_layers=np.asarray([m.num_local_layers for m in maps], np.int32),
        local_to_global=l2g,
        layer_valid=l2g >= 0,
        attention_kind=att,
        local_to_subpool=l2s,
        subpool_to_global=s2g,
        subpool_valid=sval,
        pp_size=pp,
        max_local_layers=max_local,
    )


def check_stage_view(view: StageView) -> None:
    """chex value-asserts on a (traced) stage view; wrap the caller with ``chex.chexify``.

    Checks: ``local_to_global == start_layer + l`` on valid layers, and for every
    kind ``subpool_to_global[k] == start_layer + l`` wherever
    ``local_to_subpool[l] == k`` (the state-pool addressing rule).
    """
    max_local = view.local_to_global.shape[0]
    lids = jnp.arange(max_local, dtype=jnp.int32)
    expect = jnp.where(view.layer_valid, view.start_layer + lids, -1)
    chex.assert_trees_all_equal(view.local_to_global, expect)
    chex.assert_trees_all_equal(view.layer_valid, lids < view.num_local_layers)
    for kind, l2s in view.local_to_subpool.items():
        s2g = view.subpool_to_global[kind]
        safe = jnp.clip(l2s, 0, s2g.shape[0] - 1)
        got = jnp.where(l2s >= 0, s2g[safe], -1)
        want = jnp.where(l2s >= 0, view.start_layer + lids, -1)
        chex.assert_trees_all_equal(got, want)
