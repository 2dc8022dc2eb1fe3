"""RadixTree: structure, SWA hit policy, locks, eviction, write policies, and a
Hypothesis state machine against a reference model (tree + allocators together)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from jaxhicache.pools.allocator import OutOfPages, PageAllocator
from jaxhicache.tree import (
    RadixTree,
    WritePolicy,
    should_backup_on_hit,
    should_backup_on_insert,
)

WT = WritePolicy.WRITE_THROUGH
WTS = WritePolicy.WRITE_THROUGH_SELECTIVE
WB = WritePolicy.WRITE_BACK


def key(ps: int, *pages: int) -> np.ndarray:
    """Token ids: page value v becomes ``[100 v, 100 v + 1, ...]``."""
    if not pages:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(ps, dtype=np.int64) + 100 * v for v in pages])


# --------------------------------------------------------------------------- harness
def snapshot(tree: RadixTree) -> dict:
    """Page prefix (tuple of tokens up to the page end) -> (dev, host, dswa, hswa, node)."""
    ps = tree.page_size
    out = {}
    stack = [(tree.root, ())]
    while stack:
        n, pref = stack.pop()
        for c in n.children.values():
            toks = c.tokens().tolist()
            p = pref
            for i in range(c.num_pages):
                p = p + tuple(toks[i * ps : (i + 1) * ps])

                def at(a, i=i):
                    return None if a is None else int(a[i])

                out[p] = (at(c.device_full), at(c.host_full), at(c.device_swa), at(c.host_swa), c)
            stack.append((c, p))
    return out


def prefixes(ps: int, k) -> list[tuple]:
    toks = [int(t) for t in k]
    return [tuple(toks[: (i + 1) * ps]) for i in range(len(toks) // ps)]


def expected_usable(avail: list[bool], full: int, swa: int) -> int:
    if not swa:
        return full
    for b in range(full, -1, -1):
        if all(avail[max(0, b - swa) : b]):
            return b
    raise AssertionError("unreachable")


class Env:
    """A tree with its four allocators, driven like a serving loop would."""

    def __init__(self, ps=4, swa=2, policy=WT, dev=64, host=64, protect_branch_points=True):
        self.ps = ps
        self.tree = RadixTree(
            ps, swa, write_policy=policy, protect_branch_points=protect_branch_points
        )
        self.df = PageAllocator(dev, "device-full")
        self.ds = PageAllocator(dev, "device-swa")
        self.hf = PageAllocator(host, "host-full")
        self.hs = PageAllocator(host, "host-swa")
        self.present: set[tuple] = set()
        self.events: Counter = Counter()  # what a run exercised (reported by the machine)
        self.held: list = []  # nodes locked by "requests in flight"
        self.windows: dict = {}  # id(held node) -> {page prefix: device SWA id} at lock time
        self.pending: list = []  # backups in flight

    # -- allocation with eviction fallback
    def alloc(self, alloc: PageAllocator, n: int):
        try:
            return alloc.alloc(n)
        except OutOfPages:
            pass
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

    # -- eviction with model bookkeeping
    def _locked_pages(self) -> dict:
        snap = snapshot(self.tree)
        out = {}
        for n in [*self.held, *(p[0] for p in self.pending)]:
            for pre in prefixes(self.ps, self.tree.path_tokens(n)):
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
        assert node.parent is not None and self.tree.backup_plan(node).num_pages == plan.num_pages
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
            if stale.any():  # tombstoned (freed, maybe reallocated) while copying: drop
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
    def check_match(self, k, snap) -> None:
        tree, ps = self.tree, self.ps
        m = tree.match_prefix(k)
        pres = prefixes(ps, k)
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
        assert tree.cached_len(k) == full * ps
        if b:
            assert m.node.end == b
        self.events["swa cut"] += b < full
        self.events["host hit"] += m.host_len > 0
        self.events["window from host"] += bool((m.swa_host_ids >= 0).any())
        return m

    def request(self, k, *, hold=False, load=True, backup_sync=True, tomb=True):
        tree, ps = self.tree, self.ps
        snap = snapshot(tree)
        m = self.check_match(k, snap)
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
        sp = tree.swa_pages
        sw = None
        if sp:
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
        assert node.parent is not None or node is tree.root, "a locked node left the tree"
        r = tree.insert(k[: pages * ps], full_ids, sw)
        self.events["adopted"] += r.adopted_len > 0
        self.events["dup full"] += r.dup_full_ids.size > 0
        self.events["tombstoned"] += r.tombstoned_swa_ids.size > 0
        self.free_device(r.dup_full_ids, r.free_swa_ids)
        assert r.prefix_len + r.new_len == pages * ps
        self.present |= set(prefixes(ps, k))
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
            self.release(node, tombstone=tomb)
        return m, r

    def _record_window(self, node) -> None:
        """Remember the live device SWA ids of a held lock's trailing window."""
        snap = snapshot(self.tree)
        pres = prefixes(self.ps, self.tree.path_tokens(node))
        win = pres[max(0, len(pres) - self.tree.swa_pages) :] if self.tree.swa_pages else []
        self.windows[id(node)] = {
            p: snap[p][2] for p in win if snap[p][2] is not None and snap[p][2] >= 0
        }

    def release(self, node, tombstone=False):
        self.held.remove(node)
        if node not in self.held:
            self.windows.pop(id(node), None)
        self.tree.dec_lock(node)
        if tombstone:
            self.ds.free(self.tree.tombstone_swa(node))

    # -- global checks
    def check(self):
        tree = self.tree
        tree.check_invariants()
        snap = snapshot(tree)
        assert set(snap) == self.present, "the tree lost or invented pages outside eviction"
        spaces = {"df": [], "ds": [], "hf": [], "hs": []}
        for dev, host, dswa, hswa, _ in snap.values():
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
        for n in self.held:  # a lock keeps its trailing SWA window: never tombstoned
            for pre, sid in self.windows.get(id(n), {}).items():
                assert snap[pre][2] == sid, "a locked SWA window page was tombstoned"
        assert tree.total_device_pages() == len(spaces["df"])
        assert tree.total_device_swa_pages() == len(spaces["ds"])


