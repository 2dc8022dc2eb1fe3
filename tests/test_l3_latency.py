"""The L3 tier at object-store latency (issue 16 §0): a lookup is one batch of round
trips, the fetch has enough requests in flight, the cost model fetches only what is
cheaper than recomputing, a stalled store costs at most the lookup bound, and a lookup
started when a request is queued is off its critical path.

The store is :class:`~jaxhicache.storage.latency.LatencyBackend` over a directory: a
fixed latency per object request, and a count of *sequential* round trips that follows
the code's data dependencies (the same on a loaded machine).
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from test_cache import _stamp  # the stand-in forward

from jaxhicache.cache import HiCache, HiCacheConfig, WritePolicy
from jaxhicache.cache.l3 import PrefetchPolicy, StorageConfig
from jaxhicache.cache.l3_cost import CostModel
from jaxhicache.cache.l3_lookup import window_pages
from jaxhicache.mesh import make_mesh
from jaxhicache.spec import ModelCacheSpec
from jaxhicache.storage import FileBackend
from jaxhicache.storage.latency import LatencyBackend

SPEC = ModelCacheSpec.tiny_dsv4()  # page 16, one trailing SWA page
PAGE = SPEC.page_size


def _cache(store, pp=2, **kw):
    kw.setdefault("prefetch_policy", PrefetchPolicy.WAIT_COMPLETE)
    st = StorageConfig(model_id="tiny", prefetch_threshold=PAGE, **kw)
    config = HiCacheConfig(
        device_pages=24, host_pages=48, write_policy=WritePolicy.WRITE_THROUGH, storage=st
    )
    c = HiCache(SPEC, make_mesh(pp, 1), config, store=store)
    return c, c.new_device_pools()


def _tokens(seed, pages, extra=1):
    return np.random.default_rng(seed).integers(0, 1000, pages * PAGE + extra).astype(np.int32)


def _write(root, tokens, pp=2, **kw):
    """Another instance computes ``tokens`` and writes every page to the directory store."""
    c, pools = _cache(FileBackend(root), pp, **kw)
    pools, batch = c.admit(pools, [tokens])
    (req,) = batch.requests
    pools = _stamp(pools, req, 3.0)
    c.insert(pools, req, tokens)
    c.release(req)
    c.close()


def _admit(c, pools, tokens):
    pools, batch = c.admit(pools, [tokens])
    (req,) = batch.requests
    batch.wait()
    return pools, req


@pytest.mark.parametrize("pp", [1, 2, 4])
def test_a_lookup_is_one_batch_of_round_trips(tmp_path, pp):
    """Every existence check of a lookup (every stage, full and SWA space, every candidate
    window) is issued at once: 1 round trip. The loop it replaced (one pipeline per stage,
    then one probe per candidate window) took 2 + pages here."""
    toks = _tokens(0, 10)
    _write(tmp_path, toks, pp)
    store = LatencyBackend(FileBackend(tmp_path), 0.01)
    c, pools = _cache(store, pp, cost_model=False)
    store.reset_round_trips()
    pools, req = _admit(c, pools, toks)
    assert req.storage_hit_tokens == 10 * PAGE
    assert store.round_trips("stat") == 1, store.requests()
    # every stage's full and SWA objects of every page (k = 1: every page is a candidate;
    # at PP 4 the first stages of the 6-layer spec have no full-space layer)
    spaces = sum(bool(st.full[0]) + bool(st.swa[0]) for st in c.l3.lookups.stages)
    assert spaces == (2 * pp if pp < 4 else 6)
    assert store.requests()["stat"] == spaces * 10
    # the fetch: every stage and space at once, each get in one round
    assert store.round_trips("read") <= 2, store.requests()
    c.release(req)
    c.close()


@pytest.mark.parametrize("in_flight", [4, 7, 64])
def test_lookup_round_trips_are_checks_over_lookup_in_flight(tmp_path, in_flight):
    toks = _tokens(1, 10)
    _write(tmp_path, toks)
    store = LatencyBackend(FileBackend(tmp_path), 0.005)
    c, pools = _cache(store, cost_model=False, lookup_in_flight=in_flight)
    store.reset_round_trips()
    pools, req = _admit(c, pools, toks)
    checks = store.requests()["stat"]
    assert checks == 40 and req.storage_hit_tokens == 10 * PAGE
    assert store.round_trips("stat") == math.ceil(checks / in_flight)
    c.release(req)
    c.close()


@pytest.mark.parametrize(("k", "pages", "trips"), [(4, 12, 1), (4, 10, 2), (16, 10, 2)])
def test_checkpoints_window_end_costs_at_most_one_more_round_trip(tmp_path, k, pages, trips):
    """With ``swa_checkpoint_every = k`` the batch checks the windows of the checkpoints
    and of the last page; a hit ending elsewhere (a sequence end, 10 here) costs one more
    round trip to check its window, never one per candidate."""
    stored = _tokens(2, pages)
    _write(tmp_path, stored, swa_checkpoint_every=k)
    longer = np.concatenate([stored[:-1], _tokens(3, 4)])  # the next turn: 4 pages more
    store = LatencyBackend(FileBackend(tmp_path), 0.005)
    c, pools = _cache(store, cost_model=False, swa_checkpoint_every=k)
    store.reset_round_trips()
    pools, req = _admit(c, pools, longer)
    assert req.storage_hit_tokens == pages * PAGE  # ends at the stored sequence's end
    assert store.round_trips("stat") == trips, store.requests()
    c.release(req)
    c.close()


@pytest.mark.parametrize("lacking", [False, True], ids=["complete", "end_window_lacking"])
def test_end_window_lookups_trade_a_round_trip_for_half_the_checks(tmp_path, lacking):
    """``lookup_windows="end"``: the full-space checks and the last page's window
    first, then the hit end's window (2 round trips, about half the checks); if that
    window is incomplete on a stage, the checkpoints below it (a 3rd round trip)."""
    from jaxhicache.layer_map import build_layer_maps
    from jaxhicache.spec import PageSpace
    from jaxhicache.storage import Namespace, object_key, page_hashes

    stored = _tokens(8, 10)
    _write(tmp_path, stored)
    if lacking:  # stage 1 lacks the window of page 10 (the hit's end)
        ns = Namespace.for_stage(SPEC, build_layer_maps(SPEC, 2)[1], model_id="tiny")
        h = page_hashes(stored[: 10 * PAGE], PAGE)[9]
        (tmp_path / object_key(ns, PageSpace.SWA, h)).unlink()
    longer = np.concatenate([stored[:-1], _tokens(9, 4)])  # 14 pages, 10 of them stored
    store = LatencyBackend(FileBackend(tmp_path), 0.005)
    c, pools = _cache(store, cost_model=False, lookup_windows="end")
    store.reset_round_trips()
    pools, req = _admit(c, pools, longer)
    assert req.storage_hit_tokens == (9 if lacking else 10) * PAGE
    assert store.round_trips("stat") == (3 if lacking else 2), store.requests()
    # 2 stages x 14 full + the windows of pages 14 and 10 (and 1..9 when lacking)
    assert store.requests()["stat"] == 2 * 14 + 2 + 2 + (2 * 9 if lacking else 0)
    c.release(req)
    c.close()


def test_auto_windows_follow_the_store_model(tmp_path):
    """``lookup_windows="auto"``: every window up front (one round trip) for a store that
    answers many requests at once; the hit end's only for one that serves requests one
    after another (the extra checks would cost more than the round trip they save)."""
    c, _pools = _cache(FileBackend(tmp_path))
    lk = c.l3.lookups
    assert lk._all_windows(0, 20)  # nothing observed: one round trip
    lk.costs.observe_lookup(40, 64, 0.0201, first_s=0.02)  # far away, all at once
    assert lk._all_windows(0, 20)
    serial = CostModel(0.005, 1e9, 1e-4)
    serial.observe_lookup(40, 64, 0.08, first_s=0.002)  # 2 ms per request, serialized
    lk.costs = serial
    assert not lk._all_windows(0, 20)
    c.close()


def test_window_pages_are_the_checkpoint_windows_and_the_last():
    assert window_pages(0, 10, 1, 1) == list(range(10))
    assert window_pages(0, 10, 1, 4) == [3, 7, 9]
    assert window_pages(2, 10, 2, 4) == [2, 3, 6, 7, 8, 9]
    assert window_pages(3, 4, 2, 1) == []  # the window would reach into the tree's pages
    assert window_pages(0, 10, 1, 1, all_windows=False) == [9]


@pytest.mark.parametrize("queued", [False, True], ids=["at_admission", "queued"])
@pytest.mark.parametrize("recompute", [1e-7, 1e-2], ids=["cheap", "dear"])
def test_the_cost_model_fetches_only_what_is_cheaper_than_recompute(tmp_path, recompute, queued):
    """Recomputing at 0.1 us per token: no store round trip is worth it. At admission
    the lookup itself is skipped (not even a whole hit would repay it); a lookup
    started when the request was queued finds the hit, which is then declined. At
    10 ms per token the hit is fetched."""
    toks = _tokens(4, 6)
    _write(tmp_path, toks)
    store = LatencyBackend(FileBackend(tmp_path), 0.01)
    c, pools = _cache(store)
    c.l3.observe_recompute(1000, 1000 * recompute)  # what the engine measured
    c.l3.costs.observe_lookup(8, 64, 0.0101, first_s=0.01)  # an earlier lookup's timing
    if queued:
        assert c.l3.start_lookup(toks[:-1])
    store.reset_round_trips()
    pools, req = _admit(c, pools, toks)
    s = c.stats()
    if recompute < 1e-3:
        assert req.storage_hit_tokens == 0
        assert store.requests().get("read", 0) == 0  # nothing fetched
        if queued:
            assert s["storage_declined_tokens"] == 6 * PAGE
        else:
            assert s["storage_lookups_skipped"] == 1 and store.requests() == {}
    else:
        assert req.storage_hit_tokens == 6 * PAGE
        assert s["storage_declined_tokens"] == s["storage_lookups_skipped"] == 0
    c.release(req)
    c.check_invariants()
    c.close()


def test_skipped_lookups_sample_the_store_now_and_then(tmp_path):
    """Until a lookup was observed nothing is skipped (the priors must not keep the
    estimates from being learnt); then one in eight lookups the cost model skips
    samples the store in the background (a few checks, off the request's critical
    path), so the estimates follow a store that recovers."""
    toks = _tokens(7, 6)
    _write(tmp_path, toks, pp=1)
    store = LatencyBackend(FileBackend(tmp_path), 0.002)
    c, pools = _cache(store, pp=1)
    lk = c.l3.lookups
    c.l3.observe_recompute(1000, 1e-4)  # recomputing is nearly free
    assert all(lk.worth_looking(0, 4) for _ in range(20))  # no lookup observed yet
    c.l3.costs.observe_lookup(8, 64, 0.0101, first_s=0.01)
    assert not any(lk.worth_looking(0, 4) for _ in range(5))
    lk._skips = 0
    seen = c.l3.costs.observed["latency"]
    store.reset_round_trips()
    for i in range(1, 17):
        pools, req = _admit(c, pools, toks)
        assert req.storage_hit_tokens == 0  # skipped: a miss
        c.release(req)
        t0 = time.perf_counter()  # a sample runs in the background: give it a second
        while c.l3.costs.observed["latency"] - seen < i // 8 and time.perf_counter() - t0 < 1:
            time.sleep(0.01)
        samples = c.l3.costs.observed["latency"] - seen
        assert samples == i // 8, (i, samples)
        assert store.requests().get("stat", 0) == 4 * samples  # 4 pages, 1 stage
    assert c.stats()["storage_lookups_skipped"] == 16
    c.close()


def test_a_stalled_store_costs_at_most_the_lookup_bound(tmp_path):
    toks = _tokens(5, 4)
    _write(tmp_path, toks)
    store = LatencyBackend(FileBackend(tmp_path), 2.0)  # every request stalls 2 s
    c, pools = _cache(store, lookup_timeout_s=0.1)
    c.l3.observe_recompute(64, 10.0)  # recomputing is dear: the lookup is worth trying
    t0 = time.perf_counter()
    pools, req = _admit(c, pools, toks)
    waited = time.perf_counter() - t0
    assert req.storage_hit_tokens == 0 and req.cached_tokens == 0
    s = c.stats()
    assert s["storage_lookup_timeouts"] == 1 and s["storage_lookups"] == 1
    assert s["storage_lookup_seconds"] < 1.0 and waited < 1.5, waited
    c.release(req)
    c.check_invariants()
    c.close()


def test_a_queued_lookup_is_off_the_critical_path(tmp_path):
    """start_lookup when the request is queued: its admission issues no existence check
    and waits for none (the lookup ran meanwhile); the hit is the same."""
    toks = _tokens(6, 5)
    _write(tmp_path, toks)
    store = LatencyBackend(FileBackend(tmp_path), 0.02)
    c, pools = _cache(store, cost_model=False)
    assert c.l3.start_lookup(toks[:-1])
    assert not c.l3.start_lookup(toks[:-1])  # one per key
    time.sleep(0.2)  # the request waits in the queue
    store.reset_round_trips()
    pools, req = _admit(c, pools, toks)
    assert req.storage_hit_tokens == 5 * PAGE
    assert store.requests().get("stat", 0) == 0
    s = c.stats()
    assert s["storage_early_lookups"] == 1 and s["storage_lookups"] == 1
    assert s["storage_lookup_seconds"] < 0.02  # found done: less than one round trip
    c.release(req)
    c.close()


def test_a_queued_lookup_from_a_longer_match_is_not_used(tmp_path):
    """The tree lost pages between queueing and admission: the queued lookup does not
    cover them, a fresh one runs (the hit starts where the admission's match ends)."""
    toks = _tokens(7, 5)
    _write(tmp_path, toks)
    store = FileBackend(tmp_path)
    c, pools = _cache(store, cost_model=False)
    pools, first = _admit(c, pools, toks[: 2 * PAGE + 1])  # two pages from L3 into the tree
    c.insert(pools, first, toks[: 2 * PAGE + 1])
    c.release(first)
    assert c.l3.start_lookup(toks[:-1])  # looks up pages 2..4 only
    c.poll(wait=True)
    c.evict(pools, 10**6)
    c.evict_host(10**6)  # the tree forgets pages 0..1
    assert c.stored_pages(toks) == 5  # a lookup of every page replaces the queued one
    assert not c.l3.start_lookup(toks[:-1])  # that one covers them: none more
    pools, req = _admit(c, pools, toks)
    assert (req.device_hit_tokens, req.host_hit_tokens, req.storage_hit_tokens) == (0, 0, 80)
    c.release(req)
    c.check_invariants()
    c.close()


def test_cost_model_estimates():
    m = CostModel(0.005, 1e9, 1e-4)
    assert m.load_seconds(64, 0, 32) == pytest.approx(0.01)  # 2 rounds of the prior latency
    # a far store: 40 checks answered together after 20 ms
    m.observe_lookup(requests=40, in_flight=64, seconds=0.0201, first_s=0.02)
    assert m.latency_s == pytest.approx(0.02)  # the first observation replaces the prior
    assert m.request_s == pytest.approx(0.0001 / 39)
    m.observe_lookup(requests=10, in_flight=64, seconds=0.01, first_s=0.01)
    assert m.latency_s == pytest.approx(0.015)  # the median of the observations
    for _ in range(3):
        m.observe_lookup(requests=10, in_flight=64, seconds=0.01, first_s=0.01)
    m.observe_lookup(requests=10, in_flight=64, seconds=5.0, first_s=5.0)  # one stall
    assert m.latency_s == pytest.approx(0.01)  # does not swing the estimate
    # a store serving one request after another: 2 ms each, however many in flight
    s = CostModel(0.005, 1e9, 1e-4)
    s.observe_lookup(requests=50, in_flight=64, seconds=0.1, first_s=0.002)
    assert s.latency_s == pytest.approx(0.002) and s.request_s == pytest.approx(0.098 / 49)
    assert s.load_seconds(25, 0, 32) == pytest.approx(0.002 + 25 * 0.002, rel=0.01)
    s.observe_fetch(objects=25, nbytes=10**6, in_flight=32, seconds=0.052 + 0.03)
    assert s.bytes_per_s == pytest.approx(10**6 / 0.03, rel=0.01)  # after the requests
    s.observe_fetch(objects=25, nbytes=10**6, in_flight=32, seconds=0.052 + 0.01)
    # the transfer counts at least a quarter of the fetch; the median of 2 is their mean
    assert s.bytes_per_s == pytest.approx((10**6 / 0.0155 + 10**6 / 0.03) / 2, rel=0.01)
    s.observe_fetch(objects=25, nbytes=10**6, in_flight=32, seconds=0.052 + 0.03)
    assert s.bytes_per_s == pytest.approx(10**6 / 0.03, rel=0.01)  # the median of 3
    s.observe_recompute(100, 0.05)
    assert s.recompute_seconds(10) == pytest.approx(0.005)
    for tokens, seconds in ((0, 1.0), (10, -1.0), (10, float("nan")), (True, 1.0)):
        with pytest.raises(ValueError, match=r"seconds|tokens"):
            s.observe_recompute(tokens, seconds)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lookup_in_flight", 0),
        ("fetch_in_flight", 1.5),
        ("lookup_timeout_s", 0.0),
        ("store_latency_s", -1.0),
        ("store_bytes_per_s", float("inf")),
        ("recompute_s_per_token", 0),
        ("cost_model", 1),
        ("lookup_windows", "some"),
    ],
)
def test_storage_config_rejects_bad_knobs(field, value):
    with pytest.raises(ValueError, match=f"StorageConfig.{field} .*{value!r}"):
        StorageConfig(model_id="m", **{field: value})


