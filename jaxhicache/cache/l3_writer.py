"""``WriteBack``: the L3 tier's writes, batched and yielding to the serving thread.

Backed-up pages are written to storage by one worker thread that must not slow the
decode steps it runs beside::

    add(item)  (main thread, after a backup landed)      pending ──┐
                                                                    │ one drain at a time
    worker: take EVERY pending item, one exists + one put per (stage, space) for all
            of them (fewer round trips and less Python per page), repeat until empty
            ─ runs at a lower CPU priority (``nice``) so the cores go to serving first
    finish()   (before host slots are freed): waits for every queued write
    finish(slots)  waits only for the writes that read those host slots (an eviction
               of old pages does not wait behind the newest writes on a slow store)
    drop(slots)    takes those slots' objects out of the items not yet started (host
               eviction, when the store is behind: a miss later, not a stall now)
    collect()  (poll points): counters of finished writes, failures counted, never raised

Invariants: the worker only reads host slots of pages the tree holds (backed up);
nothing frees those slots before a :meth:`finish` that covers them. Items are
numbered as they are queued and every drain takes all pending ones, so the items
finished are always a prefix of that numbering (``_done``). Order does not matter
to the store: objects are content-addressed and written only where absent.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading
from collections.abc import Callable
from typing import final

import numpy as np

__all__ = ["WriteBack", "WriteItem", "lower_thread_priority"]


@dataclasses.dataclass(frozen=True)
class WriteItem:
    """The objects of one backed-up path: full-space pages, the SWA checkpoints and
    (hybrids) the snapshots backed up with it (``state_hashes[i]``: the hash of the
    page ending at snapshot ``i``, read from host snapshot slot ``host_states[i]``).
    Full-space objects hold ``group`` pages each: ``hashes[i]`` is group ``i``'s last
    page's, ``host_full[group * i : group * (i + 1)]`` its slots."""

    hashes: list
    host_full: np.ndarray
    swa_hashes: list
    host_swa: np.ndarray
    state_hashes: list = dataclasses.field(default_factory=list)
    host_states: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    group: int = 1

    @property
    def pages(self) -> int:
        return len(self.hashes) * self.group

    def without(self, slots: dict) -> WriteItem:
        """This item less the objects read from ``slots`` (as in :meth:`reads`)."""

        def keep(k, ids):
            gone = slots.get(k)
            return np.ones(ids.size, bool) if gone is None else ~np.isin(ids, gone)

        f, w, st = (  # a group goes whole when any of its slots goes
            keep("full", self.host_full).reshape(len(self.hashes), self.group).all(axis=1),
            keep("swa", self.host_swa),
            keep("state", self.host_states),
        )
        pick = lambda xs, m: [x for x, k in zip(xs, m, strict=True) if k]  # noqa: E731
        return WriteItem(
            pick(self.hashes, f),
            self.host_full[np.repeat(f, self.group)],
            pick(self.swa_hashes, w),
            self.host_swa[w],
            pick(self.state_hashes, st),
            self.host_states[st],
            self.group,
        )

    def reads(self, slots: dict) -> bool:
        """Whether it reads any of ``slots`` (``{"full" | "swa" | "state": host ids}``)."""
        mine = {"full": self.host_full, "swa": self.host_swa, "state": self.host_states}
        return any(
            ids.size and mine[k].size and np.intersect1d(mine[k], ids).size
            for k, ids in slots.items()
        )


def lower_thread_priority(nice: int) -> bool:
    """Raises the calling thread's nice value by ``nice`` (Linux: per thread); returns
    whether it took effect. Best effort: elsewhere, or without permission, a no-op."""
    if nice <= 0:
        return False
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError):
        return False
    return True


@final
class WriteBack:
    """Coalescing write-back over ``put(items) -> pages written`` (the tier's writer)."""

    def __init__(self, put: Callable[[list[WriteItem]], int], *, nice: int = 10):
        self._put = put
        self._lock = threading.Lock()
        self._finished = threading.Condition(self._lock)
        self._pending: list[tuple[int, WriteItem]] = []  # (number, item), queued
        self._running: list[tuple[int, WriteItem]] = []  # the drain in flight
        self._queued = self._done = 0  # items numbered so far; items 1.._done finished
        self._drain: concurrent.futures.Future | None = None
        self._written = self._failed = 0
        self.batches = 0  # put calls: one per drain round, however many items it took
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1,
            thread_name_prefix="jaxhicache-l3-write",
            initializer=lower_thread_priority,
            initargs=(nice,),
        )

    def add(self, item: WriteItem) -> None:
        """Queues ``item``; starts a drain unless one is running (it will take it)."""
        with self._lock:
            self._queued += 1
            self._pending.append((self._queued, item))
            if self._drain is None:
                self._drain = self._pool.submit(self._run)

    def _run(self) -> None:
        while True:
            with self._lock:
                self._running, self._pending = self._pending, []
                if not self._running:
                    self._drain = None
                    self._finished.notify_all()
                    return
                items = [it for _n, it in self._running]
            try:
                written = self._put(items)
            except Exception:  # a backend bug must not take the cache down; counted
                written, failed = 0, 1
            else:
                failed = 0
            with self._lock:
                self.batches += 1
                self._written += written
                self._failed += failed
                self._done = self._running[-1][0]
                self._running = []
                self._finished.notify_all()

    def pending(self) -> bool:
        with self._lock:
            return bool(self._pending) or self._drain is not None

    def drop(self, slots: dict) -> int:
        """Takes the objects read from ``slots`` out of the items not yet started (their
        slots are about to be freed and the store is behind); returns the full-space
        pages dropped. Items already being written are left alone (:meth:`finish`)."""
        dropped = 0
        with self._lock:
            kept = []
            for n, it in self._pending:
                if it.reads(slots):
                    less = it.without(slots)
                    dropped += it.pages - less.pages
                    it = less
                kept.append((n, it))
            self._pending = kept
        return dropped

    def busy(self) -> np.ndarray:
        """The host full-space slots that queued or running items read (sorted)."""
        with self._lock:
            ids = [it.host_full for _n, it in self._running + self._pending]
        return np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int32)

    def finish(self, slots: dict | None = None) -> None:
        """Waits until every queued item was written (or failed); with ``slots``
        (``{"full" | "swa" | "state": host ids}``) only until those that read any of
        them were."""
        with self._lock:
            if slots is None:
                last = self._queued
            else:
                last = max(
                    (n for n, it in self._running + self._pending if it.reads(slots)), default=0
                )
            self._finished.wait_for(lambda: self._done >= last)

    def collect(self, wait: bool = False) -> tuple[int, int]:
        """``(pages written, failed batches)`` since the last call (``wait``: finish
        first)."""
        if wait:
            self.finish()
        with self._lock:
            out = (self._written, self._failed)
            self._written = self._failed = 0
        return out

    def close(self) -> None:
        self.finish()
        self._pool.shutdown(wait=True)
