"""The cache's L3 tier: prefetch from storage into host slots, back up host pages to storage.

Control plane (main thread; the only place the tree changes)::

    start_prefetch(key, salt, match)     pages after the L1/L2 match: hashes, a lookup
       │                                 (exists_prefix of the full space on every stage,
       │                                 min over stages; the SWA window of the hit end on
       │                                 every stage), host slots reserved
       v
    worker thread: backend.get per stage and page space into the reserved slots
       │
    claim(key, salt, match)              a landed prefetch that starts where the match ends
       │                                 goes to the request: its slots are loaded into the
       │                                 request's own device pages with the prefix load, the
       │                                 tree gets the pages at insert, the slots are freed at
       v                                 release; failed or stale prefetches are dropped
    write(node, pages)                   after a D2H backup landed: the worker writes (absent
       │                                 pages only) the full-space objects of every page and
       v                                 the SWA-space objects at checkpoints
    finish_writes()                      before anything frees host pages (host eviction, SWA
                                         reclaim), so no slot the worker reads changes

The worker only reads and writes slab rows of pages the controller reserved or
locked, so no slab row changes under it. Storage faults never raise: a failed
page ends the loaded prefix (a shorter hit or a miss); a failed write is a
counter. Every decision (hit end, what to insert) is taken once for all stages.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import enum
import math
from collections.abc import Callable, Sequence
from typing import final

import numpy as np

from jaxhicache.cache.ledger import PageLedger
from jaxhicache.cache.stats import CacheStats
from jaxhicache.distributed import Agreement
from jaxhicache.pools.allocator import OutOfPages
from jaxhicache.pools.host import HostPools
from jaxhicache.spec import ModelCacheSpec, PageSpace, Tier
from jaxhicache.storage.backend import StorageBackend
from jaxhicache.storage.keys import Namespace, page_hashes
from jaxhicache.tree import MatchResult, RadixTree, TreeNode

__all__ = ["PrefetchPolicy", "StorageConfig", "StorageTier"]


class PrefetchPolicy(enum.Enum):
    """How long ``admit`` waits for a request's L3 prefetch."""

    BEST_EFFORT = "best_effort"  # take what has arrived, never wait
    WAIT_COMPLETE = "wait_complete"  # wait for the whole prefetch
    TIMEOUT = "timeout"  # wait up to base + per_1k_tokens * n / 1024, capped


@final
@dataclasses.dataclass(frozen=True)
class StorageConfig:
    """Knobs of the L3 tier (the backend itself is passed to ``HiCache``).

    Attributes:
      model_id: the model's id in object keys (instances share objects only
        when their model id, cache format and stage layer ranges agree).
      prefetch_threshold: tokens an L3 hit must add to be fetched (default 256).
      prefetch_policy / timeout_base_s / timeout_per_1k_tokens_s / timeout_max_s:
        how long ``admit`` waits for a request's prefetch.
      swa_checkpoint_every: SWA-space objects (the window a hit ends on) are
        written for every k-th page boundary and the end of each backed-up
        sequence; an L3 hit ends at such a checkpoint. 1 = every page.
      backup: write host pages to L3 after their D2H backup lands.
    """

    model_id: str
    prefetch_threshold: int = 256
    prefetch_policy: PrefetchPolicy = PrefetchPolicy.TIMEOUT
    timeout_base_s: float = 0.2
    timeout_per_1k_tokens_s: float = 0.1
    timeout_max_s: float = 5.0
    swa_checkpoint_every: int = 1
    backup: bool = True

    def __post_init__(self):
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ValueError(
                f"StorageConfig.model_id must be a non-empty str, got {self.model_id!r}"
            )
        for name in ("prefetch_threshold", "swa_checkpoint_every"):
            v = getattr(self, name)
            lo = 0 if name == "prefetch_threshold" else 1
            if type(v) is bool or not isinstance(v, int) or v < lo:
                raise ValueError(f"StorageConfig.{name} must be an int >= {lo}, got {v!r}")
        if not isinstance(self.prefetch_policy, PrefetchPolicy):
            raise ValueError(
                f"StorageConfig.prefetch_policy must be a PrefetchPolicy, got {self.prefetch_policy!r}"
            )
        for name in ("timeout_base_s", "timeout_per_1k_tokens_s", "timeout_max_s"):
            v = getattr(self, name)
            if type(v) is bool or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ValueError(f"StorageConfig.{name} must be a finite number >= 0, got {v!r}")
        if not isinstance(self.backup, bool):
            raise ValueError(f"StorageConfig.backup must be a bool, got {self.backup!r}")

    def wait_seconds(self, tokens: int) -> float | None:
        """How long ``admit`` waits for a prefetch of ``tokens`` (``None`` = until done)."""
        if self.prefetch_policy is PrefetchPolicy.BEST_EFFORT:
            return 0.0
        if self.prefetch_policy is PrefetchPolicy.WAIT_COMPLETE:
            return None
        return min(
            self.timeout_max_s, self.timeout_base_s + self.timeout_per_1k_tokens_s * tokens / 1024
        )


