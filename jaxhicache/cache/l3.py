"""The cache's L3 tier: prefetch from storage into host slots, back up host pages to storage.

Control plane (main thread; the only place the tree changes)::

    start_lookup(key, salt)              (optional, when a request is queued) the lookup
       │                                 below starts on a lookup thread, off the critical path
    start_prefetch(key, salt, match)     pages after the L1/L2 match: hashes, a lookup (every
       │                                 existence check of every stage and both spaces in
       │                                 one batch, l3_lookup), waited for at most
       │                                 lookup_timeout_s; the hit end agreed (MIN over
       │                                 processes) among the ends whose window is present and
       │                                 that are cheaper to load than recompute (l3_cost);
       │                                 host slots reserved
       v
    fetch thread: backend.get per stage and page space (concurrently, fetch_in_flight
       │          objects in flight in all) into the reserved slots
       │
    claim(key, salt, match)              a landed prefetch that starts where the match ends
       │                                 goes to the request: its slots are loaded into the
       │                                 request's own device pages with the prefix load, the
       │                                 tree gets the pages at insert, the slots are freed at
       v                                 release; failed or stale prefetches are dropped
    write(node, pages, snapshots)        after a D2H backup landed: the worker writes (absent
       │                                 pages only) the full-space objects of every page, the
       │                                 SWA-space objects at checkpoints and (hybrids) one
       v                                 state object per host snapshot backed up
    finish_writes()                      before anything frees host pages (host eviction, SWA
                                         reclaim), so no slot the worker reads changes

The worker only reads and writes slab rows of pages the controller reserved or
locked, so no slab row changes under it. Storage faults never raise: a failed
page ends the loaded prefix (a shorter hit or a miss); a failed write is a
counter. Every decision (hit end, what to insert) is taken once for all stages.

Recurrent hybrids: a snapshot at position ``e`` (pages) is one object per stage in the
``STATE`` space, keyed by the hash of page ``e - 1`` (the chain of the KV pages, salt
included). A hit ends only on the snapshot grid where that object is on every stage;
its prefetch fetches it into a host snapshot slot (``StateSlots.alloc``), all or
nothing with the KV pages, and the request loads it into its own device slot.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import final

import numpy as np

from jaxhicache.cache.l3_config import LookupWindows, PrefetchPolicy, StorageConfig
from jaxhicache.cache.l3_lookup import Lookups, StageObjects
from jaxhicache.cache.l3_writer import WriteBack, WriteItem
from jaxhicache.cache.ledger import PageLedger
from jaxhicache.cache.states import StateSlots
from jaxhicache.cache.stats import CacheStats
from jaxhicache.distributed import Agreement
from jaxhicache.pools.allocator import OutOfPages
from jaxhicache.pools.host import HostPools
from jaxhicache.spec import ModelCacheSpec, PageSpace, Tier
from jaxhicache.storage.backend import StorageBackend
from jaxhicache.storage.keys import Namespace, page_hashes
from jaxhicache.tree import MatchResult, RadixTree, TreeNode
from jaxhicache.tree.hashes import salt_bytes

__all__ = ["LookupWindows", "PrefetchPolicy", "StorageConfig", "StorageTier"]


@dataclasses.dataclass(eq=False)
class Prefetch:
    """One in-flight L3 fetch of the pages ``[first, end)`` of a key (page indices)."""

    key: np.ndarray  # the whole pages [0, end) of the request's key
    salt: bytes | None  # normalized (tree.hashes.salt_bytes): "a" and b"a" are one tenant
    first: int
    end: int
    swa_first: int  # window pages [swa_first, end) fetched in the SWA space
    host_full: np.ndarray  # slots for pages [first, end)
    host_swa: np.ndarray  # slots for pages [swa_first, end)
    future: concurrent.futures.Future
    host_state: np.ndarray = dataclasses.field(  # hybrids: the snapshot slot of end
        default_factory=lambda: np.zeros(0, np.int32)
    )
    # pages_per_object > 1: scratch slots for the pages of the fetched groups outside
    # [first, end) (freed once the prefetch is claimed or dropped)
    host_extra: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))


@final
class StorageTier:
    """Prefetches and backups between the host slabs and one ``StorageBackend``."""

    def __init__(
        self,
        backend: StorageBackend,
        config: StorageConfig,
        spec: ModelCacheSpec,
        host: HostPools,
        ledger: PageLedger,
        tree: RadixTree,
        stats: CacheStats,
        agreement: Agreement | None = None,
        make_room: Callable[[PageSpace, int], None] | None = None,
        states: StateSlots | None = None,
    ):
        if not isinstance(backend, StorageBackend):
            raise ValueError(f"storage must be a StorageBackend, got {type(backend).__name__}")
        self.backend = backend
        self.config = config
        self.spec = spec
        self.host = host
        self._ledger = ledger
        self._tree = tree
        self._stats = stats
        self._ps = spec.page_size
        self._w = spec.swa_trailing_pages
        self._states = states  # hybrids: host snapshot slots (LRU snapshots evicted for room)
        self._grid = states.interval // self._ps if states is not None else 0
        self._g = config.pages_per_object
        # This process's stages only (all of them in a single process).
        self.namespaces = {
            m.pp_rank: Namespace.for_stage(
                spec, m, model_id=config.model_id, pages_per_object=self._g
            )
            for m in host.local_maps
        }
        self._agreement = agreement if agreement is not None else Agreement(local_only=True)
        # Frees host slots for a prefetch (the cache's host eviction); the caller holds
        # a lock on the match, so the prefix a prefetch continues is never evicted.
        self._make_room = make_room
        self._writeback = WriteBack(self._put, nice=config.write_nice)
        self._fetcher = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="jaxhicache-l3-fetch"
        )
        spaces = {k.page_space for k in spec.kinds()}  # MLA / MHA specs: no SWA space
        self._stages = [
            StageObjects(
                r,
                ns,
                *(
                    backend.page_objects(ns, s, host, r) if s in spaces else (0, 0)
                    for s in (PageSpace.FULL, PageSpace.SWA, PageSpace.STATE)
                ),
            )
            for r, ns in self.namespaces.items()
        ]
        n_jobs = sum(bool(st.full[0]) + bool(st.swa[0]) + bool(st.state[0]) for st in self._stages)
        self._io = (  # a prefetch's gets of several stages and spaces at once
            concurrent.futures.ThreadPoolExecutor(n_jobs, thread_name_prefix="jaxhicache-l3-io")
            if backend.concurrent and n_jobs > 1
            else None
        )
        self.lookups = Lookups(
            backend,
            config,
            self._stages,
            tree,
            self._agreement,
            stats,
            self._ps,
            self._w,
            self._grid,
        )
        self.costs = self.lookups.costs
        self._prefetches: list[Prefetch] = []

    @property
    def agreement(self) -> Agreement:
        """The MIN collective every decision on what some processes see goes through."""
        return self._agreement

    @agreement.setter
    def agreement(self, agreement: Agreement) -> None:
        self._agreement = self.lookups.agreement = agreement

    # ------------------------------------------------------------------ prefetch
    def in_flight(self) -> dict[PageSpace, int]:
        """Host slots held by prefetches that have not been applied yet."""
        return {
            PageSpace.FULL: sum(p.host_full.size + p.host_extra.size for p in self._prefetches),
            PageSpace.SWA: sum(p.host_swa.size for p in self._prefetches),
            PageSpace.STATE: sum(p.host_state.size for p in self._prefetches),
        }

    def find(self, key: np.ndarray, salt) -> Prefetch | None:
        """The prefetch (in flight or landed) of a key that this one extends (or equals),
        under the same tenant salt."""
        salt = salt_bytes(salt)
        for p in self._prefetches:
            if (
                p.salt == salt
                and key.size >= p.key.size
                and np.array_equal(key[: p.key.size], p.key)
            ):
                return p
        return None

    def prefix_for(self, key: np.ndarray, salt, match: MatchResult) -> Prefetch | None:
        """A landed prefetch of the pages after ``match`` that a request can use, if any.

        Starts one (or finds one in flight), waits as the policy says, and claims it
        when it landed, loaded on every stage and starts where ``match`` ends.
        """
        salt = salt_bytes(salt)
        p = self.find(key, salt) or self.start_prefetch(key, salt, match)
        if p is None:
            return None
        self.wait(p)
        return self.claim(p, match.matched_len // self._ps)

    def claim(self, p: Prefetch, first: int) -> Prefetch | None:
        """Hands a landed prefetch to a request whose match ends at page ``first``.

        Returns it (its slots are the request's now) if it loaded and starts there;
        a failed one, or one the tree has outgrown or lost the prefix of, is dropped.
        """
        if p not in self._prefetches:
            return None
        (status,) = self._agreed([p])
        if status == _PENDING:
            return None
        self._prefetches.remove(p)
        if _raised(p):  # a backend bug: counted, a miss
            self._stats.storage_read_failures += 1
        if status == _LOADED and p.first == first:
            self._stats.storage_prefetched_tokens += (p.end - p.first) * self._ps
            self._ledger.free(Tier.HOST, PageSpace.FULL, p.host_extra)
            p.host_extra = p.host_extra[:0]
            return p
        self._drop(p)
        return None

    def start_lookup(self, key: np.ndarray, salt=None) -> bool:
        """Starts the L3 lookup of a queued request, off the critical path.

        ``key``: what admission will match (``prompt[:-1]``). The lookup of the pages
        after what the tree holds now runs on a lookup thread; the admission of the
        request (:meth:`start_prefetch`) then finds it done instead of waiting for
        the store. Returns whether a lookup was started (not when the tree already
        holds all but ``prefetch_threshold`` tokens, or one for this key is pending).
        """
        return self.lookups.start(np.asarray(key, np.int32).reshape(-1), salt_bytes(salt))

    def stored_pages(self, key: np.ndarray, salt=None) -> int:
        """Pages of ``key`` after what the tree holds that this process's stages hold in
        L3 (local, not agreed): the lookup :meth:`start_lookup` queued (started now if
        none), kept for the request's admission."""
        return self.lookups.present(np.asarray(key, np.int32).reshape(-1), salt_bytes(salt))

    @contextlib.contextmanager
    def every_hit(self) -> Iterator[None]:
        """Within: every L3 hit is looked up and fetched whatever the cost model says
        (it still learns). For a server's warm-up: the load programs of every hit
        shape compile then, not at the first hit the model accepts later."""
        decide = self.lookups.decide
        self.lookups.decide = False
        try:
            yield
        finally:
            self.lookups.decide = decide

    def observe_recompute(self, tokens: int, seconds: float) -> None:
        """Feeds the cost model: prefilling ``tokens`` tokens took ``seconds``."""
        self.lookups.costs.observe_recompute(tokens, seconds)

    def start_prefetch(self, key: np.ndarray, salt, match: MatchResult) -> Prefetch | None:
        """Looks up the pages of ``key`` after ``match`` in storage and starts fetching them.

        Returns ``None`` when fewer than ``prefetch_threshold`` tokens would be added
        (after the cost model), when a prefetch of the key is already in flight, or
        when host slots are short even after evicting LRU host-only leaves
        (``make_room``). The caller holds a lock on ``match.node``.
        """
        ps, w = self._ps, self._w
        salt = salt_bytes(salt)
        first = match.matched_len // ps
        pages = key.size // ps
        if (pages - first) * ps < self.config.prefetch_threshold or self.find(
            key[: pages * ps], salt
        ):
            return None
        parent = self._tree.path_hashes(match.node)[-1] if first else None
        # A continuation's parent hash already carries the salt.
        hashes = page_hashes(
            key[first * ps : pages * ps], ps, salt=None if parent else salt, parent=parent
        )
        end = self.lookups.hit_end(key, salt, hashes, first)
        if (end - first) * ps < self.config.prefetch_threshold or end - first < w:
            return None  # too little, or the window would reach back into the tree's pages
        swa_first = max(end - w, first) if w else end
        g = self._g
        lo, hi = first // g * g, -(-end // g) * g  # the groups holding [first, end)
        host_full = self._alloc_host(PageSpace.FULL, end - first)
        if host_full is None:
            return None
        host_extra = self._alloc_host(PageSpace.FULL, (first - lo) + (hi - end))
        host_swa = self._alloc_host(PageSpace.SWA, end - swa_first)
        host_state = self._alloc_state() if host_swa is not None else None
        if host_extra is None or host_swa is None or host_state is None:
            for space, ids in (
                (PageSpace.FULL, host_full),
                (PageSpace.FULL, host_extra),
                (PageSpace.SWA, host_swa),
            ):
                self._ledger.free(Tier.HOST, space, ids if ids is not None else [])
            return None
        job_hashes = hashes[: end - first]
        swa_hashes = job_hashes[swa_first - first :]
        state_hashes = job_hashes[-1:] if host_state.size else []  # keyed by end's page
        # full-space objects: one per group, keyed by its last page; its slots in page order
        group_pages = self._tree.path_hashes(match.node)[lo:first] + hashes[: hi - first]
        full_hashes = group_pages[g - 1 :: g]
        table = np.concatenate([host_extra[: first - lo], host_full, host_extra[first - lo :]])
        fut = self._fetcher.submit(
            self._fetch, full_hashes, table, swa_hashes, host_swa, state_hashes, host_state
        )
        p = Prefetch(
            key=key[: end * ps].copy(),
            salt=salt,
            first=first,
            end=end,
            swa_first=swa_first,
            host_full=host_full,
            host_swa=host_swa,
            future=fut,
            host_state=host_state,
            host_extra=host_extra,
        )
        self._prefetches.append(p)
        self._stats.storage_prefetches += 1
        return p

    def _alloc_host(self, space: PageSpace, n: int) -> np.ndarray | None:
        """``n`` host slots, evicting LRU host-only leaves (``make_room``) if short;
        ``None`` when even that leaves too few (the hit becomes a miss)."""
        if n > self._ledger.num_free(Tier.HOST, space) and self._make_room is not None:
            self._make_room(space, n)
        try:
            return self._ledger.alloc(Tier.HOST, space, n)
        except OutOfPages:
            return None

    def _alloc_state(self) -> np.ndarray | None:
        """Hybrids: one host snapshot slot (LRU host snapshots evicted for room; ``None``
        when none is free even then); others: no slot."""
        if self._states is None:
            return np.zeros(0, np.int32)
        try:
            return self._states.alloc(Tier.HOST, 1)
        except OutOfPages:
            return None

    def _fetch(self, hashes, host_full, swa_hashes, host_swa, state_hashes, host_state) -> int:
        """Fetch thread: loads the pages (and the snapshot at their end) into the slots
        (the gets of every stage and page space at once on a concurrent store); returns
        the full-space objects usable on every stage (all or nothing). ``hashes``: one
        per full-space object (a group's last page), ``host_full`` its slots."""
        jobs = [
            (st, space, hs, ids)
            for space, hs, ids in (
                (PageSpace.FULL, hashes, host_full),
                (PageSpace.SWA, swa_hashes, host_swa),
                (PageSpace.STATE, state_hashes, host_state),
            )
            for st in self._stages
            if len(hs) and _objects(st, space)[0]
        ]
        if not jobs:
            return len(hashes)
        in_flight = self.config.fetch_in_flight if self.backend.concurrent else 1
        per = max(1, in_flight // len(jobs)) if self._io else None

        def get(job):
            st, space, hs, ids = job
            return self.backend.get(
                st.ns, space, hs, self.host, st.rank, ids, max_in_flight=per or in_flight
            )

        t0 = time.perf_counter()
        oks = list(self._io.map(get, jobs)) if self._io is not None else [get(j) for j in jobs]
        seconds = time.perf_counter() - t0
        objects = nbytes = 0
        for st, space, hs, _ids in jobs:
            o, b = _objects(st, space)
            objects, nbytes = objects + o * len(hs), nbytes + b * len(hs)
        self.costs.observe_fetch(objects, nbytes, in_flight, seconds)
        n = len(hashes)
        good = min(
            (
                _leading(ok)
                for (_, sp, _, _), ok in zip(jobs, oks, strict=True)
                if sp is PageSpace.FULL
            ),
            default=n,
        )
        window_ok = all(
            bool(ok.all())
            for (_, sp, _, _), ok in zip(jobs, oks, strict=True)
            if sp is not PageSpace.FULL
        )
        # A hit must end where its window and its snapshot were fetched: all or nothing.
        return n if good == n and window_ok else 0

    def wait(self, prefetch: Prefetch) -> None:
        """Waits as the policy says (never raises on a timeout)."""
        timeout = self.config.wait_seconds((prefetch.end - prefetch.first) * self._ps)
        if timeout == 0.0:
            return
        with contextlib.suppress(concurrent.futures.TimeoutError):
            prefetch.future.result(timeout)

    # -------------------------------------------------------------------- backup
    def write(self, node: TreeNode, num_pages: int, snapshots: Sequence[TreeNode] = ()) -> None:
        """Writes the last ``num_pages`` backed-up pages of ``node``'s path to storage,
        and the host snapshots just backed up at the ends of ``snapshots`` (nodes of the
        path): one state object each, keyed by the hash of the page ending there.

        Call after the D2H backup landed (the pages are host-resident). The host
        slots must not be freed before :meth:`finish_writes` (the cache calls it
        before every host eviction, SWA reclaim or snapshot eviction); device
        eviction is harmless.
        """
        snaps = [n for n in snapshots if n.parent is not None and n.state_host >= 0]
        if not self.config.backup or (num_pages <= 0 and not snaps):
            return
        state_hashes = [self._tree.path_hashes(n)[-1] for n in snaps]
        host_states = np.asarray([n.state_host for n in snaps], np.int32)
        num_pages = max(num_pages, 0)
        path_full, path_swa = _path_host_ids(node)
        hashes = self._tree.path_hashes(node)
        total = len(hashes)
        # full space: the groups of g pages these pages complete (g = 1: the pages), a
        # group's earlier pages read from their host slots (host residency is
        # prefix-closed: a backed-up node's ancestors are in host too)
        g = self._g
        lo, covered = (total - num_pages) // g * g, total // g * g
        starts = list(range(lo, covered, g))
        k = self.config.swa_checkpoint_every
        w = self._w
        swa_pages: list[int] = []
        if w and covered > lo:  # windows of the ends L3 can serve: checkpoints, the last
            ends = {e for e in range(lo + 1, covered + 1) if e % k == 0} | {covered}
            swa_pages = sorted({i for e in ends for i in range(max(e - w, 0), e)})
            swa_pages = [i for i in swa_pages if path_swa[i] >= 0]
        self._writeback.add(
            WriteItem(
                [hashes[a + g - 1] for a in starts],
                np.concatenate([path_full[a : a + g] for a in starts] or [np.zeros(0, np.int32)]),
                [hashes[i] for i in swa_pages],
                path_swa[swa_pages].copy() if swa_pages else np.zeros(0, np.int32),
                state_hashes,
                host_states,
                group=g,
            )
        )

    def _put(self, items: list[WriteItem]) -> int:
        """Writes the absent objects of a batch of items (the write-back thread): one
        existence check and one put per stage and page space for all of them."""
        written = 0
        for space, pairs in (
            (PageSpace.FULL, [(it.hashes, it.host_full) for it in items]),
            (PageSpace.SWA, [(it.swa_hashes, it.host_swa) for it in items]),
            (PageSpace.STATE, [(it.state_hashes, it.host_states) for it in items]),
        ):
            g = self._g if space is PageSpace.FULL else 1  # slots per object
            # An object in two items (a shared window) is written once.
            unique = {
                h: tuple(row)
                for hs, ids in pairs
                for h, row in zip(hs, ids.reshape(len(hs), g).tolist(), strict=True)
            }
            hs = list(unique)
            ids = np.asarray(list(unique.values()), np.int32).reshape(len(hs), g)
            for r, ns in self.namespaces.items():
                if not hs or not _has_space(ns, self.spec, space):
                    continue
                todo = np.flatnonzero(~self.backend.exists(ns, space, hs))
                if todo.size:
                    sub = [hs[i] for i in todo]
                    ok = self.backend.put(ns, space, sub, self.host, r, ids[todo].reshape(-1))
                    written += int(ok.sum()) * g
        return written

    # ---------------------------------------------------------------------- poll
    def _agreed(self, prefetches: Sequence[Prefetch], wait: bool = False) -> list[int]:
        """Each prefetch's status as every process sees it: the MIN over processes of
        pending < failed < loaded (a prefetch loads a stage's layers per process)."""
        if wait:
            concurrent.futures.wait([p.future for p in prefetches])
        local = [_status(p) for p in prefetches]
        return self.agreement.min(local).tolist() if local else []

    def poll(self, wait: bool = False) -> None:
        """Drops prefetches that failed and records finished writes (``wait``: all)."""
        for p, st in zip(list(self._prefetches), self._agreed(self._prefetches, wait), strict=True):
            if st == _FAILED:
                self._prefetches.remove(p)
                if _raised(p):
                    self._stats.storage_read_failures += 1
                self._drop(p)
        self._record_writes(wait)

    def drop_landed(self) -> int:
        """Frees the slots of landed prefetches nobody claimed (host pressure); returns pages."""
        n = 0
        for p, st in zip(list(self._prefetches), self._agreed(self._prefetches), strict=True):
            if st != _PENDING:
                self._prefetches.remove(p)
                n += p.host_full.size
                self._drop(p)
        return n

    def drop(self, p: Prefetch) -> None:
        """Frees a claimed prefetch's slots (the request that claimed it did not fit)."""
        self._drop(p)

    def _drop(self, p: Prefetch) -> None:
        self._ledger.free(Tier.HOST, PageSpace.FULL, p.host_full)
        self._ledger.free(Tier.HOST, PageSpace.FULL, p.host_extra)
        self._ledger.free(Tier.HOST, PageSpace.SWA, p.host_swa)
        self._ledger.free(Tier.HOST, PageSpace.STATE, p.host_state)

    def writing(self) -> np.ndarray:
        """Host full-space slots that queued or running L3 writes still read (sorted)."""
        return self._writeback.busy()

    def finish_writes(self, slots: Mapping[PageSpace, np.ndarray] | None = None) -> None:
        """Waits for the L3 writes that read host slots about to be freed: those that
        read any of ``slots`` (``{space: host ids}``), or (``None``) every write. With
        ``slots``, their objects not yet being written are dropped instead
        (``storage_dropped_writes``): a store behind the write rate costs misses later,
        not a stall of the serving thread now."""
        if slots is None:
            self._record_writes(wait=True)
            return
        by_space = {s.value: np.asarray(ids).reshape(-1) for s, ids in slots.items()}
        self._stats.storage_dropped_writes += self._writeback.drop(by_space)
        self._writeback.finish(by_space)
        self._record_writes(wait=False)

    def _record_writes(self, wait: bool) -> None:
        written, failed = self._writeback.collect(wait)
        self._stats.storage_backed_up_pages += written
        self._stats.storage_write_failures += failed

    def close(self) -> None:
        self.poll(wait=True)
        self.drop_landed()
        self.lookups.close()
        self._fetcher.shutdown(wait=True)
        self._writeback.close()
        if self._io is not None:
            self._io.shutdown(wait=True)


def _path_host_ids(node: TreeNode) -> tuple[np.ndarray, np.ndarray]:
    """Host full and SWA ids of every page of ``node``'s path, root first (``-1``: none)."""
    fulls, swas = [], []
    n = node
    while n.parent is not None:
        none = np.full(n.num_pages, -1, np.int32)
        fulls.append(none if n.host_full is None else n.host_full)
        swas.append(none if n.host_swa is None else n.host_swa)
        n = n.parent
    if not fulls:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    return np.concatenate(fulls[::-1]), np.concatenate(swas[::-1])


_PENDING, _FAILED, _LOADED = 0, 1, 2  # ordered: the MIN over processes is the outcome


def _status(p: Prefetch) -> int:
    if not p.future.done():
        return _PENDING
    if p.future.exception() is not None or not p.future.result():
        return _FAILED
    return _LOADED


def _raised(p: Prefetch) -> bool:
    return p.future.done() and p.future.exception() is not None


def _leading(mask: np.ndarray) -> int:
    bad = np.flatnonzero(~np.asarray(mask, bool))
    return int(bad[0]) if bad.size else int(np.asarray(mask).size)


def _objects(st: StageObjects, space: PageSpace) -> tuple[int, int]:
    """``(objects, bytes)`` of one page (or snapshot) of ``space`` on stage ``st``."""
    return {PageSpace.FULL: st.full, PageSpace.SWA: st.swa, PageSpace.STATE: st.state}[space]


def _has_space(ns: Namespace, spec: ModelCacheSpec, space: PageSpace) -> bool:
    return any(k.page_space is space for k in ns.stage_kinds)
