"""Tenant salts and L3 page hashes on the radix tree.

Salts: requests with different ``cache_salt`` never share or match a node; the same
salt (``str`` or its UTF-8 ``bytes``) does; no salt behaves as before; an empty salt
is refused (L3 page hashes treat it as no salt). Hashes: each node keeps the hex
``storage.keys.page_hashes`` chain of its pages, computed on first request and
sliced (never recomputed) by splits; ``key_hashes`` extends it past the tree.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_tree_harness import WT, Env, key, snapshot

import jaxhicache.storage.keys as keys_mod
from jaxhicache.spec import Tier
from jaxhicache.storage.keys import page_hashes
from jaxhicache.tree import RadixTree

DEV, HOST = Tier.DEVICE, Tier.HOST


def ids(a: int, n: int) -> np.ndarray:
    return np.arange(a, a + n, dtype=np.int32)


def all_paths_hashed(tree: RadixTree) -> None:
    """``path_hashes`` of every node equals ``page_hashes`` of its path's tokens."""
    ps = tree.page_size
    for n in list(tree.iter_nodes()):
        want = page_hashes(tree.path_tokens(n), ps, salt=n.salt)
        assert tree.path_hashes(n) == want
        assert n.page_hashes == want[n.start :]


@pytest.fixture
def hash_calls(monkeypatch):
    """Counts the pages ``storage.keys.page_hashes`` hashes from now on."""
    calls = []
    real = keys_mod.page_hashes

    def counting(tokens, page_size, salt=None, parent=None):
        out = real(tokens, page_size, salt, parent)
        calls.append(len(out))
        return out

    monkeypatch.setattr(keys_mod, "page_hashes", counting)
    return calls


# ---------------------------------------------------------------- salts
def test_salts_never_share_a_node():
    ps = 2
    t = RadixTree(ps, 1)
    k = key(ps, 1, 2, 3)
    r0 = t.insert(k, ids(0, 3), ids(0, 3))
    ra = t.insert(k, ids(10, 3), ids(10, 3), salt="a")
    rb = t.insert(k, ids(20, 3), ids(20, 3), salt=b"b")
    # Same tokens, three tenants: nothing was shared, each has its own root child.
    assert r0.prefix_len == ra.prefix_len == rb.prefix_len == 0
    assert len(t.root.children) == 3 and t.num_nodes == 3
    assert {n.salt for n in t.iter_nodes()} == {None, b"a", b"b"}
    assert t.total_device_pages() == 9
    for salt, first in ((None, 0), ("a", 10), (b"a", 10), ("b", 20), (b"b", 20)):
        m = t.match_prefix(k, salt=salt)
        assert m.matched_len == 6 and m.device_full_ids.tolist() == ids(first, 3).tolist()
        assert t.cached_len(k, salt=salt) == 6
    for other in ("c", b"A", "a ", "\x00a"):
        m = t.match_prefix(k, salt=other)
        assert m.matched_len == 0 and m.node is t.root
        assert t.cached_len(k, salt=other) == 0
    t.check_invariants()


def test_salt_isolation_across_branches_and_splits():
    """A split inside one tenant's path leaves the others whole; a later request of
    another tenant that shares the tokens' prefix still misses."""
    ps = 2
    t = RadixTree(ps)
    t.insert(key(ps, 1, 2, 3, 4), ids(0, 4), salt="a")
    r = t.insert(key(ps, 1, 2, 7), ids(10, 1), salt="a")  # split after 2 pages, salt kept
    assert r.prefix_len == 4 and t.num_nodes == 3
    assert all(n.salt == b"a" for n in t.iter_nodes())
    m = t.match_prefix(key(ps, 1, 2, 3), salt=None)
    assert m.matched_len == 0
    r = t.insert(key(ps, 1, 2, 3), ids(20, 3))  # unsalted: all three pages are new
    assert r.prefix_len == 0 and r.new_len == 6 and t.num_nodes == 4
    assert t.match_prefix(key(ps, 1, 2, 3, 4), salt="a").matched_len == 8
    assert t.match_prefix(key(ps, 1, 2, 3, 4)).matched_len == 6
    t.check_invariants()