def test_latency_backend_counts_dependent_requests(tmp_path):
    from jaxhicache.layer_map import build_layer_maps
    from jaxhicache.spec import PageSpace
    from jaxhicache.storage import Namespace, page_hashes

    ns = Namespace.for_stage(SPEC, build_layer_maps(SPEC, 1)[0])
    hs = page_hashes(np.arange(8 * PAGE), PAGE)
    store = LatencyBackend(FileBackend(tmp_path), 0.005, max_in_flight=64)
    store.reset_round_trips()
    store.exists(ns, PageSpace.FULL, hs)  # one batch
    assert store.round_trips() == 1
    for h in hs:  # one call per page, each after the previous answer
        store.exists(ns, PageSpace.FULL, [h])
    assert store.round_trips() == 1 + 8
    store.reset_round_trips()
    assert store.round_trips() == 0 and store.requests() == {}
    with pytest.raises(ValueError, match=r"latency_s .*-0\.1"):
        LatencyBackend(FileBackend(tmp_path), -0.1)


def test_latency_backend_serves_one_request_after_another_with_request_s(tmp_path):
    """``request_s``: the ``n``-th of ``n`` checks issued at once answers after about
    ``latency_s + n * request_s`` (moto on loopback); without it, all after ``latency_s``."""
    from jaxhicache.layer_map import build_layer_maps
    from jaxhicache.spec import PageSpace
    from jaxhicache.storage import Namespace, page_hashes

    ns = Namespace.for_stage(SPEC, build_layer_maps(SPEC, 1)[0])
    hs = page_hashes(np.arange(10 * PAGE), PAGE)
    times = {}
    for request_s in (0.0, 0.01):
        store = LatencyBackend(FileBackend(tmp_path), 0.005, request_s=request_s)
        t0 = time.perf_counter()
        store.exists(ns, PageSpace.FULL, hs)  # 10 checks, all in flight at once
        times[request_s] = time.perf_counter() - t0
    assert times[0.0] < 0.05 <= 0.005 + 10 * 0.01 <= times[0.01], times
    with pytest.raises(ValueError, match=r"request_s .*-1"):
        LatencyBackend(FileBackend(tmp_path), 0.0, request_s=-1)


