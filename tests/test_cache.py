"""HiCache: write policies, tiers, isolation, load-back completion, errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxhicache.cache import HiCache, WritePolicy
from jaxhicache.mesh import make_mesh
from jaxhicache.pools.allocator import OutOfPages
from jaxhicache.spec import ModelCacheSpec, PageSpace, PoolKind

SPEC = ModelCacheSpec.tiny_dsv4()  # page 16, window 8: one trailing SWA page
PAGE = SPEC.page_size


def _cache(policy=WritePolicy.WRITE_THROUGH, device_pages=8, host_pages=16, pp=2):
    return HiCache(
        SPEC,
        make_mesh(pp, 1),
        device_pages=device_pages,
        host_pages=host_pages,
        write_policy=policy,
    )


def _tokens(seed, pages):
    return np.random.default_rng(seed).integers(0, 1000, pages * PAGE)


def _write_request(cache, full, swa, value):
    """Stands in for a forward: stamps every sub-pool row of the request's pages."""
    pools = cache.pools
    for kind in SPEC.kinds():
        ids = full if kind.page_space is PageSpace.FULL else swa
        arr = pools[kind].at[:, :, jnp.asarray(ids)].set(value)
        pools = pools.replace_pool(kind, arr)
    cache.pools = pools


def _serve(cache, tokens, value):
    """match -> load_back -> allocate tail -> 'forward' -> insert -> release."""
    m = cache.match_prefix(tokens)
    lb = cache.load_back(m)
    lb.wait()
    new = len(tokens) // PAGE - m.matched_len // PAGE
    full, swa = cache.allocate(new, new)
    _write_request(cache, full, swa, value)
    cache.insert(tokens, full, swa)
    cache.release(lb.node)
    cache.check_invariants()
    return m


def _poison_device(cache):
    """Another request scribbles over every device page (freed pages get reused)."""
    cache.pools = cache.pools.replace(
        arrays={k: a * 0 - 5.0 for k, a in cache.pools.arrays.items()}
    )


def _read(cache, kind, ids):
    return np.asarray(cache.pools[kind])[:, :, np.asarray(ids)]


def test_write_through_backs_up_on_insert_and_serves_from_host():
    c = _cache(WritePolicy.WRITE_THROUGH)
    toks = _tokens(0, 4)
    _serve(c, toks, 7.0)
    c.poll(wait=True)
    s = c.stats()
    assert s["host_full_pages_used"] == 4 and s["backed_up_pages"] == 4
    assert s["host_swa_pages_used"] == 1  # only the trailing window's SWA page is kept
    c.check_invariants()
    assert c.evict(4) == 4  # backed up: demoted, not deleted
    _poison_device(c)
    m = c.match_prefix(toks)
    assert (m.device_len, m.host_len, m.matched_len) == (0, 4 * PAGE, 4 * PAGE)
    lb = c.load_back(m)
    for layer in range(max(lm.num_local_layers for lm in c.layer_maps)):
        lb.wait(layer)  # per stage-local layer completion
    for kind in SPEC.kinds():
        if kind.page_space is PageSpace.FULL:
            got = _read(c, kind, lb.full_page_ids)
        else:
            got = _read(c, kind, lb.swa_page_ids[-1:])
        for r, lm in enumerate(c.layer_maps):
            nk = lm.num_layers_of(kind)
            assert (got[r, :nk] == 7.0).all(), (kind, r)
    c.release(lb.node)
    assert c.stats()["host_hit_tokens"] == 4 * PAGE
    c.check_invariants()


def test_write_through_selective_backs_up_after_second_hit():
    c = _cache(WritePolicy.WRITE_THROUGH_SELECTIVE)
    toks = _tokens(1, 3)
    _serve(c, toks, 1.0)
    c.poll(wait=True)
    assert c.stats()["backups_issued"] == 0
    c.release(c.load_back(c.match_prefix(toks)).node)  # first hit
    c.poll(wait=True)
    assert c.stats()["host_full_pages_used"] == 0
    c.release(c.load_back(c.match_prefix(toks)).node)  # second hit -> backup
    c.poll(wait=True)
    assert c.stats()["host_full_pages_used"] == 3
    c.check_invariants()


