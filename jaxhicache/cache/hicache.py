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

This class is the facade: it validates, polls, dispatches backups and counts
steps; the work is done by parts :func:`~jaxhicache.cache.assembly.assemble`
builds: ``Admission`` (``admit``), ``InFlight`` (``insert`` / ``extend`` /
``retract`` / ``release``), ``Evictor``, ``Backups`` and the L3 ``StorageTier``.

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
from collections.abc import Sequence
from typing import final

from jax.sharding import Mesh

from jaxhicache.cache.admission import check_admission
from jaxhicache.cache.assembly import assemble
from jaxhicache.cache.config import HiCacheConfig
from jaxhicache.cache.requests import Batch, Request, check_tokens
from jaxhicache.distributed import DivergenceError
from jaxhicache.pools.device import DevicePools, allocate_device_pools
from jaxhicache.spec import ModelCacheSpec
from jaxhicache.storage.backend import StorageBackend
from jaxhicache.tree import MatchResult

__all__ = ["HiCache"]

_cache_ids = itertools.count(1)


@final
class HiCache:
    """Hierarchical prefix cache over device pools and host slabs for all PP stages.

    Construction builds the layer maps, allocates (zeroed) this process's host
    slabs, and starts the transfer engine and, with a store, the L3 workers; the
    device pools come from :meth:`new_device_pools`. Call :meth:`close` at the end.

    Args:
      spec: what the model caches.
      mesh: ``('pp', 'tp')`` mesh; its ``pp`` size is the pipeline depth.
      config: capacities, write policy, layouts, kernel backend, copy path, L3 knobs.
      store: the L3 backend (needs ``config.storage``; ``None``: no L3 tier).

    Raises:
      ValueError: ``spec`` is not a :class:`~jaxhicache.spec.ModelCacheSpec` or
        ``config`` not a :class:`HiCacheConfig`; a store without
        ``config.storage`` or the reverse; or, from the parts it builds, a
        partition that does not fit the mesh's ``pp`` or host slabs larger than
        the memory available.
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
        self._id = next(_cache_ids)
        p = assemble(spec, mesh, config, store, self._id)
        self.layer_maps, self.host, self.ledger = p.layer_maps, p.host, p.ledger
        self.engine, self.tree, self.agreement, self.l3 = p.engine, p.tree, p.agreement, p.l3
        self._device_swa, self._device_states = p.device_swa_pages, p.device_state_slots
        # Recurrent hybrids: the snapshot slots of each forward (``states.plan`` /
        # ``states.computed``, see :mod:`jaxhicache.cache.states`); None otherwise.
        self.states = p.states
        self._stats, self._evictor, self._backups = p.stats, p.evictor, p.backups
        self._admission, self._inflight = p.admission, p.inflight
        self._evictor.poll = self._poll
        self._steps = 0  # control-plane steps (admit / insert / ...), for check_every

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
        """Zeroed device pools of this cache's geometry (the engine owns and threads them).

        Returns:
          :class:`~jaxhicache.pools.device.DevicePools` with ``config.device_pages``
          full pages and the configured SWA pages, sharded over the mesh; the
          calls that take ``pools`` accept only pools of this geometry.
        """
        return allocate_device_pools(
            self.spec,
            self.mesh,
            self.layer_maps,
            self.config.device_pages,
            self._device_swa,
            self._device_states,
        )

    def _check_pools(self, pools) -> None:
        if not isinstance(pools, DevicePools):
            raise ValueError(f"pools must be DevicePools, got {type(pools).__name__}")
        if set(pools.kinds()) != set(self.spec.kinds()):
            raise ValueError(
                f"pools hold {sorted(pools.kinds())}, this cache's spec has "
                f"{sorted(self.spec.kinds())}"
            )
        want = (self.config.device_pages, self._device_swa, self._device_states)
        if (pools.num_pages, pools.num_swa_pages, pools.num_state_slots) != want:
            raise ValueError(
                f"pools have {pools.num_pages} full / {pools.num_swa_pages} SWA pages / "
                f"{pools.num_state_slots} snapshot slots, this cache allocates {want[0]} / "
                f"{want[1]} / {want[2]} (use cache.new_device_pools())"
            )

    # ------------------------------------------------------------------ match
    def lookup(self, tokens, *, salt=None) -> MatchResult:
        """The longest usable cached prefix of ``tokens`` on device and host.

        Whole pages, with the SWA window present: the hit a request would get,
        reported without taking it. An inspection: takes no lock, counts no hit,
        moves no data and leaves the LRU order as it was (it may split a node
        where the match ends, which changes no decision). L3 is not consulted.

        Args:
          tokens: token ids; matched as given (``admit`` matches ``prompt[:-1]``:
            pass that for a request's hit). May be empty.
          salt: the tenant's ``cache_salt``; only pages inserted with the same
            salt match.

        Returns:
          The :class:`~jaxhicache.tree.MatchResult`: ``matched_len`` tokens, of
          which ``device_len`` on device and ``host_len`` on host only.

        Raises:
          ValueError: ``tokens`` is not a 1-D sequence of token ids.
        """
        key = check_tokens(tokens, "tokens", allow_empty=True)
        return self.tree.match_prefix(key, salt=salt, touch=False)

    def prefetch(self, tokens, *, salt=None) -> bool:
        """Starts the L3 lookup of a queued request, so its admission need not wait for the store.

        Looks up (on a worker) the pages of ``tokens[:-1]`` after what the tree
        holds now; nothing is fetched or reserved until the request is admitted.

        Args:
          tokens: the request's prompt (non-empty), as it will be admitted.
          salt: its ``cache_salt``, as it will be admitted.

        Returns:
          Whether a lookup started: ``False`` without an L3 tier, when the tree
          already holds all but ``prefetch_threshold`` tokens of it, or when a
          lookup of the same prefix is pending.

        Raises:
          ValueError: ``tokens`` is empty or not a 1-D sequence of token ids.
        """
        if self.l3 is None:
            return False
        return self.l3.start_lookup(check_tokens(tokens, "tokens")[:-1], salt)

    def stored_pages(self, tokens, *, salt=None) -> int:
        """How many pages after what device and host hold L3 has of a queued request.

        For a server's host watermark: free that many host slots before the request
        is admitted (an L3 prefetch only evicts host-only pages to make room). The
        answer is this process's stages' (not agreed with other processes). It comes
        from the request's lookup (:meth:`prefetch`, started here if it was not),
        which stays queued for the admission: the store is not asked twice.

        Args:
          tokens: the request's prompt (non-empty), as it will be admitted.
          salt: its ``cache_salt``, as it will be admitted.

        Returns:
          Pages from the end of the tree's match that every local stage holds; 0
          without an L3 tier, below ``prefetch_threshold``, or when the lookup is
          not answered within ``lookup_timeout_s``.

        Raises:
          ValueError: ``tokens`` is empty or not a 1-D sequence of token ids.
        """
        if self.l3 is None:
            return 0
        return self.l3.stored_pages(check_tokens(tokens, "tokens")[:-1], salt)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """Feeds the L3 cost model one measurement of the recompute cost.

        The model fetches from L3 only what is cheaper to load than to recompute;
        without an L3 tier this does nothing.

        Args:
          tokens: tokens one prefill forward computed.
          seconds: its wall time.
        """
        if self.l3 is not None:
            self.l3.observe_recompute(tokens, seconds)

    def backed_up(self, request: Request) -> bool:
        """Whether every page ``request`` inserted has its host copy recorded.

        Its backups landed and a poll point recorded them: the per-request save
        completion a connector reports. Call :meth:`poll` to record landed ones.

        Args:
          request: a request of this cache (not validated: open or released).

        Returns:
          ``True`` when every node from the tree's root to the request's locked
          node has a host copy (so also when it holds no page of the tree).
        """
        return self._inflight.backed_up(request)

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

        Requests are admitted in order; the first one that does not fit (after SWA
        reclaim and LRU eviction) is deferred with every later one
        (``batch.deferred``): nothing is taken for them and no hit is counted.

        Returns:
          ``(pools, batch)``: the pools to use from now on (new ones when a load
          was dispatched) and the :class:`Batch` of admitted requests, their page
          tables ``int32[B, max_pages]`` padded with ``-1``, page counts, cached
          tokens, deferred indices and the load handle (or ``batch.layerwise``).

        Raises:
          OutOfPages: the batch's first request does not fit even alone (its
            message names the request's sizes; nothing is taken).
          ValueError: pools of another geometry, or a bad prompt, count or salt
            (named), before anything changes.
          DivergenceError: with ``config.check_every``, when this call is a
            check point and the processes' states differ (the batch is admitted).
        """
        self._check_pools(pools)
        prompts, new, salts = check_admission(prompts, max_new_tokens, salts)
        self._poll()
        admitted = self._admission.batch(pools, prompts, new, salts)
        self._step()
        return self._admission.dispatch(pools, admitted, layerwise)

    def _poll(self, wait: bool = False, l3: bool = True) -> int:
        done = self._backups.poll(wait)
        if self.l3 is not None:
            self.l3.poll(wait and l3)
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

        Args:
          pools: the device pools the requests wrote their KV into; read by the
            backups, never kept or donated.
          requests: one open request of this cache, or a sequence of them, each
            once.
          tokens: one token sequence, or one per request.

        Raises:
          ValueError: a request that is not an open request of this cache or
            appears twice, a token count that differs from the request count,
            bad tokens as above, or pools of another geometry (nothing changed).
          DivergenceError: with ``config.check_every``, at a check point where
            the processes' states differ (the insert has happened).
        """
        reqs, toks = self._inflight.pairs(requests, tokens, "insert")
        self._check_pools(pools)
        self._inflight.check_growth(reqs, toks)
        self._poll()
        backups = self._inflight.insert(reqs, toks)
        if backups:
            self._backups.issue(pools, backups)
        self._step()

    def extend(self, pools: DevicePools, requests: Request | Sequence[Request], num_pages) -> None:
        """Gives each request ``num_pages`` more own pages (one int for all, or one each).

        All or nothing: when the device has too few even after SWA reclaim and
        LRU eviction, raises :class:`OutOfPages` having given none (the engine
        then retracts or waits). Each request's page table grows by its pages
        (full and, with an SWA spec, SWA), raising its :attr:`Request.capacity`.

        Args:
          pools: the device pools; read only when eviction backs pages up
            (``write_back``).
          requests: one open request of this cache, or a sequence of them.
          num_pages: an int ``>= 0`` for every request, or a sequence of one each.

        Raises:
          ValueError: a request that is not open or not this cache's, a repeated
            request, a count that is negative, not an int, or of the wrong number,
            or pools of another geometry (nothing changed).
          OutOfPages: the device cannot supply them all (nothing given).
          DivergenceError: with ``config.check_every``, at a check point where
            the processes' states differ.
        """
        reqs, pages = self._inflight.check_extend(requests, num_pages)
        self._check_pools(pools)
        self._inflight.extend(pools, reqs, pages)
        self._step()

    def retract(self, pools: DevicePools, requests: Request | Sequence[Request], tokens) -> None:
        """Preempts running requests: computed pages to the tree, the rest freed, locks dropped.

        The whole pages of each request's ``tokens`` go to the tree as
        :meth:`insert` puts them (for requests whose ``tokens`` are longer than
        their last insert; shorter ones are not checked against the prompt), then
        every request is released. Re-admitting a request with its prompt and
        generated tokens then hits whatever of it survived.

        Args:
          pools: the device pools (read by the insert's backups).
          requests: one open request of this cache, or a sequence of them.
          tokens: one token sequence, or one per request: what each computed.

        Raises:
          ValueError: as :meth:`insert` raises it, for the requests with new
            tokens, or as :meth:`release` does (nothing changed).
          DivergenceError: as :meth:`insert` raises it.
        """
        reqs, toks = self._inflight.pairs(requests, tokens, "retract")
        self._check_pools(pools)
        grow = [(r, t) for r, t in zip(reqs, toks, strict=True) if t.size > r.inserted_len]
        self._inflight.check_growth([r for r, _ in grow], [t for _, t in grow])
        if grow:
            self.insert(pools, [r for r, _ in grow], [t for _, t in grow])
        self.release(reqs)
        self._stats.retracted_requests += len(reqs)

    def release(self, requests: Request | Sequence[Request]) -> None:
        """Ends requests (finished, or aborted at any point: nothing more is inserted).

        Frees their device pages the tree did not take and any host slots an L3
        prefetch claimed for them, drops their locks and marks them released; a
        request is released exactly once.

        Args:
          requests: one open request of this cache, or a sequence of them.

        Raises:
          ValueError: a request that is not an open request of this cache, or one
            given twice (nothing changed).
        """
        self._inflight.release(self._inflight.requests(requests, "release"))

    # --------------------------------------------------------------- eviction
    def evict(self, pools: DevicePools, num_pages: int) -> int:
        """Frees at least ``num_pages`` device full pages if possible; returns pages freed.

        LRU over unlocked device leaves: backed-up nodes are demoted (host copy
        kept), others deleted; under ``write_back`` they are backed up first
        (reading ``pools``).

        Args:
          pools: the device pools (read by ``write_back`` backups).
          num_pages: device full pages wanted free.

        Returns:
          Device full pages freed; fewer than ``num_pages`` when locks protect
          the rest, possibly more (whole nodes are evicted).

        Raises:
          ValueError: pools of another geometry.
        """
        self._check_pools(pools)
        return self._evictor.evict_device(pools, num_pages)

    def evict_host(self, num_pages: int) -> int:
        """Frees at least ``num_pages`` host pages (host-only leaves, LRU); returns pages freed.

        Pages an L3 write reads go last; their queued writes are dropped, running ones waited for.

        Args:
          num_pages: host full pages wanted free.

        Returns:
          Host pages freed (fewer when too few host-only leaves are unlocked).
        """
        return self._evictor.evict_host(num_pages)

    def flush(self, pools: DevicePools) -> dict[str, int]:
        """Empties device and host, keeping L3: every backup and L3 write lands first.

        Then unclaimed L3 prefetches are dropped and every device and host page is
        evicted (``write_back``: backed up first). A prefix admitted afterwards is
        served from what L3 holds.

        Args:
          pools: the device pools (read by ``write_back`` backups).

        Returns:
          ``{"<tier>_<space>_pages": n}`` (``device_full_pages``, ...): the pages
          each held when eviction began; ``l3_prefetch_pages_dropped``; and
          ``l3_written_objects``, the objects written to L3 while it waited.

        Raises:
          ValueError: pools of another geometry.
          RuntimeError: a request is open (it holds device pages or a lock); it
            is refused before any eviction.
        """
        self._check_pools(pools)
        return self._evictor.flush(pools)

    # -------------------------------------------------------------- backups
    def poll(self, wait: bool = False, *, l3: bool = True) -> int:
        """Records landed backups in the tree, and polls L3 prefetches and writes.

        Outcomes are agreed across processes before they are applied, so every
        process should poll at the same points. ``admit`` and ``insert`` poll too.

        Args:
          wait: block until every in-flight backup (and L3 work) has finished.
          l3: with ``wait``, wait for L3 prefetches and writes too (``False``: the
            backups only; a slow store's write queue does not hold the caller).

        Returns:
          How many backups this poll recorded.
        """
        return self._poll(wait, l3)

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict:
        """Hits per tier (tokens served), pages in use per tier and space, bytes moved.

        Returns:
          A new dict: every :class:`CacheStats` counter; ``<tier>_<space>_pages_used``;
          ``backup_bytes``, ``load_bytes``, ``transfer_seconds``;
          ``agreement_calls``, ``agreement_seconds``; ``in_flight_backups``;
          ``hit_rate`` (hit tokens of every tier over query tokens); and with a
          store, its backend's counters prefixed ``l3_``.
        """
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
            transfer_seconds=self._admission.transfer_seconds + t.backup_seconds,
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

        Returns:
          16 bytes (BLAKE2b) over the tree's digest and every allocator's free
          stack and generations.
        """
        h = hashlib.blake2b(self.tree.digest(), digest_size=16)
        for (tier, space), a in self.ledger.items():
            h.update(f"{tier.value}/{space.value}".encode())
            h.update(a.state_bytes())
        return h.digest()

    def check_agreement(self) -> None:
        """Checks that every process holds the same :meth:`digest`.

        One all-reduce (a no-op in a single process); every process must call it
        at the same point. ``config.check_every`` calls it every N steps.

        Raises:
          DivergenceError: another process's digest differs (same request
            stream, different decisions).
        """
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
        """Tree invariants plus page ownership (see :mod:`jaxhicache.cache.ledger`).

        Every allocated page is owned by exactly one of the tree, an open request,
        an in-flight backup or an L3 prefetch. O(tree): for tests and debugging.

        Raises:
          AssertionError: an invariant is broken (the message says which).
        """

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