@pytest.mark.parametrize("serial", [False, True], ids=["all_at_once", "one_by_one"])
def test_a_miss_on_a_store_serving_one_request_at_a_time_costs_a_check_or_two(tmp_path, serial):
    """Once the cost model has seen a store that serves requests one after another,
    a lookup keeps just enough checks in flight to cover its round trip: a miss costs
    a check or two, not the whole batch (which such a store works through one by one,
    delaying the request by all of them). A store serving everything in flight at once
    still gets the whole batch (one round trip)."""
    toks, again = _tokens(11, 12), _tokens(15, 12)
    _write(tmp_path, toks)
    _write(tmp_path, again)
    store = LatencyBackend(FileBackend(tmp_path), 0.01, request_s=0.01 if serial else 0.0)
    c, pools = _cache(store)
    c.l3.lookups.costs.observe_recompute(1, 1.0)  # recompute is dear: every lookup pays
    pools, req = _admit(c, pools, toks)  # a hit: the model learns the store's pace
    assert req.storage_hit_tokens == 12 * PAGE
    c.release(req)
    snap = c.l3.lookups.costs.snapshot()
    assert (snap["request_s"] > snap["latency_s"] / 4) is serial, snap
    store.reset_round_trips()
    pools, req = _admit(c, pools, _tokens(12, 12))  # never stored: a miss
    assert req.storage_hit_tokens == 0
    checks = store.requests()["stat"]
    if serial:
        assert checks <= 4, store.requests()
    else:
        assert checks >= 12 and store.round_trips("stat") == 1, store.requests()
    c.release(req)
    pools, req = _admit(c, pools, again)  # a paced hit: the estimates stay the store's
    assert req.storage_hit_tokens == 12 * PAGE
    if serial:
        assert c.l3.lookups.costs.snapshot()["request_s"] >= 0.0075
    c.release(req)
    c.close()


