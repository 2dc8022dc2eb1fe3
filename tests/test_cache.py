"""HiCache: the admit / insert / release API, write policies, tiers, batching, errors.

A stand-in forward stamps a value into every sub-pool row of a request's own
pages, so every test can check which bytes a later request is served. Tests
that restore from host poison the device pools first, so the bytes can only
have come from the host slabs.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxhicache.cache import (
    Batch,
    HiCache,
    HiCacheConfig,
    OutOfPages,
    Request,
    RequestState,
    WritePolicy,
)
from jaxhicache.mesh import make_mesh
from jaxhicache.spec import ModelCacheSpec, PageSpace, PoolKind
from jaxhicache.transfer import CopyPath

SPEC = ModelCacheSpec.tiny_dsv4()  # page 16, window 8: one trailing SWA page
PAGE = SPEC.page_size
PATHS = [CopyPath.DIRECT, CopyPath.STAGED]


def _cache(policy=WritePolicy.WRITE_THROUGH, device_pages=8, host_pages=16, pp=2, **kw):
    cfg = HiCacheConfig(device_pages=device_pages, host_pages=host_pages, write_policy=policy, **kw)
    cache = HiCache(SPEC, make_mesh(pp, 1), cfg)
    return cache, cache.new_device_pools()


def _tokens(seed, pages, extra=1):
    """``pages`` whole pages plus ``extra`` tokens (the last prompt token is always computed)."""
    return np.random.default_rng(seed).integers(0, 1000, pages * PAGE + extra).astype(np.int32)


def _stamp(pools, req: Request, value):
    """Stands in for a forward: stamps every sub-pool row of the request's own pages."""
    for kind in SPEC.kinds():
        table = req.full_page_ids if kind.page_space is PageSpace.FULL else req.swa_page_ids
        ids = table[req.own_start :]
        ids = ids[ids >= 0]
        pools = pools.replace_pool(kind, pools[kind].at[:, :, jnp.asarray(ids)].set(value))
    return pools


def _serve(cache, pools, tokens, value, max_new=1):
    """admit -> 'forward' -> insert -> release; returns (pools, request)."""
    pools, batch = cache.admit(pools, [tokens], max_new)
    (req,) = batch.requests
    batch.wait()
    pools = _stamp(pools, req, value)
    cache.insert(pools, req, tokens)
    cache.release(req)
    cache.check_invariants()
    return pools, req


def _poison(pools):
    """Another request scribbles over every device page (freed pages get reused)."""
    return pools.replace(arrays={k: a * 0 - 5.0 for k, a in pools.arrays.items()})


def _read(pools, kind, ids):
    return np.asarray(pools[kind])[:, :, np.asarray(ids)]


def _assert_rows(cache, pools, kind, ids, value):
    """Every layer of ``kind`` on every stage holds ``value`` in pages ``ids``."""
    got = _read(pools, kind, ids)
    counts = [lm.num_layers_of(kind) for lm in cache.layer_maps]
    assert sum(counts) > 0, kind
    for r, nk in enumerate(counts):
        assert (got[r, :nk] == value).all(), (kind, r)


# ------------------------------------------------------------------ policies
@pytest.mark.parametrize("path", PATHS)
def test_write_through_backs_up_on_insert_and_serves_from_host(path):
    c, pools = _cache(WritePolicy.WRITE_THROUGH, copy_path=path)
    toks = _tokens(0, 4)
    pools, _ = _serve(c, pools, toks, 7.0)
    c.poll(wait=True)
    s = c.stats()
    assert s["host_full_pages_used"] == 4 and s["backed_up_pages"] == 4
    assert s["host_swa_pages_used"] == 4  # every page's SWA copy is kept (reclaimable)
    assert c.evict(pools, 4) == 4  # backed up: demoted, not deleted
    pools = _poison(pools)
    pools, batch = c.admit(pools, [toks])
    (req,) = batch.requests
    assert (req.device_hit_tokens, req.host_hit_tokens) == (0, 4 * PAGE)
    for layer in range(max(lm.num_local_layers for lm in c.layer_maps)):
        batch.wait(layer)
    for kind in SPEC.kinds():
        ids = req.full_page_ids[:4] if kind.page_space is PageSpace.FULL else req.swa_page_ids[3:4]
        _assert_rows(c, pools, kind, ids, 7.0)
    assert (req.swa_page_ids[:3] == -1).all()  # outside the window: never read, not loaded
    c.release(req)
    s = c.stats()
    assert s["host_hit_tokens"] == 4 * PAGE and s["load_dispatches"] == 1
    assert s["loaded_pages"] == 4 and s["loaded_swa_pages"] == 1
    c.check_invariants()


