"""RadixTree SWA component: the hit rule (trailing window only) and the reclaim rule
(out-of-window pages kept until SWA pressure; leaf and lock windows never taken)."""

from __future__ import annotations

import numpy as np
import pytest
from test_tree_harness import WB, WT, Env, key, live_swa, prefixes, snapshot

from jaxhicache.spec import Tier
from jaxhicache.tree import RadixTree

DEV, HOST = Tier.DEVICE, Tier.HOST


def swa_of(e: Env, k) -> dict:
    """Page prefix -> device SWA id for the pages of ``k`` (live ones)."""
    live = live_swa(snapshot(e.tree), DEV)
    return {p: live[p] for p in prefixes(e.ps, k) if p in live}


# --------------------------------------------------------------------------- hit rule
def test_old_tombstones_do_not_veto_a_full_hit_with_its_window():
    e = Env(ps=4, swa=2)
    k = key(4, *range(1, 11))  # 10 pages; the engine keeps only the trailing window
    e.request(k, swa_all=False)
    leaf = e.tree.match_prefix(k).node
    assert (leaf.device_swa[:8] == -1).all() and (leaf.device_swa[8:] >= 0).all()
    assert e.tree.total_device_swa_pages() == 2
    m = e.tree.match_prefix(k)
    assert m.matched_len == 40 and m.device_len == 40 and m.full_match_len == 40
    assert m.swa_device_ids.tolist() == leaf.device_swa[8:].tolist()
    e.check()


def test_insert_keeps_out_of_window_swa_pages_reclaimable():
    e = Env(ps=4, swa=2)
    k = key(4, *range(1, 11))
    _, r = e.request(k)  # the engine hands over all 10 SWA pages it computed
    assert r.free_swa_ids.size == 0
    assert e.tree.total_device_swa_pages() == 10
    assert e.tree.reclaimable_swa_pages(DEV) == 8  # all but the leaf's window
    got = e.reclaim(100, DEV)
    assert got.size == 8 and e.tree.reclaimable_swa_pages(DEV) == 0
    m = e.tree.match_prefix(k)
    assert m.matched_len == 40 and (m.swa_device_ids >= 0).all()
    e.check()


def test_match_stops_at_last_boundary_with_its_trailing_window():
    e = Env(ps=2, swa=2, policy=WB)  # device only
    short = key(2, 1, 2, 3, 4)
    e.request(short)
    n = e.tree.match_prefix(short).node
    e.tree.inc_lock(n)  # a request in flight reads this window
    e.held.append(n)
    long = key(2, 1, 2, 3, 4, 5, 6, 7, 8)
    e.tree.insert(long, e.df.alloc(4), np.full(4, -1, dtype=np.int32))  # no SWA kept at all
    e.present |= set(prefixes(2, long))
    m = e.tree.match_prefix(long)
    assert m.full_match_len == 16 and m.matched_len == 8  # window at page 8 missing, at 4 present
    assert m.node is n
    assert e.tree.match_prefix(key(2, 1, 2, 3)).matched_len == 6  # window [1, 3) still kept
    e.reclaim(100, DEV)  # pages 0, 1: outside the lock's window
    assert e.tree.match_prefix(key(2, 1, 2, 3)).matched_len == 0
    assert e.tree.match_prefix(long).matched_len == 8  # the lock's window survived
    e.release(n)
    e.check()


# --------------------------------------------------------------------------- the issue
SYS = (7, 8, 9)  # a 3-page system prompt


