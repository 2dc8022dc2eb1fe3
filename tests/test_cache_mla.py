"""MLA + DSA sub-pools in every tier, without a model: the latent (FLOAT rows) and the
indexer keys (uint8 rows) of a request's pages come back byte for byte from device,
host and L3, on a ``pp x tp`` mesh where both pools are replicated over ``'tp'``:
one host copy and one L3 object per stage, the same bytes on every TP device, and a
hit needs the indexer object of every page.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxhicache.cache import HiCache, HiCacheConfig, WritePolicy
from jaxhicache.cache.l3 import PrefetchPolicy, StorageConfig
from jaxhicache.mesh import make_mesh
from jaxhicache.spec import ModelCacheSpec, PoolKind
from jaxhicache.storage import FileBackend
from jaxhicache.storage.layout import ObjectLayout

SPEC = ModelCacheSpec.tiny_mla(indexer_layers=(0, 2))  # 4 layers, page 16
PAGE = SPEC.page_size
LATENT, INDEXER = PoolKind.MLA_LATENT, PoolKind.DSA_INDEXER


def _cache(pp=2, tp=2, store=None, policy=WritePolicy.WRITE_THROUGH, device_pages=8):
    st = None
    if store is not None:
        st = StorageConfig(
            model_id="tiny-mla",
            prefetch_threshold=PAGE,
            prefetch_policy=PrefetchPolicy.WAIT_COMPLETE,
            cost_model=False,
        )
    cfg = HiCacheConfig(device_pages=device_pages, host_pages=16, write_policy=policy, storage=st)
    c = HiCache(SPEC, make_mesh(pp, tp), cfg, store=store)
    return c, c.new_device_pools()


def _tokens(seed, pages):
    return np.random.default_rng(seed).integers(0, 1000, pages * PAGE + 1).astype(np.int32)


def _pattern(pools, kind, page_ids, seed):
    """Distinct bytes per (stage, layer, page, row element) for ``page_ids``."""
    pp, layers = pools[kind].shape[:2]
    shape = (pp, layers, len(page_ids), *SPEC.row_shape(kind))
    x = np.random.default_rng(seed).integers(1, 250, shape)
    return x.astype(SPEC.row_dtype(kind))


def _stamp(pools, req, seed):
    """Stands in for a forward: writes distinct rows into the request's own pages."""
    ids = req.full_page_ids[req.own_start :]
    ids = ids[ids >= 0]
    for kind in SPEC.kinds():
        rows = _pattern(pools, kind, ids, seed + len(kind.value))
        pools = pools.replace_pool(kind, pools[kind].at[:, :, jnp.asarray(ids)].set(rows))
    return pools


def _poison(pools):
    return pools.replace(arrays={k: jnp.full_like(a, 251) for k, a in pools.arrays.items()})


def _rows(pools, kind, ids):
    return np.asarray(pools[kind])[:, :, np.asarray(ids)]


def _write(pools, cache, tokens, seed):
    pools, batch = cache.admit(pools, [tokens])
    (req,) = batch.requests
    pools = _stamp(pools, req, seed)
    want = {k: _rows(pools, k, req.full_page_ids[: len(tokens) // PAGE]) for k in SPEC.kinds()}
    cache.insert(pools, req, tokens)
    cache.release(req)
    return pools, want


def test_latent_and_indexer_rows_come_back_from_host_on_every_tp_device():
    cache, pools = _cache()
    toks = _tokens(0, 3)
    pools, want = _write(pools, cache, toks, seed=1)
    cache.poll(wait=True)
    assert cache.evict(pools, 8) >= 3  # device copy gone: the next hit is from host
    pools = _poison(pools)
    pools, batch = cache.admit(pools, [toks])
    (req,) = batch.requests
    batch.wait()
    assert req.host_hit_tokens == 3 * PAGE
    ids = req.full_page_ids[:3]
    for kind in SPEC.kinds():
        np.testing.assert_array_equal(_rows(pools, kind, ids), want[kind], err_msg=kind.value)
        # replicated over 'tp': both TP devices of each stage hold the same bytes
        shards = {}
        for s in pools[kind].addressable_shards:
            shards.setdefault(s.index[0].start or 0, []).append(np.asarray(s.data))
        assert len(shards) == 2 and all(len(v) == 2 for v in shards.values())
        for copies in shards.values():
            np.testing.assert_array_equal(copies[0], copies[1])
    # one host copy per stage, whatever the TP size: the slabs hold whole rows once
    assert sum(cache.host.nbytes_per_stage()) == 16 * SPEC.page_bytes()
    cache.release(req)
    cache.close()


def _objects(root):
    return sorted(p for p in root.rglob("*") if p.is_file() and len(p.name) == 64)


@pytest.mark.parametrize("layout", [ObjectLayout.PER_SPACE, ObjectLayout.PER_SUBPOOL])
def test_l3_holds_one_object_per_stage_not_per_tp_rank_and_serves_it_back(tmp_path, layout):
    store = FileBackend(tmp_path, object_layout=layout)
    cache, pools = _cache(store=store)
    toks = _tokens(2, 3)
    pools, want = _write(pools, cache, toks, seed=3)
    cache.close()  # waits for the D2H backup and the L3 write
    per_page = 2 if layout is ObjectLayout.PER_SPACE else 4  # stages x (1 or 2 sub-pools)
    objs = _objects(tmp_path)
    assert len(objs) == 3 * per_page, [str(p.relative_to(tmp_path)) for p in objs]
    assert not any("/tp-" in str(p) for p in objs)
    if layout is ObjectLayout.PER_SUBPOOL:
        assert sum("/dsa_indexer/" in str(p) for p in objs) == 3 * 2

    other, pools = _cache(store=store)  # a fresh instance: empty tree, poisoned pools
    pools = _poison(pools)
    pools, batch = other.admit(pools, [toks])
    (req,) = batch.requests
    batch.wait()
    assert req.storage_hit_tokens == 3 * PAGE
    for kind in SPEC.kinds():
        got = _rows(pools, kind, req.full_page_ids[:3])
        np.testing.assert_array_equal(got, want[kind], err_msg=kind.value)
    other.release(req)
    other.close()


@pytest.mark.parametrize("stage", [0, 1])
def test_a_missing_indexer_object_mid_prefix_ends_the_l3_hit_there(tmp_path, stage):
    store = FileBackend(tmp_path, object_layout=ObjectLayout.PER_SUBPOOL)
    cache, pools = _cache(store=store)
    toks = _tokens(4, 4)
    pools, _ = _write(pools, cache, toks, seed=5)
    cache.close()
    # the indexer object of page 2 on one stage only (keys: layers-<start>-<end>/<unit>/..)
    layers = ["layers-0-2", "layers-2-4"][stage]
    from jaxhicache.storage import page_hashes

    h = page_hashes(toks[: 4 * PAGE], PAGE)[2]
    (victim,) = [
        p
        for p in _objects(tmp_path)
        if p.name == h and f"/{layers}/" in str(p) and "/dsa_indexer/" in str(p)
    ]
    victim.unlink()
    other, pools = _cache(store=store)
    pools, batch = other.admit(pools, [toks])
    (req,) = batch.requests
    batch.wait()
    assert req.storage_hit_tokens == 2 * PAGE  # pages 0 and 1, not 0, not 4
    other.release(req)
    other.close()
