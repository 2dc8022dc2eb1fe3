"""The cache a serving engine talks to: :class:`HiCache` and its configuration.

Modules (import direction top → bottom)::

    hicache   HiCache: admit / insert / release / evict / poll / stats (the facade)
    requests  Request, Batch (page tables handed to the engine)
    l3        StorageConfig (LookupWindows, PrefetchPolicy), StorageTier: prefetch
              from and write-back to L3 storage
    backups   in-flight D2H backups (issue, land, record at poll points)
    ledger    page allocators per (tier, page space) and page ownership
    config    HiCacheConfig (frozen, validated)
    stats     CacheStats counters
"""

from jaxhicache.cache.config import HiCacheConfig
from jaxhicache.cache.hicache import HiCache
from jaxhicache.cache.l3 import LookupWindows, PrefetchPolicy, StorageConfig
from jaxhicache.cache.requests import Batch, Request, RequestState
from jaxhicache.cache.stats import CacheStats
from jaxhicache.pools.allocator import OutOfPages
from jaxhicache.tree import WritePolicy

__all__ = [
    "Batch",
    "CacheStats",
    "HiCache",
    "HiCacheConfig",
    "LookupWindows",
    "OutOfPages",
    "PrefetchPolicy",
    "Request",
    "RequestState",
    "StorageConfig",
    "WritePolicy",
]
