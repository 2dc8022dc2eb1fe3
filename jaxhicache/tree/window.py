"""SWA component of the tree: per-node summaries, window protection and reclaim.

Hit rule (DESIGN §4): full-page pools need every page of a prefix, SWA pools
only the trailing ``swa_pages`` pages (the *window*). A prefix is usable up to
the longest page boundary whose window pages all hold an SWA value (device or
host); older tombstones (``-1``) never veto a hit.

Reclaim rule. The tree never frees SWA pages at insert: pages outside every
window stay, *reclaimable*, until :meth:`SwaWindows.reclaim` frees them under
SWA pressure, so a later request that branches inside a cached sequence still
finds its window while memory allows. Per tier, reclaim takes pages in three
priority classes, LRU (node ``last_access``, then node id, then page order)
inside each:

1. pages in no window that ends at a leaf end, a lock end (a node with
   ``own_locks``) or a branch point (a node end with two or more children);
2. pages in windows of branch points only;
3. never: pages in the window ending at a leaf end or a lock end. These leave
   only with their node (device / host eviction).

Invariants (recounted by :func:`jaxhicache.tree.invariants.check_tree`): for
every node, ``prot_dist`` is the distance in pages from its end to the nearest
leaf or lock end at or below it (capped at ``swa_pages``); ``prot = min(pages,
swa_pages - prot_dist)`` trailing pages are in class 3; ``swa_prot_live`` /
``host_prot_live`` count the live SWA pages among them; the O(1) counters are
the sums over nodes, and the candidate sets hold exactly the nodes with a live
page outside class 3 in that tier. Only classes 1 and 2 are evaluated at
reclaim time; class 3 is kept up to date by :meth:`SwaWindows.reprotect`.
"""

from __future__ import annotations

import heapq
from typing import final

import numpy as np

from jaxhicache.tree.arrays import EMPTY, I32, NegOnes, concat
from jaxhicache.tree.node import TreeNode

__all__ = ["SwaWindows"]