def test_stored_pages_answers_from_the_requests_lookup_and_admission_reuses_it(tmp_path):
    """``HiCache.stored_pages`` (a server's host watermark): the pages L3 holds after the
    tree's match, from the request's own queued lookup; its admission then asks the
    store nothing."""
    toks = _tokens(13, 6)
    _write(tmp_path, toks)
    store = LatencyBackend(FileBackend(tmp_path), 0.005)
    c, pools = _cache(store, cost_model=False)
    assert c.stored_pages(_tokens(14, 6)) == 0  # nothing stored for these
    store.reset_round_trips()
    assert c.stored_pages(toks) == 6
    assert store.requests()["stat"] > 0
    store.reset_round_trips()
    pools, req = _admit(c, pools, toks)
    assert req.storage_hit_tokens == 6 * PAGE
    assert store.requests().get("stat", 0) == 0  # the lookup above was reused
    c.release(req)
    c.close()


def test_a_paced_lookup_is_observed_as_the_whole_batch(tmp_path):
    """A lookup paced to a serial store (2 checks in flight) keeps the store as busy
    as the whole batch would: the cost model reads its time as that, so the store's
    per-request time stays its own (read as rounds of 2, it would come out near 0 and
    the model would fetch hits slower than their recompute)."""
    from jaxhicache.cache.l3_lookup import probe
    from jaxhicache.storage import page_hashes

    toks = _tokens(16, 12)
    _write(tmp_path, toks)
    store = LatencyBackend(FileBackend(tmp_path), 0.002, request_s=0.002)
    c, _pools = _cache(store)
    costs = CostModel(0.001, 1e9, 1e-4, window=1)
    hashes = page_hashes(toks[: 12 * PAGE], PAGE)
    got = probe(store, c.l3.lookups.stages, hashes, 0, [], 2, costs, paced=True)
    assert got.present_prefix() == 12 and got.requests == 24
    assert 0.0015 <= costs.request_s <= 0.004, costs.snapshot()
    c.close()