# --------------------------------------------------------------------------- structure
def test_insert_requires_page_alignment():
    t = RadixTree(4)
    with pytest.raises(ValueError, match=r"key length 6 is not a multiple of page_size 4"):
        t.insert(np.arange(6), np.arange(1, dtype=np.int32))
    with pytest.raises(ValueError, match="integer"):
        t.match_prefix(np.array([1.5, 2.5]))
    with pytest.raises(ValueError, match="page_size"):
        RadixTree(0)


def test_match_any_length_matches_whole_pages_only():
    e = Env(ps=4, swa=0)
    k = key(4, 1, 2, 3)
    e.request(k)
    m = e.tree.match_prefix(k[:11])
    assert (m.matched_len, m.full_match_len) == (8, 8)
    assert m.device_full_ids.tolist() == e.tree.match_prefix(k).device_full_ids[:2].tolist()
    assert e.tree.match_prefix(k[:3]).matched_len == 0
    e.check()


def test_split_inside_node_keeps_values_on_both_halves():
    e = Env(ps=4, swa=2)
    k = key(4, 1, 2, 3, 4)
    e.request(k)
    ids = e.tree.match_prefix(k).device_full_ids.tolist()
    assert e.tree.num_nodes == 1
    # A key that diverges inside the first page of the third page: split after 2 pages.
    other = np.concatenate([k[:8], np.array([200, 4, 5, 6])])
    m = e.tree.match_prefix(other)
    assert m.full_match_len == 8
    assert e.tree.num_nodes == 2
    top = e.tree.root.children[k[:4].tobytes()]
    assert top.num_pages == 2 and top.device_full.tolist() == ids[:2]
    (bottom,) = top.children.values()
    assert bottom.num_pages == 2 and bottom.device_full.tolist() == ids[2:]
    assert e.tree.match_prefix(k).device_full_ids.tolist() == ids
    e.check()