def test_write_through_selective_backs_up_after_second_hit():
    c, pools = _cache(WritePolicy.WRITE_THROUGH_SELECTIVE)
    toks = _tokens(1, 3)
    pools, _ = _serve(c, pools, toks, 1.0)
    c.poll(wait=True)
    assert c.stats()["backups_issued"] == 0
    for hits in (1, 2):
        pools, batch = c.admit(pools, [toks])
        c.release(batch.requests[0])
        c.poll(wait=True)
        assert c.stats()["host_full_pages_used"] == (0 if hits == 1 else 3), hits
    c.check_invariants()


@pytest.mark.parametrize("path", PATHS)
def test_write_back_backs_up_on_eviction_only(path):
    c, pools = _cache(WritePolicy.WRITE_BACK, copy_path=path)
    toks = _tokens(2, 3)
    pools, _ = _serve(c, pools, toks, 3.0)
    c.poll(wait=True)
    assert c.stats()["host_full_pages_used"] == 0
    assert c.evict(pools, 3) == 3
    s = c.stats()
    assert s["host_full_pages_used"] == 3 and s["device_full_pages_used"] == 0
    pools = _poison(pools)
    pools, batch = c.admit(pools, [toks])
    (req,) = batch.requests
    assert req.host_hit_tokens == 3 * PAGE
    batch.wait()
    _assert_rows(c, pools, PoolKind.C4_KV, req.full_page_ids[:3], 3.0)
    c.release(req)
    c.check_invariants()


def test_not_backed_up_nodes_are_deleted_under_write_through_selective():
    c, pools = _cache(WritePolicy.WRITE_THROUGH_SELECTIVE)
    toks = _tokens(3, 2)
    pools, _ = _serve(c, pools, toks, 1.0)
    assert c.evict(pools, 2) == 2
    assert c.lookup(toks).matched_len == 0
    c.check_invariants()


def test_isolation_reallocated_pages_never_expose_old_bytes():
    """A's pages are freed (deleted, not backed up) and reallocated to B; a match for A
    must miss, and B's match must show B's bytes only."""
    c, pools = _cache(WritePolicy.WRITE_THROUGH_SELECTIVE, device_pages=5)
    a, b = _tokens(10, 4), _tokens(11, 4)
    pools, _ = _serve(c, pools, a, 1.0)
    pools, _ = _serve(c, pools, b, 2.0)  # needs all 5 pages: A is evicted and its ids reused
    assert c.lookup(a).matched_len == 0
    mb = c.lookup(b)
    assert mb.device_len == 4 * PAGE
    got = _read(pools, PoolKind.C4_KV, mb.device_full_ids)
    assert (got[:, :1] == 2.0).all()
    assert not (got == 1.0).any()
    c.check_invariants()


