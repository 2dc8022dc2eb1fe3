"""Decisions of the L3 tier that guard correctness (issue 16 §1), each pinned by a test
that fails when the decision is removed:

* partial hits across stages: a stage lacking a full-space object ends the hit there
  for every stage (PP 2 and PP 4; in the middle and at the end of the prefix);
* prefetch timing: a prefetch that landed after its request was admitted is used only
  by a request whose match ends where the prefetch starts, never at another offset;
* tenants: a landed prefetch of salt A never serves salt B or no salt; ``"a"`` and
  ``b"a"`` are one tenant (issue 19 point 1), in one instance and across two.

The stand-in forward stamps a distinct value into every page (``_stamp_pages``), so a
page loaded at the wrong offset, or another tenant's page, shows in the pools.
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxhicache.cache import HiCache, HiCacheConfig, WritePolicy
from jaxhicache.cache.l3 import PrefetchPolicy, StorageConfig
from jaxhicache.layer_map import build_layer_maps
from jaxhicache.mesh import make_mesh
from jaxhicache.spec import ModelCacheSpec, PageSpace
from jaxhicache.storage import FileBackend, Namespace, object_key, page_hashes
from jaxhicache.storage.latency import LatencyBackend

SPEC = ModelCacheSpec.tiny_dsv4()  # page 16, one trailing SWA page, 6 layers
PAGE = SPEC.page_size
MODEL = "tiny"


def _cache(store, pp=2, policy=PrefetchPolicy.WAIT_COMPLETE, **kw):
    st = StorageConfig(
        model_id=MODEL, prefetch_threshold=PAGE, prefetch_policy=policy, cost_model=False, **kw
    )
    config = HiCacheConfig(
        device_pages=24, host_pages=48, write_policy=WritePolicy.WRITE_THROUGH, storage=st
    )
    c = HiCache(SPEC, make_mesh(pp, 1), config, store=store)
    return c, c.new_device_pools()


def _tokens(seed, pages, extra=1):
    return np.random.default_rng(seed).integers(0, 1000, pages * PAGE + extra).astype(np.int32)


def _stamp_pages(pools, req, base):
    """The stand-in forward: own page ``i`` of the request gets ``base + i`` in every
    sub-pool row (its full page and, where it has one, its SWA page)."""
    for kind in SPEC.kinds():
        table = req.full_page_ids if kind.page_space is PageSpace.FULL else req.swa_page_ids
        for i in range(req.own_start, table.size):
            if table[i] >= 0:
                pools = pools.replace_pool(kind, pools[kind].at[:, :, int(table[i])].set(base + i))
    return pools


def _write(root, tokens, pp=2, base=100.0, salt=None):
    """Another instance computes ``tokens`` (page i stamped ``base + i``) and writes every
    page of it to the directory store."""
    c, pools = _cache(FileBackend(root), pp)
    pools, batch = c.admit(pools, [tokens], salts=[salt])
    (req,) = batch.requests
    pools = _stamp_pages(pools, req, base)
    c.insert(pools, req, tokens)
    c.release(req)
    c.close()


def _page_values(c, pools, req, pages):
    """Per page of ``pages``: the set of values its full rows hold on every stage."""
    out = []
    for i in pages:
        vals = set()
        for kind in SPEC.kinds():
            if kind.page_space is not PageSpace.FULL:
                continue
            a = np.asarray(pools[kind])[:, :, int(req.full_page_ids[i])]
            for r, m in enumerate(c.layer_maps):
                vals |= set(np.unique(a[r, : m.num_layers_of(kind)]).tolist())
        out.append(vals)
    return out


# ------------------------------------------------------------------ partial hits
@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("where", ["middle", "end"])
def test_a_stage_lacking_a_full_object_ends_the_hit_there_for_every_stage(tmp_path, pp, where):
    toks = _tokens(0, 6)
    _write(tmp_path, toks, pp)
    hashes = page_hashes(toks[: 6 * PAGE], PAGE)
    gap = 2 if where == "middle" else 5
    maps = build_layer_maps(SPEC, pp)
    holders = [
        m
        for m in maps
        if any(m.num_layers_of(k) for k in SPEC.kinds() if k.page_space is PageSpace.FULL)
    ]
    lacking = holders[-1]  # the last stage with full-space layers loses page `gap`
    ns = Namespace.for_stage(SPEC, lacking, model_id=MODEL)
    (tmp_path / object_key(ns, PageSpace.FULL, hashes[gap])).unlink()
    c, pools = _cache(FileBackend(tmp_path), pp)
    pools = pools.replace(arrays={k: a * 0 - 5.0 for k, a in pools.arrays.items()})
    pools, batch = c.admit(pools, [toks])
    (req,) = batch.requests
    batch.wait()
    assert req.storage_hit_tokens == gap * PAGE  # not zero, not longer
    assert _page_values(c, pools, req, range(gap)) == [{100.0 + i} for i in range(gap)]
    c.release(req)
    c.check_invariants()
    c.close()


# ---------------------------------------------------------------- prefetch timing
@pytest.mark.parametrize("policy", [PrefetchPolicy.BEST_EFFORT, PrefetchPolicy.TIMEOUT])
@pytest.mark.parametrize("claimer", ["other_offset", "same_offset"])
def test_a_late_prefetch_is_never_loaded_at_another_offset(tmp_path, claimer, policy):
    """R1's prefetch lands after R1 was admitted (best effort, or a timeout shorter than
    the slow store's round trip). A later request whose match ends at page 2 (R1
    inserted pages 0..1) must not take it (it holds pages 0..1); a request whose match
    ends at page 0 takes it at page 0."""
    x = _tokens(1, 2)
    _write(tmp_path, x)
    store = LatencyBackend(FileBackend(tmp_path), 0.1)
    timeouts = {"timeout_base_s": 0.01, "timeout_per_1k_tokens_s": 0.0, "timeout_max_s": 0.01}
    c, pools = _cache(store, policy=policy, **timeouts)
    pools, batch = c.admit(pools, [x])
    (r1,) = batch.requests
    assert r1.storage_hit_tokens == 0  # the prefetch has not landed
    if claimer == "other_offset":
        pools = _stamp_pages(pools, r1, 900.0)
        c.insert(pools, r1, x)  # the tree holds pages 0..1 now (R1's own values)
    c.release(r1)
    c.poll(wait=True)  # the prefetch lands, unclaimed
    assert c.l3.in_flight()[PageSpace.FULL] == 2
    longer = np.concatenate([x[:-1], _tokens(2, 3)])  # pages 0..1 of x and 3 more pages
    pools, batch = c.admit(pools, [longer])
    (r2,) = batch.requests
    batch.wait()
    if claimer == "other_offset":
        assert (r2.device_hit_tokens, r2.storage_hit_tokens, r2.cached_tokens) == (32, 0, 32)
        assert _page_values(c, pools, r2, range(2)) == [{900.0}, {901.0}]
        assert c.l3.in_flight()[PageSpace.FULL] == 0  # dropped, not kept for later
    else:
        assert (r2.device_hit_tokens, r2.storage_hit_tokens) == (0, 32)
        assert _page_values(c, pools, r2, range(2)) == [{100.0}, {101.0}]
    c.release(r2)
    c.check_invariants()
    c.close()


# ------------------------------------------------------------------------ tenants
def test_a_landed_prefetch_serves_its_tenant_only(tmp_path):
    x = _tokens(3, 2)
    _write(tmp_path, x, salt="a")
    store = LatencyBackend(FileBackend(tmp_path), 0.05)
    c, pools = _cache(store, policy=PrefetchPolicy.BEST_EFFORT)
    pools, batch = c.admit(pools, [x], salts=["a"])
    assert batch.requests[0].storage_hit_tokens == 0  # salt a's prefetch is in flight
    c.release(batch.requests[0])  # nothing inserted: the tree stays empty
    c.poll(wait=True)  # ... and lands, unclaimed
    for salt in ("b", None):
        pools, batch = c.admit(pools, [x], salts=[salt])
        (req,) = batch.requests
        assert req.cached_tokens == 0, salt
        c.release(req)
    # b"a" is the tenant "a" (issue 19): it takes the landed prefetch
    pools, batch = c.admit(pools, [x], salts=[b"a"])
    (req,) = batch.requests
    batch.wait()
    assert req.storage_hit_tokens == 32
    assert c.stats()["storage_prefetches"] == 1  # the one of salt a, nothing refetched
    assert _page_values(c, pools, req, range(2)) == [{100.0}, {101.0}]
    c.release(req)
    c.check_invariants()
    c.close()


def test_two_instances_sharing_a_store_share_pages_within_a_tenant_only(tmp_path):
    x = _tokens(4, 3)
    _write(tmp_path, x, salt="a")
    for salt, want in (("b", 0), (None, 0), (b"a", 48), ("a", 48)):
        c, pools = _cache(FileBackend(tmp_path))
        pools, batch = c.admit(pools, [x], salts=[salt])
        (req,) = batch.requests
        batch.wait()
        assert req.storage_hit_tokens == want, salt
        if want:
            assert _page_values(c, pools, req, range(3)) == [{100.0}, {101.0}, {102.0}]
        c.release(req)
        c.close()


def test_one_tenant_salt_as_str_or_bytes_in_the_prefetch_bookkeeping(tmp_path):
    """Issue 19 point 1, where the salt enters the tier: ``find`` and ``start_lookup``
    treat ``"a"`` and ``b"a"`` alike."""
    x = _tokens(5, 2)
    _write(tmp_path, x, salt="é")
    store = LatencyBackend(FileBackend(tmp_path), 0.05)
    c, pools = _cache(store, policy=PrefetchPolicy.BEST_EFFORT)
    assert c.l3.start_lookup(x[:-1], "é")
    assert not c.l3.start_lookup(x[:-1], "é".encode())  # the same key and tenant
    pools, batch = c.admit(pools, [x], salts=["é".encode()])
    assert batch.requests[0].storage_hit_tokens == 0  # in flight
    assert c.stats()["storage_early_lookups"] == 1
    c.release(batch.requests[0])
    c.poll(wait=True)
    assert c.l3.find(x[:-1], "é") is c.l3.find(x[:-1], "é".encode()) is not None
    assert c.l3.find(x[:-1], "e") is None
    c.close()


def test_stamp_helper_marks_every_page(tmp_path):
    """The helper's values are what the decision tests compare (control)."""
    c, pools = _cache(FileBackend(tmp_path))
    pools, batch = c.admit(pools, [_tokens(6, 2)])
    (req,) = batch.requests
    pools = _stamp_pages(pools, req, 7.0)
    assert _page_values(c, pools, req, range(2)) == [{7.0}, {8.0}]
    c.release(req)
    c.close()
