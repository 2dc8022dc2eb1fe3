"""HiCache for requests in flight: incremental insert, extend, retract, abort, batched calls.

A stand-in forward stamps a value into every sub-pool row of the pages a request
computed, so each test can check which bytes another request is served. After
every call the ownership invariant is checked (every page free or owned once).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxhicache.cache import HiCache, HiCacheConfig, OutOfPages, Request, WritePolicy
from jaxhicache.mesh import make_mesh
from jaxhicache.spec import ModelCacheSpec, PageSpace
from jaxhicache.transfer import CopyPath

SPEC = ModelCacheSpec.tiny_dsv4()  # page 16, window 8: one trailing SWA page
PAGE = SPEC.page_size


def _cache(device_pages=16, host_pages=32, pp=2, policy=WritePolicy.WRITE_THROUGH, **kw):
    cfg = HiCacheConfig(device_pages=device_pages, host_pages=host_pages, write_policy=policy, **kw)
    cache = HiCache(SPEC, make_mesh(pp, 1), cfg)
    return cache, cache.new_device_pools()


def _tokens(seed, n):
    return np.random.default_rng(seed).integers(0, 1000, n).astype(np.int32)


def _stamp(pools, req: Request, lo: int, hi: int, value):
    """Stands in for the forward of pages ``[lo, hi)`` of ``req``'s table."""
    for kind in SPEC.kinds():
        table = req.full_page_ids if kind.page_space is PageSpace.FULL else req.swa_page_ids
        ids = table[lo:hi]
        ids = ids[ids >= 0]
        pools = pools.replace_pool(kind, pools[kind].at[:, :, jnp.asarray(ids)].set(value))
    return pools


def _value(pools, page_id):
    return float(np.asarray(pools[SPEC.kinds()[0]])[0, 0, page_id].ravel()[0])


def _unlocked(cache):
    cache.poll(wait=True)  # in-flight backups hold locks too
    return all(n.lock_ref == 0 for n in cache.tree.iter_nodes())


def _owned_pages_match_tree(cache):
    """Nothing leaked: every used device full page is the tree's (no request open)."""
    s = cache.stats()
    return s["device_full_pages_used"] == cache.tree.total_device_pages()


