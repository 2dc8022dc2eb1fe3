"""The radix tree's snapshot component (recurrent states of hybrid models).

Snapshots live at node ends on the grid; a split's upper part is a tombstone; a match
stops at the deepest node with a snapshot on device or host while the KV of a longer
match stays; snapshots have their own LRU and never prune KV; a node's KV eviction
takes the snapshot of that tier with it, and a demoted node stays matchable from host.
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxhicache.tree import RadixTree, WritePolicy

PS = 4  # tokens per page
GRID = 2 * PS  # snapshot positions every 2 pages


def _tree(**kw):
    return RadixTree(PS, state_interval=GRID, **kw)


def _key(seed, pages):
    return np.random.default_rng(seed).integers(0, 1000, pages * PS).astype(np.int64)


def _insert(t, key, first_id=0):
    n = len(key) // PS
    return t.insert(key, np.arange(first_id, first_id + n, dtype=np.int32))


def test_a_match_ends_at_the_deepest_snapshot_and_keeps_the_longer_kv():
    t = _tree()
    key = _key(0, 6)
    _insert(t, key)
    assert t.match_prefix(key).matched_len == 0  # KV but no snapshot: no usable prefix
    node, unused = t.attach_state(key[: 2 * PS], 7)  # splits the 6-page node after page 2
    assert unused == -1 and node.end == 2 and node.state_dev == 7
    m = t.match_prefix(np.concatenate([key, [1, 2]]))
    assert (m.matched_len, m.full_match_len) == (2 * PS, 6 * PS)
    assert (m.state_device_slot, m.state_host_slot) == (7, -1) and m.node is node
    assert m.device_full_ids.tolist() == [0, 1]
    assert t.total_device_pages() == 6  # the KV past the snapshot stays
    t.attach_state(key, 9)  # the prompt ends exactly on the grid: a snapshot there too
    m = t.match_prefix(np.concatenate([key, [1, 2]]))
    assert (m.matched_len, m.state_device_slot) == (6 * PS, 9)
    assert t.attach_state(key, 11)[1] == 11  # a second snapshot at the same end: not taken
    t.check_invariants()


def test_a_split_leaves_a_tombstone_and_a_branch_hits_at_the_grid_point_before_it():
    t = _tree()
    a = _key(1, 4)
    _insert(t, a)
    t.attach_state(a, 3)  # at page 4
    b = np.concatenate([a[: 3 * PS], _key(2, 2)])  # branches off inside page 3
    t.insert(b, np.array([10, 11], np.int32))  # pages 3, 4 are b's own
    m = t.match_prefix(b)
    assert m.matched_len == 0 and m.full_match_len == 5 * PS  # the upper part: no snapshot
    upper = t.match_prefix(a, touch=False).node.parent
    assert upper.end == 3 and upper.state_dev == -1  # the tombstone
    t.attach_state(b[: 2 * PS], 5)  # b snapshots at its branch's grid point (page 2)
    assert t.match_prefix(b).matched_len == 2 * PS
    assert t.match_prefix(a).matched_len == 4 * PS
    with pytest.raises(ValueError, match="off the snapshot grid"):
        t.attach_state(b[: 3 * PS], 6)
    t.check_invariants()


def test_snapshots_have_their_own_lru_and_never_prune_kv():
    t = _tree()
    a, b = _key(3, 2), _key(4, 2)
    _insert(t, a, 0)
    _insert(t, b, 2)
    t.attach_state(a, 0)
    t.attach_state(b, 1)
    t.match_prefix(a)  # a's snapshot is the more recently used
    slots, needs = t.states.evict(1, on_device=True)
    assert slots.tolist() == [1] and not needs
    assert t.total_device_pages() == 4  # KV untouched
    assert t.match_prefix(b).matched_len == 0 and t.match_prefix(a).matched_len == 2 * PS
    node = t.match_prefix(a).node
    t.inc_lock(node)  # a request that matched it has not read it yet
    assert t.states.evict(1, on_device=True)[0].size == 0
    t.dec_lock(node)
    assert t.states.evict(1, on_device=True)[0].tolist() == [0]
    t.check_invariants()


def test_a_demoted_node_keeps_its_host_snapshot_and_stays_matchable_from_host():
    # the reference's #33713: state nodes pruned on eviction, so host load-back never fired
    t = _tree()
    key = _key(5, 4)
    _insert(t, key)
    node, _ = t.attach_state(key, 4)
    plan = t.backup_plan(node)
    t.mark_backed_up(node, np.arange(100, 100 + plan.num_pages, dtype=np.int32))
    nodes, dev_slots = t.states.backup_plan([node])
    assert nodes == [node] and dev_slots.tolist() == [4]
    assert t.states.mark_backed_up(nodes, [40]).size == 0
    r = t.evict_device(10)
    assert r.state_ids.tolist() == [4] and r.demoted_pages == 4 and r.deleted_pages == 0
    m = t.match_prefix(key)
    assert (m.matched_len, m.host_len, m.device_len) == (4 * PS, 4 * PS, 0)
    assert (m.state_device_slot, m.state_host_slot) == (-1, 40)
    r = t.evict_host(10)  # the node leaves the tree: its host snapshot with it
    assert r.state_ids.tolist() == [40] and t.num_nodes == 0
    t.check_invariants()


def test_write_back_reports_unbacked_snapshots_and_a_deleted_node_frees_its_snapshot():
    t = _tree(write_policy=WritePolicy.WRITE_BACK)
    key = _key(6, 2)
    _insert(t, key)
    t.attach_state(key, 2)
    slots, needs = t.states.evict(1, on_device=True, write_back=True)
    assert slots.size == 0 and [n.end for n in needs] == [2]
    r = t.evict_device(10, write_back=False)  # deleted: its device snapshot goes too
    assert r.deleted_pages == 2 and r.state_ids.tolist() == [2]
    t.check_invariants()


def test_bad_uses_are_refused_and_the_invariant_check_catches_a_stray_snapshot():
    with pytest.raises(ValueError, match="multiple of page_size=4"):
        RadixTree(PS, state_interval=6)
    with pytest.raises(ValueError, match="no snapshot component"):
        RadixTree(PS).attach_state(_key(0, 2), 0)
    t = _tree()
    key = _key(7, 2)
    with pytest.raises(ValueError, match="holds only 0 of the key's 2 pages"):
        t.attach_state(key, 0)
    _insert(t, key)
    with pytest.raises(ValueError, match="integer >= 0"):
        t.attach_state(key, -1)
    (node,) = t.iter_nodes()
    node.state_host = 3  # a host snapshot without host KV (bypassing the component)
    with pytest.raises(AssertionError, match="host snapshot without KV"):
        t.check_invariants()
    node.state_host = -1
    before = t.digest()
    t.attach_state(key, 1)
    assert t.digest() != before  # processes compare snapshots too
