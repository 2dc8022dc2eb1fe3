"""The model served through an L3 tier under storage faults: every fault is a miss
(or a shorter hit) and the output still equals recomputation; never a wrong page."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from jaxhicache.cache import PrefetchPolicy, StorageConfig, WritePolicy
from jaxhicache.storage import FileBackend, page_hashes
from jaxhicache.storage.faults import FaultInjectionBackend
from models.config import TinyDSV4Config
from models.dsv4 import init_params
from models.paged import PagedModel
from models.serving import ServingLoop

TOL = 1e-4
PAGE = 16
PREFIX = 48  # turn 1 writes KV for 45 + 6 - 1 = 50 tokens: 3 whole pages


@pytest.fixture(scope="module")
def model():
    cfg = TinyDSV4Config.mini(num_layers=6)
    return PagedModel(cfg, init_params(cfg, 0), pp=2)


def _loop(model, store) -> ServingLoop:
    l3 = StorageConfig(  # the cost model off: these tests pin what is served, not when
        model_id="tiny",
        prefetch_threshold=PAGE,
        prefetch_policy=PrefetchPolicy.WAIT_COMPLETE,
        cost_model=False,
    )
    return ServingLoop.for_model(
        model,
        device_pages=8,
        write_policy=WritePolicy.WRITE_THROUGH,
        storage=l3,
        store=store,
        layerwise=True,
    )


def _turns(model, root):
    rng = np.random.default_rng(3)
    turn1 = rng.integers(0, model.config.vocab, 45).astype(np.int32)
    first = _loop(model, FileBackend(root))
    r1 = first.serve(turn1, 6)
    first.close()
    return np.concatenate([turn1, r1.generated, rng.integers(0, model.config.vocab, 13)])


def _objects(root, unit, name=None):
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and f"/{unit}/" in str(p) and (name is None or p.name == name)
    )
    assert files, (unit, name)
    return files


def _flip(root, unit, name=None):
    f = _objects(root, unit, name)[-1]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


def _truncate(root, unit):
    f = _objects(root, unit)[0]
    os.truncate(f, f.stat().st_size - 7)


def _foreign(root, unit):
    """Another page's object copied under this page's key."""
    a, b = _objects(root, unit)[:2]
    b.write_bytes(a.read_bytes())


FAULTS = {
    "none": (None, None),
    "flipped_full": (_flip, "full"),
    "flipped_swa": (_flip, "swa"),
    "truncated_full": (_truncate, "full"),
    "foreign_full": (_foreign, "full"),
    "read_error": ("read", None),
    "unreachable": ("all", None),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_faults_are_misses_and_output_equals_recompute(model, tmp_path, fault):
    turn2 = _turns(model, tmp_path)
    how, unit = FAULTS[fault]
    store = FileBackend(tmp_path)
    if how is _flip and unit == "swa":  # the window page the hit ends on (page 3 of 3)
        _flip(tmp_path, unit, page_hashes(turn2[:PREFIX], PAGE)[-1])
    elif callable(how):
        how(tmp_path, unit)
    elif how == "read":
        store = FaultInjectionBackend(store, fail_read=True, errno=errno.EIO)
    elif how == "all":
        store = FaultInjectionBackend(
            store, fail_read=True, fail_stat=True, fail_write=True, errno=errno.ECONNREFUSED
        )
    loop = _loop(model, store)
    r2 = loop.serve(turn2, 4)
    oracle = loop.serve_uncached(turn2, 4)
    d = max(
        float(np.abs(r2.step_logits - oracle.step_logits).max()),
        float(np.abs(r2.prefill_logits - oracle.prefill_logits[r2.cached_tokens :]).max()),
    )
    assert d <= TOL, f"{fault}: differs from recomputation by {d:.3g}"
    s = loop.cache.stats()
    if fault == "none":
        assert r2.storage_cached_tokens == PREFIX
    else:
        assert r2.storage_cached_tokens < PREFIX, fault
        failures = (
            s["l3_integrity_failures_total"] + s["l3_read_errors_total"] + s["l3_miss_pages_total"]
        )
        assert failures > 0, (fault, {k: v for k, v in s.items() if k.startswith("l3_")})
    loop.cache.check_invariants()
    loop.close()


def test_salted_continuation_from_storage(model, tmp_path):
    """A salted request whose L1/L2 hit ends where L3 pages go on: the continuation's
    hashes chain from the tree's last page (whose hash carries the salt). Used to raise
    ValueError (salt and parent both passed to page_hashes)."""
    rng = np.random.default_rng(11)
    vocab = model.config.vocab
    a = rng.integers(0, vocab, 2 * PAGE + 1).astype(np.int32)
    ab = np.concatenate([a, rng.integers(0, vocab, 3 * PAGE)]).astype(np.int32)
    loop = _loop(model, FileBackend(tmp_path))
    loop.serve(ab, 2, salt="tenant")  # every page of ab to host and L3
    loop.cache.poll(wait=True)
    loop.evict(10**6)
    loop.evict_host(10**6)
    loop.serve(a, 2, salt="tenant")  # the tree holds a's pages again (from L3)
    abc = np.concatenate([ab, rng.integers(0, vocab, 5)]).astype(np.int32)
    r = loop.serve(abc, 3, salt="tenant")
    assert r.device_cached_tokens + r.host_cached_tokens >= 2 * PAGE  # from the tree ...
    assert r.storage_cached_tokens >= 2 * PAGE  # ... and the rest from L3, chained on
    ref = loop.serve_uncached(abc, 3)
    np.testing.assert_allclose(r.step_logits, ref.step_logits, atol=TOL)
    # Another tenant's salt finds nothing of it, in any tier.
    other = loop.serve(abc, 1, salt="other")
    assert other.cached_tokens == 0
    loop.close()


@pytest.mark.parametrize("make_room", [True, False], ids=["evicts", "control"])
def test_prefetch_evicts_host_leaves_for_room(model, tmp_path, make_room):
    """A full host tier (LRU host-only leaves) does not turn an L3 hit into a miss: the
    prefetch evicts host leaves for its slots. Control: without it, the hit is lost."""
    rng = np.random.default_rng(12)
    vocab = model.config.vocab
    loop = _loop(model, FileBackend(tmp_path))
    if not make_room:
        loop.cache.l3._make_room = None
    host_pages = loop.cache.host.num_pages
    target = rng.integers(0, vocab, 4 * PAGE + 1).astype(np.int32)
    loop.serve(target, 2)
    loop.cache.poll(wait=True)
    loop.evict(10**6)
    loop.evict_host(10**6)  # target's pages: only in L3 now
    # Fill the host tier with other conversations' pages, all host-only leaves.
    while loop.cache.stats()["host_full_pages_used"] + 4 <= host_pages:
        loop.serve(rng.integers(0, vocab, 3 * PAGE + 1).astype(np.int32), 1)
        loop.cache.poll(wait=True)
        loop.evict(10**6)
    evicted = loop.cache.stats()["host_evicted_pages"]
    r = loop.serve(target, 2)
    if make_room:
        assert r.storage_cached_tokens == 4 * PAGE
        assert loop.cache.stats()["host_evicted_pages"] > evicted
    else:
        assert r.storage_cached_tokens == 0
    loop.cache.check_invariants()
    loop.close()


def test_the_cost_model_is_fed_the_prefill_forward_not_the_admission(model, tmp_path):
    """``ServingLoop`` feeds ``observe_prefill`` the forward's time (its first chunk to
    the first token), not the TTFT: the admission's L3 lookup and fetch wait are not
    recompute cost (counted in, they made hits look cheaper than recomputing them)."""
    from jaxhicache.storage.latency import LatencyBackend

    turn2 = _turns(model, tmp_path)
    loop = _loop(model, LatencyBackend(FileBackend(tmp_path), 0.1))  # lookup, fetch: 0.1 s
    r = loop.serve(turn2, 1)
    assert r.storage_cached_tokens > 0 and r.ttft_s >= 0.2
    costs = loop.cache.l3.costs
    assert costs.observed["recompute"] == 1
    assert costs.recompute_seconds(r.prefill_tokens) <= r.ttft_s - 0.2
    loop.close()
