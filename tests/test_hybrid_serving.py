"""The hybrid recurrent-state model served through the library (issue 17): cached ≡
uncached from device and host hits, PP 1, 2 and 4 (uneven), write-through and write-back,
evictions of KV and of snapshots between turns, an L3 hit after a flush (the KV pages and
the snapshot from storage), and the continuous-batching engine.

Every turn equals its recomputation without a cache: tokens equal, logits within 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxhicache.cache import HiCache, HiCacheConfig, PrefetchPolicy, StorageConfig, WritePolicy
from jaxhicache.mesh import make_mesh
from jaxhicache.spec import Tier
from jaxhicache.storage import FileBackend
from models.engine import Engine, EngineConfig
from models.hybrid import init_params
from models.hybrid_config import TinyHybridConfig
from models.hybrid_paged import PagedHybridModel
from models.serving import ServingLoop

CFG = TinyHybridConfig.mini()  # 8 layers, attention at 3 and 7, page 16
PARAMS = init_params(CFG, seed=0)
PAGE = CFG.page_size
GRID = 2 * PAGE
TOL = 1e-4
LAYOUTS = {"pp1": (1, None), "pp2": (2, [3, 5]), "pp4": (4, [1, 3, 2, 2])}
_MODELS: dict = {}


def _model(layout: str) -> PagedHybridModel:
    if layout not in _MODELS:
        pp, part = LAYOUTS[layout]
        _MODELS[layout] = PagedHybridModel(CFG, PARAMS, mesh=make_mesh(pp, 1), partition=part)
    return _MODELS[layout]


def _tokens(seed, n):
    return np.random.default_rng(seed).integers(0, CFG.vocab, n).astype(np.int32)


def _same(r, oracle) -> None:
    np.testing.assert_array_equal(r.generated, oracle.generated)
    d = float(np.max(np.abs(r.step_logits - oracle.step_logits)))
    assert d <= TOL, d
    d = float(np.max(np.abs(r.prefill_logits - oracle.prefill_logits[r.cached_tokens :])))
    assert d <= TOL, d


CASES = [
    ("pp1", WritePolicy.WRITE_BACK),
    ("pp2", WritePolicy.WRITE_THROUGH),
    ("pp2", WritePolicy.WRITE_THROUGH_SELECTIVE),
    ("pp4", WritePolicy.WRITE_THROUGH),
]


@pytest.mark.parametrize(("layout", "policy"), CASES, ids=[f"{a}-{b.value}" for a, b in CASES])
def test_device_and_host_hits_serve_what_recomputation_gives(layout, policy):
    loop = ServingLoop.for_model(
        _model(layout),
        device_pages=16,
        write_policy=policy,
        state_interval=GRID,
        chunk_size=PAGE,
        layerwise=False,
    )
    cache = loop.cache
    turn1 = _tokens(1, 45)
    r1 = loop.serve(turn1, 6)
    _same(r1, loop.serve_uncached(turn1, 6))
    turn2 = np.concatenate([turn1, r1.generated, _tokens(2, 20)])  # 71 tokens
    oracle = loop.serve_uncached(turn2, 4)
    if policy is WritePolicy.WRITE_THROUGH_SELECTIVE:
        loop.serve(turn1, 6)  # a second hit makes the node (and its snapshot) backed up
    r2 = loop.serve(turn2, 4)
    # turn 1 computed 50 positions: its last grid point, 32, was snapshotted
    assert r2.device_cached_tokens == GRID and r2.host_cached_tokens == 0
    _same(r2, oracle)

    # KV and snapshots leave the device (write-back: backed up on the way out)
    cache.poll(wait=True)
    cache.evict(loop.pools, 10**6)
    cache.poll(wait=True)
    assert cache.tree.total_device_pages() == 0 and not cache.tree.states.dev
    loop.pools = cache.new_device_pools()  # zeroed: a stale device state cannot pass
    r3 = loop.serve(turn2, 4)
    # turn 2 left a snapshot at 64; write-through-selective backs up only what was hit
    # twice (turn 1's prefix), so the rest of turn 2 left with its device pages
    want = GRID if policy is WritePolicy.WRITE_THROUGH_SELECTIVE else 64
    assert r3.host_cached_tokens == want and r3.device_cached_tokens == 0
    _same(r3, oracle)
    cache.check_invariants()

    # snapshot eviction only: the KV stays, the hit falls back to nothing usable
    cache.poll(wait=True)
    assert cache.states.evict(Tier.DEVICE, 10**6) + cache.states.evict(Tier.HOST, 10**6) > 0
    assert cache.tree.total_device_pages() > 0
    r4 = loop.serve(turn2, 4)
    assert r4.cached_tokens == 0
    _same(r4, oracle)
    cache.check_invariants()
    loop.close()


def test_engine_concurrent_requests_match_uncached():
    m = _model("pp2")
    cache = HiCache(
        m.spec,
        m.mesh,
        HiCacheConfig(device_pages=24, host_pages=48, state_interval=GRID, partition=[3, 5]),
    )
    eng = Engine(m, cache, EngineConfig(max_running=4, prefill_tokens=PAGE, record_logits=True))
    system = _tokens(5, 2 * PAGE + 3)
    prompts = [np.concatenate([system, _tokens(20 + i, n)]) for i, n in enumerate((5, 17, 9))]
    max_new = (6, 10, 4)
    for p, n in zip(prompts, max_new, strict=True):
        eng.submit(p, n)
    done = eng.run(max_steps=300)
    assert eng.idle and len(done) == 3
    for rid, (p, n) in enumerate(zip(prompts, max_new, strict=True)):
        want, logits = eng.uncached(p, n)
        np.testing.assert_array_equal(done[rid].generated, want, err_msg=f"request {rid}")
        assert float(np.max(np.abs(np.stack(done[rid].step_logits) - logits))) <= TOL
    later = eng.submit(np.concatenate([system, _tokens(30, 8)]), 3)
    done = eng.run(max_steps=100)
    assert done[later].device_cached_tokens == GRID  # the shared system prompt's snapshot
    cache.check_invariants()


def test_a_flushed_cache_serves_the_follow_up_turn_from_l3(tmp_path):
    st = StorageConfig(
        model_id="tiny-hybrid",
        prefetch_threshold=PAGE,
        cost_model=False,
        prefetch_policy=PrefetchPolicy.WAIT_COMPLETE,
    )
    loop = ServingLoop.for_model(
        _model("pp2"),
        device_pages=16,
        state_interval=GRID,
        chunk_size=PAGE,
        store=FileBackend(tmp_path),
        storage=st,
    )
    cache = loop.cache
    turn1 = _tokens(3, 45)
    r1 = loop.serve(turn1, 6)
    turn2 = np.concatenate([turn1, r1.generated, _tokens(4, 20)])  # 71 tokens
    oracle = loop.serve_uncached(turn2, 4)
    _same(loop.serve(turn2, 4), oracle)  # leaves a snapshot at 64
    dropped = cache.flush(loop.pools)  # device and host emptied, L3 kept
    assert dropped["host_state_pages"] >= 2 and cache.tree.total_host_pages() == 0
    snaps = [p for p in tmp_path.rglob("*") if p.is_file() and "/state/" in str(p)]
    assert len(snaps) == 4  # snapshots at 32 (turn 1) and 64 (turn 2), on both stages
    loop.pools = cache.new_device_pools()  # zeroed: only L3 can bring the KV and the state
    r3 = loop.serve(turn2, 4)
    assert r3.storage_cached_tokens == 64 and r3.device_cached_tokens == r3.host_cached_tokens == 0
    _same(r3, oracle)
    cache.check_invariants()
    loop.close()
