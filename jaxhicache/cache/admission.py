"""``Admission``: one request in, a :class:`Request` with its page table out.

Per request, in the order of the batch::

    match prompt[:-1] ──> lock the prefix ──> L3 prefix after it (prefetch claim)
       │
    allocate device pages: host-only prefix pages to load, the window's SWA pages on
       │                   host only, the request's own pages up to its reservation
       │                   (Evictor: reclaim, then LRU eviction; OutOfPages: nothing
       │                   taken, the lock and the prefetch claim given back)
    the tree takes the load pages now (a later request of the batch sees them on
       │  device); their host→device moves join the batch's one PageMove
       v
    Request(node=locked prefix end, full/swa page ids, own_from, hit tokens per tier)

Per batch (``batch`` then, after the cache's step, ``dispatch``): requests in order,
the first that does not fit deferred with every later one (``OutOfPages`` only when
the first does not fit alone); then the batch's one load (or ``LayerwiseLoad``), the
backups a hit asks for, and the :class:`Batch` with its page tables.

Why the longest prefix always fits best (so there is no shorter one to fall back
to): see ``cache/README.md``, *Admission*.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, final

import numpy as np

from jaxhicache.cache.eviction import Evictor
from jaxhicache.cache.ledger import PageLedger
from jaxhicache.cache.requests import Batch, LoadParts, Request, check_tokens, page_tables
from jaxhicache.cache.states import StateSlots
from jaxhicache.cache.stats import CacheStats
from jaxhicache.pools.allocator import OutOfPages
from jaxhicache.spec import PageSpace, Tier
from jaxhicache.tree import RadixTree, TreeNode, should_backup_on_hit

if TYPE_CHECKING:
    from jaxhicache.cache.backups import Backups
    from jaxhicache.cache.l3 import StorageTier
    from jaxhicache.transfer import TransferEngine

__all__ = ["Admission", "Admitted", "check_admission"]

_EMPTY = np.zeros(0, np.int32)

Admitted = tuple[list[Request], list[int], LoadParts, list[TreeNode]]
"""``(admitted requests, deferred indices, their loads, nodes to back up on this hit)``."""


def check_admission(prompts, max_new_tokens, salts) -> tuple[list, list, list]:
    """``admit``'s arguments as per-request lists; ``ValueError`` naming a bad one."""
    if isinstance(prompts, np.ndarray) and prompts.ndim == 1:
        raise ValueError("prompts must be a sequence of token sequences, got one 1-D array")
    prompts = [check_tokens(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
    if isinstance(max_new_tokens, Sequence):
        new = list(max_new_tokens)
        if len(new) != len(prompts):
            raise ValueError(f"{len(new)} max_new_tokens values for {len(prompts)} prompts")
    else:
        new = [max_new_tokens] * len(prompts)
    for i, n in enumerate(new):
        if type(n) is bool or not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"max_new_tokens[{i}] must be an int >= 1, got {n!r}")
    salts = [None] * len(prompts) if salts is None else list(salts)
    if len(salts) != len(prompts):
        raise ValueError(f"{len(salts)} salts for {len(prompts)} prompts")
    for i, salt in enumerate(salts):
        if salt is not None and (not isinstance(salt, str | bytes) or not salt):
            raise ValueError(f"salts[{i}] must be a non-empty str or bytes, got {salt!r}")
    return prompts, new, salts


@final
class Admission:
    """Admits requests one by one into a batch's shared :class:`LoadParts`, then loads them."""

    def __init__(
        self,
        cache_id: int,
        tree: RadixTree,
        ledger: PageLedger,
        evictor: Evictor,
        stats: CacheStats,
        l3: StorageTier | None,
        has_swa: bool,
        *,
        engine: TransferEngine,
        backups: Backups,
        states: StateSlots | None = None,
    ):
        self._cache_id = cache_id
        self._states = states
        self._tree = tree
        self._ledger = ledger
        self._evictor = evictor
        self._stats = stats
        self._l3 = l3
        self._has_swa = has_swa
        self._engine = engine
        self._backups = backups
        self.transfer_seconds = 0.0  # dispatching the loads

    def batch(
        self, pools, prompts: Sequence[np.ndarray], new: Sequence, salts: Sequence
    ) -> Admitted:
        """Admits checked requests in order until one does not fit; it and later ones wait.

        Raises :class:`OutOfPages` (naming the request) when the first does not fit.
        """
        admitted: list[Request] = []
        deferred: list[int] = []
        parts = LoadParts()
        on_hit: list[TreeNode] = []  # nodes to back up on this hit (selective policy)
        for i, (prompt, n, salt) in enumerate(zip(prompts, new, salts, strict=True)):
            if deferred:  # first come, first served: no overtaking
                deferred.append(i)
                continue
            try:
                admitted.append(self.one(pools, prompt, int(n), salt, parts, on_hit))
            except OutOfPages as e:
                if not admitted:
                    raise OutOfPages(
                        f"{e.allocator} (request 0 of the batch: {prompt.size} prompt + {n} new "
                        "tokens)",
                        e.requested,
                        e.free,
                    ) from e
                deferred.append(i)
        self._stats.deferred_requests += len(deferred)
        return admitted, deferred, parts, on_hit

    def dispatch(self, pools, admitted: Admitted, layerwise: bool):
        """The batch's one load (or ``LayerwiseLoad``) and hit backups; ``(pools, Batch)``."""
        requests, deferred, parts, on_hit = admitted
        move = parts.move()
        handle = layer_load = None
        if not move.empty:
            t0 = time.perf_counter()
            if layerwise:
                layer_load = self._engine.prepare_layerwise(pools, move)
            else:
                pools, handle = self._engine.load(pools, move)
            self.transfer_seconds += time.perf_counter() - t0
            self._stats.load_dispatches += 1
            self._stats.loaded_pages += int(move.full_device.size)
            self._stats.loaded_swa_pages += int(move.swa_device.size)
        if on_hit:
            self._backups.issue(pools, on_hit)
        full, swa = page_tables(requests)
        batch = Batch(
            requests=tuple(requests),
            deferred=tuple(deferred),
            full_table=full,
            swa_table=swa,
            num_pages=np.array([r.num_pages for r in requests], np.int32),
            cached_tokens=np.array([r.cached_tokens for r in requests], np.int32),
            handle=handle,
            layerwise=layer_load,
        )
        return pools, batch

    def one(
        self,
        pools,
        prompt: np.ndarray,
        max_new: int,
        salt,
        parts: LoadParts,
        backups: list[TreeNode],
    ) -> Request:
        """Admits one request (pages for ``len(prompt) + max_new - 1`` positions);
        nodes to back up on this hit are appended to ``backups``. Raises
        :class:`OutOfPages` having taken nothing."""
        tree, ps = self._tree, self._tree.page_size
        key = prompt[:-1]
        total_pages = math.ceil((prompt.size + max_new - 1) / ps)
        m = tree.match_prefix(key, salt=salt)
        tree.inc_lock(m.node)  # before L3: a prefetch may evict host leaves for room
        pre = self._l3.prefix_for(key, salt, m) if self._l3 is not None else None
        w = m.swa_window_pages if self._has_swa else 0
        need_swa = (m.swa_device_ids < 0) & (m.swa_host_ids >= 0) if w else np.zeros(0, bool)
        first = m.matched_len // ps  # the request's first own page
        own = total_pages - first
        n_load = int(m.host_full_ids.size)
        if pre is not None and w:
            need_swa[:] = False  # the window is the L3 prefetch's, after the host pages
        n_swa_load = int(need_swa.sum())
        # Own SWA pages: none for L3 pages outside the hit's window (nothing reads them).
        swa_from = pre.swa_first if pre is not None else first
        n_own_swa = (total_pages - swa_from) if self._has_swa else 0
        state_slot = -1  # a device slot to load a host snapshot into
        try:
            full, swa = self._evictor.allocate(pools, n_load + own, n_swa_load + n_own_swa)
            # a device slot to load a host snapshot into: the L3 hit's, else the tree's
            l3_state = pre is not None and pre.host_state.size > 0
            host_snap = pre is None and m.state_device_slot < 0 <= m.state_host_slot
            if self._states is not None and (l3_state or host_snap):
                try:
                    state_slot = int(self._states.alloc(Tier.DEVICE, 1)[0])
                except OutOfPages:
                    self._ledger.free(Tier.DEVICE, PageSpace.FULL, full)
                    self._ledger.free(Tier.DEVICE, PageSpace.SWA, swa)
                    raise
        except OutOfPages:
            tree.dec_lock(m.node)
            if pre is not None and self._l3 is not None:
                self._l3.drop(pre)
            raise
        load_full, own_full = full[:n_load], full[n_load:]
        load_swa, own_swa = swa[:n_swa_load], swa[n_swa_load:]
        pages = m.matched_len // ps
        swa_window = m.swa_device_ids.copy() if w else _EMPTY
        if w:
            swa_window[need_swa] = load_swa
        if n_load or n_swa_load:
            # The tree takes the load pages now (the data lands before any forward reads
            # them: the load is dispatched, or applied by the first chunk, before that).
            unused_full, unused_swa = tree.set_device_value(
                m.node,
                load_full,
                np.where(need_swa, swa_window, -1).astype(np.int32) if w else None,
            )
            if unused_full.size or unused_swa.size:
                raise AssertionError(  # a fresh match's host-only pages are all ours to load
                    f"load bookkeeping: {unused_full.size} full / {unused_swa.size} SWA ids unused"
                )
            parts.full_device.append(load_full)
            parts.full_host.append(m.host_full_ids)
            parts.swa_device.append(load_swa)
            parts.swa_host.append(m.swa_host_ids[need_swa])
        prefix_swa = np.full(pages, -1, np.int32)
        if w and pre is None:
            prefix_swa[pages - w :] = swa_window
        if self._has_swa:
            own_swa_table = np.concatenate(
                [np.full(swa_from - first, -1, np.int32), own_swa]
            ).astype(np.int32)
        else:
            own_swa_table = np.full(own, -1, np.int32)
        storage_hit = 0
        cached = m.matched_len
        if pre is not None:  # L3 pages fill the request's first own pages
            n_pre = pre.end - pre.first
            parts.full_device.append(own_full[:n_pre])
            parts.full_host.append(pre.host_full)
            if self._has_swa:
                parts.swa_device.append(own_swa[: pre.host_swa.size])
                parts.swa_host.append(pre.host_swa)
            storage_hit = n_pre * ps
            cached += storage_hit
            self._ledger.hold_host(PageSpace.FULL, pre.host_full.size)
            self._ledger.hold_host(PageSpace.SWA, pre.host_swa.size)
            self._ledger.hold_host(PageSpace.STATE, pre.host_state.size)
        self._ledger.hold(PageSpace.FULL, own_full.size)
        self._ledger.hold(PageSpace.SWA, own_swa.size)
        s = self._stats
        s.requests += 1
        s.query_tokens += (key.size // ps) * ps
        s.device_hit_tokens += m.device_len
        s.host_hit_tokens += m.host_len
        s.storage_hit_tokens += storage_hit
        req = Request(
            cache_id=self._cache_id,
            prompt=prompt,
            max_new_tokens=max_new,
            node=m.node,
            cached_tokens=cached,
            device_hit_tokens=m.device_len,
            host_hit_tokens=m.host_len,
            storage_hit_tokens=storage_hit,
            salt=salt,
            full_page_ids=np.concatenate([m.device_full_ids, load_full, own_full]).astype(np.int32),
            swa_page_ids=np.concatenate([prefix_swa, own_swa_table]).astype(np.int32),
            page_size=ps,
            own_from=first,
            l3_host_full=None if pre is None else pre.host_full,
            l3_host_swa=None if pre is None else pre.host_swa,
            l3_host_state=None if pre is None else pre.host_state,
        )
        if self._states is not None:
            l3_snap = int(pre.host_state[0]) if pre is not None and pre.host_state.size else -1
            self._states.admit(req, m, parts, state_slot, l3_snap, cached)
        if m.matched_len and should_backup_on_hit(self._tree.write_policy, m.node):
            backups.append(m.node)
        return req