@dataclasses.dataclass(eq=False)
class Prefetch:
    """One in-flight L3 fetch of the pages ``[first, end)`` of a key (page indices)."""

    key: np.ndarray  # the whole pages [0, end) of the request's key
    salt: str | bytes | None
    first: int
    end: int
    swa_first: int  # window pages [swa_first, end) fetched in the SWA space
    host_full: np.ndarray  # slots for pages [first, end)
    host_swa: np.ndarray  # slots for pages [swa_first, end)
    future: concurrent.futures.Future


@dataclasses.dataclass(eq=False)
class _Write:
    future: concurrent.futures.Future


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
        # This process's stages only (all of them in a single process).
        self.namespaces = {
            m.pp_rank: Namespace.for_stage(spec, m, model_id=config.model_id)
            for m in host.local_maps
        }
        self.agreement = agreement if agreement is not None else Agreement(local_only=True)
        # Frees host slots for a prefetch (the cache's host eviction); the caller holds
        # a lock on the match, so the prefix a prefetch continues is never evicted.
        self._make_room = make_room
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxhicache-l3")
        self._prefetches: list[Prefetch] = []
        self._writes: list[_Write] = []

    # ------------------------------------------------------------------ prefetch
    def in_flight(self) -> dict[PageSpace, int]:
        """Host slots held by prefetches that have not been applied yet."""
        return {
            PageSpace.FULL: sum(p.host_full.size for p in self._prefetches),
            PageSpace.SWA: sum(p.host_swa.size for p in self._prefetches),
        }

    def find(self, key: np.ndarray, salt) -> Prefetch | None:
        """The prefetch (in flight or landed) of a key that this one extends (or equals)."""
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
            return p
        self._drop(p)
        return None

    def start_prefetch(self, key: np.ndarray, salt, match: MatchResult) -> Prefetch | None:
        """Looks up the pages of ``key`` after ``match`` in storage and starts fetching them.

        Returns ``None`` when fewer than ``prefetch_threshold`` tokens would be added,
        when a prefetch of the key is already in flight, or when host slots are short
        even after evicting LRU host-only leaves (``make_room``). The caller holds a
        lock on ``match.node``.
        """
        ps, w = self._ps, self._w
        first = match.matched_len // ps
        pages = key.size // ps
        if (pages - first) * ps < max(self.config.prefetch_threshold, 1) or self.find(
            key[: pages * ps], salt
        ):
            return None
        parent = self._tree.path_hashes(match.node)[-1] if first else None
        # A continuation's parent hash already carries the salt.
        hashes = page_hashes(
            key[first * ps : pages * ps], ps, salt=None if parent else salt, parent=parent
        )
        end = first + self._lookup(hashes)
        if w:
            end = self._window_end(hashes, first, end)
        if (end - first) * ps < max(self.config.prefetch_threshold, 1) or end - first < w:
            return None  # too little, or the window would reach back into the tree's pages
        swa_first = max(end - w, first) if w else end
        host_full = self._alloc_host(PageSpace.FULL, end - first)
        if host_full is None:
            return None
        host_swa = self._alloc_host(PageSpace.SWA, end - swa_first)
        if host_swa is None:
            self._ledger.free(Tier.HOST, PageSpace.FULL, host_full)
            return None
        job_hashes = hashes[: end - first]
        swa_hashes = job_hashes[swa_first - first :]
        fut = self._worker.submit(self._fetch, job_hashes, host_full, swa_hashes, host_swa)
        p = Prefetch(
            key=key[: end * ps].copy(),
            salt=salt,
            first=first,
            end=end,
            swa_first=swa_first,
            host_full=host_full,
            host_swa=host_swa,
            future=fut,
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

    def _lookup(self, hashes: Sequence[str]) -> int:
        """Consecutive full-space pages present on every stage (the decision, taken once:
        MIN over this process's stages, then MIN over processes)."""
        n = len(hashes)
        for r, ns in self.namespaces.items():
            if not n:
                break
            if self.host.layer_maps[r].num_local_layers and _has_space(
                ns, self.spec, PageSpace.FULL
            ):
                n = min(n, self.backend.exists_prefix(ns, PageSpace.FULL, hashes[:n]))
        return int(self.agreement.min([n])[0])

    def _window_end(self, hashes: Sequence[str], first: int, end: int) -> int:
        """The largest hit end ``<= end`` whose SWA window objects exist on every stage.

        Candidates are ``end`` and the checkpoints (multiples of
        ``swa_checkpoint_every``) below it: where backups write SWA objects.
        """
        w, k = self._w, self.config.swa_checkpoint_every
        candidates = [end, *range(end - end % k, first, -k)] if end > first else []
        candidates = [e for e in dict.fromkeys(candidates) if e > first]  # ordered, unique
        here = [
            all(
                self.backend.exists(
                    ns, PageSpace.SWA, hashes[max(e - w, first) - first : e - first]
                ).all()
                for ns in self.namespaces.values()
                if _has_space(ns, self.spec, PageSpace.SWA)
            )
            for e in candidates
        ]
        agreed = self.agreement.min(here)  # present on every process's stages
        return next((e for e, ok in zip(candidates, agreed, strict=True) if ok), first)

    def _fetch(self, hashes, host_full, swa_hashes, host_swa) -> int:
        """Worker: loads the pages into the slots; returns the pages usable on every stage."""
        n = len(hashes)
        good = n
        for r, ns in self.namespaces.items():
            if _has_space(ns, self.spec, PageSpace.FULL):
                ok = self.backend.get(ns, PageSpace.FULL, hashes, self.host, r, host_full)
                good = min(good, _leading(ok))
        window_ok = True
        for r, ns in self.namespaces.items():
            if swa_hashes and _has_space(ns, self.spec, PageSpace.SWA):
                ok = self.backend.get(ns, PageSpace.SWA, swa_hashes, self.host, r, host_swa)
                window_ok &= bool(ok.all())
        # A hit must end where its window was fetched: all or nothing.
        return n if good == n and window_ok else 0

    def wait(self, prefetch: Prefetch) -> None:
        """Waits as the policy says (never raises on a timeout)."""
        timeout = self.config.wait_seconds((prefetch.end - prefetch.first) * self._ps)
        if timeout == 0.0:
            return
        with contextlib.suppress(concurrent.futures.TimeoutError):
            prefetch.future.result(timeout)

    # -------------------------------------------------------------------- backup
    def write(self, node: TreeNode, num_pages: int) -> None:
        """Writes the last ``num_pages`` backed-up pages of ``node``'s path to storage.

        Call after the D2H backup landed (the pages are host-resident). The host
        slots must not be freed before :meth:`finish_writes` (the cache calls it
        before every host eviction or SWA reclaim); device eviction is harmless.
        """
        if not self.config.backup or num_pages <= 0:
            return
        path_full, path_swa = _path_host_ids(node)
        hashes = self._tree.path_hashes(node)
        total = len(hashes)
        lo = total - num_pages
        k = self.config.swa_checkpoint_every
        w = self._w
        swa_pages: list[int] = []
        if w:
            ends = {e for e in range(lo + 1, total + 1) if e % k == 0} | {total}
            swa_pages = sorted({i for e in ends for i in range(max(e - w, 0), e)})
            swa_pages = [i for i in swa_pages if path_swa[i] >= 0]
        fut = self._worker.submit(
            self._put,
            hashes[lo:],
            path_full[lo:].copy(),
            [hashes[i] for i in swa_pages],
            path_swa[swa_pages].copy() if swa_pages else np.zeros(0, np.int32),
        )
        self._writes.append(_Write(fut))

    def _put(self, hashes, host_full, swa_hashes, host_swa) -> int:
        written = 0
        for r, ns in self.namespaces.items():
            for space, hs, ids in (
                (PageSpace.FULL, hashes, host_full),
                (PageSpace.SWA, swa_hashes, host_swa),
            ):
                if not hs or not _has_space(ns, self.spec, space):
                    continue
                present = self.backend.exists(ns, space, hs)
                todo = np.flatnonzero(~present)
                if todo.size:
                    ok = self.backend.put(ns, space, [hs[i] for i in todo], self.host, r, ids[todo])
                    written += int(ok.sum())
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
        self._ledger.free(Tier.HOST, PageSpace.SWA, p.host_swa)

    def finish_writes(self) -> None:
        """Waits for every L3 write (they read host slots that are about to be freed)."""
        self._record_writes(wait=True)

    def _record_writes(self, wait: bool) -> None:
        writes = []
        for wr in self._writes:
            if not (wait or wr.future.done()):
                writes.append(wr)
                continue
            try:
                self._stats.storage_backed_up_pages += int(wr.future.result())
            except Exception:  # a backend bug must not take the cache down; counted
                self._stats.storage_write_failures += 1
        self._writes = writes

    def close(self) -> None:
        self.poll(wait=True)
        self.drop_landed()
        self._worker.shutdown(wait=True)


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


def _has_space(ns: Namespace, spec: ModelCacheSpec, space: PageSpace) -> bool:
    return any(k.page_space is space for k in ns.stage_kinds)
