"""``HiCache.flush``: device and host emptied through the public API, L3 kept.

The main job's ``--two-pass`` check relies on it: after a flush every prefix a
request is served must come from storage. The stand-in forward of ``test_cache``
stamps a value into a request's own pages; the device pools are poisoned before
the re-admission, so the bytes it is served can only have come from L3.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from test_cache import _poison, _serve, _stamp
from test_cache_l3 import _rows

from jaxhicache.cache import HiCache, HiCacheConfig, WritePolicy
from jaxhicache.cache.l3 import PrefetchPolicy, StorageConfig
from jaxhicache.mesh import make_mesh
from jaxhicache.spec import ModelCacheSpec, PageSpace
from jaxhicache.storage import FileBackend
from jaxhicache.storage.backend import StorageBackend

SPEC = ModelCacheSpec.tiny_dsv4()  # page 16, window 8: one trailing SWA page
PAGE = SPEC.page_size


class _Gated(StorageBackend):
    """A FileBackend whose object writes wait until ``gate`` is set (a slow store)."""

    def __init__(self, inner: FileBackend):
        super().__init__(max_in_flight=1)
        self._inner = inner
        self.gate = threading.Event()

    def _start_read(self, key):
        return self._inner._start_read(key)

    def _start_stat(self, key):
        return self._inner._start_stat(key)

    def _start_write(self, key, parts):
        assert self.gate.wait(30), "the gate was never opened"
        return self._inner._start_write(key, parts)

    def _start_delete(self, key, generation=None):
        return self._inner._start_delete(key, generation)

    def _clear(self, prefix):
        return self._inner._clear(prefix)


def _cache(store, policy=WritePolicy.WRITE_THROUGH):
    st = StorageConfig(
        model_id="tiny",
        prefetch_threshold=PAGE,
        prefetch_policy=PrefetchPolicy.WAIT_COMPLETE,
        cost_model=False,  # pin what is served
    )
    cfg = HiCacheConfig(device_pages=16, host_pages=32, write_policy=policy, storage=st)
    c = HiCache(SPEC, make_mesh(2, 1), cfg, store=store)
    return c, c.new_device_pools()


def _tokens(seed, pages, extra=1):
    return np.random.default_rng(seed).integers(0, 1000, pages * PAGE + extra).astype(np.int32)


def _objects(root) -> int:
    return sum(not f.endswith(".tmp") for _d, _s, fs in os.walk(root) for f in fs)


def _used(cache) -> dict:
    return {k: v for k, v in cache.stats().items() if k.endswith("_pages_used") and v}


@pytest.mark.parametrize("policy", [WritePolicy.WRITE_THROUGH, WritePolicy.WRITE_BACK])
def test_flush_waits_for_write_back_then_empties_device_and_host(tmp_path, policy):
    store = _Gated(FileBackend(tmp_path))
    c, pools = _cache(store, policy)
    a, b = _tokens(0, 4), _tokens(0, 4)
    b[2 * PAGE :] = _tokens(1, 2, extra=1)  # b shares a's first two pages
    pools, _ = _serve(c, pools, a, 3.0)
    pools, _ = _serve(c, pools, b, 4.0)
    assert _used(c)["device_full_pages_used"] == 6  # 4 + 2 whole pages in the tree

    # The store cannot take writes yet: a flush must wait for them (write-back:
    # for the D2H backups its eviction starts, then their writes) before it frees
    # a host slot they read.
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(c.flush(pools)))
    t.start()
    try:
        t.join(0.5)
        assert t.is_alive(), "flush returned before its L3 writes could land"
        assert _objects(tmp_path) == 0  # an L3 lookup now would miss everything
    finally:
        store.gate.set()  # (a failed check must not leave writes blocked)
    t.join(30)
    assert not t.is_alive()

    assert out["device_full_pages"] == 6 and out["device_swa_pages"] > 0
    held_on_host = 0 if policy is WritePolicy.WRITE_BACK else 6  # write-back: none yet
    assert out["host_full_pages"] == held_on_host
    # 6 full-space objects and 6 windows (1 SWA page each), on each of the 2 stages
    assert out["l3_written_objects"] == 2 * (6 + 6) and out["l3_prefetch_pages_dropped"] == 0
    assert _used(c) == {}  # nothing on device or host (any page space)
    assert c.lookup(a[:-1]).matched_len == 0 and c.lookup(b[:-1]).matched_len == 0
    c.check_invariants()
    objects = _objects(tmp_path)
    assert objects > 0
    assert c.flush(pools)["l3_written_objects"] == 0  # an empty cache: nothing to drop
    assert _objects(tmp_path) == objects  # L3 kept

    # Re-admitted on the same instance, poisoned device pools: served from L3 only.
    pools = _poison(pools)
    for toks, values in ((a, [3.0] * 4), (b, [3.0, 3.0, 4.0, 4.0])):
        pools, batch = c.admit(pools, [toks])
        batch.wait()
        (req,) = batch.requests
        # b too: a's reload brought back only the window at a's hit end, so b's shared
        # two pages have no SWA window on device (no hit at 32); L3 serves all of b
        assert (req.device_hit_tokens, req.host_hit_tokens, req.storage_hit_tokens) == (0, 0, 64)
        for kind in SPEC.kinds():
            if kind.page_space is PageSpace.FULL:
                for rows in _rows(c, pools, kind, req.full_page_ids[:4]):
                    for page, value in enumerate(values):
                        assert (rows[:, page] == value).all(), (kind, page)
        c.insert(pools, req, toks)
        c.release(req)
    c.check_invariants()
    c.close()


def test_flush_refuses_while_a_request_is_open(tmp_path):
    c, pools = _cache(FileBackend(tmp_path))
    pools, _ = _serve(c, pools, _tokens(2, 2), 1.0)
    toks = _tokens(3, 4)  # 65 tokens
    pools, batch = c.admit(pools, [toks], 16)  # pages for 80 positions: 5 own pages
    (req,) = batch.requests
    before = c.stats()
    with pytest.raises(RuntimeError, match="open requests hold device pages"):
        c.flush(pools)
    assert c.stats()["device_full_pages_used"] == before["device_full_pages_used"]
    # every own page inserted (prompt + 15 generated tokens = 5 whole pages): the
    # request holds no page of its own, only its lock
    pools = _stamp(pools, req, 2.0)
    c.insert(pools, req, np.concatenate([toks, np.arange(15, dtype=np.int32)]))
    with pytest.raises(RuntimeError, match="locks on the tree"):
        c.flush(pools)
    assert c.stats()["device_full_pages_used"] == 7
    c.release(req)
    dropped = c.flush(pools)
    assert dropped["device_full_pages"] == 7 and _used(c) == {}
    c.check_invariants()
    c.close()