# --------------------------------------------------------------- incremental insert
def test_chunk_inserts_are_hit_by_a_concurrent_request_and_the_lock_moves():
    c, pools = _cache()
    prompt = _tokens(0, 3 * PAGE + 5)
    pools, batch = c.admit(pools, [prompt], 4)
    (a,) = batch.requests
    first_node = a.node
    for chunk_end in (PAGE, 2 * PAGE):  # two prefill chunks of one page each
        pools = _stamp(pools, a, chunk_end // PAGE - 1, chunk_end // PAGE, 1.0 + chunk_end)
        c.insert(pools, a, prompt[:chunk_end])
        c.check_invariants()
        c.poll(wait=True)  # the write-through backup's lock is gone once it landed
        assert a.node.start + a.node.num_pages == chunk_end // PAGE  # the lock's new end
        assert a.node.own_locks == 1
    assert first_node.own_locks == 0  # the old end is unlocked
    # B shares the prompt and arrives while A is still running: it hits A's two pages.
    pools, batch = c.admit(pools, [prompt])
    (b,) = batch.requests
    assert (b.cached_tokens, b.device_hit_tokens) == (2 * PAGE, 2 * PAGE)
    assert list(b.full_page_ids[:2]) == list(a.full_page_ids[:2])
    assert _value(pools, b.full_page_ids[1]) == 1.0 + 2 * PAGE
    c.release([a, b])
    c.check_invariants()
    assert _unlocked(c) and _owned_pages_match_tree(c)


def test_decode_pages_are_inserted_as_they_fill_and_tokens_may_extend_the_prompt():
    c, pools = _cache()
    prompt = _tokens(1, PAGE + 3)
    pools, batch = c.admit(pools, [prompt], 2 * PAGE)
    (a,) = batch.requests
    generated = _tokens(2, 2 * PAGE)
    seq = np.concatenate([prompt, generated])
    c.insert(pools, a, prompt)  # after prefill: one whole page
    c.insert(pools, a, seq[: 2 * PAGE])  # a decode page filled
    c.insert(pools, a, seq[: 3 * PAGE + 1])
    assert a.inserted_pages == 3 and c.stats()["inserted_tokens"] == 3 * PAGE
    assert c.lookup(seq).matched_len == 3 * PAGE
    other = seq[: 3 * PAGE + 2].copy()
    other[2 * PAGE + 1] += 1  # a generated token that disagrees with the previous insert
    with pytest.raises(ValueError, match="previously inserted tokens at position 33"):
        c.insert(pools, a, other)
    c.release(a)
    c.check_invariants()
    assert _unlocked(c) and _owned_pages_match_tree(c)


def test_a_duplicate_page_is_freed_and_the_table_takes_the_trees_page():
    """A and B computed the same pages concurrently; A inserted first. B's copies are
    freed and B's table points at A's pages from then on (no foreign id kept)."""
    c, pools = _cache()
    prompt = _tokens(3, 2 * PAGE + 1)
    pools, batch = c.admit(pools, [prompt, prompt])
    a, b = batch.requests
    assert a.cached_tokens == b.cached_tokens == 0
    pools = _stamp(pools, a, 0, 3, 1.0)
    pools = _stamp(pools, b, 0, 3, 2.0)
    c.insert(pools, a, prompt)
    used = c.stats()["device_full_pages_used"]
    b_own = b.full_page_ids[:2].copy()
    c.insert(pools, b, prompt)
    assert c.stats()["device_full_pages_used"] == used - 2  # B's two copies freed
    assert list(b.full_page_ids[:2]) == list(a.full_page_ids[:2])
    assert not set(b_own) & set(b.full_page_ids[:2])
    assert b.swa_page_ids[1] == a.swa_page_ids[1] and b.swa_page_ids[0] == -1
    c.check_invariants()
    c.release([a, b])
    c.check_invariants()
    assert _unlocked(c) and _owned_pages_match_tree(c)


# ------------------------------------------------------------------ extend
def test_extend_grows_a_request_and_refuses_all_or_nothing():
    c, pools = _cache(device_pages=6, device_swa_pages=6)
    prompt = _tokens(4, PAGE + 2)
    pools, batch = c.admit(pools, [prompt])  # reserve 1: two pages
    (a,) = batch.requests
    assert (a.num_pages, a.capacity) == (2, 2 * PAGE)
    c.extend(pools, a, 2)
    assert a.num_pages == 4 and c.stats()["extended_pages"] == 2
    seq = np.concatenate([prompt, _tokens(5, 2 * PAGE)])
    c.insert(pools, a, seq[: 4 * PAGE])
    before = c.stats()
    with pytest.raises(OutOfPages, match="device-full"):
        c.extend(pools, [a], 3)  # 2 free, the rest locked by A
    after = c.stats()
    assert after["device_full_pages_used"] == before["device_full_pages_used"]
    assert a.num_pages == 4
    with pytest.raises(ValueError, match=r"num_pages\[0\] must be an int >= 0, got -1"):
        c.extend(pools, a, -1)
    with pytest.raises(ValueError, match="2 num_pages values for 1 requests"):
        c.extend(pools, [a], [1, 1])
    c.release(a)
    c.check_invariants()
    assert _owned_pages_match_tree(c)


def test_extend_evicts_lru_leaves_and_reclaims_swa_pages_left_behind():
    """A long decode in a small SWA pool: each new page is inserted when it fills, so the
    SWA pages that left the window are reclaimed for the next extension."""
    c, pools = _cache(device_pages=12, device_swa_pages=4, host_pages=24)
    prompt = _tokens(6, PAGE)
    pools, batch = c.admit(pools, [prompt])
    (a,) = batch.requests
    seq = np.concatenate([prompt, _tokens(7, 8 * PAGE)])
    for p in range(1, 9):  # decode fills pages 1..8, one at a time
        c.extend(pools, a, 1)
        pools = _stamp(pools, a, p, p + 1, float(p))
        c.insert(pools, a, seq[: (p + 1) * PAGE])
        c.check_invariants()
        assert c.stats()["device_swa_pages_used"] <= 4
    assert c.stats()["device_swa_reclaimed_pages"] >= 5
    c.release(a)
    # A second long request evicts the first one's LRU pages to grow.
    pools, batch = c.admit(pools, [_tokens(8, 3 * PAGE)], PAGE)  # 4 pages, 3 free
    assert c.stats()["device_evicted_pages"] > 0
    c.release(batch.requests)
    c.check_invariants()


# ------------------------------------------------------------ retract / abort
@pytest.mark.parametrize("evict", [False, True])
def test_retracted_request_hits_its_own_pages_when_readmitted(evict):
    c, pools = _cache()
    prompt = _tokens(9, 2 * PAGE + 3)
    pools, batch = c.admit(pools, [prompt], 2 * PAGE)
    (a,) = batch.requests
    seq = np.concatenate([prompt, _tokens(10, PAGE + 4)])
    pools = _stamp(pools, a, 0, 4, 3.0)
    c.retract(pools, a, seq[:-1])  # computed: prompt + generated but the last
    assert c.stats()["retracted_requests"] == 1
    c.check_invariants()
    assert _unlocked(c) and _owned_pages_match_tree(c)
    if evict:  # its pages went to host (write-through) and off device
        c.poll(wait=True)
        assert c.evict(pools, 16) == 3
    pools, batch = c.admit(pools, [seq], 8)
    (again,) = batch.requests
    assert again.cached_tokens == 3 * PAGE
    assert again.host_hit_tokens == (3 * PAGE if evict else 0)
    batch.wait()
    assert _value(pools, again.full_page_ids[2]) == 3.0
    c.release(again)
    c.check_invariants()


def test_abort_at_any_point_leaks_nothing():
    c, pools = _cache()
    prompt = _tokens(11, 3 * PAGE + 1)
    for stage in ("admitted", "chunk", "extended", "decoding"):
        pools, batch = c.admit(pools, [prompt], 2)
        (a,) = batch.requests
        if stage != "admitted":
            c.insert(pools, a, prompt[:PAGE])
        if stage in ("extended", "decoding"):
            c.extend(pools, a, 2)
        if stage == "decoding":
            c.insert(pools, a, np.concatenate([prompt, _tokens(12, PAGE)]))
        c.release(a)  # the abort: nothing more inserted
        c.check_invariants()
        assert _unlocked(c) and _owned_pages_match_tree(c), stage
        c.poll(wait=True)


# --------------------------------------------------------------- batched calls
@pytest.mark.parametrize("path", [CopyPath.DIRECT, CopyPath.STAGED])
def test_batched_insert_is_one_poll_and_one_backup_dispatch(monkeypatch, path):
    c, pools = _cache(device_pages=24, host_pages=48, copy_path=path)
    prompts = [_tokens(20 + i, 2 * PAGE + 1) for i in range(3)]
    pools, batch = c.admit(pools, prompts, 2)
    for i, r in enumerate(batch.requests):
        pools = _stamp(pools, r, 0, 3, 1.0 + i)
    dispatches = c.engine.stats_snapshot().backups
    calls = []
    real = c._backups.agreement.min
    monkeypatch.setattr(c._backups.agreement, "min", lambda v: calls.append(1) or real(v))
    c.insert(pools, list(batch.requests), prompts)
    assert c.stats()["backups_issued"] == 3
    c.poll(wait=True)  # the staged path counts a copy when it lands
    assert c.engine.stats_snapshot().backups == dispatches + 1  # three nodes, one copy
    calls.clear()
    c.insert(pools, list(batch.requests), [np.concatenate([p, [7] * (PAGE - 1)]) for p in prompts])
    assert len(calls) <= 1  # one agreement round for the second batch's poll
    c.release(batch.requests)
    c.poll(wait=True)
    assert c.stats()["backed_up_pages"] == 9
    c.check_invariants()
    # The one copy put each request's pages in its own host pages: served back from host.
    assert c.evict(pools, 24) == 9
    pools = pools.replace(arrays={k: a * 0 - 5.0 for k, a in pools.arrays.items()})
    for i, p in enumerate(prompts):
        pools, batch = c.admit(pools, [p])
        batch.wait()
        (r,) = batch.requests
        assert r.host_hit_tokens == 2 * PAGE
        for kind in (k for k in SPEC.kinds() if k.page_space is PageSpace.FULL):
            rows = np.asarray(pools[kind])[:, :, r.full_page_ids[1]]
            for stage, m in enumerate(c.layer_maps):  # the sub-pool rows of real layers
                assert (rows[stage, : m.num_layers_of(kind)] == 1.0 + i).all(), (kind, stage)
        c.release(r)
    c.check_invariants()


def test_batched_calls_refuse_before_changing_anything():
    c, pools = _cache()
    p = _tokens(30, 2 * PAGE + 1)
    pools, batch = c.admit(pools, [p, p[::-1].copy()], 1)
    a, b = batch.requests
    bad = p[::-1].copy()
    bad[0] += 1
    with pytest.raises(ValueError, match="disagree with the request's prompt at position 0"):
        c.insert(pools, [a, b], [p, bad])  # b is wrong: a must not be inserted either
    assert a.inserted_pages == 0 and c.tree.total_device_pages() == 0
    with pytest.raises(ValueError, match="a request appears twice"):
        c.insert(pools, [a, a], [p, p])
    with pytest.raises(ValueError, match="insert: 1 token sequences for 2 requests"):
        c.insert(pools, [a, b], [p])
    other, _ = _cache()
    with pytest.raises(ValueError, match="admitted by another cache"):
        other.release(a)
    c.release([a, b])
    with pytest.raises(ValueError, match="request is released; extend needs open"):
        c.extend(pools, a, 1)
    with pytest.raises(ValueError, match="request is released; retract needs open"):
        c.retract(pools, a, p)
    c.check_invariants()


# ------------------------------------------------------- connector-shaped calls
def test_lookup_reports_a_hit_without_taking_or_touching_it():
    """``get_num_new_matched_tokens``: the hit length, no lock, no allocation, and the
    LRU order unchanged (an inspected prefix is not kept alive by being inspected)."""
    c, pools = _cache(device_pages=8, host_pages=8, policy=WritePolicy.WRITE_BACK)
    old, new = _tokens(40, 2 * PAGE + 1), _tokens(41, 2 * PAGE + 1)
    for toks in (old, new):  # old is the LRU one
        pools, batch = c.admit(pools, [toks])
        c.insert(pools, batch.requests, [toks])
        c.release(batch.requests)
    used = c.stats()["device_full_pages_used"]
    assert c.lookup(old).matched_len == 2 * PAGE  # inspect the old one ...
    assert c.stats()["device_full_pages_used"] == used and _unlocked(c)
    assert c.evict(pools, 2) == 2  # ... it is still the LRU leaf: it goes first
    assert c.lookup(new).device_len == 2 * PAGE
    assert c.lookup(old).device_len == 0
    c.check_invariants()


@pytest.mark.parametrize("policy", [WritePolicy.WRITE_THROUGH, WritePolicy.WRITE_BACK])
def test_backed_up_reports_per_request_save_completion(policy):
    c, pools = _cache(policy=policy)
    toks = _tokens(42, 3 * PAGE + 1)
    pools, batch = c.admit(pools, [toks])
    (a,) = batch.requests
    c.insert(pools, a, toks)
    c.release(a)
    c.poll(wait=True)
    assert c.backed_up(a) is (policy is WritePolicy.WRITE_THROUGH)
    if policy is WritePolicy.WRITE_BACK:
        assert c.evict(pools, 3) == 3  # write-back: backed up, then demoted
        assert c.backed_up(a)


def test_prefetch_starts_a_queued_requests_l3_lookup(tmp_path):
    from jaxhicache.cache import StorageConfig
    from jaxhicache.storage import FileBackend

    c, pools = _cache()
    assert c.prefetch(_tokens(50, 3 * PAGE + 1)) is False  # no L3 tier: nothing to start
    c.observe_prefill(16, 0.01)  # a no-op without L3
    storage = StorageConfig(model_id="inflight", prefetch_threshold=PAGE, cost_model=False)
    cfg = HiCacheConfig(device_pages=16, host_pages=32, storage=storage)
    c = HiCache(SPEC, make_mesh(2, 1), cfg, store=FileBackend(tmp_path))
    pools = c.new_device_pools()
    toks = _tokens(51, 3 * PAGE + 1)
    pools, batch = c.admit(pools, [toks])
    pools = _stamp(pools, batch.requests[0], 0, 4, 1.0)
    c.insert(pools, batch.requests, [toks])
    c.release(batch.requests)
    c.poll(wait=True)
    c.l3.finish_writes()
    c.evict(pools, 16)
    c.evict_host(32)
    assert c.lookup(toks).matched_len == 0
    assert c.prefetch(toks) is True  # queued: its lookup runs before admission
    c.observe_prefill(16, 0.01)
    pools, batch = c.admit(pools, [toks])
    assert batch.requests[0].storage_hit_tokens == 3 * PAGE
    c.release(batch.requests)
    c.close()
