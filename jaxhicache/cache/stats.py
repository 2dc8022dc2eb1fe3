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

    Attributes:
      requests: admitted requests.
      deferred_requests: requests not admitted for lack of device pages (retry
        later).
      query_tokens: whole-page tokens of admitted prompts (minus the last token).
      device_hit_tokens: prefix tokens served from device.
      host_hit_tokens: prefix tokens served from host (loaded back).
      storage_hit_tokens: prefix tokens served from pages an L3 prefetch brought in.
      inserted_tokens: tokens given to ``insert``.
      extended_pages: device pages added to running requests (``extend``).
      retracted_requests: preempted requests (computed pages kept in the tree,
        the rest freed).
      backups_issued: D2H backups started.
      backups_skipped: backups not started for lack of host room (every host
        page locked or in flight).
      backups_failed: copies that raised (on any process): dropped everywhere.
      backed_up_pages: pages the backups copied to host.
      load_dispatches: merged H2D loads (one per admitted batch with host hits).
      loaded_pages: full pages copied host -> device: host hits and L3 hits.
      loaded_swa_pages: SWA pages copied host -> device.
      device_evicted_pages: device full pages evicted.
      host_evicted_pages: host full pages evicted.
      device_swa_reclaimed_pages: device SWA pages reclaimed.
      host_swa_reclaimed_pages: host SWA pages reclaimed.
      storage_prefetches: L3 fetches started.
      storage_prefetched_tokens: tokens fetched from L3 into host slots (not tree
        nodes).
      storage_backed_up_pages: stage pages written to L3 (absent ones only).
      storage_read_failures: prefetches that failed as a whole (backend error).
      storage_write_failures: L3 write batches that failed (backend error).
      storage_dropped_writes: pages whose queued L3 write was dropped because host
        eviction freed their slots before the store got to them.
      storage_lookups: L3 lookups an admission waited for (or found done).
      storage_early_lookups: lookups started when their request was queued.
      storage_lookup_timeouts: lookups not back within ``lookup_timeout_s``
        (misses).
      storage_lookups_skipped: lookups not made because not even a whole hit
        would repay them (misses).
      storage_lookup_seconds: admission time spent waiting for lookups.
      storage_declined_tokens: L3 hit tokens recomputed because that was
        cheaper than loading them.
      divergence_checks: cross-process digest comparisons (``check_every``).
    """

    requests: int = 0
    deferred_requests: int = 0
    query_tokens: int = 0
    device_hit_tokens: int = 0
    host_hit_tokens: int = 0
    storage_hit_tokens: int = 0
    inserted_tokens: int = 0
    extended_pages: int = 0
    retracted_requests: int = 0
    backups_issued: int = 0
    backups_skipped: int = 0
    backups_failed: int = 0
    backed_up_pages: int = 0
    load_dispatches: int = 0
    loaded_pages: int = 0
    loaded_swa_pages: int = 0
    device_evicted_pages: int = 0
    host_evicted_pages: int = 0
    device_swa_reclaimed_pages: int = 0
    host_swa_reclaimed_pages: int = 0
    storage_prefetches: int = 0
    storage_prefetched_tokens: int = 0
    storage_backed_up_pages: int = 0
    storage_read_failures: int = 0
    storage_write_failures: int = 0
    storage_dropped_writes: int = 0
    storage_lookups: int = 0
    storage_early_lookups: int = 0
    storage_lookup_timeouts: int = 0
    storage_lookups_skipped: int = 0
    storage_lookup_seconds: float = 0.0
    storage_declined_tokens: int = 0
    divergence_checks: int = 0
