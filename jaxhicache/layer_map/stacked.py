"""Every stage's layer maps as padded arrays, and the (traced) view of one stage.

:func:`stack_layer_maps` turns the per-stage :class:`StageLayerMap` objects into a
:class:`StackedLayerMap` whose arrays have a leading ``pp`` axis, padded to the
largest stage with ``-1``; a jitted program indexes it with the running stage
(:meth:`StackedLayerMap.stage` inside ``shard_map``) to get a :class:`StageView`.
:func:`check_stage_view` value-checks such a view under ``chex.chexify``.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxhicache.layer_map.stage import StageLayerMap, as_index
from jaxhicache.spec import PoolKind

__all__ = ["StackedLayerMap", "StageView", "check_stage_view", "stack_layer_maps"]


@struct.dataclass
class StageView:
    """One stage's maps as (possibly traced) arrays; see :meth:`StackedLayerMap.stage`.

    A pytree: every field is a leaf. Shapes are padded to the largest stage
    (``max_local``) and, per kind, to the most rows any stage has (``max_kind``).

    Attributes:
      start_layer: int32 ``[]``, the stage's first global layer.
      num_local_layers: int32 ``[]``, its layer count.
      local_to_global: int32 ``[max_local]``, global id per local layer, ``-1``
        padding.
      layer_valid: bool ``[max_local]``, ``True`` on the stage's real layers.
      attention_kind: int32 ``[max_local]``, the :class:`AttentionKind` value per
        local layer, ``-1`` padding.
      local_to_subpool: per kind, int32 ``[max_local]``, the sub-pool row per
        local layer, ``-1`` where absent or padding.
      subpool_to_global: per kind, int32 ``[max_kind]``, the global layer per
        sub-pool row, ``-1`` padding.
      subpool_valid: per kind, bool ``[max_kind]``, ``True`` on real rows.
    """

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
    """All stages' maps with a leading ``pp`` axis, padded to the largest stage.

    Build with :func:`stack_layer_maps`. A pytree whose array fields are leaves
    and whose two sizes are static. ``max_kind`` is the most rows of that kind on
    any stage, at least 1 (a kind with no layer anywhere keeps one padding row).

    Attributes:
      start_layer: int32 ``[pp]``, each stage's first global layer.
      num_local_layers: int32 ``[pp]``, each stage's layer count.
      local_to_global: int32 ``[pp, max_local]``, ``-1`` padding.
      layer_valid: bool ``[pp, max_local]``.
      attention_kind: int32 ``[pp, max_local]``, :class:`AttentionKind` values,
        ``-1`` padding.
      local_to_subpool: per kind, int32 ``[pp, max_local]``, ``-1`` where absent or
        padding.
      subpool_to_global: per kind, int32 ``[pp, max_kind]``, ``-1`` padding.
      subpool_valid: per kind, bool ``[pp, max_kind]``.
      pp_size: pipeline stages (static).
      max_local_layers: ``max_local``, the most layers of any stage (static).
    """

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
        """Sub-pool rows per stage after padding (the pool array's layer axis).

        Args:
          kind: a sub-pool of the stacked spec.

        Returns:
          ``max_kind`` of ``kind`` (at least 1).
        """
        return int(self.subpool_to_global[kind].shape[1])

    def stage_at(self, rank: jax.Array | int) -> StageView:
        """The view of stage ``rank`` (``rank`` may be traced).

        A host ``rank`` must be an exact integer in ``[0, pp_size)``; a jax
        ``rank`` must be an integer scalar (its value is not checked when traced).

        Args:
          rank: the stage, a Python/numpy integer or a jax integer scalar.

        Returns:
          The stage's :class:`StageView`: numpy rows for a host ``rank``, jax
          arrays for a jax one.

        Raises:
          ValueError: a jax ``rank`` that is not an integer scalar, or a host
            ``rank`` not an exact integer in ``[0, pp_size)``.
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
        """Inside ``shard_map``: the running stage's view, via ``axis_index(axis_name)``.

        Args:
          axis_name: the mesh axis of pipeline stages.

        Returns:
          The running stage's :class:`StageView`, traced.
        """
        return self.stage_at(jax.lax.axis_index(axis_name))


def stack_layer_maps(maps: Sequence[StageLayerMap]) -> StackedLayerMap:
    """Stack per-stage maps into the padded ``[pp, ...]`` form.

    Args:
      maps: every stage's map of one ``pp_size``, in rank order (what
        :func:`build_layer_maps` returns).

    Returns:
      The :class:`StackedLayerMap`; padding entries are ``-1`` (``False`` in the
      validity masks).

    Raises:
      ValueError: ``maps`` is empty, or its ranks are not ``0..pp-1`` in order of
        one ``pp_size == len(maps)``.
    """
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

    Args:
      view: a stage's view (:meth:`StackedLayerMap.stage_at` or
        :meth:`StackedLayerMap.stage`).
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