def test_recompute_cost_is_the_marginal_cost_of_a_token():
    """A prefill costs a fixed part plus a per-token part; a hit of ``t`` tokens saves
    only the latter. The estimate is the median slope between prefills of different
    lengths: short continuations (where the fixed part dominates) do not inflate it."""
    m = CostModel(0.005, 1e9, 1e-3)
    m.observe_recompute(64, 0.02 + 64e-4)  # one prefill: its time per token
    assert m.recompute_s_per_token == pytest.approx(0.0264 / 64)
    for tokens in (570, 128, 800, 100, 96, 700):
        m.observe_recompute(tokens, 0.02 + tokens * 1e-4)  # 20 ms + 0.1 ms per token
    assert m.recompute_s_per_token == pytest.approx(1e-4)
    m.observe_recompute(600, 9.0)  # one stall does not swing it
    assert m.recompute_s_per_token == pytest.approx(1e-4, rel=0.05)
    same = CostModel(0.005, 1e9, 1e-3)
    for _ in range(5):  # one length only: no slope, the time per token
        same.observe_recompute(100, 0.03)
    assert same.recompute_s_per_token == pytest.approx(3e-4)


def test_stored_pages_asks_nothing_when_the_cost_model_says_a_lookup_would_not_pay(tmp_path):
    toks = _tokens(17, 6)
    _write(tmp_path, toks)
    store = LatencyBackend(FileBackend(tmp_path), 0.005)
    c, _pools = _cache(store)
    c.l3.costs.observe_lookup(8, 64, 0.0101, first_s=0.01)  # a store 10 ms away
    c.l3.observe_recompute(1000, 1e-4)  # recomputing 6 pages is nearly free
    store.reset_round_trips()
    assert c.stored_pages(toks) == 0 and store.requests() == {}
    c.l3.observe_recompute(16, 10.0)
    c.l3.observe_recompute(16, 10.0)  # now it is dear: look
    assert c.stored_pages(toks) == 6
    c.close()


