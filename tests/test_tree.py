"""RadixTree: structure, locks, eviction, tiers and write policies (SWA hit and
reclaim rules: test_tree_swa.py; random traffic: test_tree_machine.py)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from test_tree_harness import WB, WT, WTS, Env, key, prefixes

from jaxhicache.tree import RadixTree, should_backup_on_hit, should_backup_on_insert

TREE_README = Path(__file__).resolve().parents[1] / "jaxhicache" / "tree" / "README.md"


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
    assert [n.num_pages for n in e.tree.backup_plan(leaf).nodes] == [2, 2]
    with pytest.raises(ValueError, match="4 pages of its path are not backed up"):
        e.tree.mark_backed_up(leaf, e.hf.alloc(2))
    e.hf.free(np.array([0, 1], dtype=np.int32))
    assert e.backup_now(leaf)
    assert e.tree.backup_plan(leaf).nodes == []
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


def test_tree_readme_python_blocks_run():
    """The imports and the serving step of jaxhicache/tree/README.md run as written."""
    blocks = re.findall(r"```python\n(.*?)```", TREE_README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {"__name__": "tree_readme"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"tree/README.md block {i}", "exec"), namespace)
    assert namespace["tree"].num_nodes >= 2
