"""``HiCache``: the object a serving loop talks to (L1 device pools + L2 host slabs).

Control plane (Python, deterministic) over the data plane (``DevicePools``
arrays moved by the :class:`~jaxhicache.transfer.TransferEngine`)::

    request tokens
       |  match_prefix            radix tree: device prefix | host-only pages | miss
       v
    CacheMatch --load_back-->  device pages allocated (evicting LRU if needed),
       |                       H2D layer by layer, LoadBack.wait(layer) per stage-local layer
       |  allocate(tail pages)  fresh device full + SWA pages for the new tokens
       v
    model forward on cache.pools (reads/writes through the page tables)
       |  insert(tokens, full_ids, swa_ids)
       v
    tree insert; duplicate / tombstoned pages freed; backups per WritePolicy
       |  release(node)
       v
    eviction: device LRU demotes backed-up nodes, deletes (or, write_back, first
    backs up) the rest; host LRU drops host-only leaves

Determinism across PP stages: one controller drives every stage of the mesh.
Every decision (which pages, which nodes, evictions) is taken once here and the
same page ids are used by every stage, which moves only its own layers inside
one ``shard_map`` dispatch. Asynchronous completions (D2H backups) mutate the
tree only when the controller polls them (:meth:`HiCache.poll`), never from the
transfer thread, so all stages see one sequence of tree states. In a
multi-process ``jax.distributed`` deployment every process runs this same
controller code on the same request stream; decisions depend only on that
stream (LRU clocks are operation counters, not wall time), so the trees stay
identical without any cross-process messages.

Invariants: a page id is owned by exactly one of {allocator free list, tree,
in-flight request, in-flight backup}; ``free + used == capacity`` for every
allocator; nodes with an in-flight backup or load are locked.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import final

import numpy as np
from jax.sharding import Mesh

from jaxhicache.layer_map import build_layer_maps
from jaxhicache.mesh import PP
from jaxhicache.pools.allocator import OutOfPages, PageAllocator
from jaxhicache.pools.device import DevicePools, allocate_device_pools
from jaxhicache.pools.host import HostPools
from jaxhicache.spec import ModelCacheSpec, PageSpace
from jaxhicache.transfer import BackupHandle, LoadHandle, PageMove, TransferEngine
from jaxhicache.tree import (
    MatchResult,
    RadixTree,
    TreeNode,
    WritePolicy,
    should_backup_on_hit,
    should_backup_on_insert,
)
from kernels_pallas.paged_copy import Backend, Layout, PagedCopyTuning

__all__ = ["CacheStats", "HiCache", "LoadBack", "WritePolicy"]


@final
@dataclasses.dataclass
class CacheStats:
    """Counters of one ``HiCache`` (tokens are page-aligned prefix tokens)."""

    requests: int = 0
    query_tokens: int = 0
    device_hit_tokens: int = 0
    host_hit_tokens: int = 0
    storage_hit_tokens: int = 0
    inserted_tokens: int = 0
    backups_issued: int = 0
    backed_up_pages: int = 0
    loaded_pages: int = 0
    device_evicted_pages: int = 0
    host_evicted_pages: int = 0


@final
@dataclasses.dataclass
class LoadBack:
    """A prefix made device-resident by :meth:`HiCache.load_back`.

    ``full_page_ids``: device full-page id of every matched page (root order).
    ``swa_page_ids``: device SWA-page id per matched page, ``-1`` for pages
    outside the trailing window (tombstones a correct forward never reads).
    ``node`` stays locked until :meth:`HiCache.release`.
    """

    node: TreeNode
    prefix_len: int
    full_page_ids: np.ndarray
    swa_page_ids: np.ndarray
    handle: LoadHandle | None

    def wait(self, layer: int | None = None) -> None:
        """Blocks until stage-local layer ``layer`` (or all layers) of the load landed."""
        if self.handle is not None:
            self.handle.wait(layer)


@dataclasses.dataclass
class _Backup:
    node: TreeNode
    handle: BackupHandle
    host_full: np.ndarray
    host_swa: np.ndarray  # aligned with host_full, -1 = no SWA page copied


@final
class HiCache:
    """Hierarchical prefix cache over device pools and host slabs for all PP stages.

    Args:
      spec: what the model caches.
      mesh: ``('pp', 'tp')`` mesh; its ``pp`` size is the pipeline depth.
      device_pages / device_swa_pages: device capacity of the full-page and
        SWA-page spaces (SWA pages default to ``device_pages``).
      host_pages / host_swa_pages: host capacity; default ``host_ratio`` × device.
      write_policy: when device pages are backed up to host.
      partition: explicit per-stage layer counts (default: the reference split).
      host_layout: slab layout (``PAGE_FIRST`` default, storage friendly).
      backend / tuning: paged-copy kernel backend and launch parameters.
    """

    def __init__(
        self,
        spec: ModelCacheSpec,
        mesh: Mesh,
        *,
        device_pages: int,
        device_swa_pages: int | None = None,
        host_pages: int | None = None,
        host_swa_pages: int | None = None,
        host_ratio: float = 2.0,
        write_policy: WritePolicy | str = WritePolicy.WRITE_THROUGH,
        partition: Sequence[int] | None = None,
        host_layout: Layout = Layout.PAGE_FIRST,
        backend: Backend | None = None,
        tuning: PagedCopyTuning | None = None,
        direct_host_copy: bool | None = None,
    ):
        self.spec = spec
        self.mesh = mesh
        self.write_policy = WritePolicy(write_policy)
        self.layer_maps = build_layer_maps(spec, mesh.shape[PP], partition)
        has_swa = spec.swa_trailing_pages > 0
        dev_swa = (device_swa_pages or device_pages) if has_swa else 0
        if host_pages is None:
            host_pages = max(1, int(device_pages * host_ratio))
        if host_swa_pages is None:
            host_swa_pages = max(1, int(dev_swa * host_ratio)) if has_swa else 0
        self._pools = allocate_device_pools(spec, mesh, self.layer_maps, device_pages, dev_swa)
        self.host = HostPools(spec, self.layer_maps, host_pages, host_swa_pages, layout=host_layout)
        self.alloc = {
            ("device", PageSpace.FULL): PageAllocator(device_pages, "device-full"),
            ("device", PageSpace.SWA): PageAllocator(max(dev_swa, 1), "device-swa"),
            ("host", PageSpace.FULL): PageAllocator(host_pages, "host-full"),
            ("host", PageSpace.SWA): PageAllocator(max(host_swa_pages, 1), "host-swa"),
        }
        self.engine = TransferEngine(
            mesh,
            self.layer_maps,
            self.host,
            backend=backend,
            tuning=tuning,
            host_is_current=self._host_current,
            direct_host_copy=direct_host_copy,
        )
        self.tree = RadixTree(
            spec.page_size, spec.swa_trailing_pages, write_policy=self.write_policy
        )
        self._stats = CacheStats()
        self._backups: list[_Backup] = []
        # Device pages handed to requests by allocate() and not yet inserted or freed.
        self._outstanding = {PageSpace.FULL: 0, PageSpace.SWA: 0}
        self._transfer_seconds = 0.0

    # ------------------------------------------------------------------ pools

    @property
    def pools(self) -> DevicePools:
        """The device pools; a forward that writes them hands the result back via the setter."""
        return self._pools

    @pools.setter
    def pools(self, new: DevicePools) -> None:
        if not isinstance(new, DevicePools) or set(new.kinds()) != set(self._pools.kinds()):
            raise ValueError("pools must be the DevicePools of this cache's spec")
        self._pools = new

    @property
    def page_size(self) -> int:
        return self.spec.page_size

    # ------------------------------------------------------------------ match

    def match_prefix(self, tokens) -> MatchResult:
        """Longest usable cached prefix of ``tokens`` (whole pages, SWA window present).

        The result tells the device-resident pages, the host-only pages a
        :meth:`load_back` brings back, and lengths per tier. Under
        ``write_through_selective`` a node hit for the second time is backed up.
        """
        self.poll()
        tokens = np.asarray(tokens)
        m = self.tree.match_prefix(tokens)
        s = self._stats
        s.requests += 1
        s.query_tokens += (tokens.size // self.page_size) * self.page_size
        s.device_hit_tokens += m.device_len
        s.host_hit_tokens += m.host_len
        if m.matched_len and should_backup_on_hit(self.write_policy, m.node):
            self.backup(m.node)
        return m

    def load_back(self, match: MatchResult) -> LoadBack:
        """Makes ``match``'s prefix device-resident; locks it until :meth:`release`.

        Allocates device pages for the host-only full pages and for the trailing
        SWA-window pages that are only on host (evicting LRU device pages when
        needed), and issues the H2D load layer by layer.
        """
        node = match.node
        self.tree.inc_lock(node)
        try:
            host_full = match.host_full_ids
            w = match.swa_window_pages
            swa_dev = match.swa_device_ids.copy()
            need_swa = (swa_dev < 0) & (match.swa_host_ids >= 0) if w else np.zeros(0, bool)
            n_swa = int(need_swa.sum())
            new_full, new_swa = self.allocate(host_full.size, n_swa)
        except BaseException:
            self.tree.dec_lock(node)
            raise
        swa_dev[need_swa] = new_swa
        handle = None
        if host_full.size or n_swa:
            move = PageMove.of(new_full, host_full, new_swa, match.swa_host_ids[need_swa])
            t0 = time.perf_counter()
            self._pools, handle = self.engine.load_layerwise(self._pools, move)
            self._transfer_seconds += time.perf_counter() - t0
            self._stats.loaded_pages += int(host_full.size)
            # Tree bookkeeping (the data is ordered before any later use of the pools).
            swa_for_tree = np.where(need_swa, swa_dev, -1).astype(np.int32) if w else None
            unused_full, unused_swa = self.tree.set_device_value(node, new_full, swa_for_tree)
            self._release_outstanding(new_full, new_swa)
            self._free("device", PageSpace.FULL, unused_full)
            self._free("device", PageSpace.SWA, unused_swa)
        pages = match.matched_len // self.page_size
        full_ids = np.concatenate([match.device_full_ids, new_full]).astype(np.int32)
        swa_ids = np.full(pages, -1, np.int32)
        if w:
            swa_ids[pages - w :] = swa_dev
        return LoadBack(node, match.matched_len, full_ids, swa_ids, handle)

    def release(self, node: TreeNode) -> None:
        """Unlocks a node locked by :meth:`load_back` (or :meth:`lock`)."""
        self.tree.dec_lock(node)

    def lock(self, node: TreeNode) -> None:
        self.tree.inc_lock(node)

    # ------------------------------------------------------------ allocation

    def allocate(self, num_pages: int, num_swa_pages: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Fresh device full and SWA page ids, evicting LRU device pages if needed.

        Raises :class:`OutOfPages` when even eviction cannot free enough (every
        remaining page is locked or in use by a request).
        """
        full_alloc = self.alloc["device", PageSpace.FULL]
        swa_alloc = self.alloc["device", PageSpace.SWA]
        while full_alloc.num_free < num_pages or swa_alloc.num_free < num_swa_pages:
            # Evicting a node frees its full pages and its (non-tombstoned) SWA pages.
            short = max(num_pages - full_alloc.num_free, num_swa_pages - swa_alloc.num_free)
            if self.evict(short) == 0:
                break
        if swa_alloc.num_free < num_swa_pages:
            raise OutOfPages(swa_alloc.name, num_swa_pages, swa_alloc.num_free)
        full = full_alloc.alloc(num_pages)
        swa = swa_alloc.alloc(num_swa_pages) if num_swa_pages else np.zeros(0, np.int32)
        self._outstanding[PageSpace.FULL] += full.size
        self._outstanding[PageSpace.SWA] += swa.size
        return full, swa

    def free(self, full_ids=(), swa_ids=()) -> None:
        """Returns a request's device pages that were never inserted (e.g. an aborted request)."""
        self._release_outstanding(full_ids, swa_ids)
        self._free("device", PageSpace.FULL, full_ids)
        self._free("device", PageSpace.SWA, swa_ids)

    def _release_outstanding(self, full_ids, swa_ids) -> None:
        """Pages leave the requests' hands (inserted into the tree or freed)."""
        nf = int((np.asarray(full_ids).ravel() >= 0).sum())
        ns = int((np.asarray(swa_ids if swa_ids is not None else ()).ravel() >= 0).sum())
        if nf > self._outstanding[PageSpace.FULL] or ns > self._outstanding[PageSpace.SWA]:
            raise ValueError(
                f"{nf} full / {ns} SWA pages returned but only {self._outstanding[PageSpace.FULL]}"
                f" / {self._outstanding[PageSpace.SWA]} were handed out by allocate()"
            )
        self._outstanding[PageSpace.FULL] -= nf
        self._outstanding[PageSpace.SWA] -= ns

    # ----------------------------------------------------------------- insert

    def insert(self, tokens, full_device_ids, swa_device_ids=None) -> TreeNode:
        """Records ``tokens``' pages after a forward; returns the node of the last page.

        ``tokens`` is truncated to whole pages. ``full_device_ids`` are the
        request's own pages after the cached prefix (right-aligned: the trailing
        pages of the truncated key); ``swa_device_ids`` the request's SWA pages
        (right-aligned, ``-1`` = none). Pages the tree already had and SWA pages
        the tombstone rule drops are freed here. Backups follow the write policy.
        """
        self.poll()
        tokens = np.asarray(tokens)
        aligned = (tokens.size // self.page_size) * self.page_size
        key = tokens[:aligned]
        full = np.asarray(full_device_ids, np.int32)
        res = self.tree.insert(key, full, swa_device_ids)
        self._release_outstanding(full, swa_device_ids)
        self._free("device", PageSpace.FULL, res.dup_full_ids)
        self._free("device", PageSpace.SWA, res.free_swa_ids)
        self._stats.inserted_tokens += res.new_len
        if should_backup_on_insert(self.write_policy, res.node):
            self.backup(res.node)
        return res.node

    # ----------------------------------------------------------------- backup

    def backup(self, node: TreeNode) -> None:
        """Starts a D2H backup of the not-yet-backed-up pages of ``node``'s path.

        The node stays locked until the backup lands and :meth:`poll` records it.
        """
        plan = self.tree.backup_plan(node)
        if plan.num_pages == 0 or any(b.node is node for b in self._backups):
            return
        swa_src = plan.device_swa_ids if self.spec.swa_trailing_pages else np.zeros(0, np.int32)
        has_swa = swa_src >= 0
        host_full = self._alloc_host(PageSpace.FULL, plan.num_pages)
        try:
            host_swa_live = self._alloc_host(PageSpace.SWA, int(has_swa.sum()))
        except OutOfPages:
            self._free("host", PageSpace.FULL, host_full)
            raise
        host_swa = np.full(plan.num_pages, -1, np.int32)
        if swa_src.size:
            host_swa[has_swa] = host_swa_live
        move = PageMove.of(plan.device_full_ids, host_full, swa_src[has_swa], host_swa_live)
        gens = {
            PageSpace.FULL: self.alloc["host", PageSpace.FULL].generation(host_full),
            PageSpace.SWA: self.alloc["host", PageSpace.SWA].generation(host_swa_live),
        }
        self.tree.inc_lock(node)
        t0 = time.perf_counter()
        handle = self.engine.backup(self._pools, move, host_generations=gens)
        self._transfer_seconds += time.perf_counter() - t0
        self._backups.append(_Backup(node, handle, host_full, host_swa))
        self._stats.backups_issued += 1

    def poll(self, wait: bool = False) -> int:
        """Records finished backups in the tree (all of them with ``wait``); returns how many."""
        done = 0
        still = []
        for b in self._backups:
            if not (wait or b.handle.done()):
                still.append(b)
                continue
            t0 = time.perf_counter()
            b.handle.wait()
            self._transfer_seconds += time.perf_counter() - t0
            self.tree.dec_lock(b.node)
            unused_full, unused_swa = self.tree.mark_backed_up(b.node, b.host_full, b.host_swa)
            self._free("host", PageSpace.FULL, unused_full)
            self._free("host", PageSpace.SWA, unused_swa)
            self._stats.backed_up_pages += b.host_full.size - unused_full.size
            done += 1
        self._backups = still
        return done

    # --------------------------------------------------------------- eviction

    def evict(self, num_pages: int) -> int:
        """Frees at least ``num_pages`` device full pages if possible; returns pages freed.

        LRU over unlocked device leaves: backed-up nodes are demoted (host copy
        kept), others deleted; under ``write_back`` they are backed up first.
        """
        self.poll()
        freed = 0
        for _ in range(2):
            res = self.tree.evict_device(num_pages - freed)
            self._release_evicted(res)
            freed += res.evicted_pages
            if not res.needs_backup or freed >= num_pages:
                break
            for n in res.needs_backup:  # write_back: back up, then demote on the next pass
                self.backup(n)
            self.poll(wait=True)
        self._stats.device_evicted_pages += freed
        return freed

    def evict_host(self, num_pages: int) -> int:
        """Frees at least ``num_pages`` host pages (host-only leaves, LRU); returns pages freed."""
        res = self.tree.evict_host(num_pages)
        self._free("host", PageSpace.FULL, res.full_ids)
        self._free("host", PageSpace.SWA, res.swa_ids)
        self._stats.host_evicted_pages += res.evicted_pages
        return res.evicted_pages

    def _release_evicted(self, res) -> None:
        self._free("device", PageSpace.FULL, res.full_ids)
        self._free("device", PageSpace.SWA, res.swa_ids)

    def _alloc_host(self, space: PageSpace, n: int) -> np.ndarray:
        a = self.alloc["host", space]
        if n > a.num_free:
            self.poll(wait=True)  # finished backups make their host leaves evictable
            self.evict_host(n - a.num_free)
        return a.alloc(n)

    def _free(self, tier: str, space: PageSpace, ids) -> None:
        ids = np.asarray(ids, np.int32).ravel()
        ids = ids[ids >= 0]
        if ids.size:
            self.alloc[tier, space].free(ids)

    def _host_current(self, space: PageSpace, ids: np.ndarray, gens: np.ndarray) -> np.ndarray:
        a = self.alloc["host", space]
        return a.is_allocated(ids) & (a.generation(ids) == gens)

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict:
        """Hits per tier (tokens), pages in use per tier and space, bytes moved, transfer time."""
        s = dataclasses.asdict(self._stats)
        t = self.engine.stats
        s.update(
            {
                f"{tier}_{space.value}_pages_used": a.num_used
                for (tier, space), a in self.alloc.items()
            }
        )
        s.update(
            backup_bytes=t.backup_bytes,
            load_bytes=t.load_bytes,
            transfer_seconds=self._transfer_seconds,
            in_flight_backups=len(self._backups),
            hit_rate=(s["device_hit_tokens"] + s["host_hit_tokens"]) / max(s["query_tokens"], 1),
        )
        return s

    def check_invariants(self) -> None:
        """Tree invariants plus page accounting: every allocated page is owned exactly
        once, by the tree, a request (allocated, not yet inserted) or an in-flight backup."""
        self.tree.check_invariants()
        for a in self.alloc.values():
            assert a.num_free + a.num_used == a.capacity, a
        t = self.tree
        dev_full = self.alloc["device", PageSpace.FULL].num_used
        dev_swa = self.alloc["device", PageSpace.SWA].num_used
        assert dev_full == t.total_device_pages() + self._outstanding[PageSpace.FULL], (
            f"device full pages: {dev_full} allocated, {t.total_device_pages()} in the tree, "
            f"{self._outstanding[PageSpace.FULL]} with requests"
        )
        assert dev_swa == t.total_device_swa_pages() + self._outstanding[PageSpace.SWA], (
            f"device SWA pages: {dev_swa} allocated, {t.total_device_swa_pages()} in the tree, "
            f"{self._outstanding[PageSpace.SWA]} with requests"
        )
        in_flight_full = sum(b.host_full.size for b in self._backups)
        in_flight_swa = sum(int((b.host_swa >= 0).sum()) for b in self._backups)
        host_full = self.alloc["host", PageSpace.FULL].num_used
        host_swa = self.alloc["host", PageSpace.SWA].num_used
        assert host_full == t.total_host_pages() + in_flight_full, (host_full, t.total_host_pages())
        assert host_swa == t.total_host_swa_pages() + in_flight_swa, (
            host_swa,
            t.total_host_swa_pages(),
        )

    def close(self) -> None:
        self.poll(wait=True)
        self.engine.close()