def test_insert_under_another_salt_needs_its_own_ids():
    """The leading pages of an insert must be on device *under that salt*."""
    ps = 2
    t = RadixTree(ps)
    t.insert(key(ps, 1, 2), ids(0, 2), salt="a")
    with pytest.raises(ValueError, match="not cached"):
        t.insert(key(ps, 1, 2, 3), ids(10, 1), salt="b")
    with pytest.raises(ValueError, match="not cached"):
        t.insert(key(ps, 1, 2, 3), ids(10, 1))
    r = t.insert(key(ps, 1, 2, 3), ids(10, 1), salt=b"a")
    assert r.prefix_len == 4 and r.new_len == 2
    t.check_invariants()


@pytest.mark.parametrize("bad", ["", b""])
def test_empty_salt_is_refused(bad):
    """L3 hashes treat an empty salt as none, so accepting it as a tenant would share
    its L3 pages with unsalted requests: the tree refuses it."""
    t = RadixTree(2)
    assert page_hashes(key(2, 1), 2, salt=bad) == page_hashes(key(2, 1), 2)
    with pytest.raises(ValueError, match="non-empty"):
        t.match_prefix(key(2, 1), salt=bad)
    with pytest.raises(ValueError, match="non-empty"):
        t.insert(key(2, 1), ids(0, 1), salt=bad)
    with pytest.raises(ValueError, match="non-empty"):
        t.key_hashes(key(2, 1), salt=bad)
    assert t.num_nodes == 0


@pytest.mark.parametrize("bad", [3, 1.5, bytearray(b"a"), memoryview(b"a"), ["a"], object()])
def test_bad_salt_type_is_a_value_error(bad):
    t = RadixTree(2)
    for call in (
        lambda: t.match_prefix(key(2, 1), salt=bad),
        lambda: t.insert(key(2, 1), ids(0, 1), salt=bad),
        lambda: t.cached_len(key(2, 1), salt=bad),
        lambda: t.key_hashes(key(2, 1), salt=bad),
    ):
        with pytest.raises(ValueError, match="salt must be str, bytes or None") as e:
            call()
        assert type(bad).__name__ in str(e.value)
    assert t.num_nodes == 0


def test_salt_is_keyword_only():
    t = RadixTree(2)
    with pytest.raises(TypeError):
        t.match_prefix(key(2, 1), "a")
    with pytest.raises(TypeError):
        t.insert(key(2, 1), ids(0, 1), None, "a")


def test_eviction_is_lru_over_all_salts():
    ps = 2
    t = RadixTree(ps)
    t.insert(key(ps, 1, 2), ids(0, 2), salt="a")
    t.insert(key(ps, 1, 2), ids(2, 2), salt="b")
    t.insert(key(ps, 1, 2), ids(4, 2))
    t.match_prefix(key(ps, 1, 2), salt="a")  # "b" is now the least recently used
    r = t.evict_device(2)
    assert r.full_ids.tolist() == [2, 3]
    assert t.match_prefix(key(ps, 1, 2), salt="b").matched_len == 0
    assert t.match_prefix(key(ps, 1, 2), salt="a").matched_len == 4
    t.check_invariants()
    r = t.evict_device(2)  # unsalted next (a was touched again just now)
    assert r.full_ids.tolist() == [4, 5]
    assert t.num_nodes == 1 and next(t.iter_nodes()).salt == b"a"
    t.check_invariants()


@pytest.mark.parametrize(
    ("dev", "host", "swa_cap", "evict_host", "exercised"),
    [
        (24, 30, 16, 4, ("swa cut", "reclaim device class 1", "host evict")),
        (20, 60, 30, 2, ("load back", "host hit", "window from host", "device demote")),
    ],
)
def test_salted_serving_loop_with_host_tier_locks_and_reclaim(
    dev, host, swa_cap, evict_host, exercised
):
    """The harness's serving loop (load back, backups, locks, SWA reclaim, eviction of
    both tiers) with three tenants sending the same conversations: every step is
    checked against the reference model, whose pages are named by (salt, tokens)."""
    e = Env(ps=2, swa=2, policy=WT, dev=dev, host=host, swa_cap=swa_cap)
    convs = [key(2, 1, 2, 3, 4), key(2, 1, 2, 3, 5, 6), key(2, 1, 2, 7)]
    hits = {}
    for rnd in range(4):
        for salt in (None, "x", b"y"):
            for k in convs:
                m, _ = e.request(k, salt=salt, hold=rnd == 1 and k is convs[0])
                hits[salt] = hits.get(salt, 0) + m.matched_len
                e.check()
        e.evict_device(6)
        e.reclaim(3, DEV)
        e.reclaim(2, HOST)
        e.evict_host(evict_host)
        e.check()
        while e.held:
            e.release(e.held[0])
    assert all(hits.values()), hits  # every tenant hit its own pages
    assert all(e.events[x] for x in exercised), dict(e.events)
    # A page prefix of one tenant never names another's page.
    for (salt, *_), (*_, node, _) in snapshot(e.tree).items():
        assert node.salt == salt
    e.tree.check_invariants()


