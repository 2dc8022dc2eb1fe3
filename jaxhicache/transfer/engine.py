"""The transfer engine: validated, counted page moves between ``DevicePools`` and ``HostPools``.

One engine serves every PP stage from one controller: each call is one
dispatch in which every stage moves its own layers with the ids shared by all
stages. The engine validates ids on the host (interpret mode clamps and resolves
duplicates last-wins; a GPU does neither predictably), pads them to power-of-two
buckets, and hands the bytes to its :class:`~jaxhicache.transfer.strategy.CopyStrategy`.

Functional API: the pools go in and (for loads) new pools come out. A backup
reads the pools and never keeps them; a load donates them.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from typing import final

import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxhicache.distributed import local_stages, put_global
from jaxhicache.layer_map import StageLayerMap, stack_layer_maps
from jaxhicache.mesh import PP, TP, pool_partition_spec
from jaxhicache.pools.device import DevicePools
from jaxhicache.pools.host import HostPools
from jaxhicache.spec import PageSpace
from jaxhicache.transfer.layerwise import LayerwiseLoad
from jaxhicache.transfer.moves import (
    BackupHandle,
    LoadHandle,
    PageMove,
    TransferStats,
    bucketed_ids,
)
from jaxhicache.transfer.programs import TransferPrograms
from jaxhicache.transfer.strategy import (
    CopyPath,
    CopyStrategy,
    DirectCopy,
    StagedCopy,
    TransferContext,
    mesh_platform,
    resolve_copy_path,
)
from kernels_pallas.common import Backend, PagedCopyTuning, validate_page_ids

__all__ = ["TransferEngine"]

_STRATEGIES: dict[CopyPath, type[CopyStrategy]] = {
    CopyPath.STAGED: StagedCopy,
    CopyPath.DIRECT: DirectCopy,
}


@final
class TransferEngine:
    """Moves pages of every sub-pool of every stage between ``DevicePools`` and ``HostPools``.

    Args:
      mesh: the ``('pp', 'tp')`` mesh the device pools live on.
      layer_maps: every stage's map (rank order).
      host: the host slabs.
      backend: kernel backend (``None``: Triton on a GPU mesh, else XLA).
      tuning: Pallas launch parameters.
      host_is_current: ``(space, host_ids, generations) -> bool mask``; rows whose
        host page was freed or reallocated since the backup was issued are not
        written (the allocator's generation check). ``None``: always current.
      copy_path: :class:`CopyPath`; ``None``: DIRECT iff the mesh's devices are
        CPUs, else STAGED.

    Raises:
      ValueError: the mesh's ``pp`` size differs from the number of layer maps,
        the host pools hold other stages than this process owns, DIRECT on a
        non-CPU mesh, or a mesh mixing device platforms.
    """

    def __init__(
        self,
        mesh: Mesh,
        layer_maps: Sequence[StageLayerMap],
        host: HostPools,
        *,
        backend: Backend | None = None,
        tuning: PagedCopyTuning | None = None,
        host_is_current: Callable[[PageSpace, np.ndarray, np.ndarray], np.ndarray] | None = None,
        copy_path: CopyPath | None = None,
    ):
        self.mesh = mesh
        self.layer_maps = tuple(layer_maps)
        self.spec = host.spec
        self.host = host
        self.stacked = stack_layer_maps(self.layer_maps)
        if mesh.shape[PP] != len(self.layer_maps):
            raise ValueError(
                f"mesh has pp={mesh.shape[PP]}, layer maps have {len(self.layer_maps)} stages"
            )
        mine = local_stages(mesh)
        if host.ranks != mine:
            raise ValueError(
                f"the host pools hold stages {list(host.ranks)} but this process owns stages "
                f"{list(mine)} of the mesh (HostPools(..., ranks=local_stages(mesh)))"
            )
        self.copy_path = resolve_copy_path(mesh, copy_path)
        if backend is None:
            backend = Backend.TRITON if mesh_platform(mesh) == "gpu" else Backend.XLA
        self.backend = Backend(backend)
        self.tuning = tuning or PagedCopyTuning()
        self.stats = TransferStats()
        self._lock = threading.Lock()
        self._replicated = NamedSharding(mesh, P())
        kinds = tuple(self.spec.kinds())
        specs = {k: pool_partition_spec(self.spec, k, mesh.shape[TP]) for k in kinds}
        programs = TransferPrograms(
            mesh,
            self.stacked,
            specs,
            backend=self.backend,
            tuning=self.tuning,
            slab_layout=host.layout,
        )
        self.programs = programs
        ctx = TransferContext(
            mesh=mesh,
            layer_maps=self.layer_maps,
            stacked=self.stacked,
            host=host,
            kinds=kinds,
            pool_specs=specs,
            programs=programs,
            stats=self.stats,
            lock=self._lock,
            host_is_current=host_is_current,
        )
        self.strategy: CopyStrategy = _STRATEGIES[self.copy_path](ctx)

    def close(self) -> None:
        """Stops the copy strategy's worker threads (in-flight copies finish first)."""
        self.strategy.close()

    def stats_snapshot(self) -> TransferStats:
        """A consistent copy of the counters (the D2H worker updates them concurrently).

        Returns:
          A new :class:`TransferStats`.
        """
        with self._lock:
            return dataclasses.replace(self.stats)

    # ----------------------------------------------------------------- backup

    def backup(self, pools: DevicePools, move: PageMove, host_generations=None) -> BackupHandle:
        """Starts a D2H backup of ``move`` for all local layers of every sub-pool.

        Args:
          pools: the device pools; read, never kept or donated.
          move: device pages to copy and the host pages they go to (host ids
            distinct per space).
          host_generations: ``{space: generations of move's host ids}`` taken when
            the host pages were allocated; rows whose pages changed generation
            since are skipped when the copy lands (with ``host_is_current``).

        Returns:
          A :class:`BackupHandle` (already finished on the DIRECT path).

        Raises:
          ValueError: an id out of range, or a repeated host id.
        """
        t0 = time.perf_counter()
        ids = self._device_ids(pools, move, unique=False)
        self._check_host_ids(move, unique=True)
        return self.strategy.backup(pools, move, ids, dict(host_generations or {}), t0)

    # ------------------------------------------------------------------- load

    def load(
        self, pools: DevicePools, move: PageMove, layer: int | None = None
    ) -> tuple[DevicePools, LoadHandle]:
        """H2D: writes ``move``'s host pages into the (donated) device pools.

        Args:
          pools: the device pools; donated (use the returned ones).
          move: host pages to copy and the device pages they go to (device ids
            distinct per space).
          layer: one stage-local layer id (every stage loads its own local layer
            ``layer`` into the sub-pool rows that layer owns, if any), or ``None``
            for all layers.

        Returns:
          ``(pools, handle)``: the new pools and a :class:`LoadHandle` to wait on.

        Raises:
          ValueError: ``layer`` outside ``[0, max local layers)``, an id out of
            range, or a repeated device id.
        """
        t0 = time.perf_counter()
        if layer is not None and not 0 <= layer < self.stacked.max_local_layers:
            raise ValueError(
                f"stage-local layer {layer} not in [0, {self.stacked.max_local_layers})"
            )
        if layer is not None:
            lw = self.prepare_layerwise(pools, move)
            if lw is None:
                return pools, LoadHandle({})
            return self._apply_layers(pools, lw, [layer])
        ids = self._device_ids(pools, move, unique=True)
        self._check_host_ids(move, unique=False)
        arrays, token, nbytes = self.strategy.load_all(pools, move, ids)
        self._count_load(nbytes, t0)
        return dataclasses.replace(pools, arrays=arrays), LoadHandle({None: token})

    def load_layerwise(self, pools: DevicePools, move: PageMove) -> tuple[DevicePools, LoadHandle]:
        """Loads layer by layer (stage-local order): one program per layer, each donating the pools.

        On the DIRECT path (CPU, no link to overlap) this is one all-layer load and
        every layer's wait is its completion. A forward that should start before
        the last layer landed takes :meth:`prepare_layerwise`'s load instead.

        Args:
          pools: the device pools; donated (use the returned ones).
          move: as in :meth:`load`.

        Returns:
          ``(pools, handle)``; ``handle.wait(l)`` returns once layer ``l`` landed.

        Raises:
          ValueError: as :meth:`load` raises it.
        """
        if self.copy_path is CopyPath.DIRECT:
            pools, handle = self.load(pools, move)
            token = handle._tokens[None]
            return pools, LoadHandle({lyr: token for lyr in range(self.stacked.max_local_layers)})
        lw = self.prepare_layerwise(pools, move)
        if lw is None:
            return pools, LoadHandle({})
        return self._apply_layers(pools, lw, range(self.stacked.max_local_layers))

    def prepare_layerwise(self, pools: DevicePools, move: PageMove) -> LayerwiseLoad | None:
        """``move`` as a :class:`LayerwiseLoad` for a forward to apply layer by layer.

        The load's host pages must not be rewritten until the consuming program
        ran (a cache keeps them locked).

        Args:
          pools: only read for its page counts (the ids' sentinels); neither
            donated nor kept.
          move: as in :meth:`load`.

        Returns:
          The load, or ``None`` when the move is empty.

        Raises:
          ValueError: an id out of range, or a repeated device id (validated here).
        """
        t0 = time.perf_counter()
        if move.empty:
            return None
        ids = self._device_ids(pools, move, unique=True)
        self._check_host_ids(move, unique=False)
        lw = self.strategy.layerwise(pools, move, ids)
        self._count_load(lw.nbytes, t0)
        return lw

    def apply_layerwise(
        self, pools: DevicePools, load: LayerwiseLoad
    ) -> tuple[DevicePools, LoadHandle]:
        """Applies a prepared layer-wise load on its own (every layer), e.g. when the
        forward that was to carry it will not run: its pages must land anyway, the
        cache already counts them as device-resident.

        Args:
          pools: the device pools; donated (use the returned ones).
          load: what :meth:`prepare_layerwise` returned.

        Returns:
          ``(pools, handle)`` as :meth:`load_layerwise` returns them.
        """
        return self._apply_layers(pools, load, range(self.stacked.max_local_layers))

    def _apply_layers(self, pools: DevicePools, lw: LayerwiseLoad, layers):
        tokens = {}
        arrays = pools.arrays
        for lyr in layers:
            layer = put_global(np.int32(lyr), self._replicated)
            arrays, tokens[lyr] = self.programs.layer_load(arrays, lw, layer)
            if isinstance(self.strategy, DirectCopy):
                self.strategy.reading_slabs(tokens[lyr])
        return dataclasses.replace(pools, arrays=arrays), LoadHandle(tokens)

    # -------------------------------------------------------------- internals

    def _count_load(self, nbytes: int, t0: float) -> None:
        with self._lock:
            self.stats.loads += 1
            self.stats.load_bytes += nbytes
            self.stats.load_seconds += time.perf_counter() - t0

    def _device_ids(self, pools: DevicePools, move: PageMove, *, unique: bool):
        out = {}
        for space in PageSpace:
            num = pools.ids_of(space)
            ids = bucketed_ids(move.ids(space)[0], num, unique=unique)
            out[space] = put_global(ids, self._replicated)  # the same in every process
        return out

    def _check_host_ids(self, move: PageMove, *, unique: bool) -> None:
        for space in PageSpace:
            validate_page_ids(move.ids(space)[1], self.host.pages_of(space), unique=unique)
