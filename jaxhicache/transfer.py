"""L1 <-> L2 page moves for every PP stage in one dispatch.

Backup (device -> host)::

    pools [pp, Lk, P, *row]  --shard_map: paged_gather per stage-->  staging [pp, Lk, nb, *row]
        --one device_put(memory_kind="pinned_host")-->  host staging
        --worker thread: copy rows into the slabs (skipping host pages reallocated since)-->
    HostPools slab[rank][kind][host_ids]

Load (host -> device), all layers or one stage-local layer::

    slabs --numpy copy per stage--> staging [pp, Lk, nb, *row] (or [pp, nb, *row]) --device_put-->
        --shard_map: paged_scatter into the donated pools--> pools'

Rules:

* Sub-pools in the full-page space move the full-page ids, SWA-space sub-pools
  (SWA KV and the C4 compressor states) move the SWA ids; the logical full-page
  anchor moves no bytes of its own.
* Page counts are padded to power-of-two buckets with the out-of-range sentinel
  id, which the kernels never write: one compile per (bucket, layer-or-all).
* Ids are validated on the host before any kernel runs.
* The pools are donated to the load; the worker thread only ever reads the host
  staging of a backup, never a device pool.
* Every stage moves its own layers: stage ``r`` gathers/scatters its sub-pools
  with the ids shared by all stages (one controller takes every decision).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from typing import final

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxhicache.layer_map import StageLayerMap, stack_layer_maps
from jaxhicache.mesh import PP, TP, pool_partition_spec
from jaxhicache.pools.device import DevicePools
from jaxhicache.pools.host import HostPools, aligned_zeros
from jaxhicache.spec import PageSpace, PoolKind
from kernels_pallas.paged_copy import (
    Backend,
    Layout,
    PagedCopyTuning,
    bucket_size,
    default_backend,
    paged_gather,
    paged_scatter,
    validate_page_ids,
)

__all__ = ["BackupHandle", "LoadHandle", "PageMove", "TransferEngine", "TransferStats"]


@final
@dataclasses.dataclass(frozen=True)
class PageMove:
    """Which pages move: device and host ids per page space, pairwise."""

    full_device: np.ndarray
    full_host: np.ndarray
    swa_device: np.ndarray
    swa_host: np.ndarray

    @classmethod
    def of(cls, full_device=(), full_host=(), swa_device=(), swa_host=()) -> PageMove:
        arrs = [
            np.asarray(x, np.int32).reshape(-1)
            for x in (full_device, full_host, swa_device, swa_host)
        ]
        if arrs[0].size != arrs[1].size:
            raise ValueError(f"{arrs[0].size} full device ids but {arrs[1].size} full host ids")
        if arrs[2].size != arrs[3].size:
            raise ValueError(f"{arrs[2].size} SWA device ids but {arrs[3].size} SWA host ids")
        return cls(*arrs)

    def ids(self, space: PageSpace) -> tuple[np.ndarray, np.ndarray]:
        if space is PageSpace.FULL:
            return self.full_device, self.full_host
        return self.swa_device, self.swa_host


@dataclasses.dataclass
class TransferStats:
    """Cumulative transfer counters (bytes are real rows, padding excluded)."""

    backup_bytes: int = 0
    load_bytes: int = 0
    backup_seconds: float = 0.0
    load_seconds: float = 0.0
    backups: int = 0
    loads: int = 0
    stale_rows_skipped: int = 0


@final
class BackupHandle:
    """An in-flight D2H backup. ``wait()`` returns the bytes written into the slabs."""

    def __init__(self, future: concurrent.futures.Future):
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> int:
        return self._future.result(timeout)


@final
class LoadHandle:
    """An issued H2D load; ``wait(layer)`` blocks until that stage-local layer landed."""

    def __init__(self, tokens: dict[int | None, jax.Array]):
        self._tokens = tokens

    def wait(self, layer: int | None = None) -> None:
        """Waits for one stage-local layer (or, with ``None``, for everything)."""
        if layer is None:
            jax.block_until_ready(list(self._tokens.values()))
        elif layer in self._tokens:
            jax.block_until_ready(self._tokens[layer])
        elif None in self._tokens:  # an all-layer load covers every layer
            jax.block_until_ready(self._tokens[None])
        else:
            raise ValueError(f"layer {layer} was not part of this load ({sorted(self._tokens)})")


@final
class TransferEngine:
    """Moves pages of every sub-pool of every stage between ``DevicePools`` and ``HostPools``."""

    def __init__(
        self,
        mesh: Mesh,
        layer_maps: Sequence[StageLayerMap],
        host: HostPools,
        *,
        backend: Backend | None = None,
        tuning: PagedCopyTuning | None = None,
        host_is_current: Callable[[PageSpace, np.ndarray, np.ndarray], np.ndarray] | None = None,
        direct_host_copy: bool | None = None,
    ):
        """
        Args:
          mesh: the ``('pp', 'tp')`` mesh the device pools live on.
          layer_maps: every stage's map (rank order).
          host: the host slabs.
          backend: kernel backend (``None``: Triton on GPU, XLA on CPU).
          tuning: Pallas launch parameters.
          host_is_current: ``(space, host_ids, generations) -> bool mask``; rows whose
            host page was freed or reallocated since the backup was issued are not
            written (the allocator's generation check). ``None``: always current.
          direct_host_copy: back up by copying page rows straight from the pool buffers
            (zero-copy views) and load from page-aligned staging aliased by the device
            arrays. Only valid where device memory is host memory; default: on the CPU
            backend. Otherwise backups take the gather-kernel + pinned-host path.
        """
        self.mesh = mesh
        self.layer_maps = tuple(layer_maps)
        self.spec = host.spec
        self.host = host
        self.stacked = stack_layer_maps(self.layer_maps)
        if mesh.shape[PP] != len(self.layer_maps):
            raise ValueError(
                f"mesh has pp={mesh.shape[PP]}, layer maps have {len(self.layer_maps)} stages"
            )
        self.backend = default_backend() if backend is None else Backend(backend)
        self.tuning = tuning or PagedCopyTuning()
        self.stats = TransferStats()
        self._host_is_current = host_is_current
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxhicache-d2h")
        self._lock = threading.Lock()
        self._kinds = tuple(self.spec.kinds())
        self.direct_host_copy = (
            jax.default_backend() == "cpu" if direct_host_copy is None else bool(direct_host_copy)
        )
        self._buffers: dict[tuple, np.ndarray] = {}
        self._busy: dict[tuple, jax.Array] = {}
        self._pending: list[tuple] = []
        tp = mesh.shape[TP]
        self._pspec = {k: pool_partition_spec(self.spec, k, tp) for k in self._kinds}
        self._slab_readers: list[jax.Array] = []  # direct loads still reading the slabs
        self._direct_load = self._make_direct_load()
        self._gather_all = self._make_gather()
        self._scatter_all = self._make_scatter(per_layer=False)
        self._scatter_layer = self._make_scatter(per_layer=True)

    def close(self) -> None:
        self._worker.shutdown(wait=True)

    # ----------------------------------------------------------------- backup

    def backup(self, pools: DevicePools, move: PageMove, host_generations=None) -> BackupHandle:
        """Starts a D2H backup of ``move`` for all local layers of every sub-pool.

        ``host_generations``: ``{space: generations of move's host ids}`` taken when
        the host pages were allocated; rows whose pages changed generation since
        are skipped when the copy lands.
        """
        t0 = time.perf_counter()
        ids = self._device_ids(pools, move, unique=False)
        for space in PageSpace:
            validate_page_ids(move.ids(space)[1], self.host.pages_of(space), unique=True)
        gens = dict(host_generations or {})
        if self.direct_host_copy:
            # Device memory is host memory: copy page rows straight from the pool's buffer
            # into the slabs, in this thread (the pool may be donated right after).
            jax.block_until_ready(self._slab_readers)  # no direct load still reads the slabs
            self._slab_readers.clear()
            fut: concurrent.futures.Future = concurrent.futures.Future()
            fut.set_result(self._land_backup(_replica0_views(pools.arrays), move, gens, t0, move))
            return BackupHandle(fut)
        staging = self._gather_all(pools.arrays, ids)
        host_sh = {
            k: NamedSharding(self.mesh, self._pspec[k], memory_kind="pinned_host") for k in staging
        }
        host_staging = jax.device_put(staging, host_sh)  # one D2H per sub-pool, async
        fut = self._worker.submit(
            self._land_backup, _replica0_views(host_staging), move, gens, t0, None
        )
        return BackupHandle(fut)

    def _land_backup(self, views, move: PageMove, gens, t0: float, from_pool) -> int:
        """Copies rows into the slabs.

        ``views[kind][rank] = [(array, row_index)]``: the staging ``[1, Lk, nb, *row]``
        (``from_pool is None``) or the pool itself ``[1, Lk, P, *row]`` (direct path,
        rows picked with ``from_pool``'s device ids).
        """
        written = 0
        for space in PageSpace:
            _, host_ids = move.ids(space)
            if not host_ids.size:
                continue
            keep = np.ones(host_ids.size, bool)
            if self._host_is_current is not None and space in gens:
                keep = np.asarray(self._host_is_current(space, host_ids, gens[space]), bool)
            dev_ids = move.ids(space)[0]
            n = host_ids.size
            for kind in self._kinds:
                if kind.page_space is not space:
                    continue
                for rank, parts in views[kind].items():
                    nk = self.layer_maps[rank].num_layers_of(kind)
                    if nk == 0:
                        continue
                    for arr, row_index in parts:
                        if from_pool is None:
                            rows = arr[0, :nk, :n][:, keep]  # staging is layer-first
                            self.host.write(
                                rank, kind, host_ids[keep], rows, row_index, layer_first=True
                            )
                            written += rows.nbytes
                        else:
                            written += self.host.write_from_pool(
                                rank, kind, host_ids[keep], arr[0, :nk], dev_ids[keep], row_index
                            )
            with self._lock:
                self.stats.stale_rows_skipped += int((~keep).sum())
        with self._lock:
            self.stats.backups += 1
            self.stats.backup_bytes += written
            self.stats.backup_seconds += time.perf_counter() - t0
        return written

    # ------------------------------------------------------------------- load

    def load(
        self, pools: DevicePools, move: PageMove, layer: int | None = None
    ) -> tuple[DevicePools, LoadHandle]:
        """H2D: writes ``move``'s host pages into the (donated) device pools.

        ``layer``: one stage-local layer id (every stage loads its own local layer
        ``layer``, if it has one), or ``None`` for all layers. Returns the new pools
        and a handle to wait on.
        """
        t0 = time.perf_counter()
        if layer is not None and not 0 <= layer < self.stacked.max_local_layers:
            raise ValueError(
                f"stage-local layer {layer} not in [0, {self.stacked.max_local_layers})"
            )
        ids = self._device_ids(pools, move, unique=True)
        for space in PageSpace:
            validate_page_ids(move.ids(space)[1], self.host.pages_of(space), unique=False)
        if self.direct_host_copy and layer is None:
            return self._load_direct(pools, move, ids, t0)
        staging, nbytes = self._host_staging(move, ids, layer)
        scatter = self._scatter_all if layer is None else self._scatter_layer
        new_arrays, token = scatter(
            pools.arrays, ids, staging, jnp.int32(-1 if layer is None else layer)
        )
        for key in self._pending:  # the staging buffers are in use until this load lands
            self._busy[key] = token
        self._pending.clear()
        out = pools.replace(arrays=new_arrays)
        with self._lock:
            self.stats.loads += 1
            self.stats.load_bytes += nbytes
            self.stats.load_seconds += time.perf_counter() - t0
        return out, LoadHandle({layer: token})

    def load_layerwise(self, pools: DevicePools, move: PageMove) -> tuple[DevicePools, LoadHandle]:
        """Loads layer by layer (stage-local order), so compute can wait per layer.

        With ``direct_host_copy`` (CPU) there is no link to overlap: one all-layer load,
        and every layer's wait is that load's completion.
        """
        if self.direct_host_copy:
            pools, handle = self.load(pools, move)
            token = handle._tokens[None]
            return pools, LoadHandle({lyr: token for lyr in range(self.stacked.max_local_layers)})
        tokens = {}
        for lyr in range(self.stacked.max_local_layers):
            pools, h = self.load(pools, move, layer=lyr)
            tokens.update(h._tokens)
        return pools, LoadHandle(tokens)

    def _load_direct(self, pools: DevicePools, move: PageMove, ids, t0: float):
        """CPU: the pools' scatter reads page rows straight from device arrays that alias
        the host slabs (no staging copy): one copy per page row."""
        slabs = {
            k: _alias_sharded(NamedSharding(self.mesh, self._pspec[k]), self.host.stacked(k))
            for k in self._kinds
        }
        host_ids = {}
        for space in PageSpace:
            h = move.ids(space)[1]
            nb = ids[space].shape[0]
            host_ids[space] = jnp.asarray(np.concatenate([h, np.zeros(nb - h.size, np.int32)]))
        new_arrays, token = self._direct_load(pools.arrays, slabs, ids, host_ids)
        self._slab_readers.append(token)
        nbytes = sum(
            move.ids(k.page_space)[1].size * m.num_layers_of(k) * self.spec.row_bytes(k)
            for k in self._kinds
            for m in self.layer_maps
        )
        with self._lock:
            self.stats.loads += 1
            self.stats.load_bytes += nbytes
            self.stats.load_seconds += time.perf_counter() - t0
        return pools.replace(arrays=new_arrays), LoadHandle({None: token})

    def _make_direct_load(self):
        """jit(shard_map), pools donated: per stage, copy slab rows into pool pages."""
        kinds = self._kinds
        page_first = self.host.layout is Layout.PAGE_FIRST

        def body(arrays, slabs, dev_ids, host_ids):
            out = {}
            for kind in kinds:
                out[kind] = _copy_host_rows(
                    arrays[kind][0],
                    slabs[kind][0],
                    dev_ids[kind.page_space],
                    host_ids[kind.page_space],
                    page_first=page_first,
                )[None]
            return out, jnp.zeros((1,), jnp.int32)

        pools_spec = dict(self._pspec)
        smap = jax.shard_map(
            body,
            mesh=self.mesh,
            in_specs=(pools_spec, pools_spec, P(), P()),
            out_specs=(pools_spec, P(PP)),
            check_vma=False,
        )
        return jax.jit(smap, donate_argnums=(0,))

    def _host_staging(self, move: PageMove, ids, layer):
        """Per kind: a device array ``[pp, Lk, nb, *row]`` (per layer: ``[pp, nb, *row]``).

        Layer-first, so the XLA scatter needs no transpose; filled from the slabs
        with one copy per page row into a reused page-aligned buffer.
        """
        staging, nbytes = {}, 0
        for kind in self._kinds:
            _, host_ids = move.ids(kind.page_space)
            nb = ids[kind.page_space].shape[0]
            n = host_ids.size
            max_k = self.stacked.max_layers_of(kind)
            row = self.spec.row_shape(kind)
            shape = (len(self.layer_maps), *((max_k,) if layer is None else ()), nb, *row)
            buf = self._staging_buffer(kind, shape)
            for m in self.layer_maps:
                r = m.pp_rank
                if layer is None:
                    nk = m.num_layers_of(kind)
                    if n and nk:
                        nbytes += self.host.read_into(r, kind, host_ids, buf[r, :nk, :n])
                else:
                    k = int(m.local_to_subpool(kind)[layer]) if layer < m.num_local_layers else -1
                    if n and k >= 0:
                        nbytes += self.host.read_into(r, kind, host_ids, buf[r, :n], layer=k)
            spec = self._pspec[kind] if layer is None else P(PP, None, *self._pspec[kind][3:])
            staging[kind] = _alias_sharded(NamedSharding(self.mesh, spec), buf)
        return staging, nbytes

    def _staging_buffer(self, kind: PoolKind, shape: tuple[int, ...]) -> np.ndarray:
        """A reusable, page-aligned host staging buffer; waits until its last load consumed it."""
        key = (kind, shape)
        if key in self._busy:
            jax.block_until_ready(self._busy.pop(key))
        if key not in self._buffers:
            self._buffers[key] = aligned_zeros(shape, self.spec.row_dtype(kind))
        self._pending.append(key)
        return self._buffers[key]

    # -------------------------------------------------------------- internals

    def _device_ids(
        self, pools: DevicePools, move: PageMove, *, unique: bool
    ) -> dict[PageSpace, jax.Array]:
        out = {}
        for space in PageSpace:
            dev, _ = move.ids(space)
            num = pools.num_pages if space is PageSpace.FULL else pools.num_swa_pages
            validate_page_ids(dev, num, unique=unique)
            nb = bucket_size(dev.size)
            out[space] = jnp.asarray(np.concatenate([dev, np.full(nb - dev.size, num, np.int32)]))
        return out

    def _make_gather(self):
        """jit(shard_map): every stage gathers its pages of every sub-pool (one compile per bucket)."""
        kinds = self._kinds

        def body(arrays, ids):
            out = {}
            for kind in kinds:
                pool = arrays[kind][0]  # [Lk, P, *row]
                sid = ids[kind.page_space]
                # Padding layers of a shorter stage gather too; their rows are dropped on landing.
                out[kind] = paged_gather(
                    pool, sid, layout=Layout.LAYER_FIRST, backend=self.backend, tuning=self.tuning
                )[None]
            return out

        pools_spec = dict(self._pspec)
        smap = jax.shard_map(
            body,
            mesh=self.mesh,
            in_specs=(pools_spec, P()),
            out_specs=pools_spec,
            check_vma=False,
        )
        return jax.jit(smap)

    def _make_scatter(self, *, per_layer: bool):
        """jit(shard_map) with the pools donated: every stage scatters its own pages."""
        kinds, stacked = self._kinds, self.stacked

        def body(arrays, ids, staging, layer):
            stage = stacked.stage(PP)
            out = {}
            for kind in kinds:
                pool = arrays[kind][0]
                sid = ids[kind.page_space]
                if per_layer:
                    k = stage.local_to_subpool[kind][
                        jnp.clip(layer, 0, stacked.max_local_layers - 1)
                    ]
                    # A stage without that layer in this sub-pool writes nothing: all ids -> sentinel.
                    sid = jnp.where(k >= 0, sid, pool.shape[1])
                    new = paged_scatter(
                        pool,
                        sid,
                        staging[kind][0],
                        layer=jnp.maximum(k, 0),
                        backend=self.backend,
                        tuning=self.tuning,
                    )
                else:
                    new = paged_scatter(
                        pool,
                        sid,
                        staging[kind][0],
                        layout=Layout.LAYER_FIRST,
                        backend=self.backend,
                        tuning=self.tuning,
                    )
                out[kind] = new[None]
            # Completion token: an output of the same executable, so it is ready exactly
            # when the scatter is, and it survives the next load's donation of the pools.
            return out, jnp.zeros((1,), jnp.int32)

        pools_spec = dict(self._pspec)
        # staging is layer-first [pp, Lk, nb, *row] (same axes as the pool); per layer
        # [pp, nb, *row]: the layer axis is gone, heads stay on 'tp'
        staging_spec = (
            pools_spec if not per_layer else {k: P(PP, None, *v[3:]) for k, v in pools_spec.items()}
        )
        smap = jax.shard_map(
            body,
            mesh=self.mesh,
            in_specs=(pools_spec, P(), staging_spec, P()),
            out_specs=(pools_spec, P(PP)),
            check_vma=False,
        )
        return jax.jit(smap, donate_argnums=(0,))


def _copy_host_rows(pool, slab, dev_ids, host_ids, *, page_first: bool):
    """``pool [K, P, *row]`` with page ``dev_ids[j]`` := host page ``host_ids[j]`` of
    ``slab`` (``[pages, K, *row]`` page-first, else ``[K, pages, *row]``); ids ``>= P``
    (bucket padding) write nothing. One ``dynamic_update_slice`` per page, in place."""
    num_layers, num_pages = pool.shape[:2]
    zeros = (0,) * (pool.ndim - 2)

    def body(j, pool):
        pid, hid = dev_ids[j], host_ids[j]

        def write(pool):
            if page_first:
                rows = jax.lax.dynamic_slice(
                    slab, (hid, 0, *zeros), (1, num_layers, *pool.shape[2:])
                )
                rows = jnp.swapaxes(rows, 0, 1)  # [K, 1, *row]: a bitcast
            else:
                rows = jax.lax.dynamic_slice(
                    slab, (0, hid, *zeros), (num_layers, 1, *pool.shape[2:])
                )
            return jax.lax.dynamic_update_slice(pool, rows, (0, pid, *zeros))

        return jax.lax.cond(pid < num_pages, write, lambda p: p, pool)

    return jax.lax.fori_loop(0, dev_ids.shape[0], body, pool)


def _alias_sharded(sharding: NamedSharding, buf: np.ndarray) -> jax.Array:
    """A device array over ``buf [pp, ...]`` sharded by ``sharding``.

    Each device's shard is put with ``may_alias=True``: on the CPU backend an aligned,
    contiguous shard is used in place (no copy); elsewhere it is one H2D copy.
    """
    arrays = [
        jax.device_put(buf[idx], d, may_alias=True)
        for d, idx in sharding.addressable_devices_indices_map(buf.shape).items()
    ]
    return jax.make_array_from_single_device_arrays(buf.shape, sharding, arrays)


def _replica0_views(arrays: dict) -> dict:
    """``{kind: {rank: (numpy view of the shard, row index)}}`` of replica-0 shards.

    ``'tp'`` replicas of a stage hold the same bytes; MHA shards carry a slice of the
    heads (the row index beyond the ``[stage, pages|layers, layers|pages]`` axes).
    """
    out = {}
    for kind, arr in arrays.items():
        views = {}
        for shard in arr.addressable_shards:
            if shard.replica_id:
                continue
            views.setdefault(shard.index[0].start or 0, [])
            views[shard.index[0].start or 0].append(
                (np.asarray(shard.data), tuple(shard.index[3:]))
            )
        out[kind] = views
    return out
