"""Under load, nothing lost: 1,000 requests through the continuous-batching engine.

Random prompt lengths over a few shared prefixes, random ``max_new_tokens``, random
tenant salts, arrivals faster than service, aborts of requests in flight, a device
pool small enough that requests are retracted and a host tier small enough that L3
(a file store) serves hits. After every step the cache's invariants hold; at the end
every page of every tier is free or the tree's, every request that was not aborted
finished, a random sample equals its uncached run token for token, and the counters
add up. Bounded: a fixed request count and a wall-clock guard.
"""

import time

import numpy as np
import pytest

from jaxhicache.cache import HiCache, HiCacheConfig, PrefetchPolicy, StorageConfig, WritePolicy
from jaxhicache.spec import PageSpace, Tier
from jaxhicache.storage import FileBackend
from models import PagedModel, TinyDSV4Config, init_params
from models.engine import Engine, EngineConfig

CFG = TinyDSV4Config.mini()  # page 16
PAGE = CFG.page_size
REQUESTS = 1000
GUARD_S = 600  # the run must end well before this


@pytest.fixture(scope="module")
def model():
    return PagedModel(CFG, init_params(CFG, seed=0), pp=1)


def _engine(model, root, device_pages, host_pages):
    storage = StorageConfig(
        model_id="load-test",
        prefetch_threshold=PAGE,
        prefetch_policy=PrefetchPolicy.WAIT_COMPLETE,
        cost_model=False,  # always fetch: this test is about correctness under load
    )
    cache = HiCache(
        model.spec,
        model.mesh,
        HiCacheConfig(
            device_pages=device_pages,
            host_pages=host_pages,
            write_policy=WritePolicy.WRITE_THROUGH,
            storage=storage,
        ),
        store=FileBackend(root),
    )
    # One prefill length and batches of at most 4: few programs to compile (CI time).
    return Engine(model, cache, EngineConfig(max_running=4, prefill_tokens=PAGE))


def assert_no_leak(cache) -> None:
    """Every page of every tier is free or owned once, and no request holds any."""
    cache.poll(wait=True)
    cache.check_invariants()  # ownership: tree + requests + in-flight == allocated
    for space in (PageSpace.FULL, PageSpace.SWA):
        assert cache.ledger.held(space) == 0, f"requests still hold device {space.value} pages"
    s = cache.stats()
    assert s["device_full_pages_used"] == cache.tree.total_device_pages()


def _stream(rng, n):
    prefixes = [rng.integers(0, CFG.vocab, k * PAGE).astype(np.int32) for k in (1, 2, 3, 2)]
    for _ in range(n):
        prefix = prefixes[rng.integers(len(prefixes))]
        suffix = rng.integers(0, CFG.vocab, int(rng.integers(1, 25))).astype(np.int32)
        salt = [None, "tenant-a", "tenant-b"][int(rng.integers(3))]
        new = int(rng.integers(1, 7)) if rng.random() < 0.85 else int(rng.integers(7, 20))
        yield np.concatenate([prefix, suffix]), new, salt


def test_thousand_requests_nothing_lost(model, tmp_path):
    rng = np.random.default_rng(7)
    eng = _engine(model, tmp_path, device_pages=16, host_pages=12)
    stream = _stream(rng, REQUESTS)
    requests, aborted = {}, set()
    t0 = time.monotonic()
    submitted = 0
    while submitted < REQUESTS or not eng.idle:
        assert time.monotonic() - t0 < GUARD_S, f"load test over {GUARD_S} s"
        for _ in range(min(3, REQUESTS - submitted)):  # faster than service
            prompt, new, salt = next(stream)
            requests[eng.submit(prompt, new, salt=salt)] = (prompt, new)
            submitted += 1
        if eng.running and rng.random() < 0.03:  # abort one request in flight
            victim = eng.running[int(rng.integers(len(eng.running)))]
            eng.abort(victim.rid)
            aborted.add(victim.rid)
        eng.step()
        eng.cache.check_invariants()
    assert len(eng.done) == REQUESTS
    assert {r for r, c in eng.done.items() if c.aborted} == aborted and aborted
    assert_no_leak(eng.cache)
    s = eng.cache.stats()
    assert eng.retractions > 0 and s["retracted_requests"] == eng.retractions
    assert s["device_hit_tokens"] > 0 and s["host_hit_tokens"] > 0
    assert s["storage_hit_tokens"] > 0  # the host tier is small: L3 serves hits
    for rid, c in eng.done.items():
        prompt, new = requests[rid]
        if c.aborted:
            continue
        assert c.generated.size == new, rid
        if not c.retractions:  # hits + computed = prompt tokens
            cached = c.device_cached_tokens + c.host_cached_tokens + c.storage_cached_tokens
            assert cached + c.prefill_tokens == prompt.size, rid
    finished = [r for r, c in eng.done.items() if not c.aborted]
    sample = rng.choice(finished, 12, replace=False)
    sample = list(sample) + [r for r, c in eng.done.items() if c.retractions][:4]
    for rid in sample:
        prompt, new = requests[int(rid)]
        want, _ = eng.uncached(prompt, new)
        np.testing.assert_array_equal(eng.done[int(rid)].generated, want, err_msg=str(rid))
    eng.cache.close()


def test_leak_check_catches_a_leaked_page(model, tmp_path):
    """The negative control: one page allocated and handed to nobody."""
    rng = np.random.default_rng(8)
    eng = _engine(model, tmp_path, device_pages=24, host_pages=12)
    for prompt, new, salt in _stream(rng, 10):
        eng.submit(prompt, new, salt=salt)
    eng.run(max_steps=500)
    assert_no_leak(eng.cache)
    eng.cache.ledger.alloc(Tier.DEVICE, PageSpace.FULL, 1)  # the leak
    with pytest.raises(AssertionError):
        assert_no_leak(eng.cache)
    eng.cache.close()