def test_host_eviction_waits_only_for_the_writes_of_the_pages_it_frees(tmp_path):
    """On a slow store the newest pages' L3 writes take long; evicting the host's
    LRU pages (written long ago) does not wait for them, and frees no slot a pending
    write still reads (every page still lands in L3)."""
    from test_cache import _serve

    store = LatencyBackend(FileBackend(tmp_path), 0.4)  # a write: 0.4 s check + 0.4 s put
    c, pools = _cache(store, pp=1, cost_model=False)
    old, new = _tokens(20, 4), _tokens(21, 4)
    pools, _ = _serve(c, pools, old, 1.0)
    c.poll(wait=True)  # its backup landed and its L3 write finished
    pools, _ = _serve(c, pools, new, 2.0)
    c.poll()  # the new pages' backup lands; their write is queued (0.8 s)
    c.evict(pools, 10**6)
    t0 = time.perf_counter()
    freed = c.evict_host(4)  # the LRU host pages: old's
    waited = time.perf_counter() - t0
    assert freed >= 4 and waited < 0.4, waited
    c.poll(wait=True)
    c.evict_host(10**6)
    for toks in (old, new):  # both sequences are in L3 and load back
        pools, req = _admit(c, pools, toks)
        assert req.storage_hit_tokens == 4 * PAGE
        c.release(req)
    c.close()


