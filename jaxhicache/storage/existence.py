"""The batched existence check: the object stats of many queries in one pipeline.

:class:`ExistsCheck` is the state of one
:meth:`StorageBackend.exists_batch <jaxhicache.storage.backend.StorageBackend.exists_batch>`
call: it orders the objects of every query by page index (then query, then
position), starts a stat per object through the backend's primitive, folds the
answers into one mask per query, cuts the pipeline at the first absent page of a
prefix query when asked to, and counts ``hit_*`` / ``miss_*`` / ``read_errors_total``.
The backend plans the keys and runs the pipeline (``_pipelined``); nothing here
touches a store directly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from .ops import ExistsQuery, Pending, _leading
from .stats import StorageStats

__all__ = ["ExistsCheck"]

Item = tuple[int, int, int, str]  # (page index, query, position in the query, object key)


class ExistsCheck:
    """One batched existence check (see module docstring).

    Args:
      queries: the queries, in the caller's order.
      keys_of: a query's object keys, one list per page (raises ``ValueError`` on
        a malformed hash).
      start_stat: the backend's stat primitive (``result()`` -> ``bool``).
      stop_at_absent: once an object of page ``p`` of a ``prefix`` query is found
        absent, objects of pages ``>= p`` not yet started are not started.
      finished: if given, the ``time.perf_counter()`` of each answer taken is
        appended, in order.

    Raises:
      ValueError: a query's page indices and hashes differ in number.
    """

    def __init__(
        self,
        queries: Sequence[ExistsQuery],
        keys_of: Callable[[ExistsQuery], list[list[str]]],
        start_stat: Callable[[str], Pending],
        *,
        stop_at_absent: bool = False,
        finished: list[float] | None = None,
    ):
        self.queries = list(queries)
        self.masks: list[np.ndarray] = []  # per query: every object of the page present
        self.items: list[Item] = []
        for qi, q in enumerate(self.queries):
            keys = keys_of(q)
            pages = list(range(len(keys))) if q.pages is None else [int(p) for p in q.pages]
            if len(pages) != len(keys):
                raise ValueError(f"{len(pages)} page indices for {len(keys)} hashes in query {qi}")
            self.masks.append(np.ones(len(keys), bool))
            self.items += [
                (pg, qi, i, k)
                for i, (pg, ks) in enumerate(zip(pages, keys, strict=True))
                for k in ks
            ]
        self.items.sort(key=lambda it: (it[0], it[1], it[2]))
        self.issued = 0  # stats started
        self._start_stat = start_stat
        self._stop = stop_at_absent
        self._finished = finished
        self._cut = math.inf  # the smallest page index found absent (stop_at_absent)
        self._errors = 0

    def start(self, item: Item) -> Pending | None:
        """Start the stat of one object, unless the pipeline was cut before its page.

        Args:
          item: an entry of :attr:`items`.

        Returns:
          The started stat, or ``None`` (not started: the page reads absent).
        """
        if self._stop and item[0] >= self._cut:
            return None
        self.issued += 1
        return self._start_stat(item[3])

    def finish(self, item: Item, pend: Pending | None) -> None:
        """Take one object's answer into its query's mask (an I/O error: absent).

        Args:
          item: the entry :meth:`start` was given.
          pend: what :meth:`start` returned.
        """
        pg, qi, i, _key = item
        if pend is None:
            self.masks[qi][i] = False
            return
        try:
            ok = bool(pend.result())
        except Exception:
            self._errors += 1
            ok = False
        if self._finished is not None:
            self._finished.append(time.perf_counter())
        if not ok:
            self.masks[qi][i] = False
            if self.queries[qi].prefix:
                self._cut = min(self._cut, pg)

    def stats(self) -> StorageStats:
        """The counters of the check, once every item finished.

        Returns:
          ``read_errors_total``, and per ``prefix`` query ``hit_*`` for the leading
          run of present pages and ``miss_*`` for the rest.
        """
        st = StorageStats(read_errors_total=self._errors)
        for q, mask in zip(self.queries, self.masks, strict=True):
            if q.prefix:
                hit, n = _leading(mask), mask.size
                st.hit_pages_total += hit
                st.hit_tokens_total += hit * q.ns.page_size
                st.miss_pages_total += n - hit
                st.miss_tokens_total += (n - hit) * q.ns.page_size
        return st
