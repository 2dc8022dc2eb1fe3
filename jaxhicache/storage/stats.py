"""``StorageStats``: the monotonic counters of one L3 backend and their Prometheus names.

Each :class:`~jaxhicache.storage.backend.StorageBackend` keeps one and hands out
snapshots (``backend.stats()``); ``as_prometheus()`` names every field
``jaxhicache_storage_<field>``. Standard library only.
"""

from __future__ import annotations

import dataclasses

__all__ = ["StorageStats"]


@dataclasses.dataclass
class StorageStats:
    """Monotonic counters of one backend; ``as_prometheus()`` gives the metric names.

    Pages and tokens count *stage pages*: one page of one page space on one
    stage (tokens = pages × page size). A PP-4 restore of ``n`` pages of both
    spaces therefore adds ``8 n`` pages; label by stage / space upstream if needed.

    Attributes:
      hit_pages_total: pages of the prefix :meth:`StorageBackend.exists_prefix`
        lookups found.
      hit_tokens_total: the same in tokens.
      miss_pages_total: the queried pages after that prefix.
      miss_tokens_total: the same in tokens.
      prefetched_pages_total: pages :meth:`StorageBackend.get` loaded into host
        slabs.
      prefetched_tokens_total: the same in tokens.
      prefetch_failed_pages_total: pages it could not load (missing object, I/O
        error or integrity failure).
      backed_up_pages_total: pages :meth:`StorageBackend.put` wrote.
      backed_up_tokens_total: the same in tokens.
      backup_failed_pages_total: pages it could not write.
      read_bytes_total: bytes read (storage → host), object headers included.
      write_bytes_total: bytes written (host → storage), object headers included.
      read_seconds_total: wall time of the ``get`` calls.
      write_seconds_total: wall time of the ``put`` calls.
      read_objects_total: objects read.
      write_objects_total: objects written.
      missing_objects_total: objects ``get`` found absent.
      integrity_failures_total: objects that failed a check (each one is then
        deleted).
      read_errors_total: I/O errors of reads and existence checks (unreachable
        store, ...).
      write_errors_total: I/O errors of writes (disk full, ...).
      delete_errors_total: I/O errors of deletes and clears.
      deleted_objects_total: objects deleted (by ``delete``, or as corrupt).
    """

    hit_pages_total: int = 0
    hit_tokens_total: int = 0
    miss_pages_total: int = 0
    miss_tokens_total: int = 0
    prefetched_pages_total: int = 0
    prefetched_tokens_total: int = 0
    prefetch_failed_pages_total: int = 0
    backed_up_pages_total: int = 0
    backed_up_tokens_total: int = 0
    backup_failed_pages_total: int = 0
    read_bytes_total: int = 0
    write_bytes_total: int = 0
    read_seconds_total: float = 0.0
    write_seconds_total: float = 0.0
    read_objects_total: int = 0
    write_objects_total: int = 0
    missing_objects_total: int = 0
    integrity_failures_total: int = 0
    read_errors_total: int = 0
    write_errors_total: int = 0
    delete_errors_total: int = 0
    deleted_objects_total: int = 0

    def as_prometheus(self, prefix: str = "jaxhicache_storage_") -> dict[str, float]:
        """The counters under their Prometheus names.

        Args:
          prefix: prepended to each field name.

        Returns:
          ``{prefix + field: value}``, one counter per field.
        """
        return {prefix + f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __sub__(self, other: StorageStats) -> StorageStats:
        return StorageStats(
            **{
                f.name: getattr(self, f.name) - getattr(other, f.name)
                for f in dataclasses.fields(self)
            }
        )

    def add(self, other: StorageStats) -> None:
        """Adds every counter of ``other`` to this one (in place).

        Args:
          other: the counters to add.
        """
        for name in _COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))


_COUNTERS = tuple(f.name for f in dataclasses.fields(StorageStats))