def test_every_hit_serves_what_the_cost_model_would_skip_while_it_learns(tmp_path):
    """``StorageTier.every_hit`` (a warm-up): hits the cost model would skip are looked
    up and fetched, so their load programs compile then; after it, they are skipped."""
    toks = _tokens(22, 6)
    _write(tmp_path, toks)
    c, pools = _cache(FileBackend(tmp_path))
    c.l3.costs.observe_lookup(8, 64, 0.0101, first_s=0.01)  # a store 10 ms away
    c.l3.observe_recompute(1000, 1e-4)  # recomputing is nearly free
    with c.l3.every_hit():
        pools, req = _admit(c, pools, toks)
        assert req.storage_hit_tokens == 6 * PAGE
        c.release(req)
    seen = c.l3.costs.observed["latency"]
    assert seen >= 2  # it learnt from that lookup
    c.evict(pools, 10**6)
    c.evict_host(10**6)
    pools, req = _admit(c, pools, toks)
    assert req.storage_hit_tokens == 0 and c.stats()["storage_lookups_skipped"] == 1
    c.release(req)
    c.close()


def test_host_eviction_passes_over_pages_an_l3_write_still_reads(tmp_path):
    """When the LRU host pages are still being written to a slow store, host eviction
    frees other host-only pages first (no wait), and only then those."""
    from test_cache import _serve

    store = LatencyBackend(FileBackend(tmp_path), 0.4)  # a write: 0.4 s check + 0.4 s put
    c, pools = _cache(store, pp=1, cost_model=False)
    a, b = _tokens(23, 4), _tokens(24, 4)
    pools, _ = _serve(c, pools, a, 1.0)
    c.poll(wait=True)  # a is written
    pools, _ = _serve(c, pools, b, 2.0)
    c.poll(wait=True, l3=False)  # b's backup landed: its write starts (0.8 s)
    time.sleep(0.1)
    pools, req = _admit(c, pools, a)  # a device hit: a is now the more recent
    c.release(req)
    c.evict(pools, 10**6)
    t0 = time.perf_counter()
    assert c.evict_host(4) >= 4
    assert time.perf_counter() - t0 < 0.4  # b (LRU, being written) passed over
    assert c.lookup(a[:-1]).matched_len == 0 and c.lookup(b[:-1]).matched_len == 4 * PAGE
    assert c.evict_host(4) >= 4  # nothing else left: b goes, after its write
    c.poll(wait=True)
    pools, req = _admit(c, pools, b)
    assert req.storage_hit_tokens == 4 * PAGE  # its write landed before its slots went
    c.release(req)
    c.close()


