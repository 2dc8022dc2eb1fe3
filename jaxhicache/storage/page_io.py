"""Page transfers between host slabs and objects: the state of one ``put`` or ``get``.

:class:`PageWrites` (one
:meth:`StorageBackend.put <jaxhicache.storage.backend.StorageBackend.put>`) encodes
each object straight from the slab rows and records which pages were written whole.
:class:`PageReads` (one
:meth:`StorageBackend.get <jaxhicache.storage.backend.StorageBackend.get>`) reads
each object, staged (verified in the read buffer, then one copy per object into the
slab once every object of the page passed) or direct (read into the slot's rows
and verified there), deletes corrupt objects conditionally on the generation read,
and at the end zeroes the slots of failed pages that received bytes.
:func:`read_direct_sync` is the direct path on the calling thread for backends
whose operations complete as they start.

Every object of page ``i`` is item ``(i, j)``, ``j`` the unit (page space or
sub-pool) in :class:`~jaxhicache.storage.layout.StagePages` order; a page stops
at its first failed object. The backend plans the keys and slab views, validates
the host ids and runs the pipeline; faults become ``False`` pages and counters,
never exceptions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from .format import (
    IntegrityError,
    decode,
    encode_parts,
    header_length,
    verify_header,
    verify_payload,
)
from .layout import StagePages
from .ops import ObjectRead, Pending, _jobs, _release, _safe
from .stats import StorageStats

__all__ = ["PageReads", "PageWrites", "read_direct_sync"]

Item = tuple[int, int]  # (page, unit)


class PageWrites:
    """The objects of one ``put`` (see module docstring).

    Args:
      keys: per page, the key of each of its objects.
      pages: the stage's slab views of the page space.
      ids: one host page id per page.
      start_write: the backend's write primitive.
    """

    def __init__(
        self,
        keys: list[list[str]],
        pages: StagePages,
        ids: np.ndarray,
        start_write: Callable[[str, Sequence], Pending],
    ):
        self.keys = keys
        self.pages = pages
        self.ids = ids
        self.ok = np.ones(len(keys), bool)  # every object of the page written
        self.st = StorageStats()
        self._start_write = start_write
        self._sizes: dict[Item, int] = {}

    def jobs(self) -> Iterator[Item]:
        """The objects in pipeline order.

        Returns:
          ``(page, unit)`` for every page, then every unit of it.
        """
        return _jobs(len(self.keys), len(self.pages.units))

    def sibling(self, start_write: Callable[[str, Sequence], Pending]) -> PageWrites:
        """The same ``put`` with its own outcome and counters, for one of several loops
        that share its pages (each page written by one loop; :meth:`absorb` merges).

        Args:
          start_write: the loop's write primitive.
        """
        return PageWrites(self.keys, self.pages, self.ids, start_write)

    def absorb(self, other: PageWrites) -> None:
        """Takes in a :meth:`sibling`'s failed pages and counters."""
        self.ok &= other.ok
        self.st.add(other.st)

    def start(self, item: Item) -> Pending | None:
        """Encode one object from the slab and start writing it.

        Args:
          item: ``(page, unit)``.

        Returns:
          The started write, or ``None`` when an object of the page already failed.
        """
        i, j = item
        if not self.ok[i]:
            return None
        key = self.keys[i][j]
        parts = encode_parts(key, self.pages.source(j, int(self.ids[i])))
        self._sizes[item] = sum(memoryview(b).nbytes for b in parts)
        return self._start_write(key, parts)

    def finish(self, item: Item, pend: Pending | None) -> None:
        """Count one object as written, or fail its page.

        Args:
          item: ``(page, unit)``.
          pend: what :meth:`start` returned.
        """
        if pend is None:
            return
        try:
            pend.result()
            self.st.write_objects_total += 1
            self.st.write_bytes_total += self._sizes.pop(item)
        except Exception:
            self.st.write_errors_total += 1
            self.ok[item[0]] = False

    def settle(self, page_size: int, group: int = 1) -> StorageStats:
        """The call's counters, once every object finished.

        Args:
          page_size: tokens per page.
          group: pages per item (``g`` of grouped objects).

        Returns:
          The object counters and ``backed_up_*`` / ``backup_failed_pages_total``
          (in pages).
        """
        done = int(self.ok.sum()) * group
        self.st.backed_up_pages_total = done
        self.st.backed_up_tokens_total = done * page_size
        self.st.backup_failed_pages_total = self.ok.size * group - done
        return self.st