# ---------------------------------------------------------------- hashes
def test_hashes_of_every_node_after_random_inserts_and_splits():
    rng = np.random.default_rng(7)
    for ps in (1, 3):
        t = RadixTree(ps, 2)
        nid = 0
        seqs = []
        for step in range(300):
            salt = [None, "s", b"\xff\x00"][int(rng.integers(3))]
            if seqs and rng.random() < 0.7:
                base, salt = seqs[int(rng.integers(len(seqs)))]
                base = base[: int(rng.integers(0, len(base) // ps + 1)) * ps]
            else:
                base = np.zeros(0, np.int64)
            k = np.concatenate([base, rng.integers(0, 3, int(rng.integers(0, 4)) * ps)])
            m = t.match_prefix(k, salt=salt)
            n = len(k) // ps - m.device_len // ps
            t.insert(k, ids(nid, n), ids(nid, n), salt=salt)
            nid += n
            seqs.append((k, salt))
            if step % 3 == 0:  # hash some paths, so later splits cut hashed nodes
                nodes = list(t.iter_nodes())
                t.path_hashes(nodes[int(rng.integers(len(nodes)))])
            if step % 50 == 49:
                t.check_invariants()  # re-derives every kept hash from its parent's
                all_paths_hashed(t)
        all_paths_hashed(t)
        t.check_invariants()


def test_hashes_are_sliced_by_splits_not_recomputed(hash_calls):
    ps = 2
    t = RadixTree(ps)
    k = key(ps, 1, 2, 3, 4, 5)
    r = t.insert(k, ids(0, 5), salt="a")
    assert r.node.page_hashes is None  # lazy: nothing hashed at insert
    assert not hash_calls
    want = page_hashes(k, ps, salt="a")
    assert t.path_hashes(r.node) == want
    assert hash_calls == [5]
    low = r.node
    # Splits: inside the node by a match, and by a branching insert.
    m = t.match_prefix(key(ps, 1, 2))
    assert m.matched_len == 0  # unsalted: no split of the salted node
    m = t.match_prefix(key(ps, 1, 2), salt="a")
    assert m.node is not low and m.node.page_hashes == want[:2]
    assert low.page_hashes == want[2:] and low.start == 2
    t.insert(key(ps, 1, 2, 3, 9), ids(5, 1), salt="a")
    mid = low.parent
    assert mid.page_hashes == want[2:3] and low.page_hashes == want[3:]
    assert hash_calls == [5]  # nothing rehashed
    assert t.path_hashes(low) == want
    assert hash_calls == [5]
    # The new branch hashes only its own page, chained from its parent's last hash.
    leaf = t.match_prefix(key(ps, 1, 2, 3, 9), salt="a").node
    assert t.path_hashes(leaf) == page_hashes(key(ps, 1, 2, 3, 9), ps, salt="a")
    assert hash_calls == [5, 1]
    t.check_invariants()


def test_hashes_survive_demotion_and_load_back_and_die_with_the_node():
    ps = 2
    t = RadixTree(ps)
    r = t.insert(key(ps, 1, 2), ids(0, 2), salt="t")
    node = r.node
    h = t.path_hashes(node)
    plan = t.backup_plan(node)
    t.mark_backed_up(node, ids(100, plan.num_pages))
    t.evict_device(2)  # demoted: host value kept, so are the hashes
    assert node.device_full is None and node.page_hashes == h
    m = t.match_prefix(key(ps, 1, 2), salt="t")
    assert m.host_len == 4 and t.path_hashes(m.node) == h
    t.set_device_value(m.node, ids(10, 2))
    assert t.path_hashes(m.node) == h
    t.check_invariants()


def test_salted_hashes_differ_from_the_first_page():
    ps = 2
    t = RadixTree(ps)
    k = key(ps, 1, 2, 3)
    a = t.path_hashes(t.insert(k, ids(0, 3), salt="a").node)
    b = t.path_hashes(t.insert(k, ids(3, 3), salt="b").node)
    u = t.path_hashes(t.insert(k, ids(6, 3)).node)
    assert u == page_hashes(k, ps) and a == page_hashes(k, ps, salt="a")
    for i in range(3):
        assert len({a[i], b[i], u[i]}) == 3
    assert t.path_hashes(t.root) == []


def test_key_hashes_past_the_tree(hash_calls):
    ps = 2
    t = RadixTree(ps)
    t.insert(key(ps, 1, 2, 3, 4), ids(0, 4), salt="a")
    t.insert(key(ps, 1, 2, 5), ids(4, 1), salt="a")
    n_nodes = t.num_nodes
    stamps = [n.last_access for n in t.iter_nodes()]
    cases = [
        (key(ps, 1, 2, 3, 4, 8, 9), "a"),  # the whole path, then two new pages
        (key(ps, 1, 2, 3, 7), "a"),  # the match ends inside a node
        (key(ps, 1, 2), "a"),  # ends at a node end
        (key(ps, 1, 2, 3, 4), None),  # another salt: nothing from the tree
        (key(ps, 9), b"a"),
        (key(ps), "a"),
        (np.concatenate([key(ps, 1, 2, 5), [7]]), "a"),  # a trailing partial page
        ([100, 101, 200, 201, 5], "a"),  # a list
    ]
    for k, salt in cases:
        assert t.key_hashes(k, salt=salt) == page_hashes(np.asarray(k), ps, salt=salt)
    # Side-effect free apart from the kept hashes: no split, no LRU bump.
    assert t.num_nodes == n_nodes and [n.last_access for n in t.iter_nodes()] == stamps
    assert all(n.page_hashes is not None for n in t.iter_nodes())
    calls = len(hash_calls)
    assert t.key_hashes(key(ps, 1, 2, 3, 4), salt="a") == page_hashes(
        key(ps, 1, 2, 3, 4), ps, salt="a"
    )
    assert len(hash_calls) == calls  # all four pages came from the nodes
    t.check_invariants()


def test_hashes_need_int32_token_ids():
    """The L3 chain hashes int32 ids; the tree itself holds any int64 id."""
    t = RadixTree(1)
    r = t.insert(np.array([2**40], np.int64), ids(0, 1))
    with pytest.raises(ValueError, match="int32"):
        t.path_hashes(r.node)
    assert r.node.page_hashes is None
    t.check_invariants()


def test_path_hashes_of_a_removed_node():
    t = RadixTree(2)
    r = t.insert(key(2, 1), ids(0, 1))
    t.evict_device(1)
    with pytest.raises(ValueError, match="no longer in the tree"):
        t.path_hashes(r.node)


# ---------------------------------------------------------------- check_invariants
def test_check_invariants_catches_bad_hashes_and_salts():
    ps = 2
    t = RadixTree(ps)
    r = t.insert(key(ps, 1, 2, 3), ids(0, 3), salt="a")
    t.insert(key(ps, 1, 2, 4), ids(3, 1), salt="a")
    leaf = r.node
    t.path_hashes(leaf)
    t.check_invariants()
    good = list(leaf.page_hashes)
    leaf.page_hashes = page_hashes(leaf.tokens(), ps)  # from scratch, without the parent
    with pytest.raises(AssertionError, match="page hash 0"):
        t.check_invariants()
    leaf.page_hashes = good
    top = leaf.parent
    good_top = top.page_hashes
    top.page_hashes = None  # a hashed child under an unhashed parent
    with pytest.raises(AssertionError, match="not prefix-closed"):
        t.check_invariants()
    top.page_hashes = good_top
    leaf.salt = b"b"  # a child of another salt than its parent
    with pytest.raises(AssertionError, match="differs from its parent"):
        t.check_invariants()
    leaf.salt = b"a"
    t.root.children[top.key[: ps * 8]] = t.root.children.pop(next(iter(t.root.children)))
    with pytest.raises(AssertionError, match="children key"):  # the salt left the key
        t.check_invariants()