def test_insert_reports_duplicates_and_keeps_tree_values():
    e = Env(ps=2, swa=0)
    k = key(2, 1, 2, 3)
    a = e.df.alloc(3)
    r1 = e.tree.insert(k, a)
    assert (r1.prefix_len, r1.new_len) == (0, 6)
    b = e.df.alloc(3)
    r2 = e.tree.insert(k, b)  # the caller recomputed everything: all are duplicates
    assert r2.prefix_len == 6 and r2.dup_full_ids.tolist() == b.tolist()
    assert e.tree.match_prefix(k).device_full_ids.tolist() == a.tolist()
    e.df.free(r2.dup_full_ids)
    # Leading pages given by the tree, trailing ones by the caller.
    c = e.df.alloc(1)
    r3 = e.tree.insert(key(2, 1, 2, 3, 4), c)
    assert r3.prefix_len == 6 and r3.new_len == 2 and r3.dup_full_ids.size == 0
    e.present |= set(prefixes(2, key(2, 1, 2, 3, 4)))
    e.check()


def test_insert_without_ids_for_uncached_pages_fails_cleanly():
    e = Env(ps=2, swa=2)
    e.request(key(2, 1, 2))
    before = e.tree.stats()
    with pytest.raises(ValueError, match=r"pages \[2, 3\) are not cached"):
        e.tree.insert(key(2, 1, 2, 3, 4), e.df.alloc(1))
    assert e.tree.stats() == before
    with pytest.raises(ValueError, match=">= 0"):
        e.tree.insert(key(2, 5), np.array([-1], dtype=np.int32))


def test_dec_lock_below_zero_raises():
    e = Env(ps=1, swa=0)
    e.request(key(1, 1, 2, 3))
    node = e.tree.match_prefix(key(1, 1, 2, 3)).node
    e.tree.inc_lock(node)
    e.tree.dec_lock(node)
    with pytest.raises(ValueError, match="below zero"):
        e.tree.dec_lock(node)
    e.tree.inc_lock(e.tree.root)  # the root is a no-op either way
    e.tree.dec_lock(e.tree.root)
    e.check()


def test_locked_nodes_are_never_evicted_and_counters_follow():
    e = Env(ps=2, swa=0)
    e.request(key(2, 1, 2))
    e.request(key(2, 5, 6, 7))
    n = e.tree.match_prefix(key(2, 1, 2)).node
    e.tree.inc_lock(n)
    e.held.append(n)
    assert e.tree.evictable_device_pages() == 3
    assert e.tree.protected_device_pages() == 2
    r = e.evict_device(100)
    assert r.evicted_pages == 3 and e.tree.total_device_pages() == 2
    assert e.tree.match_prefix(key(2, 1, 2)).device_len == 4
    e.release(n)
    assert e.tree.evictable_device_pages() == 2
    e.evict_device(100)
    assert e.tree.total_device_pages() == 0
    e.check()


def test_lru_order_of_device_eviction():
    e = Env(ps=1, swa=0, policy=WTS)
    for v in (1, 2, 3):
        e.request(key(1, v, v))
    e.tree.match_prefix(key(1, 1, 1))  # touch 1: now 2 is the least recently used
    r = e.evict_device(2)
    assert r.evicted_pages == 2
    assert e.tree.cached_len(key(1, 2, 2)) == 0
    assert e.tree.cached_len(key(1, 1, 1)) == 2 and e.tree.cached_len(key(1, 3, 3)) == 2
    e.check()


