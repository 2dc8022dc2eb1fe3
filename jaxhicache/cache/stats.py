"""``CacheStats``: the counters of one cache (all O(1) to update)."""

from __future__ import annotations

import dataclasses
from typing import final

__all__ = ["CacheStats"]


@final
@dataclasses.dataclass
class CacheStats:
    """Counters of one :class:`~jaxhicache.cache.HiCache`.

    Hit counters count what was *served* (requests admitted with their
    prefix), never what a match found for a request that was then deferred.
    Tokens are page-aligned prefix tokens.
    """

    requests: int = 0  # admitted requests
    deferred_requests: int = 0  # not admitted for lack of device pages (retry later)
    query_tokens: int = 0  # whole-page tokens of admitted prompts (minus the last token)
    device_hit_tokens: int = 0
    host_hit_tokens: int = 0
    storage_hit_tokens: int = 0  # served from pages an L3 prefetch brought in
    inserted_tokens: int = 0
    extended_pages: int = 0  # device pages added to running requests (extend)
    retracted_requests: int = 0  # preempted: computed pages kept in the tree, rest freed
    backups_issued: int = 0
    backups_skipped: int = 0  # no host room (every host page locked or in flight)
    backups_failed: int = 0  # copies that raised (on any process): dropped everywhere
    backed_up_pages: int = 0
    load_dispatches: int = 0  # merged H2D loads (one per admitted batch with host hits)
    loaded_pages: int = 0  # full pages copied host -> device: host hits and L3 hits
    loaded_swa_pages: int = 0
    device_evicted_pages: int = 0
    host_evicted_pages: int = 0
    device_swa_reclaimed_pages: int = 0
    host_swa_reclaimed_pages: int = 0
    storage_prefetches: int = 0  # L3 fetches started
    storage_prefetched_tokens: int = 0  # tokens fetched from L3 into host slots (not tree nodes)
    storage_backed_up_pages: int = 0  # stage pages written to L3 (absent ones only)
    storage_read_failures: int = 0  # prefetches that failed as a whole (backend error)
    storage_write_failures: int = 0
    storage_lookups: int = 0  # L3 lookups an admission waited for (or found done)
    storage_early_lookups: int = 0  # lookups started when their request was queued
    storage_lookup_timeouts: int = 0  # lookups not back within lookup_timeout_s: misses
    storage_lookups_skipped: int = 0  # not even a whole hit would repay the lookup: misses
    storage_lookup_seconds: float = 0.0  # admission time spent waiting for lookups
    storage_declined_tokens: int = 0  # L3 hit tokens recomputed: cheaper than loading
    divergence_checks: int = 0  # cross-process digest comparisons (check_every)