def test_write_back_backs_up_on_eviction_only():
    c = _cache(WritePolicy.WRITE_BACK)
    toks = _tokens(2, 3)
    _serve(c, toks, 3.0)
    c.poll(wait=True)
    assert c.stats()["host_full_pages_used"] == 0
    assert c.evict(3) == 3
    s = c.stats()
    assert s["host_full_pages_used"] == 3 and s["device_full_pages_used"] == 0
    _poison_device(c)
    m = c.match_prefix(toks)
    assert m.host_len == 3 * PAGE
    lb = c.load_back(m)
    lb.wait()
    assert (
        _read(c, PoolKind.C4_KV, lb.full_page_ids)[
            0, : c.layer_maps[0].num_layers_of(PoolKind.C4_KV)
        ]
        == 3.0
    ).all()
    c.release(lb.node)


def test_not_backed_up_nodes_are_deleted_under_write_through_selective():
    c = _cache(WritePolicy.WRITE_THROUGH_SELECTIVE)
    toks = _tokens(3, 2)
    _serve(c, toks, 1.0)
    assert c.evict(2) == 2
    assert c.match_prefix(toks).matched_len == 0
    c.check_invariants()


def test_isolation_reallocated_pages_never_expose_old_bytes():
    """A's pages are freed (deleted, not backed up) and reallocated to B; a match for A
    must miss, and B's match must show B's bytes only."""
    c = _cache(WritePolicy.WRITE_THROUGH_SELECTIVE, device_pages=4)
    a, b = _tokens(10, 4), _tokens(11, 4)
    _serve(c, a, 1.0)
    _serve(c, b, 2.0)  # needs all 4 pages: A is evicted and its ids reused
    ma = c.match_prefix(a)
    assert ma.matched_len == 0
    mb = c.match_prefix(b)
    assert mb.device_len == 4 * PAGE
    got = _read(c, PoolKind.C4_KV, mb.device_full_ids)
    assert (got[:, :1] == 2.0).all()
    assert not (got == 1.0).any()
    c.check_invariants()


def test_duplicate_pages_of_concurrent_requests_are_freed():
    """Two requests computed the same prefix without sharing it: the second insert
    keeps the tree's pages and frees the duplicates (no leak, no double ownership)."""
    c = _cache(WritePolicy.WRITE_THROUGH_SELECTIVE)
    toks = _tokens(5, 3)
    first = c.allocate(3, 3)
    second = c.allocate(3, 3)
    c.insert(toks, *first)
    c.check_invariants()
    c.insert(toks, *second)
    c.check_invariants()
    assert c.stats()["device_full_pages_used"] == 3
    with pytest.raises(ValueError, match="handed out by allocate"):
        c.free([int(i) for i in first[0][:1]])  # already the tree's: not the caller's to free


def test_eviction_under_pressure_and_locks():
    c = _cache(WritePolicy.WRITE_THROUGH, device_pages=6, host_pages=6)
    first, second = _tokens(20, 3), _tokens(21, 3)
    _serve(c, first, 1.0)
    m = c.match_prefix(first)
    lb = c.load_back(m)  # locks `first`
    _serve(c, second, 2.0)
    with pytest.raises(OutOfPages):
        c.allocate(4, 4)  # second can be demoted, first is locked: only 3 pages can be freed
    c.release(lb.node)
    c.poll(wait=True)
    full, swa = c.allocate(6, 6)  # now both can be demoted to host
    assert full.size == 6
    c.free(full, swa)
    m1 = c.match_prefix(first)
    assert m1.host_len == 3 * PAGE  # demoted, still on host
    c.check_invariants()


def test_host_eviction_drops_host_only_leaves():
    c = _cache(WritePolicy.WRITE_THROUGH, device_pages=4, host_pages=4)
    a = _tokens(30, 4)
    _serve(c, a, 1.0)
    c.poll(wait=True)
    c.evict(4)
    assert c.evict_host(4) == 4
    assert c.match_prefix(a).matched_len == 0
    s = c.stats()
    assert s["host_full_pages_used"] == 0 and s["host_swa_pages_used"] == 0
    c.check_invariants()


def test_bad_inputs():
    c = _cache()
    toks = _tokens(40, 2)
    _serve(c, toks, 1.0)
    m = c.match_prefix(toks)
    with pytest.raises(ValueError):
        c.release(m.node)  # never locked: unlock below zero
    with pytest.raises(ValueError, match="DevicePools"):
        c.pools = "not pools"
    with pytest.raises(ValueError):
        c.free([99])  # foreign page id
    stats = c.stats()
    for key in (
        "device_hit_tokens",
        "host_hit_tokens",
        "backup_bytes",
        "load_bytes",
        "transfer_seconds",
    ):
        assert key in stats
