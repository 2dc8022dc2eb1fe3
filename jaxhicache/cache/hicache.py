"""``HiCache``: the object a serving engine talks to (L1 device pools + L2 host slabs + L3).

The engine owns the :class:`~jaxhicache.pools.device.DevicePools` pytree and
threads it through the calls that move data; the cache owns page ids, the
radix tree and the host slabs. A continuous-batching engine calls, per step::

    admit(pools, prompts, reserve)  ─> (pools', Batch)   prefixes matched and locked,
       │                              pages for prompt + reserve, every request's
       │                              host/L3 loads merged into ONE dispatch (or a
       │                              LayerwiseLoad for the first forward chunk)
    forward(pools', page tables [B, max_pages], starts)   (the engine's)
       │
    insert(pools, requests, tokens)   after each prefill chunk and whenever a decode
       │                              page fills: new whole pages to the tree, lock
       │                              moved to the new end (others hit them now),
       │                              the batch's backups in ONE D2H dispatch
    extend(pools, requests, pages)    more own pages for decode, all or nothing
       │                              (OutOfPages: the engine retracts someone)
    retract(pools, requests, tokens)  preempted: computed pages to the tree, rest
       │                              freed, unlocked; re-admission hits them
    release(requests)                 finished or aborted: own pages not in the tree
                                      freed, lock dropped

Batched forms do one poll (one agreement round under multi-controller JAX) per
call. Every call validates all of its requests before it changes anything.

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
import time
from collections.abc import Sequence
from typing import final

import numpy as np
from jax.sharding import Mesh

from jaxhicache.cache.admission import Admission, check_admission
from jaxhicache.cache.backups import Backups
from jaxhicache.cache.config import HiCacheConfig
from jaxhicache.cache.eviction import Evictor
from jaxhicache.cache.l3 import StorageTier
from jaxhicache.cache.ledger import PageLedger
from jaxhicache.cache.requests import (
    Batch,
    LoadParts,
    Request,
    RequestState,
    check_tokens,
    page_tables,
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
from jaxhicache.tree import MatchResult, RadixTree, TreeNode, should_backup_on_insert

__all__ = ["HiCache"]

_cache_ids = itertools.count(1)


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
            reserve_bytes=config.host_reserve_bytes,
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
        self._evictor = Evictor(self.tree, self.ledger, self._stats)
        if (store is None) != (config.storage is None):
            raise ValueError(
                "an L3 tier needs both a store (a StorageBackend) and config.storage "
                f"(got store={type(store).__name__}, config.storage={config.storage!r})"
            )
        self.l3 = (
            None
            if store is None or config.storage is None  # both or neither (checked above)
            else StorageTier(
                store,
                config.storage,
                spec,
                self.host,
                self.ledger,
                self.tree,
                self._stats,
                agreement=self.agreement,
                make_room=self._evictor.make_room_on_host,
            )
        )
        self._backups = Backups(
            self.engine,
            self.tree,
            self.ledger,
            self._stats,
            self._evictor.make_room_on_host,
            on_backed_up=None if self.l3 is None else self.l3.write,
            agreement=self.agreement,
        )
        self._evictor.backups, self._evictor.l3 = self._backups, self.l3
        self._evictor.poll = self._poll
        self._steps = 0  # control-plane steps (admit / insert / ...), for check_every
        self._id = next(_cache_ids)
        self._admission = Admission(
            self._id, self.tree, self.ledger, self._evictor, self._stats, self.l3, self._has_swa
        )
        self._transfer_seconds = 0.0

    @property
    def page_size(self) -> int:
        """Tokens per page (the spec's)."""
        return self.spec.page_size

    @property
    def write_policy(self):
        """When device pages are backed up to host (``config.write_policy``)."""
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
        """The longest usable cached prefix of ``tokens`` on device and host (whole
        pages, SWA window present): the hit a request would get, reported without
        taking it. An inspection: takes no lock, counts no hit, moves no data and
        leaves the LRU order as it was (it may split a node where the match ends,
        which changes no decision)."""
        key = check_tokens(tokens, "tokens", allow_empty=True)
        return self.tree.match_prefix(key, salt=salt, touch=False)

    def prefetch(self, tokens, *, salt=None) -> bool:
        """Starts the L3 lookup of a request that is queued, not yet admitted, so its
        admission finds the answer instead of waiting for the store. Returns whether a
        lookup started (``False`` without an L3 tier, or when the tree holds nearly
        all of it)."""
        if self.l3 is None:
            return False
        return self.l3.start_lookup(check_tokens(tokens, "tokens")[:-1], salt)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """Feeds the L3 cost model one measurement: prefilling ``tokens`` took
        ``seconds`` (it fetches only what is cheaper to load than to recompute)."""
        if self.l3 is not None:
            self.l3.observe_recompute(tokens, seconds)

    def backed_up(self, request: Request) -> bool:
        """Whether every page ``request`` inserted has its host copy recorded (its
        write-through backups landed and a poll point recorded them): the per-request
        save completion a connector reports. Call :meth:`poll` to record landed ones."""
        node = request.node
        while node is not None and node.parent is not None:
            if node.host_full is None:
                return False
            node = node.parent
        return node is self.tree.root or node is None

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
        prompts, new, salts = check_admission(prompts, max_new_tokens, salts)
        self._poll()
        admitted: list[Request] = []
        deferred: list[int] = []
        parts = LoadParts()
        on_hit: list[TreeNode] = []  # nodes to back up on this hit (selective policy)
        for i, (prompt, n, salt) in enumerate(zip(prompts, new, salts, strict=True)):
            if deferred:  # first come, first served: no overtaking
                deferred.append(i)
                continue
            try:
                admitted.append(self._admission.one(pools, prompt, int(n), salt, parts, on_hit))
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
        if on_hit:
            self._backups.issue(pools, on_hit)
        full, swa = page_tables(admitted)
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

    def _poll(self, wait: bool = False) -> int:
        done = self._backups.poll(wait)
        if self.l3 is not None:
            self.l3.poll(wait)
        return done

    # ------------------------------------------------------ requests in flight
    def insert(self, pools: DevicePools, requests: Request | Sequence[Request], tokens) -> None:
        """Hands the new whole pages of each request's computed ``tokens`` to the tree.

        ``requests``: one :class:`Request` and its ``tokens``, or a sequence of
        requests and one token sequence each (one poll and one backup dispatch for
        all). ``tokens``: the sequence whose KV the request wrote so far — a prefix
        of its prompt after a prefill chunk, or the prompt followed by the generated
        tokens but the last (never fed back). Each call must give more tokens than
        the request's previous insert, agree with its prompt and with what it gave
        before, and stay within its pages (:attr:`Request.capacity`); anything else
        raises ``ValueError`` before any request changes. The page ids are the
        request's own (it cannot name foreign ones).

        Afterwards the tree holds the request's whole pages, its lock sits at their
        end (the old end is unlocked), and its page table holds the tree's ids for
        them (another request's where that one inserted the same pages first; the
        request's own duplicates are freed). A trailing partial page stays the
        request's. Backups follow the write policy (they read ``pools``).
        """
        reqs, toks = self._pairs(requests, tokens, "insert")
        self._check_pools(pools)
        for req, t in zip(reqs, toks, strict=True):
            self._check_growth(req, t)
        self._poll()
        backups = [n for req, t in zip(reqs, toks, strict=True) if (n := self._insert(req, t))]
        if backups:
            self._backups.issue(pools, backups)
        self._step()

    def _check_growth(self, req: Request, tokens: np.ndarray) -> None:
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

    def _insert(self, req: Request, tokens: np.ndarray) -> TreeNode | None:
        """One request's insert (validated); returns the node to back up, if any."""
        ps, tree = self.page_size, self.tree
        whole = tokens.size // ps
        done = req.own_start + req.inserted_pages  # pages the tree holds for it already
        req.inserted_len = tokens.size
        if tokens.size > req.known_tokens.size:
            req.tokens = tokens
        k = whole - done
        if k <= 0:
            return None
        own_full = req.full_page_ids[done:whole]
        own_swa = req.swa_page_ids[done:whole] if self._has_swa else None
        res = tree.insert(tokens[: whole * ps], own_full, own_swa, salt=req.salt)
        self.ledger.unhold(PageSpace.FULL, k)
        if own_swa is not None:
            self.ledger.unhold(PageSpace.SWA, int((own_swa >= 0).sum()))
        self.ledger.free(Tier.DEVICE, PageSpace.FULL, res.dup_full_ids)
        self.ledger.free(Tier.DEVICE, PageSpace.SWA, res.free_swa_ids)
        self._stats.inserted_tokens += res.new_len
        tree.inc_lock(res.node)  # the lock moves to the new end
        tree.dec_lock(req.node)
        req.node = res.node
        req.inserted_pages = whole - req.own_start
        full, swa = tree.device_ids(res.node)  # new arrays: tables handed out stay as they were
        keep = np.arange(whole) >= whole - self.spec.swa_trailing_pages  # the lock's window
        req.full_page_ids = np.concatenate([full, req.full_page_ids[whole:]]).astype(np.int32)
        req.swa_page_ids = np.concatenate(
            [np.where(keep, swa, -1), req.swa_page_ids[whole:]]
        ).astype(np.int32)
        return res.node if should_backup_on_insert(self.write_policy, res.node) else None

    def extend(self, pools: DevicePools, requests: Request | Sequence[Request], num_pages) -> None:
        """Gives each request ``num_pages`` more own pages (one int for all, or one each),
        all or nothing: when the device has too few even after SWA reclaim and LRU
        eviction, raises :class:`OutOfPages` having given none (the engine then
        retracts or waits). Eviction may back pages up (``write_back``), reading
        ``pools``."""
        reqs = self._requests(requests, "extend")
        pages = [num_pages] * len(reqs) if isinstance(num_pages, int | np.integer) else num_pages
        pages = list(pages)
        if len(pages) != len(reqs):
            raise ValueError(f"{len(pages)} num_pages values for {len(reqs)} requests")
        for i, n in enumerate(pages):
            if type(n) is bool or not isinstance(n, int | np.integer) or n < 0:
                raise ValueError(f"num_pages[{i}] must be an int >= 0, got {n!r}")
        self._check_pools(pools)
        total = int(sum(pages))
        full, swa = self._evictor.allocate(pools, total, total if self._has_swa else 0)
        self.ledger.hold(PageSpace.FULL, full.size)
        self.ledger.hold(PageSpace.SWA, swa.size)
        at = 0
        for req, n in zip(reqs, pages, strict=True):
            req.full_page_ids = np.concatenate([req.full_page_ids, full[at : at + n]])
            own_swa = swa[at : at + n] if self._has_swa else np.full(n, -1, np.int32)
            req.swa_page_ids = np.concatenate([req.swa_page_ids, own_swa])
            at += n
        self._stats.extended_pages += total
        self._step()

    def retract(self, pools: DevicePools, requests: Request | Sequence[Request], tokens) -> None:
        """Preempts running requests: the whole pages of their computed ``tokens`` go to
        the tree (as :meth:`insert`, where there is anything new), the rest of their
        pages are freed and their locks dropped. Re-admitting a request with its
        prompt and generated tokens then hits whatever of it survived."""
        reqs, toks = self._pairs(requests, tokens, "retract")
        self._check_pools(pools)
        grow = [(r, t) for r, t in zip(reqs, toks, strict=True) if t.size > r.inserted_len]
        for req, t in grow:
            self._check_growth(req, t)
        if grow:
            self.insert(pools, [r for r, _ in grow], [t for _, t in grow])
        self.release(reqs)
        self._stats.retracted_requests += len(reqs)

    def release(self, requests: Request | Sequence[Request]) -> None:
        """Ends requests (finished, or aborted at any point: nothing more is inserted):
        frees their pages the tree did not take and unlocks what they held."""
        for req in self._requests(requests, "release"):
            rest = req.own_start + req.inserted_pages
            full = req.full_page_ids[rest:]
            self.ledger.unhold(PageSpace.FULL, full.size)
            self.ledger.free(Tier.DEVICE, PageSpace.FULL, full)
            if self._has_swa:
                swa = req.swa_page_ids[rest:]
                self.ledger.unhold(PageSpace.SWA, int((swa >= 0).sum()))
                self.ledger.free(Tier.DEVICE, PageSpace.SWA, swa)
            if req.l3_host_full is not None and req.l3_host_swa is not None:  # the L3 slots
                self.ledger.unhold_host(PageSpace.FULL, req.l3_host_full.size)
                self.ledger.unhold_host(PageSpace.SWA, req.l3_host_swa.size)
                self.ledger.free(Tier.HOST, PageSpace.FULL, req.l3_host_full)
                self.ledger.free(Tier.HOST, PageSpace.SWA, req.l3_host_swa)
            self.tree.dec_lock(req.node)
            req.state = RequestState.RELEASED

    def _requests(self, requests, what: str) -> list[Request]:
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

    def _pairs(self, requests, tokens, what: str) -> tuple[list[Request], list[np.ndarray]]:
        if isinstance(requests, Request):
            return self._requests(requests, what), [check_tokens(tokens, "tokens")]
        reqs = self._requests(requests, what)
        toks = list(tokens)
        if len(toks) != len(reqs):
            raise ValueError(f"{what}: {len(toks)} token sequences for {len(reqs)} requests")
        return reqs, [check_tokens(t, f"tokens[{i}]") for i, t in enumerate(toks)]

    # --------------------------------------------------------------- eviction
    def evict(self, pools: DevicePools, num_pages: int) -> int:
        """Frees at least ``num_pages`` device full pages if possible; returns pages freed.

        LRU over unlocked device leaves: backed-up nodes are demoted (host copy
        kept), others deleted; under ``write_back`` they are backed up first
        (reading ``pools``).
        """
        self._check_pools(pools)
        return self._evictor.evict_device(pools, num_pages)

    def evict_host(self, num_pages: int) -> int:
        """Frees at least ``num_pages`` host pages (host-only leaves, LRU); returns pages freed."""
        return self._evictor.evict_host(num_pages)

    def flush(self, pools: DevicePools) -> dict[str, int]:
        """Empties device and host, keeping L3: every backup and L3 write lands first, then
        everything is evicted; returns the pages dropped per tier and space and the objects
        written to L3 meanwhile. ``RuntimeError`` while a request is open."""
        self._check_pools(pools)
        return self._evictor.flush(pools)

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
