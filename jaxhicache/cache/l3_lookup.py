"""One L3 lookup: what this process's stages hold of a request's pages, in one batch.

A lookup of pages ``[first, stop)`` issues, in ONE pipelined batch
(:meth:`~jaxhicache.storage.StorageBackend.exists_batch`, ``lookup_in_flight`` checks
at once), the existence checks of

* the full-space objects of every page on every local stage (a prefix query: the
  checks stop at the first absent page), and
* the SWA-space objects of the pages in the windows of the hit ends the tier may
  choose without a second look (:func:`window_pages`: every checkpoint, i.e. multiple
  of ``swa_checkpoint_every``, and ``stop``), on every local stage,
* recurrent hybrids: the state-space object (one snapshot) of every candidate end on
  the snapshot grid (:func:`state_pages`: keyed by the hash of the page ending there),
  on every local stage; a hit ends only where one is,

so a lookup costs about ``ceil(checks / lookup_in_flight)`` sequential round trips to
the store instead of one per stage plus one per candidate window. The result is
local (:class:`Probe`); the tier agrees on the hit with the other processes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import time
from collections.abc import Sequence

import numpy as np

from jaxhicache.cache.l3_config import LookupWindows, StorageConfig
from jaxhicache.cache.l3_cost import CostModel
from jaxhicache.cache.stats import CacheStats
from jaxhicache.distributed import Agreement
from jaxhicache.spec import PageSpace
from jaxhicache.storage.backend import ExistsQuery, StorageBackend
from jaxhicache.storage.keys import Namespace
from jaxhicache.tree import RadixTree

__all__ = ["Lookups", "Probe", "StageObjects", "probe", "state_pages", "window_pages"]


@dataclasses.dataclass(frozen=True)
class StageObjects:
    """One local stage's namespace and what one page of each space costs to fetch."""

    rank: int
    ns: Namespace
    full: tuple[int, int]  # (objects, bytes) of one full-space page; (0, 0): no such pool
    swa: tuple[int, int]
    state: tuple[int, int] = (0, 0)  # of one recurrent-state snapshot (hybrids)


@dataclasses.dataclass
class Probe:
    """What this process's stages hold of pages ``[first, stop)`` (local, not agreed).

    ``full[i]``: page ``first + i``'s full-space objects are present on every local
    stage; ``swa[i]``: its SWA-space objects are (only pages in ``checked`` were
    looked at; the others read ``False``); ``state[i]``: the snapshot object at the
    end of page ``first + i`` (keyed by its hash) is (only at :func:`state_pages`).
    """

    first: int
    stop: int
    full: np.ndarray
    swa: np.ndarray
    checked: frozenset[int]
    requests: int = 0
    seconds: float = 0.0
    final: bool = False  # the lookup gave up (timed out, skipped): look no further
    state: np.ndarray | None = None  # None: no state objects looked up (all False)

    @classmethod
    def nothing(cls, first: int, stop: int) -> Probe:
        """A lookup that found nothing and looks no further (not answered in time, or
        skipped)."""
        n = max(stop - first, 0)
        return cls(first, stop, np.zeros(n, bool), np.zeros(n, bool), frozenset(), final=True)

    def state_present(self, end: int) -> bool:
        """Whether the snapshot object at ``end`` (pages; keyed by page ``end - 1``'s
        hash) was found on every local stage."""
        i = end - 1 - self.first
        return self.state is not None and 0 <= i < self.state.size and bool(self.state[i])

    def present_prefix(self) -> int:
        """Consecutive pages from ``first`` with their full-space objects on every stage."""
        bad = np.flatnonzero(~self.full)
        return int(bad[0]) if bad.size else int(self.full.size)

    def window_present(self, end: int, w: int) -> bool:
        """Whether the SWA objects of the ``w`` pages before ``end`` were found."""
        lo = max(end - w, self.first)
        return all(p in self.checked for p in range(lo, end)) and bool(
            self.swa[lo - self.first : end - self.first].all()
        )


