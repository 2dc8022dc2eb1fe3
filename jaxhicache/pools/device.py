"""Device (L1) pool state: every sub-pool of a spec as stage-stacked arrays.

``DevicePools.arrays[kind]`` has shape ``[pp, max_layers_of_kind, pages, *row]``
where ``pages`` is ``num_pages`` for full-page-space kinds, ``num_swa_pages`` for
SWA-space kinds and ``num_state_slots`` (snapshot slots) for recurrent-state kinds
(``PoolKind.page_space``). Stages with
fewer layers of a kind than the largest stage carry padding rows that no map
addresses (``StackedLayerMap.subpool_valid``). Arrays are created directly with
their ``NamedSharding`` (no host round trip): each device holds only its
stage's slice.

This module is data plane: it holds arrays and sizes them; page ownership
lives in the allocators and the radix tree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from jaxhicache.layer_map import StackedLayerMap, StageLayerMap, stack_layer_maps
from jaxhicache.mesh import PP, pool_sharding
from jaxhicache.spec import ModelCacheSpec, PageSpace, PoolKind

__all__ = [
    "DevicePools",
    "allocate_device_pools",
    "device_bytes_per_stage",
    "pages_of_space",
    "pool_shape",
]


@struct.dataclass
class DevicePools:
    """Device sub-pools of one model, a pytree of ``[pp, layers, pages, *row]`` arrays.

    Build with :func:`allocate_device_pools`. ``pools[kind]`` is ``kind``'s array
    (``ValueError`` for a kind these pools lack). The arrays are the leaves; the
    page counts are static, so a jitted function recompiles when they change.

    Attributes:
      arrays: one array per sub-pool kind of the spec, in the spec's order.
      num_pages: pages of every full-page-space array (their axis 2).
      num_swa_pages: pages of every SWA-space array (0 when the spec has none).
      num_state_slots: snapshot slots of every recurrent-state array (0 when the
        spec has none).
    """

    arrays: dict[PoolKind, jax.Array]
    num_pages: int = struct.field(pytree_node=False)
    num_swa_pages: int = struct.field(pytree_node=False)
    num_state_slots: int = struct.field(pytree_node=False, default=0)

    def __getitem__(self, kind: PoolKind) -> jax.Array:
        try:
            return self.arrays[kind]
        except KeyError:
            raise ValueError(
                f"no device pool of kind {kind!r}; have {[k.value for k in self.arrays]}"
            ) from None

    def replace_pool(self, kind: PoolKind, array: jax.Array) -> DevicePools:
        """A copy with ``kind``'s array replaced (``ValueError`` for a kind these pools lack).

        ``array``'s shape, dtype and sharding are not checked; a model's forward
        passes back what it read, updated in place.

        Args:
          kind: a kind these pools hold.
          array: the new array of that sub-pool.

        Returns:
          New :class:`DevicePools`; ``self`` is unchanged.

        Raises:
          ValueError: ``kind`` is not one of :meth:`kinds`.
        """
        self[kind]  # raises for an unknown kind
        return dataclasses.replace(self, arrays={**self.arrays, kind: array})

    def ids_of(self, space: PageSpace) -> int:
        """The id count of a space in these pools.

        Args:
          space: a page space (``STATE``: snapshot slots).

        Returns:
          ``num_pages``, ``num_swa_pages`` or ``num_state_slots``.
        """
        return {
            PageSpace.FULL: self.num_pages,
            PageSpace.SWA: self.num_swa_pages,
            PageSpace.STATE: self.num_state_slots,
        }[PageSpace(space)]

    def kinds(self) -> tuple[PoolKind, ...]:
        """The pool kinds held, in the spec's order.

        Returns:
          The keys of ``arrays``.
        """
        return tuple(self.arrays)


def pages_of_space(
    kind: PoolKind, num_pages: int, num_swa_pages: int, num_state_slots: int = 0
) -> int:
    """The id count of ``kind``'s space: full pages, SWA pages or snapshot slots.

    Args:
      kind: a sub-pool kind; its :attr:`PoolKind.page_space` decides.
      num_pages: pages of the full-page space.
      num_swa_pages: pages of the SWA space.
      num_state_slots: slots of the recurrent-state space.

    Returns:
      ``num_pages``, ``num_swa_pages`` or ``num_state_slots``.
    """
    return {
        PageSpace.FULL: num_pages,
        PageSpace.SWA: num_swa_pages,
        PageSpace.STATE: num_state_slots,
    }[kind.page_space]


def pool_shape(
    spec: ModelCacheSpec,
    stacked: StackedLayerMap,
    kind: PoolKind,
    num_pages: int,
    num_swa_pages: int,
    num_state_slots: int = 0,
) -> tuple[int, ...]:
    """Global shape of the device array of sub-pool ``kind``.

    Args:
      spec: the model's cache spec.
      stacked: every stage's maps (gives ``pp`` and the padded layer count).
      kind: a sub-pool the spec caches.
      num_pages: pages of the full-page space.
      num_swa_pages: pages of the SWA space.
      num_state_slots: slots of the recurrent-state space.

    Returns:
      ``(pp, max_layers_of(kind), pages, *row_shape(kind))``; the stage axis is
      the one sharded over ``'pp'``.

    Raises:
      ValueError: ``kind`` is not cached by ``spec``.
    """
    pages = pages_of_space(spec.check_kind(kind), num_pages, num_swa_pages, num_state_slots)
    return (stacked.pp_size, stacked.max_layers_of(kind), pages, *spec.row_shape(kind))


def _check_counts(
    spec: ModelCacheSpec, num_pages: int, num_swa_pages: int, num_state_slots: int
) -> None:
    if num_pages < 1:
        raise ValueError(f"num_pages must be >= 1, got {num_pages}")
    spaces = {k.page_space for k in spec.kinds()}
    if PageSpace.SWA in spaces and num_swa_pages < 1:
        raise ValueError(f"num_swa_pages must be >= 1 for spec {spec.name!r}, got {num_swa_pages}")
    if PageSpace.STATE in spaces and num_state_slots < 1:
        raise ValueError(
            f"num_state_slots must be >= 1 for spec {spec.name!r}, got {num_state_slots}"
        )


def allocate_device_pools(
    spec: ModelCacheSpec,
    mesh: Mesh,
    layer_maps: Sequence[StageLayerMap] | StackedLayerMap,
    num_pages: int,
    num_swa_pages: int = 0,
    num_state_slots: int = 0,
) -> DevicePools:
    """Zero-filled pools, created sharded ``P('pp', ...)`` on ``mesh``.

    One jitted program creates every array with its sharding, so no device holds
    more than its stage's slice and nothing goes through the host.

    Args:
      spec: the model's cache spec; one array per kind it caches.
      mesh: the ``('pp', 'tp')`` mesh (:func:`jaxhicache.mesh.make_mesh`).
      layer_maps: every stage's map in rank order, or them already stacked.
      num_pages: pages of the full-page space (``>= 1``).
      num_swa_pages: pages of the SWA space (``>= 1`` when the spec has an SWA
        kind; ignored otherwise).
      num_state_slots: snapshot slots of the recurrent-state space (``>= 1`` when
        the spec has recurrent states; ignored otherwise).

    Returns:
      The :class:`DevicePools`, zero-filled in each kind's row dtype.

    Raises:
      ValueError: a page count below its minimum, the mesh's ``'pp'`` size
        differs from the maps' stage count, or (from
        :func:`jaxhicache.mesh.pool_sharding`) heads not divisible by ``'tp'``.
    """
    _check_counts(spec, num_pages, num_swa_pages, num_state_slots)
    stacked = _stacked(layer_maps)
    if mesh.shape[PP] != stacked.pp_size:
        raise ValueError(f"mesh has pp={mesh.shape[PP]}, layer maps have pp={stacked.pp_size}")
    counts = (num_pages, num_swa_pages, num_state_slots)
    shapes = {k: pool_shape(spec, stacked, k, *counts) for k in spec.kinds()}
    shardings = {k: pool_sharding(spec, mesh, k) for k in spec.kinds()}

    def zeros():
        return {k: jnp.zeros(shapes[k], spec.row_dtype(k)) for k in spec.kinds()}

    arrays = jax.jit(zeros, out_shardings=shardings)()
    return DevicePools(
        arrays=arrays,
        num_pages=num_pages,
        num_swa_pages=num_swa_pages,
        num_state_slots=num_state_slots,
    )


def device_bytes_per_stage(
    spec: ModelCacheSpec,
    layer_maps: Sequence[StageLayerMap],
    num_pages: int,
    num_swa_pages: int = 0,
    num_state_slots: int = 0,
    *,
    padded: bool = True,
) -> list[int]:
    """Device bytes each stage holds for the given page counts.

    ``padded=True`` counts the stage-padded allocation (what ``allocate_device_pools``
    reserves per device); ``padded=False`` counts only the stage's real layers.

    Args:
      spec: the model's cache spec.
      layer_maps: every stage's map, in rank order.
      num_pages: pages of the full-page space (``>= 1``).
      num_swa_pages: pages of the SWA space (``>= 1`` when the spec has an SWA kind).
      num_state_slots: snapshot slots (``>= 1`` when the spec has recurrent states).
      padded: count the padding rows too.

    Returns:
      Bytes per stage, in rank order, counting whole rows: a kind replicated
      over ``'tp'`` is held this size on each of the stage's devices, a
      heads-sharded kind is split over them.

    Raises:
      ValueError: a page count below its minimum, or maps that do not stack
        (:func:`jaxhicache.layer_map.stack_layer_maps`).
    """

    _check_counts(spec, num_pages, num_swa_pages, num_state_slots)
    stacked = stack_layer_maps(layer_maps)
    out = []
    for m in layer_maps:
        total = 0
        for kind in spec.kinds():
            layers = stacked.max_layers_of(kind) if padded else m.num_layers_of(kind)
            pages = pages_of_space(kind, num_pages, num_swa_pages, num_state_slots)
            total += layers * pages * spec.row_bytes(kind)
        out.append(total)
    return out


def _stacked(layer_maps: Sequence[StageLayerMap] | StackedLayerMap) -> StackedLayerMap:
    if isinstance(layer_maps, StackedLayerMap):
        return layer_maps
    return stack_layer_maps(layer_maps)