class PageReads:
    """The objects of one ``get`` (see module docstring).

    Args:
      keys: per page, the key of each of its objects.
      pages: the stage's slab views of the page space.
      ids: one host page id per page, no repeats.
      direct: read straight into the slot's rows (``start_read_into``) rather
        than staged (``start_read``).
      start_read, start_read_into, start_delete: the backend's primitives.
    """

    def __init__(
        self,
        keys: list[list[str]],
        pages: StagePages,
        ids: np.ndarray,
        direct: bool,
        start_read: Callable[[str], Pending],
        start_read_into: Callable[[str, bytearray, list[memoryview]], Pending],
        start_delete: Callable[[str, bytes | None], Pending],
    ):
        self.keys = keys
        self.pages = pages
        self.ids = ids
        self.direct = direct
        self.ok = np.ones(len(keys), bool)  # every object of the page verified
        self.touched = np.zeros(len(keys), bool)  # a direct read wrote (or may have) into it
        self.st = StorageStats()
        self._start_read = start_read
        self._start_read_into = start_read_into
        self._start_delete = start_delete
        self._got: dict[int, list[tuple[memoryview, ObjectRead]]] = {}  # staged payloads
        self._held: dict[Item, tuple[bytearray, list[memoryview]]] = {}  # direct buffers
        self._deletes: list[Pending | None] = []  # _safe: never None for a started delete

    def jobs(self) -> Iterator[Item]:
        """The objects in pipeline order.

        Returns:
          ``(page, unit)`` for every page, then every unit of it.
        """
        return _jobs(len(self.keys), len(self.pages.units))

    def start(self, item: Item) -> Pending | None:
        """Start reading one object (into its slot's rows when direct).

        Args:
          item: ``(page, unit)``.

        Returns:
          The started read, or ``None`` when an object of the page already failed.
        """
        i, j = item
        if not self.ok[i]:
            return None
        key = self.keys[i][j]
        if not self.direct:
            return self._start_read(key)
        header = bytearray(header_length(key))
        views = self.pages.direct(j, int(self.ids[i]))
        self._held[item] = (header, views)
        return self._start_read_into(key, header, views)

    def corrupt(self, key: str, generation: bytes | None) -> None:
        """Count an object that failed a check and start deleting it (only if the
        store still holds the generation that was read).

        Args:
          key: the object.
          generation: the generation its read returned.
        """
        self.st.integrity_failures_total += 1
        self._deletes.append(_safe(lambda: self._start_delete(key, generation)))

    def _drop(self, i: int) -> None:
        for _payload, r in self._got.pop(i, ()):
            _release(r)

    def finish(self, item: Item, pend: Pending | None) -> None:
        """Verify one object; a staged page's payloads go into the slab after its last.

        Args:
          item: ``(page, unit)``.
          pend: what :meth:`start` returned.
        """
        i, j = item
        if pend is None:
            return
        ok, st, direct = self.ok, self.st, self.direct
        key = self.keys[i][j]
        nbytes = self.pages.units[j].nbytes
        header, views = self._held.pop(item, (None, None))
        try:
            r = pend.result()
        except Exception:
            st.read_errors_total += 1
            ok[i] = False
            self.touched[i] |= direct  # a direct read may have written part of the rows
            self._drop(i)
            return
        if r.value is None:
            st.missing_objects_total += 1
            ok[i] = False
        elif direct:
            self.touched[i] = True
            st.read_objects_total += 1
            st.read_bytes_total += r.size
            assert header is not None and views is not None, "held since start()"
            try:
                _, _, digest = verify_header(key, header, r.size, nbytes)
                verify_payload(key, views, digest)
            except IntegrityError:
                self.corrupt(key, r.generation)
                ok[i] = False
        else:
            st.read_objects_total += 1
            st.read_bytes_total += memoryview(r.value).nbytes
            try:
                payload = decode(key, r.value, nbytes)
            except IntegrityError:
                self.corrupt(key, r.generation)
                ok[i] = False
                _release(r)
            else:
                if ok[i]:
                    self._got.setdefault(i, []).append((payload, r))
                else:
                    _release(r)
        if not ok[i]:
            self._drop(i)
        elif j == len(self.pages.units) - 1 and not direct:
            for jj, (payload, r) in enumerate(self._got.pop(i)):
                self.pages.write(jj, int(self.ids[i]), payload)
                _release(r)

    def settle(self, page_size: int, group: int = 1) -> StorageStats:
        """Zero the slots of failed pages that received bytes, wait for the deletes,
        and total the call's counters, once every object finished.

        Args:
          page_size: tokens per page.
          group: pages per item (``g`` of grouped objects).

        Returns:
          The object counters and ``prefetched_*`` / ``prefetch_failed_pages_total``.
        """
        st = self.st
        for i in np.flatnonzero(self.touched & ~self.ok).tolist():
            self.pages.scrub(int(self.ids[i]))  # never leave unverified bytes in a slot
        for d in self._deletes:
            try:
                if d is not None and d.result() is not False:
                    st.deleted_objects_total += 1
            except Exception:
                st.delete_errors_total += 1
        done = int(self.ok.sum()) * group
        st.prefetched_pages_total = done
        st.prefetched_tokens_total = done * page_size
        st.prefetch_failed_pages_total = self.ok.size * group - done
        return st


def read_direct_sync(
    read_into: Callable[[str, bytearray, list[memoryview]], ObjectRead],
    keys: list[list[str]],
    pages: StagePages,
    ids: list[int],
    ok: np.ndarray,
    touched: np.ndarray,
    st: StorageStats,
    corrupt: Callable[[str, bytes | None], None],
) -> None:
    """A ``get``'s direct reads on the calling thread: one tight loop over the objects,
    a page stopping at its first failed object (the outcome and counters of
    :class:`PageReads`' pipelined direct path).

    Args:
      read_into: the backend's synchronous scatter read (``_read_into_sync``).
      keys: per page, the key of each of its objects.
      pages: the stage's slab views of the page space.
      ids: one host page id per page.
      ok, touched: :attr:`PageReads.ok` / :attr:`PageReads.touched`, updated.
      st: the counters, updated.
      corrupt: :meth:`PageReads.corrupt`.
    """
    units = pages.units
    if not keys:
        return
    hlens = [header_length(k) for k in keys[0]]  # same length for every page of a unit
    for i, hid in enumerate(ids):
        for j, u in enumerate(units):
            key = keys[i][j]
            header = bytearray(hlens[j])
            views = pages.direct(j, hid)
            try:
                r = read_into(key, header, views)
            except Exception:
                st.read_errors_total += 1
                ok[i] = False
                touched[i] = True
                break
            if r.value is None:
                st.missing_objects_total += 1
                ok[i] = False
                break
            touched[i] = True
            st.read_objects_total += 1
            st.read_bytes_total += r.size
            try:
                _, _, digest = verify_header(key, header, r.size, u.nbytes)
                verify_payload(key, views, digest)
            except IntegrityError:
                corrupt(key, r.generation)
                ok[i] = False
                break