def window_pages(first: int, stop: int, w: int, k: int, all_windows: bool = True) -> list[int]:
    """The pages whose SWA objects a lookup of ``[first, stop)`` checks up front: the
    windows (``w`` pages) of the hit ends ``e`` in ``[first + w, stop]`` that are a
    multiple of ``k`` or ``stop`` itself (``all_windows=False``: ``stop``'s only).
    Deterministic: every process checks the same."""
    if w <= 0 or stop - first < w:
        return []
    ends = [
        e for e in range(first + max(w, 1), stop + 1) if e == stop or (all_windows and e % k == 0)
    ]
    return sorted({p for e in ends for p in range(e - w, e)})


def state_pages(first: int, stop: int, grid: int) -> list[int]:
    """The pages whose hashes key the snapshot objects a lookup of ``[first, stop)``
    checks: ``e - 1`` for every hit end ``e`` in ``(first, stop]`` on the snapshot grid
    (a multiple of ``grid`` pages; ``grid`` 0: none)."""
    if grid <= 0:
        return []
    return [e - 1 for e in range((first // grid + 1) * grid, stop + 1, grid)]


def probe(
    backend: StorageBackend,
    stages: Sequence[StageObjects],
    hashes: Sequence[str],
    first: int,
    swa_pages: Sequence[int],
    in_flight: int,
    costs: CostModel | None = None,
    snap_pages: Sequence[int] = (),
    paced: bool = False,
    group: int = 1,
) -> Probe:
    """Checks pages ``[first, first + len(hashes))`` (``hashes[i]`` is page ``first + i``),
    the SWA objects of ``swa_pages`` and the snapshot objects keyed by ``snap_pages``,
    all in one batch; observes its time in ``costs`` (``paced``: ``in_flight`` was cut
    to a serial store's pace, which keeps it as busy as the whole batch at once would:
    observed as that). ``group``: full-space pages per object (one check per group
    of ``[first, stop)`` that ends by ``stop``, keyed by its last page; a page is
    present when its group is; pages after the last whole group never are). Never
    raises for a store fault (an error is an absent page)."""
    stop = first + len(hashes)
    lasts = list(range(first // group * group + group - 1, stop, group))  # groups' last pages
    swa_pages = [p for p in swa_pages if first <= p < stop]
    snap_pages = [p for p in snap_pages if first <= p < stop]
    queries: list[ExistsQuery] = []
    kinds: list[PageSpace] = []
    for s in stages:
        if s.full[0] and lasts:
            sub = [hashes[p - first] for p in lasts]
            queries.append(ExistsQuery(s.ns, PageSpace.FULL, sub, lasts, True))
            kinds.append(PageSpace.FULL)
        if s.swa[0] and swa_pages:
            sub = [hashes[p - first] for p in swa_pages]
            queries.append(ExistsQuery(s.ns, PageSpace.SWA, sub, swa_pages))
            kinds.append(PageSpace.SWA)
        if s.state[0] and snap_pages:  # in page order with the KV: cut at the first gap
            sub = [hashes[p - first] for p in snap_pages]
            queries.append(ExistsQuery(s.ns, PageSpace.STATE, sub, snap_pages))
            kinds.append(PageSpace.STATE)
    t0 = time.perf_counter()
    issued: list[int] = []
    done: list[float] = []
    masks = backend.exists_batch(
        queries, max_in_flight=in_flight, stop_at_absent=True, started=issued, finished=done
    )
    seconds = time.perf_counter() - t0
    groups = np.ones(len(lasts), bool)
    swa_sub = np.ones(len(swa_pages), bool)
    snap_sub = np.ones(len(snap_pages), bool)
    for kind, m in zip(kinds, masks, strict=True):
        if kind is PageSpace.FULL:
            groups &= m
        elif kind is PageSpace.SWA:
            swa_sub &= m
        else:
            snap_sub &= m
    full = np.zeros(stop - first, bool)  # page p: its group (last page p // g * g + g - 1)
    if lasts:
        pages = np.arange(first, lasts[-1] + 1)
        full[: pages.size] = groups[(pages - lasts[0] + group - 1) // group]
    swa = np.zeros(stop - first, bool)
    if swa_pages:
        swa[np.asarray(swa_pages) - first] = swa_sub
    state = np.zeros(stop - first, bool)
    if snap_pages:
        state[np.asarray(snap_pages) - first] = snap_sub
    requests = issued[0]
    if costs is not None and done:  # a backend running checks inline has one in flight
        eff = requests if paced else min(in_flight, requests) if backend.concurrent else 1
        costs.observe_lookup(requests, eff, seconds, first_s=done[0] - t0)
    return Probe(first, stop, full, swa, frozenset(swa_pages), requests, seconds, state=state)


@dataclasses.dataclass(eq=False)
class _Early:
    """A lookup started when its request was queued (:meth:`Lookups.start`)."""

    first: int
    future: concurrent.futures.Future


_EARLY_MAX = 256  # queued lookups kept; the oldest are forgotten beyond this
_EXPLORE = 8  # one in this many lookups the cost model skips samples the store
_SAMPLE = 4  # pages whose full-space objects such a sample checks


class Lookups:
    """The lookup side of the L3 tier: probes on lookup threads (early ones started
    when a request is queued), bounded waits, the cost model, the agreed hit end.

    Counters go to ``stats`` (``storage_lookups``, ``storage_early_lookups``,
    ``storage_lookup_timeouts``, ``storage_lookup_seconds``,
    ``storage_declined_tokens``, ``storage_read_failures``).
    """

    def __init__(
        self,
        backend: StorageBackend,
        config: StorageConfig,
        stages: Sequence[StageObjects],
        tree: RadixTree,
        agreement: Agreement,
        stats: CacheStats,
        page_size: int,
        window_pages: int,
        state_grid: int = 0,
    ):
        self.backend, self.config, self.stages = backend, config, list(stages)
        self._tree, self.agreement, self._stats = tree, agreement, stats
        self._ps, self._w = page_size, window_pages
        self._grid = state_grid  # pages between snapshot positions (hybrids; 0: none)
        self._g = config.pages_per_object  # full-space pages per object
        self.costs = CostModel(
            config.store_latency_s, config.store_bytes_per_s, config.recompute_s_per_token
        )
        self._pool = concurrent.futures.ThreadPoolExecutor(
            4, thread_name_prefix="jaxhicache-l3-lookup"
        )
        self._early: collections.OrderedDict[tuple, _Early] = collections.OrderedDict()
        self._skips = 0  # lookups in a row the cost model would skip
        # whether the cost model decides (``config.cost_model``; off during a warm-up,
        # StorageTier.every_hit): off, it still learns but declines nothing
        self.decide = config.cost_model

    def start(self, key: np.ndarray, salt: bytes | None) -> bool:
        """Starts the lookup of a queued request's ``key`` (what admission will match)
        after what the tree holds now; see :meth:`StorageTier.start_lookup`. A lookup
        of the key queued before the tree lost some of its pages is replaced."""
        ps = self._ps
        pages = key.size // ps
        first = self._first(key, salt)
        if (pages - first) * ps < self.config.prefetch_threshold:
            return False
        tag = (salt, key[: pages * ps].tobytes())
        queued = self._early.get(tag)
        if queued is not None and queued.first <= first:
            return False  # pending, and it covers the pages (else: the tree lost some)
        hashes = self._tree.key_hashes(key[: pages * ps], salt=salt)[first:]
        self._early[tag] = _Early(first, self._pool.submit(self._probe, hashes, first, pages))
        while len(self._early) > _EARLY_MAX:
            self._early.popitem(last=False)
        self._stats.storage_early_lookups += 1
        return True

    def present(self, key: np.ndarray, salt: bytes | None) -> int:
        """Pages of ``key`` after what the tree holds that this process's stages hold
        (local, not agreed), from the lookup :meth:`start` queued for it (started here
        if none; left queued for the admission, which then does not look again).
        Waits at most ``lookup_timeout_s``; 0 when nothing was looked up or no answer
        came in time, or when the cost model says a lookup would not pay."""
        ps = self._ps
        pages = key.size // ps
        tag = (salt, key[: pages * ps].tobytes())
        queued = self._early.get(tag)
        first = self._first(key, salt)
        if (queued is None or queued.first > first) and not self.worth_looking(
            first, pages, explore=False
        ):
            return 0  # as the admission would decide (it counts the skip)
        self.start(key, salt)
        early = self._early.get(tag)
        if early is None:
            return 0
        try:
            return early.future.result(timeout=self.config.lookup_timeout_s).present_prefix()
        except Exception:  # a timeout or a backend bug: the admission counts it
            return 0

    def hit_end(
        self, key: np.ndarray, salt: bytes | None, hashes: Sequence[str], first: int
    ) -> int:
        """The agreed end of the L3 hit of ``key``'s pages after page ``first``
        (``hashes[i]``: page ``first + i``); ``first`` when there is none. Uses the
        lookup :meth:`start` queued for the key if it covers the pages."""
        stop = first + len(hashes)
        t0 = time.perf_counter()
        deadline = t0 + self.config.lookup_timeout_s
        early = self._early.pop((salt, key[: stop * self._ps].tobytes()), None)
        if early is None and not self.worth_looking(first, stop):
            self._stats.storage_lookups_skipped += 1
            if self._skips % _EXPLORE == 0:  # a store that was slow may have recovered
                self._pool.submit(self._sample, hashes[: _SAMPLE * self._g], first)
            got = Probe.nothing(first, stop)  # still agreed: every process takes the step
        else:
            got = self._await(early, hashes, first, stop, deadline)
        end = self._agree(got, hashes, first, deadline)
        self._stats.storage_lookup_seconds += time.perf_counter() - t0
        return end

    def close(self) -> None:
        self._early.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)  # lookups hold no slots

    # ---------------------------------------------------------------- internals
    def _sample(self, hashes: Sequence[str], first: int) -> None:
        """Lookup thread: the existence checks of a few full-space pages, all at once,
        for the cost model's estimates only (a skipped lookup's exploration)."""
        stages = [dataclasses.replace(st, swa=(0, 0), state=(0, 0)) for st in self.stages]
        limit = self._in_flight(self.config.lookup_in_flight)
        probe(self.backend, stages, hashes, first, [], limit, self.costs, group=self._g)

    def _probe(self, hashes: Sequence[str], first: int, stop: int) -> Probe:
        """Lookup thread: one batch of every existence check of pages ``[first, stop)``;
        then, if that batch did not check the window of the end of the pages present
        here, one more for it (so a queued lookup has it by admission)."""
        k, w = self.config.swa_checkpoint_every, self._w
        swa = window_pages(first, stop, w, k, self._all_windows(first, stop))
        snaps = state_pages(first, stop, self._grid)
        c = self._paced()
        paced = c < self._in_flight(self.config.lookup_in_flight)
        got = probe(
            self.backend, self.stages, hashes, first, swa, c, self.costs, snaps, paced, self._g
        )
        end = first + got.present_prefix()
        pages = [p for p in range(end - w, end) if p not in got.checked]
        if w and end - first >= w and pages:
            stages = [dataclasses.replace(st, full=(0, 0)) for st in self.stages]
            sub = [hashes[p - first] for p in pages]
            more = _probe_pages(self.backend, stages, sub, first, self._paced(), pages)
            got.swa[np.asarray(pages) - first] = more.swa[np.asarray(pages) - first]
            got.checked = got.checked | more.checked
            got.requests += more.requests
        return got

    def _await(self, early: _Early | None, hashes, first: int, stop: int, deadline: float) -> Probe:
        """The local lookup of pages ``[first, stop)``: the queued one if it covers them,
        else a fresh one; waited for at most ``lookup_timeout_s`` (then: nothing found)."""
        if early is None or early.first > first:  # the tree lost pages since it was queued
            fut = self._pool.submit(self._probe, hashes, first, stop)
        else:
            fut = early.future
        t0 = time.perf_counter()
        try:
            got = fut.result(timeout=max(deadline - t0, 0.0))
        except concurrent.futures.TimeoutError:
            got = Probe.nothing(first, stop)
            self._stats.storage_lookup_timeouts += 1
        except Exception:  # a backend bug: counted, a miss
            got = Probe.nothing(first, stop)
            self._stats.storage_read_failures += 1
        self._stats.storage_lookups += 1
        if got.first < first:  # queued from a shorter match: keep our pages only
            cut = first - got.first
            state = None if got.state is None else got.state[cut:]
            got = dataclasses.replace(
                got, first=first, full=got.full[cut:], swa=got.swa[cut:], state=state
            )
        return got

    def _paced(self) -> int:
        """Existence checks one lookup keeps in flight: ``lookup_in_flight``, or on a store
        that serves requests one after another (the cost model's ``request_s``) just
        enough to cover one round trip at that pace (``ceil(latency_s / request_s) +
        1``), so that a miss costs a check or two instead of the whole batch while a
        hit takes as long as before (the store works through the checks at its pace
        either way; the cost model prices a lookup as the whole batch at once, which
        keeps such a store as busy). Inline backends: 1."""
        limit = self._in_flight(self.config.lookup_in_flight)
        if not self.decide or not self.costs.observed["request"]:
            return limit
        snap = self.costs.snapshot()
        if snap["request_s"] <= 0:
            return limit
        return max(1, min(limit, math.ceil(snap["latency_s"] / snap["request_s"]) + 1))

    def _in_flight(self, n: int) -> int:
        return n if self.backend.concurrent else 1  # inline operations: one at a time

    def _fetch_seconds(self, first: int, end: int) -> float:
        """Modelled time to fetch pages ``[first, end)``, the window and the snapshot at
        ``end``."""
        n, nw = -(-end // self._g) - first // self._g, min(self._w, end - first)  # n: groups
        objects = sum(st.full[0] * n + st.swa[0] * nw + st.state[0] for st in self.stages)
        nbytes = sum(st.full[1] * n + st.swa[1] * nw + st.state[1] for st in self.stages)
        return self.costs.load_seconds(
            objects, nbytes, self._in_flight(self.config.fetch_in_flight)
        )

    def worth(self, first: int, end: int) -> bool:
        """Whether loading pages ``[first, end)`` (and the window before ``end``) is
        cheaper than recomputing them, by this process's estimates."""
        if not self.decide or end <= first:
            return True
        return self._fetch_seconds(first, end) <= self.costs.recompute_seconds(
            (end - first) * self._ps
        )

    def _all_windows(self, first: int, stop: int) -> bool:
        """Whether a lookup checks every checkpoint's window up front (``lookup_windows``;
        ``AUTO``: unless the extra checks would take the store longer than the round
        trip they save). A local choice: the agreement does not depend on it."""
        mode = self.config.lookup_windows
        if mode is not LookupWindows.AUTO or not self.costs.observed["request"]:
            return mode is not LookupWindows.END
        k, w = self.config.swa_checkpoint_every, self._w
        extra = len(window_pages(first, stop, w, k)) - len(window_pages(first, stop, w, k, False))
        stages = sum(st.swa[0] > 0 for st in self.stages)
        snap = self.costs.snapshot()
        return snap["request_s"] * extra * stages <= snap["latency_s"]

    def _first(self, key: np.ndarray, salt: bytes | None) -> int:
        """The page the admission's L3 lookup of ``key`` would start at now: the end of
        its match (with SWA: the last page whose window the tree holds; hybrids: a
        snapshot), not of every page the tree holds (a lookup queued from there would
        be replaced at admission)."""
        return self._tree.match_prefix(key, salt=salt, touch=False).matched_len // self._ps

    def worth_looking(self, first: int, stop: int, explore: bool = True) -> bool:
        """Whether even a hit of every page ``[first, stop)`` would save more than the
        lookup and the fetch cost (else the lookup is skipped: a miss for nothing).

        Always true until a lookup was observed (the priors decide nothing that would
        keep the estimates from being learnt). ``explore``: counts a skip (every
        ``_EXPLORE``-th skip in a row, :meth:`hit_end` samples the store in the
        background, so that the estimates follow a store that recovers, without a
        whole lookup on a request's critical path)."""
        if not self.decide or not self.costs.observed["latency"]:
            return True
        if explore:
            self._skips += 1
        k = self.config.swa_checkpoint_every
        windows = len(window_pages(first, stop, self._w, k, self._all_windows(first, stop)))
        snaps = len(state_pages(first, stop, self._grid))
        checks = sum(
            (st.full[0] > 0) * (stop // self._g - first // self._g)
            + (st.swa[0] > 0) * windows
            + (st.state[0] > 0) * snaps
            for st in self.stages
        )
        lookup = self.costs.load_seconds(checks, 0, self._in_flight(self.config.lookup_in_flight))
        save = self.costs.recompute_seconds((stop - first) * self._ps)
        if lookup + self._fetch_seconds(first, stop) < save:
            self._skips = 0 if explore else self._skips
            return True
        return False

    def _agree(self, got: Probe, hashes: Sequence[str], first: int, deadline: float) -> int:
        """The largest ``e`` such that on every process's stages the full-space objects
        of ``[first, e)``, the SWA objects of the window before ``e`` and (hybrids) the
        snapshot object at ``e`` on the grid are present and loading is cheaper than
        recomputing (``first``: none).

        One MIN collective over ``[consecutive pages present, per candidate end: window
        (and snapshot) present, per candidate end: worth loading, (hybrids) per candidate
        end: snapshot present]`` for the windows this process's batch checked (every
        snapshot on the grid is in that batch). The windows of the hit's own end ``first + n`` (``n`` the agreed
        consecutive pages) and then of the checkpoints below it, where no complete one
        was agreed yet, are agreed in later steps every process takes alike (they
        follow from agreed values only); a process answers them from its batch where it
        checked those windows, else with one more batch (until ``deadline``).
        """
        w, k, g = self._w, self.config.swa_checkpoint_every, self._grid
        n_local = got.present_prefix()
        ends = list(range(first + max(w, 1), got.stop + 1))
        snap = [not g or (e % g == 0 and got.state_present(e)) for e in ends]
        valid = [
            e - first <= n_local and (not w or got.window_present(e, w)) and s
            for e, s in zip(ends, snap, strict=True)
        ]
        worth = [v and self.worth(first, e) for v, e in zip(valid, ends, strict=True)]
        agreed = self.agreement.min([n_local, *valid, *worth, *(snap if g else ())])
        m = len(ends)
        snap_ok = {e for e, v in zip(ends, agreed[1 + 2 * m :], strict=True) if v} if g else None
        best_valid = max(
            (e for e, v in zip(ends, agreed[1 : 1 + m], strict=True) if v), default=first
        )
        best = max(
            (e for e, v in zip(ends, agreed[1 + m : 1 + 2 * m], strict=True) if v), default=first
        )
        end = first + int(agreed[0])
        steps = [[end], [e for e in range(end - 1, first + w - 1, -1) if e % k == 0]]
        for step in steps if w else ():
            todo = [
                e
                for e in step
                if e > best_valid and e - first >= w and (snap_ok is None or e in snap_ok)
            ]
            if not todo:
                continue
            here = self._windows(got, hashes, first, todo, deadline)
            cheap = [h and self.worth(first, e) for h, e in zip(here, todo, strict=True)]
            ok = self.agreement.min([*here, *cheap])
            best_valid = max([best_valid, *(e for e, v in zip(todo, ok, strict=False) if v)])
            best = max([best, *(e for e, v in zip(todo, ok[len(todo) :], strict=True) if v)])
        self._stats.storage_declined_tokens += max(best_valid - best, 0) * self._ps
        return best

    def _windows(
        self, got: Probe, hashes: Sequence[str], first: int, ends: Sequence[int], deadline: float
    ) -> list[bool]:
        """Per end: whether the SWA objects of its window are on every local stage: from
        ``got`` where it checked them, else from one more batch (``False`` when the
        lookup gave up, or the batch does not answer before ``deadline``)."""
        w = self._w
        known = {e for e in ends if all(p in got.checked for p in range(e - w, e))}
        ask = [e for e in ends if e not in known]
        pages = sorted({p for e in ask for p in range(max(e - w, first), e)})
        remaining = deadline - time.perf_counter()
        if pages and not got.final and remaining > 0:
            stages = [dataclasses.replace(st, full=(0, 0)) for st in self.stages]
            sub = [hashes[p - first] for p in pages]
            args = (self.backend, stages, sub, first, self._paced(), pages)
            try:
                more = self._pool.submit(_probe_pages, *args).result(timeout=remaining)
                return [(got if e in known else more).window_present(e, w) for e in ends]
            except concurrent.futures.TimeoutError:
                self._stats.storage_lookup_timeouts += 1
            except Exception:  # a backend bug: counted, a miss
                self._stats.storage_read_failures += 1
        return [e in known and got.window_present(e, w) for e in ends]


def _probe_pages(backend, stages, sub_hashes, first, in_flight, pages) -> Probe:
    """A probe of the SWA objects of ``pages`` only (``sub_hashes[i]``: page ``pages[i]``)."""
    stop = max(pages) + 1
    hashes = ["0" * 64] * (stop - first)  # never looked up: the stages have no full query
    for p, h in zip(pages, sub_hashes, strict=True):
        hashes[p - first] = h
    return probe(backend, stages, hashes, first, pages, in_flight)