# --------------------------------------------------------------------------- tiers
@pytest.mark.parametrize("policy", [WT, WTS])
def test_evict_demotes_backed_up_and_deletes_unbacked(policy):
    e = Env(ps=2, swa=1, policy=policy)
    e.request(key(2, 1, 2))  # write_through backs this up at insert
    e.request(key(2, 3, 4))
    backed = e.tree.match_prefix(key(2, 1, 2)).node
    if policy is WTS:
        assert backed.host_full is None
        e.backup_now(backed)
    other = e.tree.match_prefix(key(2, 3, 4)).node
    assert (other.host_full is not None) == (policy is WT)
    r = e.evict_device(100)
    assert r.evicted_pages == 4
    assert (r.demoted_pages, r.deleted_pages) == ((4, 0) if policy is WT else (2, 2))
    assert backed.parent is not None and backed.device_full is None and backed.host_full is not None
    m = e.tree.match_prefix(key(2, 1, 2))
    assert (m.device_len, m.host_len) == (
        0,
        4,
    ) and m.host_full_ids.tolist() == backed.host_full.tolist()
    assert e.tree.cached_len(key(2, 3, 4)) == (4 if policy is WT else 0)
    e.check()


def test_write_back_reports_needs_backup_instead_of_deleting():
    e = Env(ps=2, swa=0, policy=WB)
    e.request(key(2, 1, 2))
    n = e.tree.match_prefix(key(2, 1, 2)).node
    assert not should_backup_on_insert(WB, n) and n.host_full is None
    r = e.tree.evict_device(10)
    assert r.evicted_pages == 0 and r.needs_backup == [n]
    assert e.tree.total_device_pages() == 2  # nothing happened
    assert e.backup_now(n)
    r = e.tree.evict_device(10)
    e.free_device(r.full_ids, r.swa_ids)
    assert r.demoted_pages == 2 and r.deleted_pages == 0
    e.check()


def test_host_eviction_removes_only_unlocked_host_only_leaves():
    e = Env(ps=2, swa=1)  # write_through: everything is backed up
    e.request(key(2, 1, 2))
    e.request(key(2, 1, 2, 3))
    assert e.tree.total_host_pages() == 3
    assert e.tree.evict_host(10).evicted_pages == 0  # all on device too: nothing host-only
    e.evict_device(1)  # demote the leaf [3]
    assert e.tree.evictable_host_pages() == 1
    n = e.tree.match_prefix(key(2, 1, 2, 3)).node
    assert n.device_full is None
    e.tree.inc_lock(n)
    e.held.append(n)
    assert e.tree.evict_host(10).evicted_pages == 0  # locked
    e.release(n)
    r = e.evict_host(10)
    assert r.evicted_pages == 1 and r.deleted_pages == 1
    assert e.tree.cached_len(key(2, 1, 2, 3)) == 4
    e.check()


def test_backup_must_form_a_prefix_and_counts_are_checked():
    e = Env(ps=2, swa=0, policy=WB)
    e.request(key(2, 1, 2))
    e.request(key(2, 1, 2, 3, 4))
    leaf = e.tree.match_prefix(key(2, 1, 2, 3, 4)).node
    assert [n.num_pages for n in e.tree.nodes_to_backup(leaf)] == [2, 2]
    with pytest.raises(ValueError, match="4 pages of its path are not backed up"):
        e.tree.mark_backed_up(leaf, e.hf.alloc(2))
    e.hf.free(np.array([0, 1], dtype=np.int32))
    assert e.backup_now(leaf)
    assert e.tree.nodes_to_backup(leaf) == []
    e.check()


def test_load_back_sets_device_values_and_loads_the_swa_window():
    e = Env(ps=2, swa=2)
    k = key(2, 1, 2, 3, 4)
    e.request(k)
    e.evict_device(100)  # demote everything (write_through backed it up)
    m = e.tree.match_prefix(k)
    assert (m.matched_len, m.device_len, m.host_len) == (8, 0, 8)
    assert (m.swa_device_ids == -1).all() and (m.swa_host_ids >= 0).all()
    assert m.needs_load
    m2, _ = e.request(k)
    assert m2.host_len == 8
    m3 = e.tree.match_prefix(k)
    assert (m3.device_len, m3.host_len) == (8, 0) and (m3.swa_device_ids >= 0).all()
    assert not m3.needs_load
    e.check()


