"""HiCache with an L3 tier: prefetch into host slots, backup to storage, faults, salts.

The stand-in forward of ``test_cache`` stamps a value into a request's own pages;
a second cache over the same store (another instance, fresh device and host
pools) must serve those bytes from L3, or miss — never other bytes.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from test_cache import _stamp  # the stand-in forward

from jaxhicache.cache import HiCache, HiCacheConfig, WritePolicy
from jaxhicache.cache.l3 import PrefetchPolicy, StorageConfig
from jaxhicache.mesh import make_mesh
from jaxhicache.spec import ModelCacheSpec, PageSpace, PoolKind
from jaxhicache.storage import FileBackend
from jaxhicache.storage.backend import StorageBackend
from jaxhicache.storage.faults import FaultInjectionBackend
from jaxhicache.storage.layout import window_rows

SPEC = ModelCacheSpec.tiny_dsv4()  # page 16, window 8: one trailing SWA page
PAGE = SPEC.page_size


def _config(policy=PrefetchPolicy.WAIT_COMPLETE, **kw):
    kw.setdefault("cost_model", False)  # these tests pin what is served (test_l3_latency: when)
    st = StorageConfig(model_id="tiny", prefetch_threshold=PAGE, prefetch_policy=policy, **kw)
    return HiCacheConfig(
        device_pages=16, host_pages=32, write_policy=WritePolicy.WRITE_THROUGH, storage=st
    )


def _cache(store, pp=2, **kw):
    c = HiCache(SPEC, make_mesh(pp, 1), _config(**kw), store=store)
    return c, c.new_device_pools()


def _tokens(seed, pages, extra=1):
    return np.random.default_rng(seed).integers(0, 1000, pages * PAGE + extra).astype(np.int32)


def _write(store, tokens, value, salt=None, pp=2):
    """Instance A computes ``tokens`` and backs them up to host and on to L3."""
    c, pools = _cache(store, pp)
    pools, batch = c.admit(pools, [tokens], salts=[salt])
    (req,) = batch.requests
    pools = _stamp(pools, req, value)
    c.insert(pools, req, tokens)
    c.release(req)
    c.close()  # waits for the D2H backup and the L3 write
    return c


def _read(store, tokens, salt=None, pp=2, **kw):
    """Instance B (fresh pools, empty tree) admits ``tokens``; returns (cache, pools, req)."""
    c, pools = _cache(store, pp, **kw)
    pools = pools.replace(arrays={k: a * 0 - 5.0 for k, a in pools.arrays.items()})  # poison
    pools, batch = c.admit(pools, [tokens], salts=[salt])
    batch.wait()
    return c, pools, batch.requests[0]


def _rows(cache, pools, kind, ids):
    """Per stage ``[n_kind, len(ids), *stored]``: what L3 holds of these pages (SWA space:
    the window rows, ``storage.layout.window_rows``)."""
    got = np.asarray(pools[kind])[:, :, np.asarray(ids)]
    out = [got[r, : m.num_layers_of(kind)] for r, m in enumerate(cache.layer_maps)]
    if kind.page_space is PageSpace.SWA:
        shape, index = window_rows(SPEC, kind)
        out = [
            x.reshape(*x.shape[:2], *(shape or x.shape[2:]))[(slice(None),) * 2 + index]
            for x in out
        ]
    return out


@pytest.mark.parametrize("pp", [1, 2])
def test_second_instance_serves_the_prefix_from_storage(tmp_path, pp):
    store = FileBackend(tmp_path)
    toks = _tokens(0, 4)
    assert _write(store, toks, 7.0, pp=pp).stats()["storage_backed_up_pages"] > 0
    c, pools, req = _read(store, toks, pp=pp)
    assert (req.device_hit_tokens, req.host_hit_tokens, req.storage_hit_tokens) == (0, 0, 64)
    for kind in SPEC.kinds():
        ids = req.full_page_ids[:4] if kind.page_space is PageSpace.FULL else req.swa_page_ids[3:4]
        for rows in _rows(c, pools, kind, ids):
            assert (rows == 7.0).all(), kind
    c.release(req)
    s = c.stats()
    assert s["storage_hit_tokens"] == 64 and s["storage_prefetched_tokens"] == 64
    assert s["l3_prefetched_pages_total"] > 0
    c.check_invariants()
    c.close()


def test_backup_skips_pages_already_in_storage(tmp_path):
    store = FileBackend(tmp_path)
    toks = _tokens(1, 3)
    a = _write(store, toks, 1.0)
    b = _write(store, toks, 2.0)  # same pages: nothing new written
    assert a.stats()["storage_backed_up_pages"] > 0
    assert b.stats()["storage_backed_up_pages"] == 0
    c, pools, req = _read(store, toks)
    assert req.storage_hit_tokens == 48
    assert all(
        (rows == 1.0).all() for rows in _rows(c, pools, PoolKind.C4_KV, req.full_page_ids[:3])
    )
    c.close()


def test_salts_never_share_a_page_in_any_tier(tmp_path):
    store = FileBackend(tmp_path)
    toks = _tokens(2, 3)
    _write(store, toks, 3.0, salt="tenant-a")
    for salt, want in (("tenant-b", 0), (None, 0), ("tenant-a", 48)):
        c, pools, req = _read(store, toks, salt=salt)
        assert req.cached_tokens == want, salt
        c.release(req)
        c.close()
    # L1 / L2 as well: one instance, two tenants
    c, pools = _cache(store)
    for salt in ("x", "y"):
        pools, batch = c.admit(pools, [_tokens(3, 2)], salts=[salt])
        (req,) = batch.requests
        assert req.cached_tokens == 0, salt
        c.insert(pools, req, req.prompt)
        c.release(req)
    pools, batch = c.admit(pools, [_tokens(3, 2)], salts=["x"])
    assert batch.requests[0].device_hit_tokens == 32
    c.release(batch.requests[0])
    c.check_invariants()
    c.close()


def _flip_a_payload_byte(root, space_dir):
    files = sorted(p for p in root.rglob("*") if p.is_file() and f"/{space_dir}/" in str(p))
    assert files, f"no {space_dir} objects under {root}"
    data = bytearray(files[0].read_bytes())
    data[-1] ^= 0xFF
    files[0].write_bytes(bytes(data))


@pytest.mark.parametrize("space_dir", ["full", "swa"])
def test_corrupt_object_is_a_miss_never_a_wrong_page(tmp_path, space_dir):
    store = FileBackend(tmp_path)
    toks = _tokens(4, 1, extra=1)  # one page: its full and SWA objects decide the hit
    _write(store, toks, 5.0)
    _flip_a_payload_byte(tmp_path, space_dir)
    c, _pools, req = _read(store, toks)
    assert req.cached_tokens == 0
    s = c.stats()
    assert s["l3_integrity_failures_total"] >= 1
    c.release(req)
    c.check_invariants()
    c.close()


def test_read_errors_are_a_miss(tmp_path):
    inner = FileBackend(tmp_path)
    toks = _tokens(5, 2)
    _write(inner, toks, 6.0)
    store = FaultInjectionBackend(inner, fail_read=lambda key: "/full/" in key)
    c, _pools, req = _read(store, toks)
    assert req.cached_tokens == 0
    assert c.stats()["l3_read_errors_total"] >= 1
    c.release(req)
    c.check_invariants()
    c.close()


def test_write_errors_are_counted_not_raised(tmp_path):
    store = FaultInjectionBackend(FileBackend(tmp_path), fail_write=lambda key: True)
    c, pools = _cache(store)
    pools, batch = c.admit(pools, [_tokens(6, 2)])
    (req,) = batch.requests
    c.insert(pools, req, req.prompt)
    c.release(req)
    c.close()
    s = c.stats()
    assert s["storage_backed_up_pages"] == 0 and s["l3_write_errors_total"] >= 1


class _Slow(StorageBackend):
    """A FileBackend whose reads take ``delay`` seconds each (an injected slow store)."""

    def __init__(self, inner: FileBackend, delay: float):
        super().__init__(max_in_flight=1)
        self._inner, self._delay = inner, delay

    def _start_read(self, key):
        time.sleep(self._delay)
        return self._inner._start_read(key)

    def _start_stat(self, key):
        return self._inner._start_stat(key)

    def _start_write(self, key, parts):
        return self._inner._start_write(key, parts)

    def _start_delete(self, key, generation=None):
        return self._inner._start_delete(key, generation)

    def _clear(self, prefix):
        return self._inner._clear(prefix)


@pytest.mark.parametrize("policy", list(PrefetchPolicy))
def test_prefetch_policies_bound_the_wait(tmp_path, policy):
    inner = FileBackend(tmp_path)
    toks = _tokens(7, 4)
    _write(inner, toks, 8.0, pp=1)
    delay = 0.15  # per object: 4 full + 1 SWA objects on one stage ~ 0.75 s
    store = _Slow(inner, delay)
    kw = {"timeout_base_s": 0.2, "timeout_per_1k_tokens_s": 0.0, "timeout_max_s": 0.2}
    c, pools = _cache(store, pp=1, policy=policy, **kw)
    t0 = time.perf_counter()
    pools, batch = c.admit(pools, [toks])
    waited = time.perf_counter() - t0
    (req,) = batch.requests
    if policy is PrefetchPolicy.WAIT_COMPLETE:
        assert req.storage_hit_tokens == 64 and waited >= 4 * delay
    elif policy is PrefetchPolicy.BEST_EFFORT:
        assert req.storage_hit_tokens == 0 and waited < 2 * delay
    else:
        # waited for the timeout, returned before the whole fetch (5 reads) could land
        assert req.storage_hit_tokens == 0 and 0.2 <= waited < 5 * delay
    c.release(req)
    if policy is not PrefetchPolicy.WAIT_COMPLETE:  # it lands later: the next request hits
        c.poll(wait=True)
        pools, batch = c.admit(pools, [toks])
        assert batch.requests[0].cached_tokens == 64
        c.release(batch.requests[0])
    c.check_invariants()
    c.close()