# ------------------------------------------------------------------ batching
@pytest.mark.parametrize("path", PATHS)
def test_batched_load_back_is_one_dispatch_with_padded_tables(path):
    """Two requests with host hits of different lengths: one H2D load, ``[B, max]`` tables."""
    c, pools = _cache(device_pages=16, host_pages=32, copy_path=path)
    a, b = _tokens(50, 2), _tokens(51, 4)
    pools, _ = _serve(c, pools, a, 1.0)
    pools, _ = _serve(c, pools, b, 2.0)
    c.poll(wait=True)
    assert c.evict(pools, 16) == 6
    pools = _poison(pools)
    loads_before = c.engine.stats.loads
    pools, batch = c.admit(pools, [a, b], [3, 20])
    assert isinstance(batch, Batch) and len(batch) == 2 and batch.deferred == ()
    assert c.engine.stats.loads == loads_before + 1  # merged: one dispatch for both
    ra, rb = batch.requests
    assert (ra.host_hit_tokens, rb.host_hit_tokens) == (2 * PAGE, 4 * PAGE)
    want_pages = [-(-(a.size + 2) // PAGE), -(-(b.size + 19) // PAGE)]
    np.testing.assert_array_equal(batch.num_pages, want_pages)
    np.testing.assert_array_equal(batch.cached_tokens, [2 * PAGE, 4 * PAGE])
    assert batch.full_table.shape == (2, max(want_pages)) and batch.full_table.dtype == np.int32
    assert (batch.full_table[0, want_pages[0] :] == -1).all()
    np.testing.assert_array_equal(batch.full_table[1], rb.full_page_ids)
    full, swa = batch.tables(16)
    assert full.shape == swa.shape == (2, 16) and (full[:, max(want_pages) :] == -1).all()
    batch.wait()
    _assert_rows(c, pools, PoolKind.C4_KV, ra.full_page_ids[:2], 1.0)
    _assert_rows(c, pools, PoolKind.C4_KV, rb.full_page_ids[:4], 2.0)
    _assert_rows(c, pools, PoolKind.C4_STATE, rb.swa_page_ids[3:4], 2.0)
    for r in batch.requests:
        c.release(r)
    assert c.stats()["host_hit_tokens"] == 6 * PAGE
    c.check_invariants()


def test_requests_sharing_a_host_prefix_load_it_once():
    c, pools = _cache(device_pages=16, host_pages=32)
    a = _tokens(60, 3)
    b = np.concatenate([a[: 3 * PAGE], _tokens(61, 1)])
    pools, _ = _serve(c, pools, a, 4.0)
    c.poll(wait=True)
    c.evict(pools, 16)
    pools, batch = c.admit(pools, [a, b])
    ra, rb = batch.requests
    assert ra.host_hit_tokens == 3 * PAGE
    assert (rb.device_hit_tokens, rb.host_hit_tokens) == (3 * PAGE, 0)  # a's pages, loading
    np.testing.assert_array_equal(ra.full_page_ids[:3], rb.full_page_ids[:3])
    assert c.stats()["loaded_pages"] == 3
    batch.wait()
    _assert_rows(c, pools, PoolKind.C4_KV, rb.full_page_ids[:3], 4.0)
    for r in batch.requests:
        c.release(r)
    c.check_invariants()


def test_deferred_requests_take_nothing_and_count_no_hit():
    """Device pages for the first request only: the second is deferred (FCFS), its match
    counts no hit, and a request that can never fit raises OutOfPages."""
    c, pools = _cache(device_pages=7, host_pages=12)
    warm = _tokens(70, 2)
    pools, _ = _serve(c, pools, warm, 1.0)
    hits_before = c.stats()["device_hit_tokens"]
    big, other = _tokens(71, 4), np.concatenate([warm, _tokens(72, 1)])
    pools, batch = c.admit(pools, [big, other])
    assert [r.prompt.size for r in batch.requests] == [big.size]
    assert batch.deferred == (1,)
    s = c.stats()
    assert s["deferred_requests"] == 1 and s["device_hit_tokens"] == hits_before
    c.check_invariants()
    with pytest.raises(OutOfPages, match="request 0 of the batch"):
        c.admit(pools, [_tokens(73, 8)])
    c.release(batch.requests[0])
    c.check_invariants()
    pools, batch = c.admit(pools, [other])
    assert batch.requests[0].cached_tokens == 2 * PAGE  # warm was demoted to host meanwhile
    c.release(batch.requests[0])


def test_duplicate_pages_of_concurrent_requests_are_freed():
    """Two requests computed the same prompt in one batch without sharing it: the second
    insert keeps the tree's pages and frees the duplicates (no leak, no double owner)."""
    c, pools = _cache(WritePolicy.WRITE_THROUGH_SELECTIVE)
    toks = _tokens(5, 3)
    pools, batch = c.admit(pools, [toks, toks])
    r1, r2 = batch.requests
    assert r1.cached_tokens == r2.cached_tokens == 0
    for r, v in ((r1, 1.0), (r2, 2.0)):
        pools = _stamp(pools, r, v)
        c.insert(pools, r, toks)
        c.check_invariants()
    assert c.stats()["device_full_pages_used"] == 3 + 2  # tree + both partial tail pages
    for r in (r1, r2):
        c.release(r)
    assert c.stats()["device_full_pages_used"] == 3
    c.check_invariants()


def test_eviction_under_pressure_respects_locks():
    c, pools = _cache(WritePolicy.WRITE_THROUGH, device_pages=8, host_pages=8)
    first, second = _tokens(20, 3), _tokens(21, 3)
    pools, _ = _serve(c, pools, first, 1.0)
    pools, batch = c.admit(pools, [first])  # locks `first` (3 pages) + 1 own page
    held = batch.requests[0]
    pools, _ = _serve(c, pools, second, 2.0)
    c.poll(wait=True)
    with pytest.raises(OutOfPages):
        c.admit(pools, [_tokens(22, 5)])  # needs 6: 1 free + `second` (3); `first` is locked
    c.check_invariants()
    c.release(held)
    pools, batch = c.admit(pools, [_tokens(22, 5)])  # now both can be demoted to host
    c.release(batch.requests[0])
    assert c.lookup(first).host_len == 3 * PAGE  # demoted, still on host
    c.check_invariants()


def test_host_eviction_drops_host_only_leaves():
    c, pools = _cache(WritePolicy.WRITE_THROUGH, device_pages=5, host_pages=4)
    a = _tokens(30, 4)
    pools, _ = _serve(c, pools, a, 1.0)
    c.poll(wait=True)
    c.evict(pools, 4)
    assert c.evict_host(4) == 4
    assert c.lookup(a).matched_len == 0
    s = c.stats()
    assert s["host_full_pages_used"] == 0 and s["host_swa_pages_used"] == 0
    c.check_invariants()


# ------------------------------------------------------------- shared prefix
def test_second_conversation_hits_the_shared_system_prompt():
    """Two conversations share a 3-page system prompt: the second gets all 3 pages."""
    c, pools = _cache(device_pages=16, host_pages=32)
    system = _tokens(80, 3, extra=0)
    a = np.concatenate([system, _tokens(81, 2)])
    b = np.concatenate([system, _tokens(82, 2)])
    pools, batch = c.admit(pools, [a])
    (ra,) = batch.requests
    a_window = ra.swa_page_ids[2]  # after its insert, a's table keeps only its lock's window
    pools = _stamp(pools, ra, 1.0)
    c.insert(pools, ra, a)
    c.release(ra)
    assert ra.cached_tokens == 0
    pools, batch = c.admit(pools, [b])
    (rb,) = batch.requests
    assert rb.cached_tokens == 3 * PAGE and rb.device_hit_tokens == 3 * PAGE
    window = rb.swa_page_ids[2]
    assert window >= 0 and window == a_window  # a's own window page, not another
    c.release(rb)
    c.check_invariants()


def test_shared_prefix_under_swa_pressure_misses_rather_than_a_wrong_window():
    """With few device SWA pages, the window at the branch point is reclaimed: the second
    conversation takes a shorter hit or a miss, and never a window page from elsewhere."""
    c, pools = _cache(device_pages=16, host_pages=32, device_swa_pages=6, host_swa_pages=6)
    system = _tokens(90, 3, extra=0)
    a = np.concatenate([system, _tokens(91, 2)])
    pools, _ = _serve(c, pools, a, 1.0)
    pools, _ = _serve(c, pools, _tokens(92, 4), 2.0)  # SWA pressure: a's inner windows go
    assert c.stats()["device_swa_reclaimed_pages"] > 0
    b = np.concatenate([system, _tokens(93, 2)])
    pools, batch = c.admit(pools, [b])
    (rb,) = batch.requests
    p = rb.cached_tokens // PAGE
    if p:  # whatever window it got is the one a wrote for that page (device or host)
        batch.wait()
        _assert_rows(c, pools, PoolKind.SWA_KV, rb.swa_page_ids[p - 1 : p], 1.0)
    c.release(rb)
    c.check_invariants()


# ------------------------------------------------------------------- errors
def test_insert_refuses_what_is_not_the_requests():
    c, pools = _cache()
    toks = _tokens(40, 2, extra=5)
    pools, batch = c.admit(pools, [toks], 3)
    (req,) = batch.requests
    other = toks.copy()
    other[3] += 1
    with pytest.raises(ValueError, match="disagree with the request's prompt at position 3"):
        c.insert(pools, req, other)
    with pytest.raises(ValueError, match="KV pages for 48 positions"):
        c.insert(pools, req, np.concatenate([toks, np.arange(12)]))
    c2, pools2 = _cache()
    with pytest.raises(ValueError, match="admitted by another cache"):
        c2.insert(pools2, req, toks)
    with pytest.raises(ValueError, match="cache allocates"):
        c.insert(_cache(device_pages=4)[1], req, toks)
    c.insert(pools, req, toks)
    with pytest.raises(ValueError, match=r"longer than what the request inserted before \(37\)"):
        c.insert(pools, req, toks)
    c.release(req)
    assert req.state is RequestState.RELEASED
    with pytest.raises(ValueError, match="request is released"):
        c.release(req)
    c.check_invariants()


def test_admit_refuses_bad_inputs():
    c, pools = _cache()
    with pytest.raises(ValueError, match="sequence of token sequences"):
        c.admit(pools, np.arange(5))
    with pytest.raises(ValueError, match=r"prompts\[0\] is empty"):
        c.admit(pools, [[]])
    with pytest.raises(ValueError, match=r"prompts\[1\] must hold integer"):
        c.admit(pools, [[1, 2], [1.5, 2.0]])
    with pytest.raises(ValueError, match=r"max_new_tokens\[0\] must be an int >= 1, got 0"):
        c.admit(pools, [[1, 2]], 0)
    with pytest.raises(ValueError, match=r"max_new_tokens\[0\] must be an int >= 1, got True"):
        c.admit(pools, [[1, 2]], True)
    with pytest.raises(ValueError, match="2 max_new_tokens values for 1 prompts"):
        c.admit(pools, [[1, 2]], [1, 1])
    with pytest.raises(ValueError, match="pools must be DevicePools"):
        c.admit("not pools", [[1, 2]])
    c.check_invariants()
    assert c.stats()["requests"] == 0


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("device_pages", 0, "device_pages must be a positive int, got 0"),
        ("device_pages", True, "device_pages must be a positive int, got True"),
        ("host_pages", 2.5, "host_pages must be a positive int, got 2.5"),
        ("host_ratio", float("nan"), "host_ratio must be a finite number > 0, got nan"),
        ("write_policy", "write_back", "write_policy must be one of .*; got 'write_back'"),
        ("copy_path", "direct", "copy_path must be one of .*; got 'direct'"),
        ("partition", "24", r"partition must be a sequence of ints \(list or tuple\), got .24."),
    ],
)
def test_config_refuses_bad_values(field, value, needle):
    kw = {"device_pages": 8, field: value}
    with pytest.raises(ValueError, match=needle):
        HiCacheConfig(**kw)


def test_stats_keys():
    c, pools = _cache()
    pools, _ = _serve(c, pools, _tokens(41, 2), 1.0)
    stats = c.stats()
    for key in (
        "device_hit_tokens",
        "host_hit_tokens",
        "backup_bytes",
        "load_bytes",
        "transfer_seconds",
        "load_dispatches",
        "deferred_requests",
        "device_swa_reclaimed_pages",
    ):
        assert key in stats
    assert stats["backup_bytes"] > 0 and stats["inserted_tokens"] == 2 * PAGE


def test_backup_without_host_room_is_skipped_not_raised():
    """Write-through with a host tier smaller than the sequence: the backup is skipped
    and counted, the insert and the release go through, and page ownership holds."""
    c, pools = _cache(WritePolicy.WRITE_THROUGH, device_pages=8, host_pages=2)
    toks = _tokens(45, 4)
    pools, batch = c.admit(pools, [toks])
    (req,) = batch.requests
    pools = _stamp(pools, req, 1.0)
    c.insert(pools, req, toks)
    c.release(req)
    s = c.stats()
    assert s["backups_skipped"] == 1 and s["backups_issued"] == 0
    assert c.lookup(toks).device_len == 4 * PAGE
    c.check_invariants()
