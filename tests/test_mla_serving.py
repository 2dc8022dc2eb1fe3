"""The MLA + DSA model served through the library, unchanged serving code: a 2-turn
conversation on PP 2 through ``ServingLoop`` over a ``HiCache`` with L3 (turn 2 hits on
device, then again from L3 after device and host are evicted), and concurrent requests
on the continuous-batching ``Engine``. Every run equals its recomputation without a cache.
"""

from __future__ import annotations

import numpy as np
from mla_common import PAGE, TOL, diff, model, tokens

from jaxhicache.cache import HiCache, HiCacheConfig, PrefetchPolicy, StorageConfig, WritePolicy
from jaxhicache.storage import FileBackend
from models.engine import Engine, EngineConfig
from models.protocol import ServableModel
from models.serving import ServingLoop

DEVICE_PAGES = 16  # the model tests' pool size: their compiled programs are reused
PREFIX = 48  # turn 1 writes KV for 45 + 6 - 1 = 50 tokens: 3 whole pages


def _loop(m, root) -> ServingLoop:
    l3 = StorageConfig(  # the cost model off: pin what is served, not when
        model_id="tiny-mla",
        prefetch_threshold=PAGE,
        prefetch_policy=PrefetchPolicy.WAIT_COMPLETE,
        cost_model=False,
    )
    return ServingLoop.for_model(
        m,
        device_pages=DEVICE_PAGES,
        write_policy=WritePolicy.WRITE_THROUGH,
        storage=l3,
        store=FileBackend(root),
        layerwise=True,
    )


def _same(r, oracle) -> None:
    np.testing.assert_array_equal(r.generated, oracle.generated)
    assert diff(r.step_logits, oracle.step_logits) <= TOL
    assert diff(r.prefill_logits, oracle.prefill_logits[r.cached_tokens :]) <= TOL


def test_two_turns_hit_device_then_storage(tmp_path):
    m = model("pp2")
    assert isinstance(m, ServableModel)
    loop = _loop(m, tmp_path)
    turn1 = tokens(3, 45)
    r1 = loop.serve(turn1, 6)
    assert r1.cached_tokens == 0
    _same(r1, loop.serve_uncached(turn1, 6))
    turn2 = np.concatenate([turn1, r1.generated, tokens(4, 13)])
    r2 = loop.serve(turn2, 6)
    assert (r2.device_cached_tokens, r2.host_cached_tokens) == (PREFIX, 0)
    oracle = loop.serve_uncached(turn2, 6)
    _same(r2, oracle)
    assert (r2.swa_page_ids == -1).all()  # no SWA page space: the tables are all -1

    # Device and host tiers emptied (and the device pools zeroed): only L3 holds it.
    cache = loop.cache
    cache.poll(wait=True)
    cache.evict(loop.pools, 10**6)
    cache.evict_host(10**6)
    assert cache.tree.total_device_pages() == 0 and cache.tree.total_host_pages() == 0
    loop.pools = cache.new_device_pools()
    r3 = loop.serve(turn2, 6)
    assert r3.storage_cached_tokens == 4 * PAGE - PAGE  # 63-token match: 3 whole pages
    assert r3.device_cached_tokens == r3.host_cached_tokens == 0
    _same(r3, oracle)
    cache.check_invariants()
    loop.close()


def test_engine_concurrent_requests_match_uncached():
    m = model("pp1")
    cache = HiCache(
        m.spec,
        m.mesh,
        HiCacheConfig(
            device_pages=DEVICE_PAGES, host_pages=32, write_policy=WritePolicy.WRITE_THROUGH
        ),
    )
    eng = Engine(m, cache, EngineConfig(max_running=4, prefill_tokens=PAGE, record_logits=True))
    system = tokens(5, 2 * PAGE)
    prompts = [np.concatenate([system, tokens(20 + i, n)]) for i, n in enumerate((5, 17, 9, 12))]
    max_new = (6, 10, 4, 8)
    for p, n in zip(prompts, max_new, strict=True):
        eng.submit(p, n)
    done = eng.run(max_steps=300)
    assert eng.idle and len(done) == 4
    assert sum(done[i].device_cached_tokens for i in range(1, 4)) >= 2 * PAGE  # shared prefix
    for rid, (p, n) in enumerate(zip(prompts, max_new, strict=True)):
        want, logits = eng.uncached(p, n)
        np.testing.assert_array_equal(done[rid].generated, want, err_msg=f"request {rid}")
        assert diff(done[rid].step_logits, logits) <= TOL
    cache.check_invariants()