@final
class SwaWindows:
    """The SWA bookkeeping of one tree: counters per tier and node-level operations."""

    __slots__ = (
        "dev_cands",
        "dev_live",
        "dev_prot",
        "host_cands",
        "host_live",
        "host_prot",
        "neg",
        "neg_swa",
        "swa",
    )

    def __init__(self, swa_pages: int):
        self.swa = swa_pages
        self.neg = NegOnes()
        self.neg_swa = self.neg(swa_pages)  # read-only: shared by every match
        self.dev_live = 0  # device SWA pages >= 0
        self.host_live = 0
        self.dev_prot = 0  # ... of them in class 3 (never reclaimed)
        self.host_prot = 0
        self.dev_cands: set[TreeNode] = set()  # nodes with a reclaimable device SWA page
        self.host_cands: set[TreeNode] = set()

    # ------------------------------------------------------------------ arrays
    def array(self, k: int, part: np.ndarray | None) -> tuple:
        """A k-page device SWA array whose last ``len(part)`` entries come from ``part``
        (the rest tombstones); returns (array, live count, live lo, live hi)."""
        if part is None or not part.size:
            return np.full(k, -1, dtype=I32), 0, k, 0
        q = part.size
        arr = concat((self.neg(k - q), part)) if q < k else part.copy()
        if part[part.argmin()] >= 0:
            return arr, q, k - q, k
        live = np.flatnonzero(part >= 0)
        if not live.size:
            return arr, 0, k, 0
        return arr, int(live.size), k - q + int(live[0]), k - q + int(live[-1]) + 1

    @staticmethod
    def avail(n: TreeNode) -> np.ndarray:
        """Per page: an SWA value on device or host."""
        d, h = n.device_swa, n.host_swa
        if d is not None:
            a = d >= 0
            if h is not None:
                a |= h >= 0
            return a
        if h is not None:
            return h >= 0
        return np.zeros(n.num_pages, dtype=bool)

    @staticmethod
    def recompute_tail(n: TreeNode) -> None:
        k = n.num_pages
        if n.swa_live == k or n.host_swa_live == k:
            n.swa_tail = k
            return
        if n.swa_live + n.host_swa_live == 0:
            n.swa_tail = 0
            return
        r = SwaWindows.avail(n)[::-1]
        i = int(r.argmin())
        n.swa_tail = k if r[i] else i

    # ------------------------------------------------------------------ class 3
    @staticmethod
    def _dev_tail_live(n: TreeNode, t: int) -> int:
        """Live device SWA pages among the last ``t`` pages of ``n``."""
        live = n.swa_live
        if not t or not live:
            return 0
        a = n.num_pages - t
        lo, hi = n.swa_lo, n.swa_hi
        if a <= lo:
            return live
        if a >= hi:
            return 0
        if hi - lo == live:  # dense
            return hi - a
        return int(np.count_nonzero(n.device_swa[a:hi] >= 0))

    @staticmethod
    def _host_tail_live(n: TreeNode, t: int) -> int:
        live = n.host_swa_live
        if not t or not live:
            return 0
        if t >= n.num_pages:
            return live
        return int(np.count_nonzero(n.host_swa[n.num_pages - t :] >= 0))

    def set_prot(self, n: TreeNode, t: int) -> None:
        """Make the last ``t`` pages of ``n`` its class-3 tail; recount both tiers."""
        n.prot = t
        d = self._dev_tail_live(n, t)
        self.dev_prot += d - n.swa_prot_live
        n.swa_prot_live = d
        if n.swa_live > d:
            self.dev_cands.add(n)
        else:
            self.dev_cands.discard(n)
        h = self._host_tail_live(n, t)
        self.host_prot += h - n.host_prot_live
        n.host_prot_live = h
        if n.host_swa_live > h:
            self.host_cands.add(n)
        else:
            self.host_cands.discard(n)

    def reprotect(self, n: TreeNode) -> None:
        """``n`` (attached) gained or lost a child or its own locks: update ``prot_dist``
        and the class-3 tails of it and of the ancestors that the change reaches."""
        swa = self.swa
        while n.parent is not None:
            if n.own_locks or not n.children:
                d = 0
            else:
                d = swa
                s = n.short
                if s:
                    for c in s:
                        v = c.num_pages + c.prot_dist
                        if v < d:
                            d = v
            if d == n.prot_dist:
                return
            n.prot_dist = d
            k = n.num_pages
            t = swa - d
            self.set_prot(n, t if t < k else k)
            if k >= swa:  # the parent is at least swa_pages away either way
                return
            n = n.parent

    # ------------------------------------------------------------------ node values
    def new_leaf(self, new: TreeNode, parent: TreeNode, part: np.ndarray | None) -> None:
        """SWA value of a fresh unlocked childless device node under ``parent``."""
        swa = self.swa
        k = new.num_pages
        if k < swa:
            if parent.short is None:
                parent.short = {new}
            else:
                parent.short.add(new)
        arr, live, lo, hi = self.array(k, part)
        new.device_swa = arr
        new.swa_live = live
        new.swa_lo = lo
        new.swa_hi = hi
        self.dev_live += live
        if live == 0 or (hi == k and live == k - lo):
            new.swa_tail = live  # the live pages are exactly the trailing ones
        else:
            self.recompute_tail(new)
        t = swa if swa < k else k  # a leaf: its whole window is class 3
        new.prot = t
        if live:
            p = self._dev_tail_live(new, t)
            new.swa_prot_live = p
            self.dev_prot += p
            if live > p:
                self.dev_cands.add(new)
        if parent.parent is not None:
            self.reprotect(parent)

    def set_device(self, n: TreeNode, swa: tuple | None) -> None:
        """Device SWA value of a node that just got its device full value."""
        k = n.num_pages
        arr, live, lo, hi = swa if swa is not None else self.array(k, None)
        n.device_swa = arr
        n.swa_live = live
        n.swa_lo = lo
        n.swa_hi = hi
        self.dev_live += live
        if n.host_full is None and (live == 0 or (hi == k and live == k - lo)):
            n.swa_tail = live
        else:
            self.recompute_tail(n)
        if live:
            p = self._dev_tail_live(n, n.prot)
            n.swa_prot_live = p
            self.dev_prot += p
            if live > p:
                self.dev_cands.add(n)

    def clear_device(self, n: TreeNode, swa_out: list) -> None:
        """Drop a node's device SWA value; appends its live ids to ``swa_out``."""
        swa = n.device_swa
        if n.swa_live:
            if n.swa_hi - n.swa_lo == n.swa_live:
                swa_out.append(swa[n.swa_lo : n.swa_hi])
            else:
                swa_out.append(swa[swa >= 0])
        self.dev_live -= n.swa_live
        self.dev_prot -= n.swa_prot_live
        self.dev_cands.discard(n)
        n.device_swa = None
        n.swa_live = 0
        n.swa_prot_live = 0
        n.swa_lo = n.num_pages
        n.swa_hi = 0
        self.recompute_tail(n)

    def set_host(self, n: TreeNode, swa: np.ndarray | None) -> None:
        if swa is None:
            swa = np.full(n.num_pages, -1, dtype=I32)
        n.host_swa = swa
        live = int(np.count_nonzero(swa >= 0))
        n.host_swa_live = live
        self.host_live += live
        p = self._host_tail_live(n, n.prot)
        n.host_prot_live = p
        self.host_prot += p
        if live > p:
            self.host_cands.add(n)
        self.recompute_tail(n)

    def clear_host(self, n: TreeNode, swa_out: list) -> None:
        if n.host_swa_live:
            swa_out.append(n.host_swa[n.host_swa >= 0])
        self.host_live -= n.host_swa_live
        self.host_prot -= n.host_prot_live
        self.host_cands.discard(n)
        n.host_swa = None
        n.host_swa_live = 0
        n.host_prot_live = 0
        self.recompute_tail(n)

    def merge(self, n: TreeNode, pos: int, sw: np.ndarray, sw_start: int, dup_out: list) -> None:
        """Caller SWA ids over an existing device node: fill tombstones, report the rest."""
        lo = max(pos, sw_start)
        give = sw[lo - sw_start : pos + n.num_pages - sw_start]
        tree = n.device_swa[lo - pos :]
        has = give >= 0
        fill = has & (tree < 0)
        dup = give[has & ~fill & (give != tree)]  # the tree's own ids are not duplicates
        if dup.size:
            dup_out.append(dup)
        idx = np.flatnonzero(fill)
        c = idx.size
        if c:
            tree[idx] = give[idx]
            n.swa_live += c
            self.dev_live += c
            base = lo - pos
            if base + int(idx[0]) < n.swa_lo:
                n.swa_lo = base + int(idx[0])
            if base + int(idx[-1]) + 1 > n.swa_hi:
                n.swa_hi = base + int(idx[-1]) + 1
            self.recompute_tail(n)
            self.set_prot(n, n.prot)

    def split(self, new: TreeNode, child: TreeNode, k: int, p: TreeNode) -> None:
        """SWA half of splitting ``child`` after ``k`` pages into ``new`` (upper, ``k``
        pages, already holding the full values) and ``child`` (lower)."""
        swa = self.swa
        if child.device_swa is not None:
            top = child.device_swa[:k]
            new.device_swa = top
            child.device_swa = child.device_swa[k:]
            lo, hi, live = child.swa_lo, child.swa_hi, child.swa_live
            if lo >= k:
                c = 0
            elif hi <= k:
                c = live
            elif hi - lo == live:  # dense: count by arithmetic
                c = k - lo
            else:
                c = int(np.count_nonzero(top >= 0))
            new.swa_live = c
            child.swa_live -= c
        new.swa_lo = min(child.swa_lo, k)
        new.swa_hi = min(child.swa_hi, k)
        child.swa_lo = max(0, child.swa_lo - k)
        child.swa_hi = max(0, child.swa_hi - k)
        if not new.swa_live:
            new.swa_lo, new.swa_hi = k, 0
        if not child.swa_live:
            child.swa_lo, child.swa_hi = child.num_pages, 0
        if child.host_swa is not None:
            top = child.host_swa[:k]
            new.host_swa = top
            child.host_swa = child.host_swa[k:]
            c = int(np.count_nonzero(top >= 0))
            new.host_swa_live = c
            child.host_swa_live -= c
        self.recompute_tail(new)
        self.recompute_tail(child)
        if p.short is not None:
            p.short.discard(child)
        if k < swa:
            if p.short is None:
                p.short = set()
            p.short.add(new)
        if child.num_pages < swa:
            new.short = {child}
        # Class 3 is unchanged as a set of pages; only its split between the halves moves.
        d = child.num_pages + child.prot_dist
        new.prot_dist = d if d < swa else swa
        t = swa - child.prot_dist
        self.set_prot(child, t if t < child.num_pages else child.num_pages)
        t = swa - new.prot_dist
        self.set_prot(new, t if t < k else k)

    def detach(self, n: TreeNode, p: TreeNode) -> None:
        """``n`` (without values) just left ``p``'s children."""
        if p.short is not None:
            p.short.discard(n)
        if p.parent is not None:
            self.reprotect(p)

    # ------------------------------------------------------------------ reclaim
    def _window_tail(self, n: TreeNode) -> int:
        """Trailing pages of ``n`` in a window of a leaf, lock or branch end (>= n.prot)."""
        swa = self.swa
        d = 0
        x = n
        while not x.own_locks and len(x.children) == 1:
            x = next(iter(x.children.values()))
            d += x.num_pages
            if d >= swa:
                return 0
        k = n.num_pages
        t = swa - d
        return t if t < k else k

    def _free_front(self, n: TreeNode, dev: bool, lim: int, need: int, out: list) -> int:
        """Free up to ``need`` live SWA pages of one tier with index < ``lim``, lowest first."""
        k = n.num_pages
        if dev:
            arr = n.device_swa
            lo, hi, live = n.swa_lo, n.swa_hi, n.swa_live
            if lim <= lo or not live:
                return 0
            if hi - lo == live:  # dense
                e = lim if lim < hi else hi
                if e - lo > need:
                    e = lo + need
                seg = arr[lo:e]
                out.append(seg.copy())
                seg.fill(-1)
                c = e - lo
            else:
                idx = np.flatnonzero(arr[lo:lim] >= 0)
                if not idx.size:
                    return 0
                if idx.size > need:
                    idx = idx[:need]
                idx += lo
                out.append(arr[idx])
                arr[idx] = -1
                c = idx.size
                e = int(idx[-1]) + 1
            n.swa_live -= c
            self.dev_live -= c
            if n.swa_live:
                n.swa_lo = e
            else:
                n.swa_lo, n.swa_hi = k, 0
            if n.swa_live == n.swa_prot_live:
                self.dev_cands.discard(n)
        else:
            arr = n.host_swa
            idx = np.flatnonzero(arr[:lim] >= 0)
            if not idx.size:
                return 0
            if idx.size > need:
                idx = idx[:need]
            out.append(arr[idx])
            arr[idx] = -1
            c = idx.size
            e = int(idx[-1]) + 1
            n.host_swa_live -= c
            self.host_live -= c
            if n.host_swa_live == n.host_prot_live:
                self.host_cands.discard(n)
        if n.swa_tail > k - e:
            self.recompute_tail(n)
        return c

    def reclaim(self, num_pages: int, dev: bool, keep_branch_windows: bool) -> np.ndarray:
        """Free up to ``num_pages`` SWA pages of one tier by the reclaim rule (see module
        docstring); class 2 only when class 1 runs short and ``keep_branch_windows`` is
        false. Returns the freed ids."""
        cands = self.dev_cands if dev else self.host_cands
        if num_pages <= 0 or not cands:
            return EMPTY
        heap = [(n.last_access, n) for n in cands]
        heapq.heapify(heap)
        out: list[np.ndarray] = []
        need = num_pages
        branch: list[TreeNode] = []  # nodes with class-2 pages, LRU order
        while need and heap:
            n = heapq.heappop(heap)[1]
            t = self._window_tail(n)
            k = n.num_pages
            if t < k:
                need -= self._free_front(n, dev, k - t, need, out)
            if t > n.prot:
                branch.append(n)
        if need and not keep_branch_windows:
            for n in branch:
                need -= self._free_front(n, dev, n.num_pages - n.prot, need, out)
                if not need:
                    break
        if not out:
            return EMPTY
        return out[0] if len(out) == 1 else concat(out)

    # ------------------------------------------------------------------ windows of a match
    def usable_boundary(self, path: list[TreeNode], full_pages: int) -> int:
        """Largest page boundary b <= full_pages whose trailing window has SWA values."""
        avail = concat([self.avail(n) for n in path])
        bad = np.flatnonzero(~avail)
        if bad.size == 0 or full_pages - 1 - int(bad[-1]) >= self.swa:
            return full_pages
        # b = bad[k] is usable iff the run before it is long enough (or k == 0).
        gaps = np.diff(bad) - 1
        ok = np.flatnonzero(gaps >= self.swa)
        k = int(ok[-1]) + 1 if ok.size else 0
        return int(bad[k])

    def window(self, path: list[TreeNode], w: int) -> tuple[np.ndarray, np.ndarray]:
        """(device ids, host ids) of the last ``w`` pages of ``path``; host ids only
        where the device has none."""
        n = path[-1]
        k = n.num_pages
        neg = self.neg_swa if w == self.swa else self.neg(w)
        if n.host_swa is None:
            if k >= w:  # common case: one node, nothing on host
                return n.device_swa[k - w :].copy(), neg
            if len(path) > 1:  # next common case: two nodes, nothing on host
                p = path[-2]
                pk = p.num_pages
                if pk + k >= w and p.host_swa is None:
                    return concat((p.device_swa[pk + k - w :], n.device_swa)), neg
        dev_parts = []
        nodes = []
        need = w
        any_host = False
        for n in reversed(path):
            take = min(need, n.num_pages)
            lo = n.num_pages - take
            dev_parts.append(n.device_swa[lo:] if n.device_swa is not None else self.neg(take))
            nodes.append((n, lo))
            any_host |= n.host_swa is not None
            need -= take
            if not need:
                break
        dev = concat(dev_parts[::-1]) if len(dev_parts) > 1 else dev_parts[0].copy()
        if not any_host:
            return dev, neg
        host = concat(
            [
                n.host_swa[lo:] if n.host_swa is not None else self.neg(n.num_pages - lo)
                for n, lo in nodes[::-1]
            ]
        )
        host[dev >= 0] = -1  # only pages that must come from host
        return dev, host
