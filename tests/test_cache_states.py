"""HiCache with recurrent-state snapshots (a hybrid spec), without a model.

A stand-in forward writes, for every position p whose state a plan asks for, the value
``p + salt`` into that snapshot slot (all layers, both state kinds). So every test can
check which state a later request reads: the one taken exactly at its hit.
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxhicache.cache import HiCache, HiCacheConfig, WritePolicy
from jaxhicache.mesh import make_mesh
from jaxhicache.spec import ModelCacheSpec, PoolKind

SPEC = ModelCacheSpec.tiny_hybrid()  # page 16, attention at layers 3 and 7
PAGE = SPEC.page_size
GRID = 2 * PAGE  # snapshots every 32 tokens
STATES = (PoolKind.CONV_STATE, PoolKind.RECURRENT_STATE)


def _cache(pp=2, policy=WritePolicy.WRITE_THROUGH, **kw):
    kw.setdefault("device_pages", 24)
    cfg = HiCacheConfig(write_policy=policy, state_interval=GRID, host_pages=48, **kw)
    c = HiCache(SPEC, make_mesh(pp, 1), cfg)
    return c, c.new_device_pools()


def _tokens(seed, n):
    return np.random.default_rng(seed).integers(0, 1000, n).astype(np.int32)


def _write_state(pools, slot, value):
    for kind in STATES:
        pools = pools.replace_pool(kind, pools[kind].at[:, :, slot].set(value))
    return pools


def _read_state(pools, slot):
    return {float(np.asarray(pools[k])[:, :, slot].max()) for k in STATES}


def _forward(cache, pools, req, end, chunk=PAGE):
    """Stands in for the model: the state at each planned position p is p (as a float)."""
    plan = cache.states.plan(req, end, chunk)
    if plan.state_in >= 0:  # what it read: the state at the plan's start
        assert _read_state(pools, plan.state_in) == {float(plan.start)}, plan
    for p, slot in plan.snapshots.items():
        pools = _write_state(pools, slot, float(p))
    pools = _write_state(pools, plan.state_out, float(end))
    cache.states.computed(req, plan)
    return pools, plan


def _serve(cache, pools, prompt, gen=3):
    pools, batch = cache.admit(pools, [prompt], gen)
    (req,) = batch.requests
    batch.wait()
    pools, _ = _forward(cache, pools, req, prompt.size)
    for i in range(gen - 1):  # decode: one position at a time
        pools, _ = _forward(cache, pools, req, prompt.size + i + 1)
    cache.insert(pools, req, np.concatenate([prompt, _tokens(99, gen - 1)]))
    cache.release(req)
    cache.check_invariants()
    return pools, req


def test_a_hit_reads_the_snapshot_at_its_end_and_never_writes_it():
    cache, pools = _cache()
    prompt = _tokens(0, 70)
    pools, r1 = _serve(cache, pools, prompt)
    assert r1.cached_tokens == 0
    # the prompt's last grid point (64) was snapshotted during the prefill
    follow = np.concatenate([prompt, _tokens(1, 20)])
    pools, batch = cache.admit(pools, [follow], 2)
    (r2,) = batch.requests
    assert r2.cached_tokens == r2.device_hit_tokens == 64
    tree_slot = r2.state_read
    pools, plan = _forward(cache, pools, r2, follow.size)
    assert plan.state_in == tree_slot and plan.state_out != tree_slot  # copy-on-write
    assert _read_state(pools, tree_slot) == {64.0}  # the cached snapshot is unchanged
    cache.release(r2)
    cache.check_invariants()


def test_a_prompt_ending_on_the_grid_is_snapshotted_there_and_hit():
    # the reference's #30850: a prefix ending exactly on a chunk boundary never backed up
    cache, pools = _cache()
    prompt = _tokens(2, 64)
    pools, _ = _serve(cache, pools, prompt)
    cache.poll(wait=True)
    assert cache.tree.states is not None and len(cache.tree.states.host) >= 1
    m = cache.lookup(np.concatenate([prompt, _tokens(3, 5)]))
    assert m.matched_len == 64 and m.state_host_slot >= 0  # backed up like any other


def test_a_branch_inside_a_longer_kv_match_is_snapshotted_for_the_next_request():
    cache, pools = _cache()
    a = _tokens(4, 70)
    pools, _ = _serve(cache, pools, a)  # snapshot at 64 only
    b = np.concatenate([a[:50], _tokens(5, 30)])  # shares 3 whole pages (48 tokens)
    pools, batch = cache.admit(pools, [b], 2)
    (rb,) = batch.requests
    assert rb.cached_tokens == 0 and rb.snapshot_at == 32  # no snapshot at or before 48
    pools, plan = _forward(cache, pools, rb, b.size)
    assert set(plan.snapshots) == {32, 64}  # the branch point and the last grid point
    cache.insert(pools, rb, b)
    cache.release(rb)
    c = np.concatenate([a[:50], _tokens(6, 10)])
    pools, batch = cache.admit(pools, [c], 2)
    assert batch.requests[0].cached_tokens == 32  # hits at the branch point now
    cache.release(batch.requests[0])
    cache.check_invariants()


@pytest.mark.parametrize("policy", [WritePolicy.WRITE_THROUGH, WritePolicy.WRITE_BACK])
def test_a_host_hit_loads_the_snapshot_into_the_requests_own_slot(policy):
    # the reference's #39830 (wrong output after a host hit) and #33713 (state nodes
    # pruned on eviction, so host load-back never fired)
    cache, pools = _cache(policy=policy)
    prompt = _tokens(7, 70)
    pools, _ = _serve(cache, pools, prompt)
    cache.poll(wait=True)
    cache.evict(pools, 10**6)  # write-back backs up first; the host snapshot stays
    cache.poll(wait=True)
    assert cache.tree.total_device_pages() == 0
    pools = cache.new_device_pools()  # zeroed: only the host copy can bring the state
    follow = np.concatenate([prompt, _tokens(8, 9)])
    pools, batch = cache.admit(pools, [follow], 2)
    (r,) = batch.requests
    batch.wait()
    assert r.host_hit_tokens == 64 and r.state_read in r.state_owned
    assert _read_state(pools, r.state_read) == {64.0}
    pools, plan = _forward(cache, pools, r, follow.size)
    assert plan.state_out == plan.state_in  # its own slot: advanced in place
    cache.release(r)
    cache.check_invariants()


def test_decode_snapshots_every_interval_so_a_follow_up_hits_past_the_prompt():
    cache, pools = _cache()
    prompt = _tokens(9, 40)
    gen = 30  # positions 40..69 computed: the grid point 64 is crossed while decoding
    pools, _ = _serve(cache, pools, prompt, gen)
    history = np.concatenate([prompt, _tokens(99, gen - 1)])
    follow = np.concatenate([history, [7], _tokens(10, 5)])
    pools, batch = cache.admit(pools, [follow], 1)
    want = (prompt.size + gen - 1) // GRID * GRID
    assert batch.requests[0].cached_tokens >= want == 64
    cache.release(batch.requests[0])


def test_snapshot_slots_are_their_own_capacity_and_their_eviction_keeps_kv():
    cache, pools = _cache(device_state_slots=3, host_state_slots=3)
    kept = []
    for seed in range(4):  # each leaves one snapshot (at 64): the fourth evicts the first
        prompt = _tokens(20 + seed, 70)
        pools, _ = _serve(cache, pools, prompt, gen=1)
        kept.append(prompt)
    assert cache.tree.states is not None and len(cache.tree.states.dev) <= 3
    m = cache.lookup(np.concatenate([kept[0], [1]]))
    assert m.full_match_len >= 64  # its KV stays (on device or host)
    cache.check_invariants()


def test_a_host_snapshot_pool_smaller_than_the_device_one_is_refused():
    # the reference's #39436: a host state pool out of proportion to what it must hold
    with pytest.raises(ValueError, match="host_state_slots=2 is below device_state_slots=3"):
        HiCache(SPEC, make_mesh(1, 1), HiCacheConfig(24, device_state_slots=3, host_state_slots=2))
    cfg = HiCacheConfig(24, host_pages=96, state_interval=GRID)
    assert cfg.state_slots(SPEC) == (24 // 2 + 8, 96 // 2)  # the defaults: one per grid step
    assert cfg.state_slots(ModelCacheSpec.tiny_dsv4()) == (0, 0)