def test_load_back_surplus_ids_come_back():
    e = Env(ps=2, swa=0)
    k = key(2, 1, 2)
    e.request(k)
    e.evict_device(100)
    node = e.tree.match_prefix(k).node
    one = e.df.alloc(1)
    with pytest.raises(ValueError, match="2 host-only pages end its path, got only 1"):
        e.tree.set_device_value(node, one)
    e.df.free(one)
    ids = e.df.alloc(3)
    uf, us = e.tree.set_device_value(node, ids)  # one id too many: it comes back
    assert uf.tolist() == ids[:1].tolist() and us.size == 0
    assert node.device_full.tolist() == ids[1:].tolist()
    e.df.free(uf)
    e.check()


def test_insert_adopts_device_ids_for_host_only_pages():
    e = Env(ps=2, swa=1)
    k = key(2, 1, 2, 3)
    e.request(k)
    e.evict_device(100)
    m, r = e.request(k, load=False)  # recompute instead of loading back
    assert m.host_len == 6 and r.adopted_len == 6 and r.dup_full_ids.size == 0
    assert e.tree.match_prefix(k).device_len == 6
    e.check()


def test_insert_over_host_only_prefix_without_ids_is_refused():
    e = Env(ps=2, swa=0)
    e.request(key(2, 1, 2))
    e.evict_device(100)
    before = e.tree.stats()
    with pytest.raises(ValueError, match="cached on host only"):
        e.tree.insert(key(2, 1, 2, 3), e.df.alloc(1))
    assert e.tree.stats() == before


# --------------------------------------------------------------------------- SWA
def test_old_tombstones_do_not_veto_a_full_hit_with_its_window():
    e = Env(ps=4, swa=2)
    k = key(4, *range(1, 11))  # 10 pages
    e.request(k)
    leaf = e.tree.match_prefix(k).node
    assert (leaf.device_swa[:8] == -1).all() and (leaf.device_swa[8:] >= 0).all()
    assert e.tree.total_device_swa_pages() == 2
    m = e.tree.match_prefix(k)
    assert m.matched_len == 40 and m.device_len == 40 and m.full_match_len == 40
    assert m.swa_device_ids.tolist() == leaf.device_swa[8:].tolist()
    e.check()


def test_match_stops_at_last_boundary_with_its_trailing_window():
    e = Env(ps=2, swa=2)
    short = key(2, 1, 2, 3, 4)
    e.request(short)
    n = e.tree.match_prefix(short).node
    e.tree.inc_lock(n)  # a request in flight reads this window: protected
    e.held.append(n)
    long = key(2, 1, 2, 3, 4, 5, 6, 7, 8)
    e.tree.insert(long, e.df.alloc(4), np.full(4, -1, dtype=np.int32))  # no SWA kept at all
    e.present |= set(prefixes(2, long))
    m = e.tree.match_prefix(long)
    assert m.full_match_len == 16 and m.matched_len == 8  # window at page 8 missing, at 4 present
    assert m.node is n
    assert e.tree.match_prefix(key(2, 1, 2, 3)).matched_len == 0  # window [1, 3) tombstoned
    e.release(n, tombstone=False)
    e.check()


def test_lock_protects_window_until_released_and_tombstone_swa_frees_it():
    e = Env(ps=1, swa=2, policy=WB)  # nothing on host: the device window is all there is
    a = key(1, 1, 2, 3, 4)
    e.request(a)
    n = e.tree.match_prefix(a).node
    e.tree.inc_lock(n)
    e.held.append(n)
    e.request(key(1, 1, 2, 3, 4, 5, 6, 7))
    assert e.tree.match_prefix(a).matched_len == 4  # kept: a lock ends there
    e.release(n, tombstone=True)
    assert e.tree.match_prefix(a).matched_len == 0  # released and tombstoned
    e.check()