@pytest.mark.parametrize(("ps", "swa"), [(4, 2), (16, 8), (256, 1)])
def test_second_conversation_gets_the_shared_system_prompt(ps, swa):
    """With room to spare, the second of two conversations sharing a 3-page system
    prompt gets every shared whole page from the cache, with its full window."""
    e = Env(ps=ps, swa=swa, policy=WB)
    sys_prompt = key(ps, *SYS)
    a = np.concatenate([sys_prompt, key(ps, 1, 2, 3, 4)])
    e.request(a)
    given = swa_of(e, a)
    b = np.concatenate([sys_prompt, key(ps, 5, 6), np.arange(ps // 2 + 1)])
    m, _ = e.request(b)
    assert m.full_match_len == m.matched_len == m.device_len == 3 * ps
    w = min(swa, 3)
    assert m.swa_window_pages == w
    assert m.swa_device_ids.tolist() == [given[p] for p in prefixes(ps, sys_prompt)[3 - w :]]
    e.check()


def test_eager_reclaim_after_every_insert_is_the_old_behaviour():
    """Reclaiming class 1 right after each insert (the old tombstone rule with branch
    points protected): the second conversation misses, only the third one hits."""
    e = Env(ps=4, swa=2, policy=WB)
    sys_prompt = key(4, *SYS)

    def conv(*pages):
        e.request(np.concatenate([sys_prompt, key(4, *pages)]))
        e.reclaim(e.tree.reclaimable_swa_pages(DEV), DEV, keep_branch_windows=True)

    conv(1, 2, 3, 4)
    m = e.tree.match_prefix(np.concatenate([sys_prompt, key(4, 5)]))
    assert (m.full_match_len, m.matched_len) == (12, 0)
    conv(5)  # recomputed: its SWA pages refill the prompt's, now a branch point
    m = e.tree.match_prefix(np.concatenate([sys_prompt, key(4, 6)]))
    assert m.matched_len == 12
    e.check()


def test_under_swa_pressure_a_miss_or_a_shorter_hit_never_a_wrong_window():
    e = Env(ps=4, swa=2, policy=WB, swa_cap=12)
    sys_prompt = key(4, *SYS)
    a = np.concatenate([sys_prompt, key(4, 1, 2, 3, 4)])
    e.request(a)  # 7 SWA pages
    given = swa_of(e, a)
    e.request(key(4, 7, 8, 5))  # branch after 2 prompt pages; 1 more SWA page
    assert e.ds.num_free == 4
    e.request(key(4, 20, 21, 22, 23, 24, 25))  # needs 6: reclaims 2 (LRU, class 1 first)
    assert e.events["reclaim device class 1"] == 2 and not e.events["reclaim device class 2"]
    foreign = set(swa_of(e, key(4, 20, 21, 22, 23, 24, 25)).values())
    b = np.concatenate([sys_prompt, key(4, 5, 6)])
    m = e.tree.match_prefix(b)
    assert (m.full_match_len, m.matched_len) == (12, 8)  # window at page 3 lost page 2
    want = [given[p] for p in prefixes(4, sys_prompt)[:2]]
    assert m.swa_device_ids.tolist() == want and foreign.isdisjoint(want)
    e.reclaim(100, DEV)  # everything but leaf windows: the branch window goes too
    m = e.tree.match_prefix(b)
    assert (m.full_match_len, m.matched_len) == (12, 0) and m.swa_device_ids.size == 0
    e.check()


# --------------------------------------------------------------------------- reclaim rule
def test_reclaim_never_takes_leaf_or_lock_windows():
    e = Env(ps=2, swa=2, policy=WB)
    e.request(key(2, 1, 2, 3, 4, 5, 6))
    e.request(key(2, 1, 2, 3, 7, 8))  # branch point after page 3
    e.request(key(2, 1, 2, 3, 9))  # a 1-page leaf: its window reaches into the branch's node
    locked = key(2, 1, 2, 3, 4, 5)
    n = e.tree.match_prefix(locked).node  # splits the first leaf after page 5
    e.tree.inc_lock(n)
    e.held.append(n)
    e._record_window(n)
    assert e.tree.reclaimable_swa_pages(DEV) == 2  # page 0: no window; 1: the branch's
    e.reclaim(100, DEV)
    assert e.tree.reclaimable_swa_pages(DEV) == 0
    keep = {
        *prefixes(2, key(2, 1, 2, 3, 4, 5, 6))[4:],  # first leaf's window
        *prefixes(2, key(2, 1, 2, 3, 7, 8))[3:],  # second leaf's window
        *prefixes(2, key(2, 1, 2, 3, 9))[2:],  # third leaf's window
        *prefixes(2, locked)[3:],  # the lock's window
    }
    assert set(live_swa(snapshot(e.tree), DEV)) == keep
    e.check()
    e.release(n)  # the lock's window is an internal page again: reclaimable
    assert e.tree.reclaimable_swa_pages(DEV) == 1
    got = e.reclaim(100, DEV)
    assert got.size == 1
    assert set(live_swa(snapshot(e.tree), DEV)) == keep - {prefixes(2, locked)[3]}
    e.check()


def test_reclaim_is_lru_and_class_one_first():
    e = Env(ps=1, swa=1, policy=WB)
    e.request(key(1, 1, 2, 3))
    e.request(key(1, 5, 6, 7))
    e.tree.match_prefix(key(1, 1, 2, 3))  # touch the first: the second is older now
    got = e.reclaim(3, DEV)  # the model in Env.reclaim checks the exact pages too
    snap = snapshot(e.tree)
    assert [p for p in prefixes(1, key(1, 5, 6, 7)) if snap[p][2] == -1] == [
        (None, 500),
        (None, 500, 600),
    ]
    assert [p for p in prefixes(1, key(1, 1, 2, 3)) if snap[p][2] == -1] == [(None, 100)]
    assert got.size == 3
    e.check()


@pytest.mark.parametrize("tier", [DEV, HOST])
def test_reclaim_takes_branch_windows_last(tier):
    e = Env(ps=1, swa=1, policy=WT)  # write-through: the same pages on host
    e.request(key(1, 1, 2, 3))
    e.request(key(1, 1, 2, 4))  # branch after page 2: its window (page 1) is class 2
    e.request(key(1, 8, 9))
    e.tree.match_prefix(key(1, 1, 2))  # the branch window is the most recent page now
    col = 2 if tier is DEV else 3
    e.reclaim(2, tier)  # class 1 first: pages (1,) and (8,), though they are older
    snap = snapshot(e.tree)
    assert (
        snap[(None, 100)][col] == snap[(None, 800)][col] == -1 and snap[(None, 100, 200)][col] >= 0
    )
    assert e.reclaim(5, tier, keep_branch_windows=True).size == 0
    assert e.reclaim(5, tier).size == 1  # then the branch window
    assert snapshot(e.tree)[(None, 100, 200)][col] == -1
    other = HOST if tier is DEV else DEV
    assert e.tree.reclaimable_swa_pages(other) == 3  # the other tier is untouched
    e.check()


def test_host_swa_copies_follow_the_same_rule():
    e = Env(ps=2, swa=1, policy=WT)  # write-through: host copies of all 4 SWA pages
    k = key(2, 1, 2, 3, 4)
    e.request(k)
    assert e.tree.total_host_swa_pages() == 4
    assert e.tree.reclaimable_swa_pages(HOST) == e.tree.reclaimable_swa_pages(DEV) == 3
    assert e.reclaim(10, HOST).size == 3
    assert e.tree.total_device_swa_pages() == 4  # the device tier is untouched
    e.evict_device(100)  # demote: the host copy is all there is
    m = e.tree.match_prefix(k)
    assert m.matched_len == 8 and m.host_len == 8 and (m.swa_host_ids >= 0).all()
    m = e.tree.match_prefix(key(2, 1, 2, 3))  # its window (page 2) was reclaimed on host
    assert (m.full_match_len, m.matched_len) == (6, 0)
    e.check()


def test_window_loaded_from_host_when_device_swa_was_reclaimed():
    e = Env(ps=2, swa=1)
    a = key(2, 1, 2)
    e.request(a)  # backed up with its SWA pages
    e.request(key(2, 1, 2, 3))  # page 1 is no window's now
    e.reclaim(10, DEV)
    node = e.tree.match_prefix(a).node
    assert node.device_swa[-1] == -1 and node.host_swa[-1] >= 0
    m = e.tree.match_prefix(a)
    assert m.matched_len == 4 and m.device_len == 4
    assert m.swa_host_ids.tolist() == [node.host_swa[-1]]
    e.request(a)  # loads the window back
    assert e.tree.match_prefix(a).swa_device_ids[0] >= 0
    e.check()


def test_reclaim_tier_argument_and_trees_without_swa():
    t = RadixTree(2, 1)
    t.insert(key(2, 1, 2), np.array([0, 1], np.int32), np.array([0, 1], np.int32))
    assert t.reclaimable_swa_pages("device") == 1 == t.reclaimable_swa_pages(DEV)
    with pytest.raises(ValueError, match="storage"):
        t.reclaim_swa(1, Tier.STORAGE)
    assert t.reclaim_swa(0, DEV).size == 0
    assert t.reclaim_swa(5, "device").tolist() == [0]
    plain = RadixTree(2)
    plain.insert(key(2, 1), np.array([0], np.int32))
    assert plain.reclaim_swa(5, DEV).size == 0 and plain.reclaimable_swa_pages(HOST) == 0
    t.check_invariants()


def test_check_invariants_catches_stale_reclaim_bookkeeping():
    e = Env(ps=2, swa=2, policy=WB)
    e.request(key(2, 1, 2, 3, 4))
    leaf = e.tree.match_prefix(key(2, 1, 2, 3, 4)).node
    leaf.prot -= 1
    with pytest.raises(AssertionError, match="prot"):
        e.tree.check_invariants()
    leaf.prot += 1
    leaf.swa_prot_live -= 1
    with pytest.raises(AssertionError, match="protected live SWA"):
        e.tree.check_invariants()
    leaf.swa_prot_live += 1
    e.tree.check_invariants()
