"""``Evictor``: room for new pages on device and host, by reclaim and LRU eviction.

Every page a request or a backup needs comes from here::

    allocate(pools, n_full, n_swa)      device ids; when short: reclaim SWA pages
       │                                outside protected windows, then evict LRU
       │                                device leaves (demote backed-up ones, delete
       │                                or — write_back — back up the rest), then
       │                                OutOfPages naming the allocator
    make_room_on_host(space, n)         unclaimed L3 prefetches dropped, host SWA
                                        reclaimed, LRU host-only leaves evicted
    flush(pools)                        no request open: every backup and L3 write
                                        landed, then device and host emptied (L3 kept)

Invariant: nothing here frees a page that a lock protects (the tree refuses), and
anything that frees host pages first waits for the L3 writes that read them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, final

import numpy as np

from jaxhicache.cache.ledger import PageLedger
from jaxhicache.cache.stats import CacheStats
from jaxhicache.pools.allocator import OutOfPages
from jaxhicache.spec import PageSpace, Tier
from jaxhicache.tree import RadixTree

if TYPE_CHECKING:
    from jaxhicache.cache.backups import Backups
    from jaxhicache.cache.l3 import StorageTier

__all__ = ["Evictor"]


@final
class Evictor:
    """Reclaim and eviction over one tree and ledger (backups and L3 attached later)."""

    def __init__(self, tree: RadixTree, ledger: PageLedger, stats: CacheStats):
        self._tree = tree
        self._ledger = ledger
        self._stats = stats
        self.backups: Backups | None = None  # set once the cache built them
        self.l3: StorageTier | None = None
        self.poll: Callable[..., object] = lambda wait=False: None  # the cache's poll point

    def allocate(self, pools, n_full: int, n_swa: int) -> tuple[np.ndarray, np.ndarray]:
        """Device full and SWA page ids, reclaiming SWA pages and evicting LRU if needed.

        Raises :class:`OutOfPages` (nothing allocated) when even that leaves too few.
        """
        fa = self._ledger[Tier.DEVICE, PageSpace.FULL]
        sa = self._ledger[Tier.DEVICE, PageSpace.SWA]
        while True:
            short_full = n_full - fa.num_free
            short_swa = n_swa - sa.num_free
            if short_full <= 0 and short_swa <= 0:
                break
            if short_swa > 0 and self.reclaim_swa(Tier.DEVICE, short_swa):
                continue
            if self.evict_device(pools, max(short_full, short_swa)) == 0:
                break
        if fa.num_free < n_full:
            raise OutOfPages(fa.name, n_full, fa.num_free)
        if sa.num_free < n_swa:
            raise OutOfPages(sa.name, n_swa, sa.num_free)
        return (
            self._ledger.alloc(Tier.DEVICE, PageSpace.FULL, n_full),
            self._ledger.alloc(Tier.DEVICE, PageSpace.SWA, n_swa),
        )

    def reclaim_swa(self, tier: Tier, n: int) -> int:
        """Frees up to ``n`` SWA pages of ``tier`` outside every protected window."""
        ids = self._tree.reclaim_swa(n, tier)
        if tier is Tier.HOST and self.l3 is not None:
            self.l3.finish_writes({PageSpace.SWA: ids})  # the writes reading them
        self._ledger.free(tier, PageSpace.SWA, ids)
        if tier is Tier.DEVICE:
            self._stats.device_swa_reclaimed_pages += int(ids.size)
        else:
            self._stats.host_swa_reclaimed_pages += int(ids.size)
        return int(ids.size)

    def make_room_on_host(self, space: PageSpace, n: int) -> None:
        """Frees host pages of ``space`` until ``n`` are free, where possible."""
        short = n - self._ledger.num_free(Tier.HOST, space)
        if short > 0 and self.l3 is not None:
            self.l3.drop_landed()  # prefetched pages nobody claimed
            short = n - self._ledger.num_free(Tier.HOST, space)
        if short > 0 and space is PageSpace.SWA:
            short -= self.reclaim_swa(Tier.HOST, short)
        if short > 0:
            self.evict_host(short)

    def evict_device(self, pools, num_pages: int) -> int:
        """Frees at least ``num_pages`` device full pages if possible; returns pages freed.

        LRU over unlocked device leaves: backed-up nodes are demoted (host copy
        kept), others deleted; under ``write_back`` they are backed up first
        (one D2H dispatch reading ``pools``), then demoted.
        """
        self.poll()
        freed = 0
        for _ in range(2):
            res = self._tree.evict_device(num_pages - freed)
            self._ledger.free(Tier.DEVICE, PageSpace.FULL, res.full_ids)
            self._ledger.free(Tier.DEVICE, PageSpace.SWA, res.swa_ids)
            self._ledger.free(Tier.DEVICE, PageSpace.STATE, res.state_ids)
            freed += res.evicted_pages
            if not res.needs_backup or freed >= num_pages:
                break
            assert self.backups is not None, "HiCache sets backups before any eviction"
            self.backups.issue(pools, res.needs_backup)  # write_back: then demote
            self.backups.poll(wait=True)
        self._stats.device_evicted_pages += freed
        return freed

    def _writing(self):
        """``skip`` for the tree's host eviction: pages an L3 write still reads (evicted
        only when the others do not free enough; their writes are waited for)."""
        if self.l3 is None:
            return None
        busy = self.l3.writing()
        if not busy.size:
            return None
        return lambda ids: bool(np.isin(ids, busy, assume_unique=True).any())

    def evict_host(self, num_pages: int) -> int:
        """Frees at least ``num_pages`` host pages (host-only leaves, LRU); returns pages
        freed. Pages no L3 write still reads go first; it waits only for the writes
        that read the slots it frees (on a slow store the write queue runs behind)."""
        res = self._tree.evict_host(num_pages, skip=self._writing())
        if res.evicted_pages < num_pages and self.l3 is not None:  # then pages being written
            more = self._tree.evict_host(num_pages - res.evicted_pages)
            res = dataclasses.replace(
                res,
                full_ids=np.concatenate([res.full_ids, more.full_ids]),
                swa_ids=np.concatenate([res.swa_ids, more.swa_ids]),
                state_ids=np.concatenate([res.state_ids, more.state_ids]),
                evicted_pages=res.evicted_pages + more.evicted_pages,
                deleted_pages=res.deleted_pages + more.deleted_pages,
            )
        if self.l3 is not None:  # the writes that read these slots land first
            self.l3.finish_writes(
                {
                    PageSpace.FULL: res.full_ids,
                    PageSpace.SWA: res.swa_ids,
                    PageSpace.STATE: res.state_ids,
                }
            )
        self._ledger.free(Tier.HOST, PageSpace.FULL, res.full_ids)
        self._ledger.free(Tier.HOST, PageSpace.SWA, res.swa_ids)
        self._ledger.free(Tier.HOST, PageSpace.STATE, res.state_ids)
        self._stats.host_evicted_pages += res.evicted_pages
        return res.evicted_pages

    def flush(self, pools) -> dict[str, int]:
        """Empties device and host, keeping L3 (``HiCache.flush``); returns what it dropped.

        Refuses (``RuntimeError``, nothing changed) while a request is open: it holds
        device pages or a lock. Then waits for every in-flight backup and every L3
        write (a page leaves host only once storage holds it), drops unclaimed L3
        prefetches, and evicts every device page (``write_back``: backed up, then
        written on) and every host page. Returns the pages each tier and space held
        when eviction began, the prefetched host pages dropped, and the objects the
        flush's waits wrote to L3 (one per page, page space and stage).
        """
        led = self._ledger
        spaces = dict.fromkeys(s for (_t, s), _a in led.items())  # the ledger's page spaces
        held = {s.value: led.held(s) for s in spaces if led.held(s)}
        if held:
            raise RuntimeError(f"flush: open requests hold device pages {held}; release them")
        written = self._stats.storage_backed_up_pages
        self.poll(True)  # backups land (their L3 writes queued), L3 writes finish
        locks = sum(c.lock_ref for c in self._tree.root.children.values())
        if locks:
            raise RuntimeError(f"flush: {locks} locks on the tree (open requests); release them")
        dropped = self.l3.drop_landed() if self.l3 is not None else 0
        out = {f"{t.value}_{s.value}_pages": a.num_used for (t, s), a in led.items()}
        self.evict_device(pools, led[Tier.DEVICE, PageSpace.FULL].capacity)
        self.poll(True)  # write-back: the backups that started land and are written
        self.evict_host(led[Tier.HOST, PageSpace.FULL].capacity)  # nothing left to drop
        if self.l3 is not None:
            self.l3.finish_writes()
        left = {f"{t.value}_{s.value}": a.num_used for (t, s), a in led.items() if a.num_used}
        if left:
            raise RuntimeError(f"flush: pages left after evicting everything: {left}")
        out["l3_prefetch_pages_dropped"] = dropped
        out["l3_written_objects"] = self._stats.storage_backed_up_pages - written
        return out
