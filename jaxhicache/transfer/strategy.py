"""Copy strategies: how page rows travel between the device pools and the host slabs.

:class:`CopyPath` names the two strategies; :func:`resolve_copy_path` picks one
from the mesh's device platform (never from ``jax.default_backend()``):

* :class:`StagedCopy` (any platform; the only one on GPU). Backup: the gather
  program copies the pages of all local layers into a device staging buffer, one
  ``device_put`` moves it to ``pinned_host`` memory, a worker thread copies the
  rows into the slabs. Load: the slabs' rows are copied into a reused
  page-aligned host staging buffer, moved to the devices, and scattered into the
  donated pools. Layer-wise: the staging goes to ``pinned_host`` memory once and
  each layer's rows move to the device inside the consuming program.
* :class:`DirectCopy` (CPU meshes only, where device memory is host memory).
  Backup copies page rows straight from the pool buffers into the slabs, in the
  calling thread; loads read the slabs through zero-copy device aliases. Every
  byte is copied once.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import enum
import threading
import time
from collections.abc import Callable
from typing import ClassVar, final

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxhicache.distributed import put_global
from jaxhicache.layer_map import StackedLayerMap, StageLayerMap
from jaxhicache.pools.device import DevicePools
from jaxhicache.pools.host import HostPools
from jaxhicache.spec import PageSpace, PoolKind
from jaxhicache.transfer.layerwise import LayerwiseLoad
from jaxhicache.transfer.moves import BackupHandle, PageMove, TransferStats, bucketed_ids
from jaxhicache.transfer.programs import TransferPrograms
from jaxhicache.transfer.staging import StagingBuffers, alias_sharded, replica0_views

__all__ = [
    "CopyPath",
    "CopyStrategy",
    "DirectCopy",
    "StagedCopy",
    "TransferContext",
    "mesh_platform",
    "resolve_copy_path",
]


class CopyPath(enum.Enum):
    """How rows travel between device pools and host slabs (see the module docstring)."""

    STAGED = "staged"
    DIRECT = "direct"


def mesh_platform(mesh: Mesh) -> str:
    """The platform of the mesh's devices (``'cpu'``, ``'gpu'``, ...); one per mesh."""
    platforms = {d.platform for d in mesh.devices.flat}
    if len(platforms) != 1:
        raise ValueError(f"the mesh mixes device platforms {sorted(platforms)}")
    return platforms.pop()


def resolve_copy_path(mesh: Mesh, copy_path: CopyPath | str | None) -> CopyPath:
    """``None`` -> DIRECT iff the mesh's devices are CPUs, else STAGED.

    DIRECT on a non-CPU mesh raises ``ValueError`` naming the platform.
    """
    platform = mesh_platform(mesh)
    if copy_path is None:
        return CopyPath.DIRECT if platform == "cpu" else CopyPath.STAGED
    path = CopyPath(copy_path)
    if path is CopyPath.DIRECT and platform != "cpu":
        kind = mesh.devices.flat[0].device_kind
        raise ValueError(
            f"CopyPath.DIRECT needs a CPU mesh (device memory = host memory); this mesh's "
            f"devices are {platform} ({kind}): use CopyPath.STAGED"
        )
    return path


def host_memory_kind(mesh: Mesh) -> str:
    """``'pinned_host'`` when the mesh's devices have it, else ``'unpinned_host'``."""
    kinds = {m.kind for m in mesh.devices.flat[0].addressable_memories()}
    for kind in ("pinned_host", "unpinned_host"):
        if kind in kinds:
            return kind
    raise ValueError(f"the mesh's devices have no host memory space (memories: {sorted(kinds)})")


@dataclasses.dataclass(frozen=True)
class TransferContext:
    """What every strategy shares with the engine (built once by the engine)."""

    mesh: Mesh
    layer_maps: tuple[StageLayerMap, ...]
    stacked: StackedLayerMap
    host: HostPools
    kinds: tuple[PoolKind, ...]
    pool_specs: dict[PoolKind, P]
    programs: TransferPrograms
    stats: TransferStats
    lock: threading.Lock
    host_is_current: Callable[[PageSpace, np.ndarray, np.ndarray], np.ndarray] | None

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def sharding(self, kind: PoolKind, memory_kind: str | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, self.pool_specs[kind], memory_kind=memory_kind)


