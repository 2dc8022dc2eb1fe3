"""``HiCache``: the object a serving engine talks to (L1 device pools + L2 host slabs).

The engine owns the :class:`~jaxhicache.pools.device.DevicePools` pytree and
threads it through the calls that move data; the cache owns page ids, the
radix tree and the host slabs::

    prompts ──admit(pools, prompts, max_new_tokens)──> (pools', Batch)
       │   per request: match prompt[:-1] (the last token is always computed),
       │   lock the prefix, allocate device pages for host-only prefix pages,
       │   window SWA pages and the request's own pages (evicting LRU, reclaiming
       │   SWA pages outside protected windows); a request that does not fit is
       │   deferred with every later one
       │   (a shorter prefix never needs fewer pages), else it and the rest wait
       │   all requests' host→device moves: ONE dispatch (or a LayerwiseLoad that
       │   the first forward chunk applies layer by layer)
       v
    forward(pools', batch.full_table, batch.swa_table, batch.cached_tokens)
       │
    insert(pools, request, computed_tokens)   whole pages to the tree (validated
       │                                      against the request's prompt and pages);
       │                                      backups per WritePolicy (D2H, async)
    release(request)                          unused own pages freed, prefix unlocked

Determinism: every decision (page ids, evictions, backups) is taken here once
for all PP stages; completions of asynchronous backups change the tree only at
poll points, and LRU uses operation counters, so processes that replay the same
request stream keep identical trees.

Invariants (:meth:`HiCache.check_invariants`): tree invariants; every allocated
page is owned by exactly one of the tree, an open request, an in-flight backup
(:mod:`jaxhicache.cache.ledger`); nodes with an in-flight backup or an open
request are locked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import time
from collections.abc import Sequence
from typing import final

import numpy as np
from jax.sharding import Mesh

from jaxhicache.cache.backups import Backups
from jaxhicache.cache.config import HiCacheConfig
from jaxhicache.cache.l3 import StorageTier
from jaxhicache.cache.ledger import PageLedger
from jaxhicache.cache.requests import (
    Batch,
    LoadParts,
    Request,
    RequestState,
    check_tokens,
    stack_tables,
)
from jaxhicache.cache.stats import CacheStats
from jaxhicache.distributed import Agreement, DivergenceError, local_stages
from jaxhicache.layer_map import build_layer_maps
from jaxhicache.mesh import PP
from jaxhicache.pools.allocator import OutOfPages
from jaxhicache.pools.device import DevicePools, allocate_device_pools
from jaxhicache.pools.host import HostPools
from jaxhicache.spec import ModelCacheSpec, PageSpace, Tier
from jaxhicache.storage.backend import StorageBackend
from jaxhicache.transfer import TransferEngine
from jaxhicache.tree import (
    MatchResult,
    RadixTree,
    should_backup_on_hit,
    should_backup_on_insert,
)

__all__ = ["HiCache"]

_cache_ids = itertools.count(1)
_EMPTY = np.zeros(0, np.int32)


@final
class HiCache:
    """Hierarchical prefix cache over device pools and host slabs for all PP stages.

    Args:
      spec: what the model caches.
      mesh: ``('pp', 'tp')`` mesh; its ``pp`` size is the pipeline depth.
      config: capacities, write policy, layouts, kernel backend, copy path, L3 knobs.
      store: the L3 backend (needs ``config.storage``; ``None``: no L3 tier).
    """

    def __init__(
        self,
        spec: ModelCacheSpec,
        mesh: Mesh,
        config: HiCacheConfig,
        store: StorageBackend | None = None,
    ):
        if not isinstance(spec, ModelCacheSpec):
            raise ValueError(f"spec must be a ModelCacheSpec, got {type(spec).__name__}")
        if not isinstance(config, HiCacheConfig):
            raise ValueError(f"config must be a HiCacheConfig, got {type(config).__name__}")
        self.spec = spec
        self.mesh = mesh
        self.config = config
        partition = list(config.partition) if config.partition is not None else None
        self.layer_maps = build_layer_maps(spec, mesh.shape[PP], partition)
        self._has_swa = spec.swa_trailing_pages > 0
        self._device_swa = config.device_swa_capacity(spec)
        host_pages = config.host_capacity()
        host_swa = config.host_swa_capacity(spec)
        self.host = HostPools(  # this process's stages only
            spec,
            self.layer_maps,
            host_pages,
            host_swa,
            layout=config.host_layout,
            ranks=local_stages(mesh),
        )
        self.ledger = PageLedger(config.device_pages, self._device_swa, host_pages, host_swa)
        self.engine = TransferEngine(
            mesh,
            self.layer_maps,
            self.host,
            backend=config.backend,
            tuning=config.tuning,
            host_is_current=self.ledger.host_is_current,
            copy_path=config.copy_path,
        )
        self.tree = RadixTree(
            spec.page_size, spec.swa_trailing_pages, write_policy=config.write_policy
        )
        # Multi-controller JAX: one MIN all-reduce where a decision rests on what only
        # some processes can see (identity, no collective, in a single process).
        self.agreement = Agreement()
        self._stats = CacheStats()
        if (store is None) != (config.storage is None):
            raise ValueError(
                "an L3 tier needs both a store (a StorageBackend) and config.storage "
                f"(got store={type(store).__name__}, config.storage={config.storage!r})"
            )
        self.l3 = (
            None
            if store is None
            else StorageTier(
                store,
                config.storage,
                spec,
                self.host,
                self.ledger,
                self.tree,
                self._stats,
                agreement=self.agreement,
                make_room=self._make_room_on_host,
            )
        )
        self._backups = Backups(
            self.engine,
            self.tree,
            self.ledger,
            self._stats,
            self._make_room_on_host,
            on_backed_up=None if self.l3 is None else self.l3.write,
            agreement=self.agreement,
        )
        self._steps = 0  # control-plane steps (admit / insert), for check_every
        self._id = next(_cache_ids)
        self._transfer_seconds = 0.0

    @property
    def page_size(self) -> int:
        return self.spec.page_size

    @property
    def write_policy(self):
        return self.config.write_policy

    # ------------------------------------------------------------------ pools
    def new_device_pools(self) -> DevicePools:
        """Zeroed device pools of this cache's geometry (the engine owns and threads them)."""
        return allocate_device_pools(
            self.spec, self.mesh, self.layer_maps, self.config.device_pages, self._device_swa
        )

    def _check_pools(self, pools) -> None:
        if not isinstance(pools, DevicePools):
            raise ValueError(f"pools must be DevicePools, got {type(pools).__name__}")
        if set(pools.kinds()) != set(self.spec.kinds()):
            raise ValueError(
                f"pools hold {sorted(pools.kinds())}, this cache's spec has "
                f"{sorted(self.spec.kinds())}"
            )
        want = (self.config.device_pages, self._device_swa)
        if (pools.num_pages, pools.num_swa_pages) != want:
            raise ValueError(
                f"pools have {pools.num_pages} full / {pools.num_swa_pages} SWA pages, this "
                f"cache allocates {want[0]} / {want[1]} (use cache.new_device_pools())"
            )

    # ------------------------------------------------------------------ match
    def lookup(self, tokens, *, salt=None) -> MatchResult:
        """The longest usable cached prefix of ``tokens`` (whole pages, SWA window present).

        For inspection: takes no lock, counts no hit, moves no data (it does
        refresh the LRU order of the matched path, as any match does).
        """
        return self.tree.match_prefix(check_tokens(tokens, "tokens", allow_empty=True), salt=salt)

    # ------------------------------------------------------------------ admit
    def admit(
        self,
        pools: DevicePools,
        prompts: Sequence,
        max_new_tokens: int | Sequence[int] = 1,
        *,
        salts: Sequence | None = None,
        layerwise: bool = False,
    ) -> tuple[DevicePools, Batch]:
        """Admits a batch of requests: prefixes locked, pages allocated, prefix loads issued.

        Args:
          pools: the device pools (donated when a load is dispatched).
          prompts: token-id sequences. Each request's cached prefix is matched on
            ``prompt[:-1]``: the last prompt token is always computed.
          max_new_tokens: per request (or one for all, ``>= 1``); the request gets
            pages for positions ``[0, len(prompt) + max_new_tokens - 1)``.
          salts: per request ``cache_salt`` (``str`` / ``bytes`` / ``None``), set by the
            serving engine: requests with different salts share no page in any tier.
          layerwise: return the prefix load as ``batch.layerwise`` for the model's
            first forward chunk to apply layer by layer (overlapping the copy of
            layer ``l + 1`` with the compute of layer ``l``) instead of dispatching it.

        Returns ``(pools, batch)``. Requests are admitted in order; the first one
        that does not fit (after SWA reclaim and LRU eviction) is deferred with
        every later one (``batch.deferred``): nothing is taken for them and no hit
        is counted. Raises :class:`OutOfPages` when not even the first request fits.
        """
        self._check_pools(pools)
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
        self._poll()
        admitted: list[Request] = []
        deferred: list[int] = []
        parts = LoadParts()
        for i, (prompt, n, salt) in enumerate(zip(prompts, new, salts, strict=True)):
            if deferred:  # first come, first served: no overtaking
                deferred.append(i)
                continue
            try:
                admitted.append(self._admit_one(pools, prompt, int(n), salt, parts))
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
        self._step()
        move = parts.move()
        handle = layer_load = None
        if move.full_device.size or move.swa_device.size:
            t0 = time.perf_counter()
            if layerwise:
                layer_load = self.engine.prepare_layerwise(pools, move)
            else:
                pools, handle = self.engine.load(pools, move)
            self._transfer_seconds += time.perf_counter() - t0
            self._stats.load_dispatches += 1
            self._stats.loaded_pages += int(move.full_device.size)
            self._stats.loaded_swa_pages += int(move.swa_device.size)
        full, swa = stack_tables(tuple(admitted))
        batch = Batch(
            requests=tuple(admitted),
            deferred=tuple(deferred),
            full_table=full,
            swa_table=swa,
            num_pages=np.array([r.num_pages for r in admitted], np.int32),
            cached_tokens=np.array([r.cached_tokens for r in admitted], np.int32),
            handle=handle,
            layerwise=layer_load,
        )
        return pools, batch

    def _admit_one(
        self, pools, prompt: np.ndarray, max_new: int, salt, parts: LoadParts
    ) -> Request:
        ps, tree = self.page_size, self.tree
        key = prompt[:-1]
        kv_tokens = prompt.size + max_new - 1
        total_pages = math.ceil(kv_tokens / ps)
        m = tree.match_prefix(key, salt=salt)
        tree.inc_lock(m.node)  # before L3: a prefetch may evict host leaves for room
        pre = self.l3.prefix_for(key, salt, m) if self.l3 is not None else None
        # The longest prefix always fits best: a prefix of c tokens, d of them on device,
        # needs ceil(kv / page) - d / page device full pages whatever c is, and never more
        # SWA pages than a shorter one (see cache/README.md), so there is no shorter
        # prefix to fall back to: if this does not fit, the request does not fit.
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
        try:
            full, swa = self._allocate(pools, n_load + own, n_swa_load + n_own_swa)
        except OutOfPages:
            tree.dec_lock(m.node)
            if pre is not None:
                self.l3.drop(pre)
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
            self.ledger.hold_host(PageSpace.FULL, pre.host_full.size)
            self.ledger.hold_host(PageSpace.SWA, pre.host_swa.size)
        self.ledger.hold(PageSpace.FULL, own_full.size)
        self.ledger.hold(PageSpace.SWA, own_swa.size)
        s = self._stats
        s.requests += 1
        s.query_tokens += (key.size // ps) * ps
        s.device_hit_tokens += m.device_len
        s.host_hit_tokens += m.host_len
        s.storage_hit_tokens += storage_hit
        req = Request(
            cache_id=self._id,
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
        )
        if m.matched_len and should_backup_on_hit(self.write_policy, m.node):
            self._backups.issue(pools, m.node)
        return req

    def _poll(self, wait: bool = False) -> int:
        done = self._backups.poll(wait)
        if self.l3 is not None:
            self.l3.poll(wait)
        return done

    # ----------------------------------------------------------------- insert
    def insert(self, pools: DevicePools, request: Request, tokens) -> None:
        """Hands the whole pages of ``request``'s computed ``tokens`` to the tree.

        ``tokens``: the sequence whose KV the request wrote, i.e. its prompt
        followed by the generated tokens but the last (never fed back). It must
        start with the request's prompt and be no longer than the positions the
        request has pages for; anything else raises ``ValueError``. The page ids
        are the request's own (it cannot name foreign ones). A trailing partial
        page stays with the request until :meth:`release`. Backups follow the
        write policy (they read ``pools``).
        """
        self._check_request(request, "insert", RequestState.OPEN)
        self._check_pools(pools)
        tokens = check_tokens(tokens, "tokens")
        p = request.prompt
        if tokens.size < p.size or not np.array_equal(tokens[: p.size], p):
            raise ValueError(
                f"tokens ({tokens.size}) must start with the request's {p.size}-token prompt"
            )
        if tokens.size > request.kv_tokens:
            raise ValueError(
                f"tokens has {tokens.size} tokens but the request holds KV pages for "
                f"{request.kv_tokens} positions (prompt {p.size} + max_new_tokens "
                f"{request.max_new_tokens} - 1)"
            )
        self._poll()
        ps = self.page_size
        whole = tokens.size // ps
        first = request.own_start
        k = whole - first
        if k > 0:
            own_full = request.full_page_ids[first:whole]
            own_swa = request.swa_page_ids[first:whole] if self._has_swa else None
            res = self.tree.insert(tokens[: whole * ps], own_full, own_swa, salt=request.salt)
            self.ledger.unhold(PageSpace.FULL, k)
            if self._has_swa:
                self.ledger.unhold(PageSpace.SWA, int((own_swa >= 0).sum()))
            self.ledger.free(Tier.DEVICE, PageSpace.FULL, res.dup_full_ids)
            self.ledger.free(Tier.DEVICE, PageSpace.SWA, res.free_swa_ids)
            self._stats.inserted_tokens += res.new_len
        request.inserted_pages = max(k, 0)
        request.state = RequestState.INSERTED  # the tree owns those pages from here on
        if k > 0 and should_backup_on_insert(self.write_policy, res.node):
            self._backups.issue(pools, res.node)
        self._step()

    def release(self, request: Request) -> None:
        """Ends ``request``: frees its pages the tree did not take, unlocks its prefix."""
        self._check_request(request, "release", RequestState.OPEN, RequestState.INSERTED)
        rest = request.own_start + request.inserted_pages
        full = request.full_page_ids[rest:]
        self.ledger.unhold(PageSpace.FULL, full.size)
        self.ledger.free(Tier.DEVICE, PageSpace.FULL, full)
        if self._has_swa:
            swa = request.swa_page_ids[rest:]
            self.ledger.unhold(PageSpace.SWA, int((swa >= 0).sum()))
            self.ledger.free(Tier.DEVICE, PageSpace.SWA, swa)
        if request.l3_host_full is not None:  # the L3 slots: the load read them by now
            self.ledger.unhold_host(PageSpace.FULL, request.l3_host_full.size)
            self.ledger.unhold_host(PageSpace.SWA, request.l3_host_swa.size)
            self.ledger.free(Tier.HOST, PageSpace.FULL, request.l3_host_full)
            self.ledger.free(Tier.HOST, PageSpace.SWA, request.l3_host_swa)
        self.tree.dec_lock(request.node)
        request.state = RequestState.RELEASED

    def _check_request(self, request, what: str, *states: RequestState) -> None:
        if not isinstance(request, Request):
            raise ValueError(f"{what}: expected a Request from admit(), got {type(request)!r}")
        if request.cache_id != self._id:
            raise ValueError(f"{what}: the request was admitted by another cache")
        if request.state not in states:
            raise ValueError(
                f"{what}: the request is {request.state.value}; {what} needs "
                + " or ".join(s.value for s in states)
            )

    # ------------------------------------------------------------- allocation
    def _allocate(self, pools, n_full: int, n_swa: int) -> tuple[np.ndarray, np.ndarray]:
        """Device full and SWA page ids, reclaiming SWA pages and evicting LRU if needed."""
        fa = self.ledger[Tier.DEVICE, PageSpace.FULL]
        sa = self.ledger[Tier.DEVICE, PageSpace.SWA]
        while True:
            short_full = n_full - fa.num_free
            short_swa = n_swa - sa.num_free
            if short_full <= 0 and short_swa <= 0:
                break
            if short_swa > 0 and self._reclaim_swa(Tier.DEVICE, short_swa):
                continue
            if self._evict_device(pools, max(short_full, short_swa)) == 0:
                break
        if fa.num_free < n_full:
            raise OutOfPages(fa.name, n_full, fa.num_free)
        if sa.num_free < n_swa:
            raise OutOfPages(sa.name, n_swa, sa.num_free)
        return (
            self.ledger.alloc(Tier.DEVICE, PageSpace.FULL, n_full),
            self.ledger.alloc(Tier.DEVICE, PageSpace.SWA, n_swa),
        )

    def _reclaim_swa(self, tier: Tier, n: int) -> int:
        if tier is Tier.HOST and self.l3 is not None:
            self.l3.finish_writes()  # they read host slots
        ids = self.tree.reclaim_swa(n, tier)
        self.ledger.free(tier, PageSpace.SWA, ids)
        if tier is Tier.DEVICE:
            self._stats.device_swa_reclaimed_pages += int(ids.size)
        else:
            self._stats.host_swa_reclaimed_pages += int(ids.size)
        return int(ids.size)

    def _make_room_on_host(self, space: PageSpace, n: int) -> None:
        short = n - self.ledger.num_free(Tier.HOST, space)
        if short > 0 and self.l3 is not None:
            self.l3.drop_landed()  # prefetched pages nobody claimed
            short = n - self.ledger.num_free(Tier.HOST, space)
        if short > 0 and space is PageSpace.SWA:
            short -= self._reclaim_swa(Tier.HOST, short)
        if short > 0:
            self.evict_host(short)

    # --------------------------------------------------------------- eviction
    def evict(self, pools: DevicePools, num_pages: int) -> int:
        """Frees at least ``num_pages`` device full pages if possible; returns pages freed.

        LRU over unlocked device leaves: backed-up nodes are demoted (host copy
        kept), others deleted; under ``write_back`` they are backed up first
        (reading ``pools``).
        """
        self._check_pools(pools)
        return self._evict_device(pools, num_pages)

    def _evict_device(self, pools, num_pages: int) -> int:
        self._poll()
        freed = 0
        for _ in range(2):
            res = self.tree.evict_device(num_pages - freed)
            self.ledger.free(Tier.DEVICE, PageSpace.FULL, res.full_ids)
            self.ledger.free(Tier.DEVICE, PageSpace.SWA, res.swa_ids)
            freed += res.evicted_pages
            if not res.needs_backup or freed >= num_pages:
                break
            for n in res.needs_backup:  # write_back: back up, then demote on the next pass
                self._backups.issue(pools, n)
            self._backups.poll(wait=True)
        self._stats.device_evicted_pages += freed
        return freed

    def evict_host(self, num_pages: int) -> int:
        """Frees at least ``num_pages`` host pages (host-only leaves, LRU); returns pages freed."""
        if self.l3 is not None:
            self.l3.finish_writes()  # they read host slots
        res = self.tree.evict_host(num_pages)
        self.ledger.free(Tier.HOST, PageSpace.FULL, res.full_ids)
        self.ledger.free(Tier.HOST, PageSpace.SWA, res.swa_ids)
        self._stats.host_evicted_pages += res.evicted_pages
        return res.evicted_pages

    # -------------------------------------------------------------- backups
    def poll(self, wait: bool = False) -> int:
        """Records landed backups (and L3 prefetches and writes) in the tree (all of them
        with ``wait``); returns how many backups."""
        return self._poll(wait)

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict:
        """Hits per tier (tokens served), pages in use per tier and space, bytes moved."""
        s = dataclasses.asdict(self._stats)
        t = self.engine.stats_snapshot()
        s.update(
            {
                f"{tier.value}_{space.value}_pages_used": a.num_used
                for (tier, space), a in self.ledger.items()
            }
        )
        s.update(
            backup_bytes=t.backup_bytes,
            load_bytes=t.load_bytes,
            transfer_seconds=self._transfer_seconds + t.backup_seconds,
            agreement_calls=self.agreement.calls,
            agreement_seconds=self.agreement.seconds,
            in_flight_backups=len(self._backups),
            hit_rate=(s["device_hit_tokens"] + s["host_hit_tokens"] + s["storage_hit_tokens"])
            / max(s["query_tokens"], 1),
        )
        if self.l3 is not None:
            s.update(self.l3.backend.stats().as_prometheus(prefix="l3_"))
        return s

    def digest(self) -> bytes:
        """A hash of this process's decision state: the tree and every page allocator.

        Processes replaying the same request stream must have equal digests.
        """
        h = hashlib.blake2b(self.tree.digest(), digest_size=16)
        for (tier, space), a in self.ledger.items():
            h.update(f"{tier.value}/{space.value}".encode())
            h.update(a.state_bytes())
        return h.digest()

    def check_agreement(self) -> None:
        """Raises :class:`~jaxhicache.distributed.DivergenceError` unless every process
        holds the same :meth:`digest` (one all-reduce; a no-op in a single process).
        Every process must call it at the same point."""
        self._stats.divergence_checks += 1
        if not self.agreement.digests_equal(self.digest()):
            raise DivergenceError(
                f"process {self.agreement.process_index} of {self.agreement.processes}: "
                "cache state differs from another process's (same request stream, "
                "different decisions)"
            )

    def _step(self) -> None:
        self._steps += 1
        n = self.config.check_every
        if n and self._steps % n == 0:
            self.check_agreement()

    def check_invariants(self) -> None:
        """Tree invariants plus page ownership (see :mod:`jaxhicache.cache.ledger`)."""
        self.tree.check_invariants()
        in_flight = self._backups.in_flight()
        if self.l3 is not None:
            for space, n in self.l3.in_flight().items():
                in_flight[space] += n
        self.ledger.check(self.tree, in_flight)

    def close(self) -> None:
        """Waits for every backup, prefetch and L3 write, then stops the workers."""
        self._poll(wait=True)
        if self.l3 is not None:
            self._poll(wait=True)  # backups that landed above start L3 writes
            self.l3.close()
        self.engine.close()
