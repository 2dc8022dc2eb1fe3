"""Recurrent-state snapshot slots in device pools and host slabs: their own id space,
sized separately from the page spaces, split over 'tp' along ``PoolKind.tp_axis``."""

from __future__ import annotations

import numpy as np
import pytest

from jaxhicache.layer_map import build_layer_maps
from jaxhicache.mesh import make_mesh
from jaxhicache.pools.device import allocate_device_pools, device_bytes_per_stage
from jaxhicache.pools.host import HostPools
from jaxhicache.spec import ModelCacheSpec, PageSpace, PoolKind

SPEC = ModelCacheSpec.tiny_hybrid()  # 8 layers: 6 linear, attention at 3 and 7
CONV, REC, KV = PoolKind.CONV_STATE, PoolKind.RECURRENT_STATE, PoolKind.FULL_KV


def test_device_pools_hold_snapshot_slots_split_over_tp():
    maps = build_layer_maps(SPEC, 2)
    pools = allocate_device_pools(SPEC, make_mesh(2, 2), maps, 12, num_state_slots=5)
    assert pools.num_state_slots == 5
    assert pools[REC].shape == (2, 3, 5, 4, 16, 16) and pools[REC].dtype == np.float32
    assert pools[CONV].shape == (2, 3, 5, 2 * 2 * 16 + 4 * 16, 3)
    assert pools[KV].shape == (2, 1, 12, 2, 16, 2, 16)
    # each device holds its stage and its TP rank's half of the value heads
    shard = pools[REC].addressable_shards[0]
    assert shard.data.shape == (1, 3, 5, 2, 16, 16)
    per = device_bytes_per_stage(SPEC, maps, 12, 0, 5)
    assert per == [12 * SPEC.page_bytes(maps[0]) + 5 * SPEC.snapshot_bytes(maps[0])] * 2
    with pytest.raises(ValueError, match="num_state_slots must be >= 1"):
        allocate_device_pools(SPEC, make_mesh(2, 1), maps, 12)


def test_host_slabs_hold_snapshot_slots_once_per_stage():
    maps = build_layer_maps(SPEC, 2)
    host = HostPools(SPEC, maps, 8, num_state_slots=3, reserve_bytes=0)
    assert host.pages_of(PageSpace.STATE) == 3 and host.pages_of(PageSpace.FULL) == 8
    assert host.slab(1, REC).shape == (3, 3, 4, 16, 16)
    assert sum(host.nbytes_per_stage()) == 8 * SPEC.page_bytes() + 3 * SPEC.snapshot_bytes()
    scaled = HostPools.from_ratio(SPEC, maps, 8, 0, 2.0, device_state_slots=3, reserve_bytes=0)
    assert scaled.num_state_slots == 6 and scaled.num_pages == 16
    with pytest.raises(ValueError, match="host num_state_slots must be >= 1"):
        HostPools(SPEC, maps, 8, reserve_bytes=0)


@pytest.mark.parametrize("path", ["direct", "staged"])
def test_snapshot_slots_round_trip_through_host_with_the_kv_pages(path):
    import jax
    import jax.numpy as jnp

    from jaxhicache.transfer import CopyPath, PageMove, TransferEngine

    maps = build_layer_maps(SPEC, 2, [3, 5])  # uneven: 2 + 4 linear layers
    mesh = make_mesh(2, 2)  # recurrent states split over 'tp', conv channels too
    pools = allocate_device_pools(SPEC, mesh, maps, 6, num_state_slots=4)
    rng = np.random.default_rng(0)
    pools = pools.replace(
        arrays={
            k: jax.device_put(jnp.asarray(rng.standard_normal(a.shape).astype(a.dtype)), a.sharding)
            for k, a in pools.arrays.items()
        }
    )
    before = {k: np.asarray(a) for k, a in pools.arrays.items()}
    host = HostPools(SPEC, maps, 8, num_state_slots=3, reserve_bytes=0)
    eng = TransferEngine(mesh, maps, host, copy_path=CopyPath(path))
    # one backup: KV pages 1, 4 and snapshot slots 3, 0 -> host slots 2, 1
    assert eng.backup(
        pools, PageMove.of([1, 4], [0, 5], state_device=[3, 0], state_host=[2, 1])
    ).wait()
    fresh = allocate_device_pools(SPEC, mesh, maps, 6, num_state_slots=4)
    loaded, handle = eng.load(fresh, PageMove.of([2], [5], state_device=[1], state_host=[2]))
    handle.wait()
    for kind in (CONV, REC):
        got, want = np.asarray(loaded[kind]), before[kind]
        for r, m in enumerate(maps):
            n = m.num_layers_of(kind)
            np.testing.assert_array_equal(got[r, :n, 1], want[r, :n, 3], err_msg=f"{kind} {r}")
        assert not got[:, :, [0, 2, 3]].any()  # other slots untouched
    assert [m.num_layers_of(KV) for m in maps] == [0, 2]  # stage 0 has no attention layer
    np.testing.assert_array_equal(np.asarray(loaded[KV])[1, :, 2], before[KV][1, :, 4])
    eng.close()
