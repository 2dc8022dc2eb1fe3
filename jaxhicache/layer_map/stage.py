"""One pipeline stage's layer maps, on the host: the partition and :class:`StageLayerMap`.

``pp_partition`` gives each stage its global layer range; ``build_stage_layer_map``
and ``build_layer_maps`` build the maps of one stage or all and assert their
invariants (``check_stage_layer_map``); ``as_index`` is the exact-integer check
every id and count passes. The index spaces and invariants are described in the
package docstring (:mod:`jaxhicache.layer_map`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import final

import chex
import numpy as np

from jaxhicache.spec import AttentionKind, ModelCacheSpec, PoolKind

__all__ = [
    "StageLayerMap",
    "as_index",
    "build_layer_maps",
    "build_stage_layer_map",
    "check_stage_layer_map",
    "pp_partition",
]


def as_index(name: str, value) -> int:
    """``value`` as a Python ``int`` if it is an exact integer, else ``ValueError`` naming it.

    Accepted: ``int``, numpy integer scalars and 0-d integer numpy arrays.
    Rejected: ``bool`` (and ``numpy.bool_``), floats (even ``11.0``), strings,
    ``None`` and anything else. Layer ids, ranks and counts are never truncated.

    Args:
      name: what ``value`` is, for the error message (``"pp_rank"``, ``"local layer"``).
      value: the candidate index. Its range is not checked here.

    Returns:
      ``value`` as a plain ``int``.

    Raises:
      ValueError: ``value`` is not an exact integer (message names ``name``, the
        value and its type).
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

    Args:
      num_layers: the model's layer count (``>= 1``; the MTP slot not counted).
      pp_size: pipeline stages (``>= 1``; without ``partition``, at most
        ``num_layers``).
      partition: layer count per stage, in rank order, or ``None`` for the default
        rule.

    Returns:
      ``pp_size`` half-open global ranges ``(start, end)``, contiguous from 0 to
      ``num_layers``, each non-empty.

    Raises:
      ValueError: a count that is not an exact integer; ``num_layers`` or
        ``pp_size`` below 1; ``pp_size > num_layers`` under the default rule;
        ``partition`` not a sequence (a string included), of the wrong length,
        with a stage below 1 layer, or not summing to ``num_layers``.
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
    """Layer maps of one pipeline stage. Build with :func:`build_stage_layer_map`.

    Frozen; compared by identity. The stage owns the global layers
    ``[start_layer, end_layer)``.

    Attributes:
      spec: the model's cache spec.
      pp_rank: this stage's rank in ``[0, pp_size)``.
      pp_size: pipeline stages.
      start_layer: first global layer of the stage.
      end_layer: one past its last global layer.
      _subpool_of_local: per sub-pool kind, the sub-pool id of each stage-local
        layer (``-1`` where the layer has no row); read it through
        :meth:`local_to_subpool`.
    """

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
        """Sub-pools of the spec (a stage may hold zero layers of some).

        Returns:
          The spec's kinds in canonical order (``spec.kinds()``), the same on
          every stage.
        """
        return self.spec.kinds()

    def local_to_subpool(self, kind: PoolKind) -> np.ndarray:
        """int32 ``[num_local_layers]``: sub-pool id of each local layer, -1 where absent.

        Args:
          kind: a sub-pool the spec caches.

        Returns:
          A new array; entry ``l`` is the row of local layer ``l`` in this stage's
          ``kind`` sub-pool, or ``-1``.

        Raises:
          ValueError: ``kind`` is not a :class:`PoolKind` the spec caches.
        """
        return np.asarray(self._subpool_of_local[self.spec.check_kind(kind)], dtype=np.int32)

    def kind_local_ids(self, kind: PoolKind) -> np.ndarray:
        """int32: stage-local ids of the layers that have sub-pool ``kind``, ascending.

        Args:
          kind: a sub-pool the spec caches.

        Returns:
          ``[n_kind]`` local ids; entry ``k`` is the local layer of sub-pool row ``k``.

        Raises:
          ValueError: as :meth:`local_to_subpool` raises it.
        """
        return np.flatnonzero(self.local_to_subpool(kind) >= 0).astype(np.int32)

    def subpool_to_global(self, kind: PoolKind) -> np.ndarray:
        """int32 ``[n_kind]``: global ids of the sub-pool's layers (``start_layer + local``).

        Args:
          kind: a sub-pool the spec caches.

        Returns:
          Entry ``k`` is the global layer of row ``k`` of this stage's ``kind``
          sub-pool, ascending.

        Raises:
          ValueError: as :meth:`local_to_subpool` raises it.
        """
        return (self.start_layer + self.kind_local_ids(kind)).astype(np.int32)

    def num_layers_of(self, kind: PoolKind) -> int:
        """Layers of this stage that hold ``kind`` (the size of its sub-pool layer space).

        Args:
          kind: a sub-pool the spec caches.

        Returns:
          The count, possibly 0.

        Raises:
          ValueError: as :meth:`local_to_subpool` raises it.
        """
        return int(self.kind_local_ids(kind).size)

    def global_to_local(self, global_layer: int) -> int:
        """Stage-local id of ``global_layer``; ``ValueError`` if another stage owns it.

        Args:
          global_layer: a global layer id (an exact integer, :func:`as_index`).

        Returns:
          ``global_layer - start_layer``.

        Raises:
          ValueError: not an exact integer, or outside ``[start_layer, end_layer)``.
        """
        global_layer = as_index("global layer", global_layer)
        if not self.start_layer <= global_layer < self.end_layer:
            raise ValueError(
                f"global layer {global_layer} is not on stage {self.pp_rank} "
                f"[{self.start_layer}, {self.end_layer})"
            )
        return int(global_layer - self.start_layer)

    def global_id(self, local_layer: int) -> int:
        """Global id of a stage-local layer: the index into any global-length list.

        Args:
          local_layer: a stage-local id in ``[0, num_local_layers)``.

        Returns:
          ``start_layer + local_layer``.

        Raises:
          ValueError: not an exact integer, or out of the stage's local range.
        """
        return self.start_layer + self._check_local(local_layer)

    def subpool_id(self, kind: PoolKind, local_layer: int) -> int:
        """Sub-pool row of a stage-local layer; ``ValueError`` if it has no row in ``kind``.

        Args:
          kind: a sub-pool the spec caches.
          local_layer: a stage-local id in ``[0, num_local_layers)``.

        Returns:
          The layer's row in this stage's ``kind`` sub-pool, in ``[0, n_kind)``.

        Raises:
          ValueError: ``local_layer`` not an exact integer or out of range,
            ``kind`` not cached by the spec, or the layer has no ``kind`` row.
        """
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
    """The layer map of stage ``pp_rank`` of ``pp_size``; checked before it is returned.

    Args:
      spec: the model's cache spec.
      pp_rank: the stage, in ``[0, pp_size)``.
      pp_size: pipeline stages.
      partition: layer count per stage, or ``None`` for :func:`pp_partition`'s
        default rule.

    Returns:
      The stage's map, its invariants (module docstring) asserted.

    Raises:
      ValueError: as :func:`pp_partition` raises it, or ``pp_rank`` not an exact
        integer in ``[0, pp_size)``.
    """
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
    """Maps of every stage; asserts every global layer lands in exactly one stage.

    Also asserts that, per sub-pool kind, the stages' sub-pool layers joined in
    rank order are the spec's layers of that kind.

    Args:
      spec: the model's cache spec.
      pp_size: pipeline stages.
      partition: layer count per stage, or ``None`` for :func:`pp_partition`'s
        default rule.

    Returns:
      ``pp_size`` maps in rank order.

    Raises:
      ValueError: as :func:`pp_partition` raises it.
    """
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
