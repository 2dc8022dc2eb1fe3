"""``InFlight``: the page and lock bookkeeping of admitted requests until they end.

What :class:`~jaxhicache.cache.hicache.HiCache` does between ``admit`` and the
end of a request, one request at a time (the cache polls, dispatches backups and
counts steps around these calls)::

    requests / pairs / check_growth   validate a call's requests and tokens, all of
       │                              them before anything changes (ValueError)
    insert(req, tokens)               new whole pages to the tree with the request's
       │                              own ids, duplicates freed, the lock moved to
       │                              the new end, SWA ids left behind the window
       │                              handed to the tree; the node to back up, if any
    extend(pools, reqs, pages)        more own pages, all or nothing (OutOfPages)
    release(reqs)                     own pages the tree did not take freed (and L3
                                      host slots), lock dropped, state RELEASED

Invariant: a request's page table only ever holds ids it owns or ids the tree
holds under its lock, so it never reads a page that was freed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import final

import numpy as np

from jaxhicache.cache.eviction import Evictor
from jaxhicache.cache.ledger import PageLedger
from jaxhicache.cache.requests import Request, RequestState, check_tokens
from jaxhicache.cache.states import StateSlots
from jaxhicache.cache.stats import CacheStats
from jaxhicache.pools.device import DevicePools
from jaxhicache.spec import PageSpace, Tier
from jaxhicache.tree import RadixTree, TreeNode, should_backup_on_insert

__all__ = ["InFlight"]


@final
class InFlight:
    """Insert, extend and release of one cache's open requests (no polling, no dispatch)."""

    def __init__(
        self,
        cache_id: int,
        tree: RadixTree,
        ledger: PageLedger,
        evictor: Evictor,
        stats: CacheStats,
        states: StateSlots | None = None,
    ):
        self._id = cache_id
        self._states = states
        self._tree = tree
        self._ledger = ledger
        self._evictor = evictor
        self._stats = stats
        self._window = tree.swa_pages  # the spec's swa_trailing_pages
        self._has_swa = tree.swa_pages > 0

    # ------------------------------------------------------------- validation
    def requests(self, requests, what: str) -> list[Request]:
        """Open requests of this cache, each once (``ValueError`` before any change)."""
        reqs = [requests] if isinstance(requests, Request) else list(requests)
        for req in reqs:
            if not isinstance(req, Request):
                raise ValueError(f"{what}: expected a Request from admit(), got {type(req)!r}")
            if req.cache_id != self._id:
                raise ValueError(f"{what}: the request was admitted by another cache")
            if req.state is not RequestState.OPEN:
                raise ValueError(f"{what}: the request is {req.state.value}; {what} needs open")
        if len({id(r) for r in reqs}) != len(reqs):
            raise ValueError(f"{what}: a request appears twice in one call")
        return reqs

    def pairs(self, requests, tokens, what: str) -> tuple[list[Request], list[np.ndarray]]:
        """One request and its tokens, or a sequence of each, as two checked lists."""
        if isinstance(requests, Request):
            return self.requests(requests, what), [check_tokens(tokens, "tokens")]
        reqs = self.requests(requests, what)
        toks = list(tokens)
        if len(toks) != len(reqs):
            raise ValueError(f"{what}: {len(toks)} token sequences for {len(reqs)} requests")
        return reqs, [check_tokens(t, f"tokens[{i}]") for i, t in enumerate(toks)]

    def check_growth(self, reqs: Sequence[Request], toks: Sequence[np.ndarray]) -> None:
        """``ValueError`` unless each request's tokens extend what it knows and fit its pages."""
        for req, tokens in zip(reqs, toks, strict=True):
            known = req.known_tokens
            n = min(tokens.size, known.size)
            if not np.array_equal(tokens[:n], known[:n]):
                at = int(np.argmax(tokens[:n] != known[:n]))
                what = "prompt" if at < req.prompt.size else "previously inserted tokens"
                raise ValueError(f"tokens disagree with the request's {what} at position {at}")
            if tokens.size <= req.inserted_len:
                raise ValueError(
                    f"tokens ({tokens.size}) must be longer than what the request inserted "
                    f"before ({req.inserted_len}): those pages are in the tree already"
                )
            if tokens.size > req.capacity:
                raise ValueError(
                    f"tokens has {tokens.size} tokens but the request holds KV pages for "
                    f"{req.capacity} positions ({req.num_pages} pages; extend() adds pages)"
                )

    def check_extend(self, requests, num_pages) -> tuple[list[Request], list[int]]:
        """``extend``'s arguments as per-request lists (``ValueError`` naming a bad one)."""
        reqs = self.requests(requests, "extend")
        pages = [num_pages] * len(reqs) if isinstance(num_pages, int | np.integer) else num_pages
        pages = list(pages)
        if len(pages) != len(reqs):
            raise ValueError(f"{len(pages)} num_pages values for {len(reqs)} requests")
        for i, n in enumerate(pages):
            if type(n) is bool or not isinstance(n, int | np.integer) or n < 0:
                raise ValueError(f"num_pages[{i}] must be an int >= 0, got {n!r}")
        return reqs, [int(n) for n in pages]

    # ------------------------------------------------------------- changes
    def insert(self, reqs: Sequence[Request], toks: Sequence[np.ndarray]) -> list[TreeNode]:
        """Validated requests' inserts; returns the nodes the write policy backs up now."""
        return [n for req, t in zip(reqs, toks, strict=True) if (n := self._insert(req, t))]

    def _insert(self, req: Request, tokens: np.ndarray) -> TreeNode | None:
        tree = self._tree
        ps = tree.page_size
        whole = tokens.size // ps
        done = req.own_start + req.inserted_pages  # pages the tree holds for it already
        req.inserted_len = tokens.size
        if tokens.size > req.known_tokens.size:
            req.tokens = tokens
        k = whole - done
        if k <= 0:
            if self._states is not None:  # snapshots inside pages the tree holds already
                self._states.attach(req, tokens[: whole * ps])
            return None
        own_full = req.full_page_ids[done:whole]
        own_swa = req.swa_page_ids[done:whole] if self._has_swa else None
        res = tree.insert(tokens[: whole * ps], own_full, own_swa, salt=req.salt)
        self._ledger.unhold(PageSpace.FULL, k)
        if own_swa is not None:
            self._ledger.unhold(PageSpace.SWA, int((own_swa >= 0).sum()))
        self._ledger.free(Tier.DEVICE, PageSpace.FULL, res.dup_full_ids)
        self._ledger.free(Tier.DEVICE, PageSpace.SWA, res.free_swa_ids)
        self._stats.inserted_tokens += res.new_len
        tree.inc_lock(res.node)  # the lock moves to the new end
        tree.dec_lock(req.node)
        req.node = res.node
        if self._states is not None:
            self._states.attach(req, tokens[: whole * ps])
        req.inserted_pages = whole - req.own_start
        full, swa = tree.device_ids(res.node)  # new arrays: tables handed out stay as they were
        keep = np.arange(whole) >= whole - self._window  # the lock's window
        req.full_page_ids = np.concatenate([full, req.full_page_ids[whole:]]).astype(np.int32)
        req.swa_page_ids = np.concatenate(
            [np.where(keep, swa, -1), req.swa_page_ids[whole:]]
        ).astype(np.int32)
        return res.node if should_backup_on_insert(tree.write_policy, res.node) else None

    def extend(self, pools: DevicePools, reqs: Sequence[Request], pages: Sequence[int]) -> None:
        """Validated requests' new own pages, all or nothing (``OutOfPages``: none given)."""
        total = int(sum(pages))
        full, swa = self._evictor.allocate(pools, total, total if self._has_swa else 0)
        self._ledger.hold(PageSpace.FULL, full.size)
        self._ledger.hold(PageSpace.SWA, swa.size)
        at = 0
        for req, n in zip(reqs, pages, strict=True):
            req.full_page_ids = np.concatenate([req.full_page_ids, full[at : at + n]])
            own_swa = swa[at : at + n] if self._has_swa else np.full(n, -1, np.int32)
            req.swa_page_ids = np.concatenate([req.swa_page_ids, own_swa])
            at += n
        self._stats.extended_pages += total

    def release(self, reqs: Sequence[Request]) -> None:
        """Validated requests' ends: own pages and L3 host slots freed, locks dropped."""
        for req in reqs:
            rest = req.own_start + req.inserted_pages
            full = req.full_page_ids[rest:]
            self._ledger.unhold(PageSpace.FULL, full.size)
            self._ledger.free(Tier.DEVICE, PageSpace.FULL, full)
            if self._has_swa:
                swa = req.swa_page_ids[rest:]
                self._ledger.unhold(PageSpace.SWA, int((swa >= 0).sum()))
                self._ledger.free(Tier.DEVICE, PageSpace.SWA, swa)
            if req.l3_host_full is not None and req.l3_host_swa is not None:  # the L3 slots
                self._ledger.unhold_host(PageSpace.FULL, req.l3_host_full.size)
                self._ledger.unhold_host(PageSpace.SWA, req.l3_host_swa.size)
                self._ledger.free(Tier.HOST, PageSpace.FULL, req.l3_host_full)
                self._ledger.free(Tier.HOST, PageSpace.SWA, req.l3_host_swa)
            if req.l3_host_state is not None:  # hybrids: the prefetched snapshot's host slot
                self._ledger.unhold_host(PageSpace.STATE, req.l3_host_state.size)
                self._ledger.free(Tier.HOST, PageSpace.STATE, req.l3_host_state)
            if self._states is not None:
                self._states.release(req)
            self._tree.dec_lock(req.node)
            req.state = RequestState.RELEASED

    def backed_up(self, request: Request) -> bool:
        """Whether every page ``request`` inserted has its host copy recorded."""
        node = request.node
        while node is not None and node.parent is not None:
            if node.host_full is None:
                return False
            node = node.parent
        return node is self._tree.root or node is None
