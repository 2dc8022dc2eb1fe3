"""Cached ≡ uncached for the MLA + DSA model across tiers, layouts and write policies.

One conversation of three turns per case: turn 2 hits the device tier; the device tier
is then emptied (write-back backs up on eviction), so turn 3 hits the host tier; host
and device are then emptied, so the same turn hits L3 alone. Every turn equals its
recomputation: tokens equal, logits within 1e-4 (``mla_common.TOL``).
"""

from __future__ import annotations

import numpy as np
import pytest
from mla_common import LAYOUTS, PAGE, TOL, diff, model, tokens

from jaxhicache.cache import PrefetchPolicy, StorageConfig, WritePolicy
from jaxhicache.storage import FileBackend
from models.serving import ServingLoop

LAYOUTS["pp4"] = (4, 1, None)  # one layer per stage
CASES = [
    ("pp1", WritePolicy.WRITE_BACK),
    ("pp2", WritePolicy.WRITE_THROUGH),
    ("pp2", WritePolicy.WRITE_THROUGH_SELECTIVE),
    ("pp2tp2", WritePolicy.WRITE_BACK),
    ("pp4", WritePolicy.WRITE_THROUGH),
]


def _same(r, oracle) -> None:
    np.testing.assert_array_equal(r.generated, oracle.generated)
    assert diff(r.step_logits, oracle.step_logits) <= TOL
    assert diff(r.prefill_logits, oracle.prefill_logits[r.cached_tokens :]) <= TOL


@pytest.mark.parametrize(("layout", "policy"), CASES, ids=[f"{a}-{b.value}" for a, b in CASES])
def test_every_tier_serves_what_recomputation_gives(tmp_path, layout, policy):
    m = model(layout)
    l3 = StorageConfig(
        model_id="tiny-mla",
        prefetch_threshold=PAGE,
        prefetch_policy=PrefetchPolicy.WAIT_COMPLETE,
        cost_model=False,
    )
    loop = ServingLoop.for_model(
        m,
        device_pages=16,
        write_policy=policy,
        storage=l3,
        store=FileBackend(tmp_path),
        layerwise=layout != "pp1",  # both load paths
    )
    cache = loop.cache
    turn1 = tokens(11, 37)
    r1 = loop.serve(turn1, 5)
    _same(r1, loop.serve_uncached(turn1, 5))
    turn2 = np.concatenate([turn1, r1.generated, tokens(12, 22)])
    oracle = loop.serve_uncached(turn2, 5)
    if policy is WritePolicy.WRITE_THROUGH_SELECTIVE:
        loop.serve(turn1, 5)  # a second hit makes the node eligible for backup
    r2 = loop.serve(turn2, 5)
    assert r2.device_cached_tokens == 2 * PAGE and r2.host_cached_tokens == 0
    _same(r2, oracle)

    cache.poll(wait=True)
    cache.evict(loop.pools, 10**6)  # write-back: backed up on the way out
    cache.poll(wait=True)
    assert cache.tree.total_device_pages() == 0
    loop.pools = cache.new_device_pools()  # zeroed: a stale device page cannot pass
    r3 = loop.serve(turn2, 5)
    assert r3.host_cached_tokens >= 2 * PAGE and r3.device_cached_tokens == 0
    _same(r3, oracle)

    cache.poll(wait=True)
    cache.evict(loop.pools, 10**6)
    cache.poll(wait=True)
    cache.evict_host(10**6)
    assert cache.tree.total_device_pages() == cache.tree.total_host_pages() == 0
    loop.pools = cache.new_device_pools()
    r4 = loop.serve(turn2, 5)
    assert r4.storage_cached_tokens == r3.host_cached_tokens
    assert r4.device_cached_tokens == r4.host_cached_tokens == 0
    _same(r4, oracle)
    cache.check_invariants()
    loop.close()
