"""L3 storage: page hash keys, the object format, and backends (see README.md here)."""

from .backend import ObjectRead, Pending, StorageBackend
from .faults import FaultInjectionBackend
from .file_backend import FileBackend, default_cache_dir
from .format import IntegrityError
from .keys import (
    LAYOUT_VERSION,
    Namespace,
    cache_format,
    check_page_hash,
    object_key,
    page_hashes,
    tp_sharded_kinds,
)
from .latency import LatencyBackend
from .layout import ObjectLayout, plan_units, stored_bytes_per_page
from .stats import StorageStats

_LAZY = {"TensorStoreBackend", "parse_kvstore_spec"}


def __getattr__(name: str):
    # tensorstore is an optional dependency (extra ``storage``): import it on first use
    if name in _LAZY:
        from . import tensorstore_backend

        return getattr(tensorstore_backend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LAYOUT_VERSION",
    "FaultInjectionBackend",
    "FileBackend",
    "IntegrityError",
    "LatencyBackend",
    "Namespace",
    "ObjectLayout",
    "ObjectRead",
    "Pending",
    "StorageBackend",
    "StorageStats",
    "TensorStoreBackend",
    "cache_format",
    "check_page_hash",
    "default_cache_dir",
    "object_key",
    "page_hashes",
    "parse_kvstore_spec",
    "plan_units",
    "stored_bytes_per_page",
    "tp_sharded_kinds",
]