class CopyStrategy(abc.ABC):
    """One way of moving rows; the engine validates ids and keeps the counters.

    ``ids`` arguments are ``{space: bucketed device ids}`` (sentinel-padded),
    already validated against the pools; host ids are validated too.

    Args:
      ctx: what the strategy shares with its engine (mesh, layer maps, host
        slabs, programs, counters and their lock).
    """

    path: ClassVar[CopyPath]

    def __init__(self, ctx: TransferContext):
        self.ctx = ctx

    @abc.abstractmethod
    def backup(self, pools: DevicePools, move: PageMove, ids, gens, t0: float) -> BackupHandle:
        """Starts copying ``move``'s device pages of every local layer into the slabs.

        Args:
          pools: the device pools (read, not kept).
          move: the pages.
          ids: ``{space: bucketed device ids}`` of ``move``.
          gens: ``{space: generations of move's host ids}`` (may be empty): rows
            whose host page changed generation are skipped.
          t0: ``time.perf_counter()`` when the engine was called (for the counters).

        Returns:
          A :class:`BackupHandle` whose result is the bytes written.
        """

    @abc.abstractmethod
    def load_all(self, pools: DevicePools, move: PageMove, ids) -> tuple[dict, jax.Array, int]:
        """Issues one all-layer H2D into the donated pools.

        Args:
          pools: the device pools (their arrays donated).
          move: the pages.
          ids: ``{space: bucketed device ids}`` of ``move``.

        Returns:
          ``(arrays, token, bytes)``: the new pool arrays, an output that is ready
          when the load landed, and the row bytes written.
        """

    @abc.abstractmethod
    def layerwise(self, pools: DevicePools, move: PageMove, ids) -> LayerwiseLoad:
        """``move`` as a :class:`LayerwiseLoad`.

        Args:
          pools: the device pools (read for their page counts, never donated).
          move: the pages.
          ids: ``{space: bucketed device ids}`` of ``move``.

        Returns:
          The load, for a forward (or :meth:`TransferEngine.apply_layerwise`).
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Finishes pending work; the strategy is unusable after."""

    # --------------------------------------------------------- shared pieces

    def _load(self, pools: DevicePools, move: PageMove, ids, rows, host_ids, slab_layout):
        ctx = self.ctx
        return LayerwiseLoad(
            rows=rows,
            device_ids=dict(ids),
            host_ids=host_ids,
            slab_layout=slab_layout,
            row_specs=tuple((k, ctx.pool_specs[k]) for k in ctx.kinds),
            num_pages=pools.num_pages,
            num_swa_pages=pools.num_swa_pages,
            nbytes=self._load_bytes(move),
            backend=ctx.programs.backend,
            tuning=ctx.programs.tuning,
        )

    def _load_bytes(self, move: PageMove) -> int:
        """Real row bytes a load of ``move`` writes here (this process's stages' layers)."""
        ctx = self.ctx
        return sum(
            move.ids(k.page_space)[1].size * m.num_layers_of(k) * ctx.host.spec.row_bytes(k)
            for k in ctx.kinds
            for m in ctx.host.local_maps
        )

    def _aliased(self, kind: PoolKind, buf: np.ndarray, memory_kind=None, *, may_alias=True):
        """A global array of ``kind``'s pool sharding over this process's stage rows."""
        ctx = self.ctx
        return alias_sharded(
            ctx.sharding(kind, memory_kind),
            buf,
            ctx.host.ranks,
            len(ctx.layer_maps),
            may_alias=may_alias,
        )

    def _land_backup(self, views, move: PageMove, gens, t0: float, from_pool: bool) -> int:
        """Copies rows into the slabs, skipping host pages that went stale; returns bytes.

        ``views[kind][rank] = [(array, row_index)]``: the staging ``[1, Lk, nb, *row]``
        or, with ``from_pool``, the pool itself ``[1, Lk, P, *row]`` (rows picked with
        the move's device ids).
        """
        ctx = self.ctx
        written = 0
        for space in PageSpace:
            dev_ids, host_ids = move.ids(space)
            if not host_ids.size:
                continue
            keep = np.ones(host_ids.size, bool)
            if ctx.host_is_current is not None and space in gens:
                keep = np.asarray(ctx.host_is_current(space, host_ids, gens[space]), bool)
            n = host_ids.size
            for kind in ctx.kinds:
                if kind.page_space is not space:
                    continue
                for rank, parts in views[kind].items():
                    nk = ctx.layer_maps[rank].num_layers_of(kind)
                    if nk == 0:
                        continue
                    for arr, row_index in parts:
                        if from_pool:
                            written += ctx.host.write_from_pool(
                                rank, kind, host_ids[keep], arr[0, :nk], dev_ids[keep], row_index
                            )
                        else:
                            rows = arr[0, :nk, :n][:, keep]  # staging is layer-first
                            ctx.host.write(rank, kind, host_ids[keep], rows, row_index)
                            written += rows.nbytes
            with ctx.lock:
                ctx.stats.stale_rows_skipped += int((~keep).sum())
        with ctx.lock:
            ctx.stats.backups += 1
            ctx.stats.backup_bytes += written
            ctx.stats.backup_seconds += time.perf_counter() - t0
        return written


