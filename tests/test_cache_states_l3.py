"""Recurrent-state snapshots in L3 (a hybrid spec, the stand-in forward of
``test_cache_states``): one object per snapshot per stage, keyed by the hash of the page
ending at it; a second instance over the same store serves the prefix and the exact
state; a missing, corrupt, truncated or foreign state object moves the hit back to the
previous grid point that has one (or to a miss), never to a wrong state; TP-split state
rows are one object per TP rank.

The stand-in forward writes the value ``p`` into the snapshot slot of position ``p``
(every layer, both state kinds) and checks, before each forward, that the state it
reads is the one at its start.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_cache_l3 import _Slow  # a store whose reads take a while
from test_cache_states import GRID, PAGE, SPEC, STATES, _forward, _serve, _tokens

from jaxhicache.cache import HiCache, HiCacheConfig, WritePolicy
from jaxhicache.cache.l3 import PrefetchPolicy, StorageConfig
from jaxhicache.layer_map import build_layer_maps
from jaxhicache.mesh import make_mesh
from jaxhicache.pools.host import HostPools
from jaxhicache.spec import PageSpace
from jaxhicache.storage import FileBackend
from jaxhicache.storage.keys import Namespace, object_key, page_hashes


def _cache(store, pp=2, policy=PrefetchPolicy.WAIT_COMPLETE, g=1, **kw):
    st = StorageConfig(
        model_id="tiny-hybrid",
        prefetch_threshold=PAGE,
        prefetch_policy=policy,
        cost_model=False,
        pages_per_object=g,
    )
    kw.setdefault("device_pages", 24)
    kw.setdefault("host_pages", 48)
    cfg = HiCacheConfig(
        write_policy=WritePolicy.WRITE_THROUGH, state_interval=GRID, storage=st, **kw
    )
    c = HiCache(SPEC, make_mesh(pp, 1), cfg, store=store)
    return c, c.new_device_pools()


def _write(store, prompt, gen=3, salt=None, pp=2, g=1):
    """Instance A serves ``prompt`` (snapshots at its grid points), backs it up to host and
    writes it on to L3; returns the closed cache."""
    c, pools = _cache(store, pp, g=g)
    pools, batch = c.admit(pools, [prompt], gen, salts=[salt])
    (req,) = batch.requests
    pools, _ = _forward(c, pools, req, prompt.size)
    for i in range(gen - 1):
        pools, _ = _forward(c, pools, req, prompt.size + i + 1)
    c.insert(pools, req, np.concatenate([prompt, _tokens(99, gen - 1)]))
    c.release(req)
    c.close()  # every backup lands, every L3 write finishes
    return c


def _state_values(cache, pools, slot):
    """Per stage and state kind, the distinct values of the slot's real layers."""
    out = set()
    for kind in STATES:
        arr = np.asarray(pools[kind])
        for r, m in enumerate(cache.layer_maps):
            n = m.num_layers_of(kind)
            if n:
                out |= set(np.unique(arr[r, :n, slot]).tolist())
    return out


def _admit(store, tokens, pp=2, salt=None, **kw):
    """Instance B (empty tree, zeroed pools) admits ``tokens``; ``(cache, pools, req)``."""
    c, pools = _cache(store, pp, **kw)
    pools, batch = c.admit(pools, [tokens], 2, salts=[salt])
    batch.wait()
    return c, pools, batch.requests[0]


def _state_files(root):
    return sorted(p for p in root.rglob("*") if p.is_file() and "/state/" in str(p))


