"""Test harness for the radix tree: a tree with its four allocators driven like a
serving loop, and a reference model (from the tree's shape and the page arrays,
never from its summaries) that every step is checked against. No tests here.

A page is named by its *prefix*: ``(salt, token, token, ...)`` up to the page's end,
``salt`` being the bytes of the request's cache salt or ``None``, so pages of
different salts are different pages to the model."""

from __future__ import annotations

from collections import Counter

import numpy as np

from jaxhicache.pools.allocator import OutOfPages, PageAllocator
from jaxhicache.spec import Tier
from jaxhicache.tree import RadixTree, WritePolicy, should_backup_on_hit, should_backup_on_insert

WT = WritePolicy.WRITE_THROUGH
WTS = WritePolicy.WRITE_THROUGH_SELECTIVE
WB = WritePolicy.WRITE_BACK
TIERS = (Tier.DEVICE, Tier.HOST)


def key(ps: int, *pages: int) -> np.ndarray:
    """Token ids: page value v becomes ``[100 v, 100 v + 1, ...]``."""
    if not pages:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(ps, dtype=np.int64) + 100 * v for v in pages])


def salt_bytes(salt) -> bytes | None:
    """The model's name of a salt: ``str`` and ``bytes`` salts with equal UTF-8 bytes
    are one tenant."""
    return salt.encode() if isinstance(salt, str) else salt


def snapshot(tree: RadixTree) -> dict:
    """Page prefix ``(salt, tokens up to the page end...)`` -> (dev, host, dswa, hswa,
    node, i) with ``i`` the page's index inside ``node``."""
    ps = tree.page_size
    out = {}
    stack = [(tree.root, None)]
    while stack:
        n, pref = stack.pop()
        for c in n.children.values():
            toks = c.tokens().tolist()
            p = (c.salt,) if pref is None else pref
            for i in range(c.num_pages):
                p = p + tuple(toks[i * ps : (i + 1) * ps])

                def at(a, i=i):
                    return None if a is None else int(a[i])

                out[p] = (
                    at(c.device_full),
                    at(c.host_full),
                    at(c.device_swa),
                    at(c.host_swa),
                    c,
                    i,
                )
            stack.append((c, p))
    return out