@final
class StagedCopy(CopyStrategy):
    """Gather kernel -> device staging -> pinned host -> slabs (worker thread), and back.

    Args:
      ctx: as for :class:`CopyStrategy`.
    """

    path = CopyPath.STAGED

    def __init__(self, ctx: TransferContext):
        super().__init__(ctx)
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxhicache-d2h")
        self._buffers = StagingBuffers()
        self._host_kind = host_memory_kind(ctx.mesh)

    def close(self) -> None:
        self._worker.shutdown(wait=True)

    def backup(self, pools, move, ids, gens, t0):
        ctx = self.ctx
        staging = ctx.programs.gather_all(pools.arrays, ids)
        host_sh = {k: ctx.sharding(k, self._host_kind) for k in staging}
        host_staging = jax.device_put(staging, host_sh)  # one D2H per sub-pool, async
        fut = self._worker.submit(
            self._land_backup, replica0_views(host_staging), move, gens, t0, False
        )
        return BackupHandle(fut)

    def _fill_staging(self, move: PageMove, ids) -> tuple[dict[PoolKind, np.ndarray], int]:
        """Per kind a reused layer-first buffer ``[local stages, Lk, nb, *row]`` of the rows."""
        ctx = self.ctx
        out, nbytes = {}, 0
        for kind in ctx.kinds:
            host_ids = move.ids(kind.page_space)[1]
            nb, n = ids[kind.page_space].shape[0], host_ids.size
            shape = (
                len(ctx.host.ranks),
                ctx.stacked.max_layers_of(kind),
                nb,
                *ctx.host.spec.row_shape(kind),
            )
            buf = self._buffers.take(kind, shape, ctx.host.spec.row_dtype(kind))
            for i, m in enumerate(ctx.host.local_maps):
                nk = m.num_layers_of(kind)
                if n and nk:
                    nbytes += ctx.host.read_into(m.pp_rank, kind, host_ids, buf[i, :nk, :n])
            out[kind] = buf
        return out, nbytes

    def load_all(self, pools, move, ids):
        ctx = self.ctx
        bufs, nbytes = self._fill_staging(move, ids)
        staging = {k: self._aliased(k, b) for k, b in bufs.items()}
        arrays, token = ctx.programs.scatter_all(pools.arrays, ids, staging)
        self._buffers.busy_until(token)  # the buffers are read until this load lands
        return arrays, token, nbytes

    def layerwise(self, pools, move, ids):
        bufs, _ = self._fill_staging(move, ids)
        rows = {k: self._aliased(k, b, self._host_kind, may_alias=False) for k, b in bufs.items()}
        self._buffers.busy_until(list(rows.values()))  # until the host copies landed
        return self._load(pools, move, ids, rows, {}, None)


@final
class DirectCopy(CopyStrategy):
    """CPU only: rows copied straight between pool buffers and slabs (no staging copy).

    Args:
      ctx: as for :class:`CopyStrategy`.
    """

    path = CopyPath.DIRECT

    def __init__(self, ctx: TransferContext):
        super().__init__(ctx)
        self._slab_readers: list[jax.Array] = []  # tokens of programs that read the slabs
        self._slabs: dict[PoolKind, jax.Array] | None = None

    def close(self) -> None:
        jax.block_until_ready(self._slab_readers)
        self._slab_readers.clear()

    def slabs(self) -> dict[PoolKind, jax.Array]:
        """The stacked host slabs as device arrays over the same memory (made once).

        Returns:
          ``{kind: array}``, sharded like the pools, aliasing the slabs (no copy).
        """
        if self._slabs is None:
            ctx = self.ctx
            self._slabs = {k: self._aliased(k, ctx.host.stacked(k)) for k in ctx.kinds}
        return self._slabs

    def reading_slabs(self, token: jax.Array) -> None:
        """Records a program that reads the slabs; backups wait for it before writing them.

        Args:
          token: an output of that program (ready when it finished).
        """
        self._slab_readers.append(token)

    def backup(self, pools, move, ids, gens, t0):
        # The slabs are written in this thread (the pools may be donated right after);
        # no load program may still be reading them.
        jax.block_until_ready(self._slab_readers)
        self._slab_readers.clear()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.set_result(self._land_backup(replica0_views(pools.arrays), move, gens, t0, True))
        return BackupHandle(fut)

    def _host_ids(self, move: PageMove, ids) -> dict[PageSpace, jax.Array]:
        out = {}
        for space in PageSpace:
            h = move.ids(space)[1]
            nb = ids[space].shape[0]
            ids_h = bucketed_ids(h, self.ctx.host.pages_of(space), unique=False, pad=0)
            assert ids_h.shape[0] == nb
            out[space] = put_global(ids_h, self.ctx.replicated)
        return out

    def load_all(self, pools, move, ids):
        arrays, token = self.ctx.programs.direct_load(
            pools.arrays, self.slabs(), ids, self._host_ids(move, ids)
        )
        self.reading_slabs(token)
        return arrays, token, self._load_bytes(move)

    def layerwise(self, pools, move, ids):
        host_ids = self._host_ids(move, ids)
        return self._load(pools, move, ids, self.slabs(), host_ids, self.ctx.host.layout)