def test_poll_can_wait_for_the_backups_without_the_l3_writes(tmp_path):
    from test_cache import _serve

    store = LatencyBackend(FileBackend(tmp_path), 0.4)
    c, pools = _cache(store, pp=1, cost_model=False)
    pools, _ = _serve(c, pools, _tokens(25, 4), 1.0)
    t0 = time.perf_counter()
    c.poll(wait=True, l3=False)
    assert time.perf_counter() - t0 < 0.3
    assert c.stats()["in_flight_backups"] == 0 and c.l3.writing().size == 4  # still writing
    c.poll(wait=True)
    assert c.l3.writing().size == 0 and c.stats()["storage_backed_up_pages"] >= 4
    c.close()


def test_host_eviction_drops_queued_writes_of_the_pages_it_frees(tmp_path):
    """A store behind the write rate: host eviction that must free pages whose L3
    write has not started drops that write (counted) instead of waiting for the
    queue; a write already running is waited for; nothing wrong is ever stored."""
    from test_cache import _serve

    store = LatencyBackend(FileBackend(tmp_path), 0.4)  # a write: 0.4 s check + 0.4 s put
    c, pools = _cache(store, pp=1, cost_model=False)
    b, d = _tokens(26, 4), _tokens(27, 4)
    pools, _ = _serve(c, pools, b, 1.0)
    c.poll(wait=True, l3=False)  # b's write starts (running, 0.8 s)
    pools, _ = _serve(c, pools, d, 2.0)
    c.poll(wait=True, l3=False)  # d's write is queued behind it
    pools, req = _admit(c, pools, b)  # b is now the more recent: d is the LRU
    c.release(req)
    c.evict(pools, 10**6)
    t0 = time.perf_counter()
    assert c.evict_host(4) >= 4  # d: its queued write dropped, no wait
    assert time.perf_counter() - t0 < 0.3
    assert c.stats()["storage_dropped_writes"] == 4
    c.poll(wait=True)
    c.evict_host(10**6)
    for toks, hit in ((b, 4 * PAGE), (d, 0)):
        pools, req = _admit(c, pools, toks)
        assert req.storage_hit_tokens == hit
        c.release(req)
    c.close()