@pytest.mark.parametrize("protect", [True, False])
def test_branch_point_window_protection(protect):
    e = Env(ps=2, swa=1, protect_branch_points=protect)
    sys_prompt = key(2, 9, 9, 9)
    e.request(np.concatenate([sys_prompt, key(2, 1)]))
    m, _ = e.request(np.concatenate([sys_prompt, key(2, 2)]))
    assert m.full_match_len == 6 and m.matched_len == 0  # window at the branch was tombstoned
    e.request(np.concatenate([sys_prompt, key(2, 1, 5)]))  # an insert through the branch point
    m = e.tree.match_prefix(np.concatenate([sys_prompt, key(2, 3)]))
    assert m.matched_len == (6 if protect else 0)
    e.check()


def test_window_loaded_from_host_when_device_swa_was_tombstoned():
    e = Env(ps=2, swa=1)
    a = key(2, 1, 2)
    e.request(a)  # backed up with its window (page 1)
    e.request(key(2, 1, 2, 3))  # tombstones page 1's device SWA (host copy stays)
    node = e.tree.match_prefix(a).node
    assert node.device_swa[-1] == -1 and node.host_swa[-1] >= 0
    m = e.tree.match_prefix(a)
    assert (
        m.matched_len == 4 and m.device_len == 4 and m.swa_host_ids.tolist() == [node.host_swa[-1]]
    )
    e.request(a, tomb=False)  # loads the window back (and keeps it until the next cleanup)
    assert e.tree.match_prefix(a).swa_device_ids[0] >= 0
    e.check()


def test_write_policies_decide_what_is_backed_up_and_when():
    for pol in (WT, WTS, WB):
        e = Env(ps=2, swa=1, policy=pol)
        e.request(key(2, 1, 2))
        n = e.tree.match_prefix(key(2, 1, 2)).node  # first hit
        assert (n.host_full is not None) == (pol is WT)
        assert should_backup_on_hit(pol, n) == (pol is WTS and n.hit_count >= 2)
        assert n.hit_count == 1  # the request's own match found nothing; this is hit 1
        e.request(key(2, 1, 2))  # second hit: selective backs up now
        assert (n.host_full is not None) == (pol in (WT, WTS))
        if pol is WB:
            assert e.tree.evict_device(10).needs_backup == [n]
        e.check()


def test_isolation_reallocated_pages_never_leak_through_match():
    e = Env(ps=2, swa=1, policy=WB, dev=4)
    a, b = key(2, 1, 2), key(2, 7, 8)
    e.request(a)
    a_ids = e.tree.match_prefix(a).device_full_ids.copy()
    lease = e.df.snapshot(a_ids)  # e.g. a D2H copy of A's pages still in flight
    r = e.tree.evict_device(10, write_back=False)  # delete A outright
    e.free_device(r.full_ids, r.swa_ids)
    e._after_evict({}, r.deleted_pages)
    e.request(b)
    b_ids = e.tree.match_prefix(b).device_full_ids
    assert set(b_ids.tolist()) & set(a_ids.tolist())  # the same page ids were reused ...
    assert not e.df.is_current(lease)  # ... the late copy sees it and drops its bytes
    m = e.tree.match_prefix(a)
    assert m.matched_len == 0 and m.device_full_ids.size == 0 and m.full_match_len == 0
    assert e.tree.match_prefix(b).device_full_ids.tolist() == b_ids.tolist()
    e.check()


def test_check_invariants_catches_corruption():
    e = Env(ps=2, swa=1)
    e.request(key(2, 1, 2))
    e.request(key(2, 3, 4))
    e.tree.check_invariants()
    a = e.tree.match_prefix(key(2, 1, 2)).node
    b = e.tree.match_prefix(key(2, 3, 4)).node
    saved = b.device_full
    b.device_full = a.device_full.copy()
    with pytest.raises(AssertionError, match="owned twice"):
        e.tree.check_invariants()
    b.device_full = saved
    b.host_full, saved = None, b.host_full
    with pytest.raises(AssertionError):
        e.tree.check_invariants()
    b.host_full = saved
    e.tree.check_invariants()