def _state_key(cache, r, tokens, end, salt=None):
    """The key of the snapshot object at ``end`` tokens on stage ``r``."""
    h = page_hashes(tokens[:end], PAGE, salt=salt)[end // PAGE - 1]
    return object_key(cache.l3.namespaces[r], PageSpace.STATE, h)


@pytest.mark.parametrize("pp", [1, 2])
def test_second_instance_serves_the_prefix_and_the_exact_state(tmp_path, pp):
    store = FileBackend(tmp_path)
    prompt = _tokens(0, 70)  # snapshot at 64
    a = _write(store, prompt, pp=pp)
    assert a.stats()["storage_backed_up_pages"] > 0
    follow = np.concatenate([prompt, _tokens(1, 20)])
    c, pools, req = _admit(store, follow, pp=pp)
    assert (req.device_hit_tokens, req.host_hit_tokens, req.storage_hit_tokens) == (0, 0, 64)
    assert req.cached_tokens == req.state_pos == 64 and req.state_read in req.state_owned
    assert _state_values(c, pools, req.state_read) == {64.0}  # every stage, layer, kind
    pools, plan = _forward(c, pools, req, follow.size)  # asserts it read the state at 64
    assert plan.start == 64
    c.insert(pools, req, follow)
    c.release(req)
    c.check_invariants()
    # the fetched snapshot went to the tree with the pages: the next request hits on device
    again = np.concatenate([prompt[:64], _tokens(2, 10)])
    pools, batch = c.admit(pools, [again], 2)
    assert batch.requests[0].device_hit_tokens == 64
    c.release(batch.requests[0])
    c.check_invariants()
    c.flush(pools)  # frees every slot: nothing left anywhere
    c.close()


def test_one_object_per_snapshot_per_stage_keyed_by_the_page_ending_there(tmp_path):
    store = FileBackend(tmp_path)
    prompt = _tokens(3, 40)
    a = _write(store, prompt, gen=60)  # snapshots at 32 (prefill), 64 and 96 (decode)
    keys = {str(p.relative_to(tmp_path)) for p in _state_files(tmp_path)}
    history = np.concatenate([prompt, _tokens(99, 59)])
    want = {_state_key(a, r, history, e) for e in (32, 64, 96) for r in (0, 1)}
    assert keys == want  # 3 snapshots x 2 stages, each under the hash of page e/16 - 1
    _write(store, prompt, gen=60)  # the same snapshots again: nothing new
    assert len(_state_files(tmp_path)) == 6


def _delete(store, cache, r, tokens, end):
    ns = cache.l3.namespaces[r]
    h = page_hashes(tokens[:end], PAGE)[end // PAGE - 1]
    assert store.delete(ns, PageSpace.STATE, [h]) == 1


def test_a_missing_state_object_moves_the_hit_to_the_previous_grid_point(tmp_path):
    store = FileBackend(tmp_path)
    prompt = _tokens(4, 40)
    a = _write(store, prompt, gen=60)  # objects at 32, 64, 96 on both stages
    history = np.concatenate([prompt, _tokens(99, 59)])
    follow = np.concatenate([history, _tokens(5, 9)])
    for end, stage, want in ((96, 1, 64), (64, 0, 32), (32, 1, 0)):
        _delete(store, a, stage, history, end)  # gone from ONE stage: not a hit there
        c, pools, req = _admit(store, follow)
        assert req.cached_tokens == req.storage_hit_tokens == want, end
        if want:
            assert req.state_pos == want and _state_values(c, pools, req.state_read) == {want}
        else:
            assert req.state_read == -1 and req.state_pos == 0  # the zero state
        pools, _ = _forward(c, pools, req, follow.size)
        c.release(req)
        c.check_invariants()
        c.close()


def _corrupt(path, how, donor):
    data = bytearray(path.read_bytes())
    if how == "corrupt":
        data[-1] ^= 0xFF
    elif how == "truncated":
        data = data[:-8]
    else:  # foreign: another snapshot's object under this key
        data = bytearray(donor.read_bytes())
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["corrupt", "truncated", "foreign"])
def test_a_bad_state_object_is_never_a_wrong_state(tmp_path, how):
    store = FileBackend(tmp_path)
    prompt = _tokens(6, 70)
    a = _write(store, prompt, gen=30)  # snapshots at 64 and 96
    history = np.concatenate([prompt, _tokens(99, 29)])
    bad = tmp_path / _state_key(a, 1, history, 96)
    _corrupt(bad, how, donor=tmp_path / _state_key(a, 1, history, 64))
    follow = np.concatenate([history, _tokens(7, 5)])
    c, pools, req = _admit(store, follow)
    # the object exists, so the hit ends at 96; its fetch fails verification: a miss
    assert req.cached_tokens == 0 and req.state_read == -1
    assert c.stats()["l3_integrity_failures_total"] >= 1
    pools, _ = _forward(c, pools, req, follow.size)
    c.release(req)
    c.check_invariants()
    c.close()
    assert not bad.exists()  # deleted as corrupt: the next lookup falls back to 64
    c, pools, req = _admit(store, follow)
    assert req.storage_hit_tokens == 64 and _state_values(c, pools, req.state_read) == {64.0}
    c.release(req)
    c.check_invariants()
    c.close()


def test_salts_separate_tenants(tmp_path):
    store = FileBackend(tmp_path)
    prompt = _tokens(8, 70)
    _write(store, prompt, salt="tenant-a")
    follow = np.concatenate([prompt, _tokens(9, 5)])
    for salt, want in (("tenant-b", 0), (None, 0), ("tenant-a", 64)):
        c, pools, req = _admit(store, follow, salt=salt)
        assert req.cached_tokens == want, salt
        if want:
            assert _state_values(c, pools, req.state_read) == {64.0}
        c.release(req)
        c.close()


def test_host_snapshot_slots_are_made_by_lru_eviction(tmp_path):
    store = FileBackend(tmp_path)
    prompts = [_tokens(10 + i, 70) for i in range(2)]
    for p in prompts:
        _write(store, p, gen=1)
    c, pools = _cache(store, device_state_slots=3, host_state_slots=3)
    pools, _ = _serve(c, pools, _tokens(12, 40), gen=30)  # snapshots at 32 and 64
    pools, _ = _serve(c, pools, _tokens(13, 70), gen=1)  # and one at 64
    c.poll(wait=True)
    assert c.tree.states is not None and len(c.tree.states.host) == 3  # every host slot
    for p in prompts:  # each L3 snapshot needs a host slot: the LRU host snapshot goes
        follow = np.concatenate([p, _tokens(20, 5)])
        pools, batch = c.admit(pools, [follow], 2)
        (req,) = batch.requests
        batch.wait()
        assert req.storage_hit_tokens == 64
        assert _state_values(c, pools, req.state_read) == {64.0}
        pools, _ = _forward(c, pools, req, follow.size)
        c.insert(pools, req, follow)
        c.release(req)
        c.poll(wait=True)
        c.check_invariants()
    c.flush(pools)
    c.close()


def test_a_prefetch_not_taken_falls_back_to_the_trees_hit(tmp_path):
    inner = FileBackend(tmp_path)
    prompt = _tokens(30, 70)
    _write(inner, prompt, gen=30, pp=1)  # L3: snapshots at 64 and 96
    store = _Slow(inner, 0.1)
    c, pools = _cache(store, pp=1, policy=PrefetchPolicy.BEST_EFFORT)
    pools, _ = _serve(c, pools, prompt[:40], gen=1)  # the tree: a snapshot at 32
    history = np.concatenate([prompt, _tokens(99, 29)])
    follow = np.concatenate([history, _tokens(31, 5)])
    pools, batch = c.admit(pools, [follow], 2)
    (req,) = batch.requests
    batch.wait()
    assert req.cached_tokens == req.device_hit_tokens == 32 and req.storage_hit_tokens == 0
    pools, _ = _forward(c, pools, req, follow.size)  # reads the tree's state at 32
    c.release(req)
    c.poll(wait=True)  # the prefetch lands; nobody claims it (the match ends elsewhere)
    c.check_invariants()
    c.flush(pools)
    c.close()


def test_tp_split_state_objects_hold_their_ranks_rows(tmp_path):
    maps = build_layer_maps(SPEC, 1, None)
    host = HostPools(SPEC, maps, 4, 0, num_state_slots=2)
    for kind in STATES:  # slot 0: distinct values everywhere; slot 1: zeros
        slab = host.slab(0, kind)
        slab[0] = np.arange(slab[0].size).reshape(slab[0].shape) % 251
    store = FileBackend(tmp_path)
    hs = page_hashes(_tokens(40, PAGE), PAGE)
    spaces = [
        Namespace.for_stage(SPEC, maps[0], model_id="m", tp_rank=r, tp_size=2) for r in (0, 1)
    ]
    for r, ns in enumerate(spaces):
        assert ns.unit_is_sharded(PageSpace.STATE)
        assert store.put(ns, PageSpace.STATE, hs, host, 0, [0]).all()
        assert f"/tp-{r}-of-2/state/" in object_key(ns, PageSpace.STATE, hs[0])
    assert len(_state_files(tmp_path)) == 2  # one object per TP rank
    assert store.get(spaces[0], PageSpace.STATE, hs, host, 0, [1]).all()
    for kind in STATES:  # rank 0's half of the split axis (0): the rest still zero
        slab, axis = host.slab(0, kind), kind.tp_axis
        assert axis == 0
        half = SPEC.row_shape(kind)[0] // 2
        np.testing.assert_array_equal(slab[1][:, :half], slab[0][:, :half])
        assert not slab[1][:, half:].any()
    assert store.get(spaces[1], PageSpace.STATE, hs, host, 0, [1]).all()
    for kind in STATES:
        np.testing.assert_array_equal(host.slab(0, kind)[1], host.slab(0, kind)[0])


def test_objects_of_several_pages_serve_the_prefix_and_the_state_at_a_grid_point(tmp_path):
    """``pages_per_object=3`` (48-token groups) on a 32-token snapshot grid. A1 serves 70
    tokens (group of pages 0-2, snapshot at 64), A2 96 + 4 (groups 0-2 and 3-5, snapshot
    at 96), then the objects of the snapshot at 96 are lost: B's hit is 64, the last
    grid point with a snapshot inside present groups; both groups are fetched whole
    (pages 4-5 into scratch slots the claim frees) with the exact state at 64."""
    store = FileBackend(tmp_path)
    prompt = _tokens(0, 100)
    _write(store, prompt[:70], g=3)
    a2 = _write(store, prompt, g=3)
    for r in range(2):
        (tmp_path / _state_key(a2, r, prompt, 96)).unlink()
    follow = np.concatenate([prompt, _tokens(1, 20)])
    c, pools, req = _admit(store, follow, g=3)
    assert (req.device_hit_tokens, req.host_hit_tokens, req.storage_hit_tokens) == (0, 0, 64)
    assert req.state_pos == 64 and _state_values(c, pools, req.state_read) == {64.0}
    assert c.l3.in_flight()[PageSpace.FULL] == 0  # the scratch slots went back at the claim
    pools, plan = _forward(c, pools, req, follow.size)  # asserts it read the state at 64
    assert plan.start == 64
    c.insert(pools, req, follow)
    c.release(req)
    c.check_invariants()
    c.close()