def prefixes(ps: int, k, salt=None) -> list[tuple]:
    toks = [int(t) for t in k]
    s = salt_bytes(salt)
    return [(s, *toks[: (i + 1) * ps]) for i in range(len(toks) // ps)]


def expected_usable(avail: list[bool], full: int, swa: int) -> int:
    if not swa:
        return full
    for b in range(full, -1, -1):
        if all(avail[max(0, b - swa) : b]):
            return b
    raise AssertionError("unreachable")


def swa_classes(tree: RadixTree, snap: dict, locked_nodes) -> dict:
    """Reclaim class of every page prefix: 3 = in the window ending at a leaf end or at a
    locked node's end, 2 = (else) in the window ending at a branch point, 1 = neither."""
    swa = tree.swa_pages
    locked = {id(n) for n in locked_nodes}
    cls = dict.fromkeys(snap, 1)
    ends = {}  # node end prefix -> node
    for pre, (*_, node, i) in snap.items():
        if i == node.num_pages - 1:
            ends[pre] = node
    for want in (2, 3):
        for pre, node in ends.items():
            kind = (
                3
                if (not node.children or id(node) in locked)
                else 2
                if len(node.children) > 1
                else 1
            )
            if kind != want:
                continue
            pages = (len(pre) - 1) // tree.page_size
            for b in range(max(0, pages - swa), pages):
                cls[pre[: 1 + (b + 1) * tree.page_size]] = want
    return cls


def live_swa(snap: dict, tier: Tier) -> dict:
    """Page prefix -> SWA id of that tier, live pages only."""
    j = 2 if tier is Tier.DEVICE else 3
    return {p: v[j] for p, v in snap.items() if v[j] is not None and v[j] >= 0}


class Env:
    """A tree with its four allocators, driven like a serving loop would."""

    def __init__(self, ps=4, swa=2, policy=WT, dev=64, host=64, swa_cap=None):
        self.ps = ps
        self.tree = RadixTree(ps, swa, write_policy=policy)
        self.df = PageAllocator(dev, "device-full")
        self.ds = PageAllocator(swa_cap or dev, "device-swa")
        self.hf = PageAllocator(host, "host-full")
        self.hs = PageAllocator(swa_cap or host, "host-swa")
        self.present: set[tuple] = set()
        self.events: Counter = Counter()  # what a run exercised (reported by the machine)
        self.held: list = []  # nodes locked by "requests in flight"
        self.windows: dict = {}  # id(held node) -> {page prefix: device SWA id} at lock time
        self.pending: list = []  # backups in flight

    # -- allocation with reclaim / eviction fallback
    def alloc(self, alloc: PageAllocator, n: int):
        try:
            return alloc.alloc(n)
        except OutOfPages:
            pass
        if alloc is self.ds:
            self.reclaim(n - alloc.num_free, Tier.DEVICE)
        elif alloc is self.hs:
            self.reclaim(n - alloc.num_free, Tier.HOST)
        if alloc.num_free < n:
            if alloc is self.df or alloc is self.ds:
                self.evict_device(n)
            else:
                self.evict_host(n)
        try:
            return alloc.alloc(n)
        except OutOfPages:
            return None

    def free_device(self, full, swa):
        self.df.free(full)
        self.ds.free(swa)

    def locked_nodes(self) -> list:
        return [*self.held, *(p[0] for p in self.pending)]

    # -- SWA reclaim, checked against the reference classes
    def reclaim(self, n: int, tier: Tier, *, keep_branch_windows: bool = False) -> np.ndarray:
        tree = self.tree
        snap = snapshot(tree)
        live = live_swa(snap, tier)
        cls = swa_classes(tree, snap, self.locked_nodes())
        allowed = (1,) if keep_branch_windows else (1, 2)
        assert tree.reclaimable_swa_pages(tier) == sum(cls[p] < 3 for p in live)

        def lru(p):
            node, i = snap[p][4], snap[p][5]
            return (node.last_access, node.id, i)

        order = [sorted((p for p in live if cls[p] == c), key=lru) for c in allowed]
        want = [p for group in order for p in group][: max(n, 0)]
        got = tree.reclaim_swa(n, tier, keep_branch_windows=keep_branch_windows)
        by_id = {v: p for p, v in live.items()}
        freed = [by_id[int(i)] for i in got]
        assert Counter(freed) == Counter(want), "reclaim took other pages than the rule says"
        after = live_swa(snapshot(tree), tier)
        assert after == {p: v for p, v in live.items() if p not in set(freed)}
        (self.ds if tier is Tier.DEVICE else self.hs).free(got)
        for p in freed:
            self.events[f"reclaim {tier.value} class {cls[p]}"] += 1
        self.events["reclaim short"] += len(freed) < n
        return got

    # -- eviction with model bookkeeping
    def _locked_pages(self) -> dict:
        snap = snapshot(self.tree)
        out = {}
        for n in self.locked_nodes():
            for pre in prefixes(self.ps, self.tree.path_tokens(n), n.salt):
                out[pre] = snap[pre][0] is not None
        return out

    def _after_evict(self, locked: dict, deleted: int):
        after = snapshot(self.tree)
        assert set(after) <= self.present, "eviction invented pages"
        removed = self.present - set(after)
        assert len(removed) == deleted, (len(removed), deleted)
        for pre, on_dev in locked.items():
            assert pre in after, "a locked page was evicted"
            if on_dev:
                assert after[pre][0] is not None, "a locked page was demoted"
        self.present = set(after)

    def evict_device(self, n: int):
        locked = self._locked_pages()
        r = self.tree.evict_device(n)
        self.events["device demote"] += r.demoted_pages > 0
        self.events["device delete"] += r.deleted_pages > 0
        self.events["needs backup"] += bool(r.needs_backup)
        self.free_device(r.full_ids, r.swa_ids)
        self._after_evict(locked, r.deleted_pages)
        if r.needs_backup:
            assert self.tree.write_policy is WB
            for node in r.needs_backup:
                assert node.host_full is None and node.lock_ref == 0
                self.backup_now(node)
            return (
                self.evict_device(n) if any(x.host_full is not None for x in r.needs_backup) else r
            )
        return r

    def evict_host(self, n: int):
        locked = self._locked_pages()
        r = self.tree.evict_host(n)
        self.events["host evict"] += r.evicted_pages > 0
        self.hf.free(r.full_ids)
        self.hs.free(r.swa_ids)
        self._after_evict(locked, r.deleted_pages)
        return r

    # -- backups
    def start_backup(self, node) -> bool:
        plan = self.tree.backup_plan(node)
        if plan.num_pages == 0:
            return False
        # Host allocation may evict host-only leaves; the plan's pages are on device.
        hf = self.alloc(self.hf, plan.num_pages)
        if hf is None:
            return False
        plan = self.tree.backup_plan(node)  # host reclaim / eviction leave it as it was
        assert node.parent is not None and plan.num_pages == hf.size
        live = plan.device_swa_ids >= 0
        hs = self.alloc(self.hs, int(live.sum())) if plan.device_swa_ids.size else None
        hs_arr = None
        if hs is not None and plan.device_swa_ids.size:
            hs_arr = np.full(plan.num_pages, -1, dtype=np.int32)
            hs_arr[live] = hs
        self.tree.inc_lock(node)
        lease_full = self.df.snapshot(plan.device_full_ids)
        lease_swa = self.ds.snapshot(plan.device_swa_ids) if plan.device_swa_ids.size else None
        self.pending.append((node, hf, hs_arr, lease_full, lease_swa))
        return True

    def complete_backup(self, i: int):
        node, hf, hs_arr, lease_full, lease_swa = self.pending.pop(i)
        assert self.df.is_current(lease_full), "device full pages changed under a locked backup"
        if hs_arr is not None:
            stale = ~self.ds.current_mask(lease_swa)
            if stale.any():  # reclaimed (freed, maybe reallocated) while copying: drop
                self.events["stale swa lease"] += 1
                self.hs.free(hs_arr[stale & (hs_arr >= 0)])
                hs_arr = np.where(stale, -1, hs_arr).astype(np.int32)
        unused_f, unused_s = self.tree.mark_backed_up(node, hf, hs_arr)
        self.events["backup surplus"] += unused_f.size > 0
        self.events["backup"] += 1
        self.hf.free(unused_f)
        self.hs.free(unused_s)
        self.tree.dec_lock(node)

    def backup_now(self, node) -> bool:
        if not self.start_backup(node):
            return False
        self.complete_backup(len(self.pending) - 1)
        return True

    # -- a request: match, (load back), insert
    def check_match(self, k, snap, salt=None):
        tree, ps = self.tree, self.ps
        m = tree.match_prefix(k, salt=salt)
        pres = prefixes(ps, k, salt)
        full = 0
        while full < len(pres) and pres[full] in snap:
            full += 1
        assert m.full_match_len == full * ps
        avail = [
            (snap[p][2] is not None and snap[p][2] >= 0)
            or (snap[p][3] is not None and snap[p][3] >= 0)
            for p in pres[:full]
        ]
        b = expected_usable(avail, full, tree.swa_pages)
        assert m.matched_len == b * ps, (m.matched_len, b * ps, avail)
        dev = [snap[p][0] for p in pres[:b]]
        nd = m.device_len // ps
        assert all(d is not None for d in dev[:nd]) and all(d is None for d in dev[nd:])
        assert m.device_full_ids.tolist() == dev[:nd]
        assert m.host_full_ids.tolist() == [snap[p][1] for p in pres[nd:b]]
        assert m.device_len + m.host_len == m.matched_len
        w = min(tree.swa_pages, b)
        assert m.swa_window_pages == w
        win = pres[b - w : b]
        want_dev = [snap[p][2] if snap[p][2] is not None else -1 for p in win]
        assert m.swa_device_ids.tolist() == want_dev
        want_host = [
            snap[p][3] if d < 0 and snap[p][3] is not None else -1
            for p, d in zip(win, want_dev, strict=True)
        ]
        assert m.swa_host_ids.tolist() == want_host
        assert tree.cached_len(k, salt=salt) == full * ps
        if b:
            assert m.node.end == b
            assert m.node.salt == salt_bytes(salt)
        self.events["swa cut"] += b < full
        self.events["host hit"] += m.host_len > 0
        self.events["window from host"] += bool((m.swa_host_ids >= 0).any())
        return m

    def _swa_ids(self, m, have: int, pages: int, swa_all: bool):
        """The request's SWA pages: all it computed, or (``swa_all=False``, an engine that
        drops out-of-window pages itself) the trailing window plus the window at the
        page-wise match, which refills the tombstones there."""
        ps, sp = self.ps, self.tree.swa_pages
        if swa_all:
            sw = np.full(pages - have, -1, dtype=np.int32)
            got = self.alloc(self.ds, pages - have)
            if got is not None:
                sw[:] = got
            return sw
        tail_lo = max(have, pages - sp)
        lo = tail_lo
        fp = m.full_match_len // ps
        if fp > have:
            lo = min(lo, max(have, fp - sp))
        sw = np.full(pages - lo, -1, dtype=np.int32)
        got = self.alloc(self.ds, pages - tail_lo)
        if got is not None:
            sw[tail_lo - lo :] = got
        hi = min(fp, tail_lo)
        if lo < hi:
            got = self.alloc(self.ds, hi - lo)
            if got is not None:
                sw[: hi - lo] = got
        return sw

    def request(self, k, *, hold=False, load=True, backup_sync=True, swa_all=True, salt=None):
        tree, ps = self.tree, self.ps
        snap = snapshot(tree)
        m = self.check_match(k, snap, salt)
        node = m.node
        tree.inc_lock(node)
        self.held.append(node)
        have = m.device_len // ps
        if load and m.needs_load:
            nf = m.host_len // ps
            need = m.swa_host_ids >= 0
            full = self.alloc(self.df, nf)
            sw = self.alloc(self.ds, int(need.sum())) if full is not None else None
            if full is not None and sw is not None:
                arr = np.full(m.swa_window_pages, -1, dtype=np.int32)
                arr[need] = sw
                uf, us = tree.set_device_value(node, full, arr)
                self.events["load back"] += 1
                self.free_device(uf, us)
                have = m.matched_len // ps
            elif full is not None:
                self.df.free(full)
        pages = len(k) // ps
        own = pages - have
        full_ids = self.alloc(self.df, own)
        if full_ids is None:
            self.release(node)
            return m, None
        sw = self._swa_ids(m, have, pages, swa_all) if tree.swa_pages else None
        assert node.parent is not None or node is tree.root, "a locked node left the tree"
        before = live_swa(snapshot(tree), Tier.DEVICE)
        r = tree.insert(k[: pages * ps], full_ids, sw, salt=salt)
        self.events["adopted"] += r.adopted_len > 0
        self.events["dup full"] += r.dup_full_ids.size > 0
        self.events["dup swa"] += r.free_swa_ids.size > 0
        after = live_swa(snapshot(tree), Tier.DEVICE)
        for p, v in before.items():  # insert never frees nor changes an SWA page
            assert after.get(p) == v, "insert dropped or replaced a live SWA page"
        if sw is not None:  # each id given lands on its page unless that page had one
            pres = prefixes(ps, k, salt)[pages - sw.size :]
            dups = [v for p, v in zip(pres, sw.tolist(), strict=True) if v >= 0 and p in before]
            assert sorted(r.free_swa_ids.tolist()) == sorted(dups)
            for p, v in zip(pres, sw.tolist(), strict=True):
                if v >= 0 and p not in before:
                    assert after[p] == v, "insert did not keep an SWA page it was given"
        self.free_device(r.dup_full_ids, r.free_swa_ids)
        assert r.prefix_len + r.new_len == pages * ps
        self.present |= set(prefixes(ps, k, salt))
        pol = tree.write_policy
        if should_backup_on_insert(pol, r.node):
            assert pol is WT
            if backup_sync:
                self.backup_now(r.node)
            else:
                self.start_backup(r.node)
        if should_backup_on_hit(pol, node):
            assert pol is WTS and node.hit_count >= 2
            self.backup_now(node)
        if hold:
            self._record_window(node)
        else:
            self.release(node)
        return m, r

    def _record_window(self, node) -> None:
        """Remember the live device SWA ids of a held lock's trailing window."""
        snap = snapshot(self.tree)
        pres = prefixes(self.ps, self.tree.path_tokens(node), node.salt)
        win = pres[max(0, len(pres) - self.tree.swa_pages) :] if self.tree.swa_pages else []
        self.windows[id(node)] = {
            p: snap[p][2] for p in win if snap[p][2] is not None and snap[p][2] >= 0
        }

    def release(self, node):
        self.held.remove(node)
        if node not in self.held:
            self.windows.pop(id(node), None)
        self.tree.dec_lock(node)

    # -- global checks
    def check(self):
        tree = self.tree
        tree.check_invariants()
        snap = snapshot(tree)
        assert set(snap) == self.present, "the tree lost or invented pages outside eviction"
        spaces = {"df": [], "ds": [], "hf": [], "hs": []}
        for dev, host, dswa, hswa, _, _ in snap.values():
            if dev is not None:
                spaces["df"].append(dev)
            if host is not None:
                spaces["hf"].append(host)
            if dswa is not None and dswa >= 0:
                spaces["ds"].append(dswa)
            if hswa is not None and hswa >= 0:
                spaces["hs"].append(hswa)
        for _, hf, hs_arr, _, _ in self.pending:
            spaces["hf"].extend(hf.tolist())
            if hs_arr is not None:
                spaces["hs"].extend(hs_arr[hs_arr >= 0].tolist())
        for name, alloc in (("df", self.df), ("ds", self.ds), ("hf", self.hf), ("hs", self.hs)):
            ids = sorted(spaces[name])
            assert len(ids) == len(set(ids)), f"{name}: a page is owned twice"
            assert ids == alloc.allocated_ids().tolist(), f"{name}: tree+in-flight != allocator"
            assert alloc.num_used + alloc.num_free == alloc.capacity
        for n in self.held:  # a lock keeps its trailing SWA window: never reclaimed
            for pre, sid in self.windows.get(id(n), {}).items():
                assert snap[pre][2] == sid, "a locked SWA window page was reclaimed"
        assert tree.total_device_pages() == len(spaces["df"])
        assert tree.total_device_swa_pages() == len(spaces["ds"])
        if tree.swa_pages:
            cls = swa_classes(tree, snap, self.locked_nodes())
            for tier in TIERS:
                live = live_swa(snap, tier)
                assert tree.reclaimable_swa_pages(tier) == sum(cls[p] < 3 for p in live)