# --------------------------------------------------------------------------- stateful
class TreeMachine(RuleBasedStateMachine):
    """Random serving traffic against the tree, checked after every step."""

    @initialize(
        ps=st.sampled_from([1, 2, 4]),
        swa=st.sampled_from([0, 1, 2, 3]),
        policy=st.sampled_from([WT, WTS, WB]),
        dev=st.sampled_from([10, 16, 40]),
        host=st.sampled_from([8, 24, 60]),
        protect=st.booleans(),
    )
    def setup(self, ps, swa, policy, dev, host, protect):
        self.env = Env(ps, swa, policy, dev, host, protect_branch_points=protect)
        self.seqs: list[np.ndarray] = []

    def _key(self, data) -> np.ndarray:
        ps = self.env.ps
        if self.seqs and data.draw(st.integers(0, 3), label="extend") > 0:
            # Mostly multi-turn traffic: a previous sequence, maybe cut back a little.
            base = self.seqs[data.draw(st.integers(0, len(self.seqs) - 1), label="base")]
            npages = len(base) // ps
            if data.draw(st.booleans(), label="near end"):
                cut = max(0, npages - data.draw(st.integers(0, 2), label="back"))
            else:
                cut = data.draw(st.integers(0, npages), label="cut")
            base = base[: cut * ps]
        else:
            base = np.zeros(0, dtype=np.int64)
        more = data.draw(st.lists(st.integers(0, 2), min_size=0, max_size=5 * ps), label="more")
        k = np.concatenate([base, np.array(more, dtype=np.int64)])
        return k[: 10 * ps]

    @rule(
        data=st.data(),
        hold=st.booleans(),
        load=st.booleans(),
        sync=st.booleans(),
        tomb=st.booleans(),
    )
    def request(self, data, hold, load, sync, tomb):
        for _ in range(data.draw(st.integers(1, 3), label="burst")):
            k = self._key(data)
            hold = hold and len(self.env.held) < 4
            self.env.request(k, hold=hold, load=load, backup_sync=sync, tomb=tomb)
            if len(k) >= self.env.ps:
                self.seqs.append(k)

    @rule(data=st.data())
    def match_only(self, data):
        self.env.check_match(self._key(data), snapshot(self.env.tree))

    @rule(data=st.data())
    def lock_match(self, data):
        """A request that matched and waits (e.g. for its load back): lock only."""
        env = self.env
        if len(env.held) < 4:
            m = env.check_match(self._key(data), snapshot(env.tree))
            if m.node is not env.tree.root:
                env.tree.inc_lock(m.node)
                env.held.append(m.node)
                env._record_window(m.node)

    @precondition(lambda self: self.env.held)
    @rule(data=st.data(), tomb=st.booleans())
    def unlock(self, data, tomb):
        i = data.draw(st.integers(0, len(self.env.held) - 1))
        self.env.release(self.env.held[i], tombstone=tomb)

    @rule(n=st.integers(1, 12))
    def evict_device(self, n):
        self.env.evict_device(n)

    @rule(n=st.integers(1, 12))
    def evict_host(self, n):
        self.env.evict_host(n)

    @precondition(lambda self: self.env.tree.num_nodes)
    @rule(data=st.data())
    def start_backup(self, data):
        nodes = [n for n in self.env.tree.iter_nodes() if n.device_full is not None]
        if nodes and len(self.env.pending) < 3:
            self.env.start_backup(nodes[data.draw(st.integers(0, len(nodes) - 1))])

    @precondition(lambda self: self.env.pending)
    @rule(data=st.data())
    def complete_backup(self, data):
        self.env.complete_backup(data.draw(st.integers(0, len(self.env.pending) - 1)))

    @invariant()
    def consistent(self):
        if hasattr(self, "env"):
            self.env.check()

    def teardown(self):
        if hasattr(self, "env"):
            for name, count in self.env.events.items():
                if count:
                    event(name)


TreeMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_tree_state_machine = TreeMachine.TestCase
