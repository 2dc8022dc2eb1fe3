"""Page allocators: free lists of page ids with per-page generation counters.

One class serves every page space and tier: the full-page (anchor) space and the
SWA-page space, on device (L1) and on host (L2). Instances differ only by name
and capacity. The allocator hands out ids; it never touches the bytes.

Generations: every page has a ``uint32`` counter bumped on each free. A
:class:`Lease` (``snapshot(ids)``) records the ids with their generations when a
transfer starts; ``is_current(lease)`` at completion says whether any of those
pages was freed (and maybe reallocated to someone else) in between, so a late
transfer never writes stale bytes into a page that changed hands.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import numpy as np

__all__ = ["Lease", "OutOfPages", "PageAllocator"]

_SHOW = 8  # how many offending ids an error message names


def _show(ids: np.ndarray) -> str:
    ids = np.asarray(ids).ravel()
    head = ", ".join(str(int(i)) for i in ids[:_SHOW])
    return f"[{head}{', ...' if ids.size > _SHOW else ''}] ({ids.size} ids)"


class OutOfPages(MemoryError):
    """Not enough free pages; names the allocator, the request and what is free.

    A ``MemoryError``. Raised before anything is taken, so the allocator (and, in
    the cache, every allocator of the same call) is unchanged.

    Args:
      name: the allocator's name, kept as ``allocator``.
      requested: pages asked for, kept as ``requested``.
      free: pages free at the time, kept as ``free``.
    """

    def __init__(self, name: str, requested: int, free: int):
        self.allocator = name
        self.requested = requested
        self.free = free
        super().__init__(
            f"allocator {name!r}: requested {requested} pages but only {free} are free"
        )


class Lease(NamedTuple):
    """Page ids with their generations at snapshot time (a transfer ticket).

    Made by :meth:`PageAllocator.snapshot`; checked by
    :meth:`PageAllocator.current_mask` of the same allocator.

    Attributes:
      allocator: the name of the allocator that made it.
      ids: int32, the page ids in the order given, ``-1`` tombstones kept.
      generations: uint32, each id's generation at snapshot time (0 for ``-1``).
    """

    allocator: str
    ids: np.ndarray  # int32
    generations: np.ndarray  # uint32


class PageAllocator:
    """Stack free list of ``num_pages`` page ids ``0..num_pages-1``.

    ``alloc(n)`` pops ``n`` ids (O(n)); ``free(ids)`` pushes a batch back after
    validating all of it (out-of-range, duplicate or already-free ids raise
    ``ValueError`` and change nothing).

    Args:
      num_pages: capacity (an integer, ``operator.index``; ``TypeError`` for
        anything else).
      name: the name error messages and leases carry, e.g. ``"device/full"``.

    Raises:
      ValueError: ``num_pages`` outside ``[0, 2**31 - 1]`` (ids are int32).
    """

    __slots__ = ("_free", "_gen", "_is_free", "_name", "_num_pages", "_top")

    def __init__(self, num_pages: int, name: str = "pages"):
        num_pages = operator.index(num_pages)
        if num_pages < 0 or num_pages > np.iinfo(np.int32).max:
            raise ValueError(f"num_pages must be in [0, 2**31 - 1], got {num_pages}")
        self._name = str(name)
        self._num_pages = num_pages
        # Stack with its top at the end; the lowest ids are handed out first.
        self._free = np.arange(num_pages - 1, -1, -1, dtype=np.int32)
        self._top = num_pages
        self._is_free = np.ones(num_pages, dtype=bool)
        self._gen = np.zeros(num_pages, dtype=np.uint32)

    # ------------------------------------------------------------------ sizes
    @property
    def name(self) -> str:
        """The allocator's name (in error messages)."""
        return self._name

    @property
    def capacity(self) -> int:
        """Pages it manages."""
        return self._num_pages

    @property
    def num_free(self) -> int:
        """Pages free now."""
        return self._top

    @property
    def num_used(self) -> int:
        """Pages allocated now."""
        return self._num_pages - self._top

    def __repr__(self) -> str:
        return (
            f"PageAllocator(name={self._name!r}, capacity={self._num_pages}, "
            f"free={self._top}, used={self.num_used})"
        )

    def state_bytes(self) -> bytes:
        """The free stack (order included) and generations, as bytes.

        Equal in processes that took the same decisions (for a cross-process
        digest).

        Returns:
          The free ids in stack order (int32) followed by every page's generation
          (uint32).
        """
        return self._free[: self._top].tobytes() + self._gen.tobytes()

    # ------------------------------------------------------------ alloc/free
    def can_alloc(self, n: int) -> bool:
        """Whether ``n`` pages can be allocated now (``0 <= n <= free``).

        Args:
          n: a page count.

        Returns:
          ``True`` iff ``alloc(n)`` would succeed now (``False`` for negative ``n``).
        """
        return 0 <= n <= self._top

    def alloc(self, n: int) -> np.ndarray:
        """Return ``n`` distinct free page ids (int32), ascending on a fresh allocator.

        The most recently freed ids are handed out first (a stack).

        Args:
          n: pages to take (an integer, ``operator.index``); 0 gives an empty array.

        Returns:
          A new int32 array of ``n`` ids, now allocated.

        Raises:
          ValueError: ``n`` is negative.
          OutOfPages: fewer than ``n`` pages are free (nothing taken).
        """
        n = operator.index(n)
        if n < 0:
            raise ValueError(f"allocator {self._name!r}: cannot allocate {n} pages")
        top = self._top
        if n > top:
            raise OutOfPages(self._name, n, top)
        ids = self._free[top - n : top][::-1].copy()
        self._top = top - n
        self._is_free[ids] = False
        return ids

    def _as_ids(self, ids, what: str) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.size == 0:
            return np.zeros(0, dtype=np.int32)
        if arr.dtype.kind not in "iu":
            raise ValueError(
                f"allocator {self._name!r}: {what} needs integer page ids, got {arr.dtype}"
            )
        arr = arr.ravel()
        bad = arr[(arr < 0) | (arr >= self._num_pages)]
        if bad.size:
            raise ValueError(
                f"allocator {self._name!r}: {what} got page ids outside "
                f"[0, {self._num_pages}): {_show(bad)}"
            )
        return arr.astype(np.int32, copy=False)

    def free(self, ids) -> None:
        """Return a batch of pages. All-or-nothing: any bad id raises ``ValueError``.

        Each freed page's generation is bumped, so leases taken before no longer
        count it as current.

        Args:
          ids: integer page ids (any shape; flattened); empty frees nothing.

        Raises:
          ValueError: a non-integer dtype, an id outside ``[0, capacity)``, an id
            given twice, or an id that is already free (nothing is freed).
        """
        arr = self._as_ids(ids, "free")
        k = arr.size
        if k == 0:
            return
        if k > 1:
            s = np.sort(arr)
            dup = s[1:][s[1:] == s[:-1]]
            if dup.size:
                raise ValueError(
                    f"allocator {self._name!r}: free got duplicate page ids {_show(np.unique(dup))}"
                )
        already = arr[self._is_free[arr]]
        if already.size:
            raise ValueError(
                f"allocator {self._name!r}: double free of pages that are already free {_show(already)}"
            )
        self._is_free[arr] = True
        self._gen[arr] += np.uint32(1)
        self._free[self._top : self._top + k] = arr
        self._top += k

    # ------------------------------------------------------------ queries
    def is_allocated(self, ids) -> np.ndarray:
        """Boolean mask: which of ``ids`` are currently allocated.

        Args:
          ids: integer page ids (flattened).

        Returns:
          A bool array, one entry per id in order.

        Raises:
          ValueError: a non-integer dtype or an id outside ``[0, capacity)``.
        """
        arr = self._as_ids(ids, "is_allocated")
        return ~self._is_free[arr]

    def allocated_ids(self) -> np.ndarray:
        """All currently allocated ids, ascending (for invariant checks).

        Returns:
          A new int32 array.
        """
        return np.flatnonzero(~self._is_free).astype(np.int32)

    def generation(self, ids) -> np.ndarray:
        """Current generation (uint32) of each page in ``ids``.

        Args:
          ids: integer page ids (flattened); free pages are allowed.

        Returns:
          A new uint32 array: how many times each page has been freed.

        Raises:
          ValueError: a non-integer dtype or an id outside ``[0, capacity)``.
        """
        arr = self._as_ids(ids, "generation")
        return self._gen[arr].copy()

    # ------------------------------------------------------------ leases
    def snapshot(self, ids) -> Lease:
        """Ticket for pages about to be read or written by an asynchronous transfer.

        The pages must be allocated now. ``ids`` may contain ``-1`` entries
        (tombstones); they are kept in the lease and always count as current.

        Args:
          ids: integer page ids (flattened), ``-1`` allowed.

        Returns:
          A :class:`Lease` of this allocator: a copy of ``ids`` as int32 and their
          current generations.

        Raises:
          ValueError: a non-integer dtype, an id (other than ``-1``) outside
            ``[0, capacity)``, or a page that is free now.
        """
        arr = np.asarray(ids)
        if arr.size and arr.dtype.kind not in "iu":
            raise ValueError(f"allocator {self._name!r}: snapshot needs integer page ids")
        wide = arr.ravel().astype(np.int64)  # range-checked before narrowing: 2**32 is no 0
        live = self._as_ids(wide[wide != -1], "snapshot")
        arr = wide.astype(np.int32)
        not_alloc = live[self._is_free[live]]
        if not_alloc.size:
            raise ValueError(
                f"allocator {self._name!r}: snapshot of pages that are not allocated {_show(not_alloc)}"
            )
        gens = np.zeros(arr.size, dtype=np.uint32)
        mask = arr != -1
        gens[mask] = self._gen[arr[mask]]
        return Lease(self._name, arr, gens)

    def current_mask(self, lease: Lease) -> np.ndarray:
        """Per page of the lease: still allocated and never freed since the snapshot.

        Args:
          lease: a lease this allocator made (:meth:`snapshot`).

        Returns:
          A bool array aligned with ``lease.ids``; ``True`` for ``-1`` entries.

        Raises:
          ValueError: ``lease`` names another allocator.
        """
        if lease.allocator != self._name:
            raise ValueError(
                f"lease of allocator {lease.allocator!r} checked against allocator {self._name!r}"
            )
        ids = lease.ids
        out = np.ones(ids.size, dtype=bool)
        m = ids != -1
        live = ids[m]
        out[m] = (~self._is_free[live]) & (self._gen[live] == lease.generations[m])
        return out

    def is_current(self, lease: Lease) -> bool:
        """True when no page of the lease was freed (or freed and reallocated) since.

        Args:
          lease: a lease this allocator made (:meth:`snapshot`).

        Returns:
          ``current_mask(lease).all()`` as a Python bool.

        Raises:
          ValueError: ``lease`` names another allocator.
        """

        return bool(self.current_mask(lease).all())
