"""Device pools: shapes from the spec, P('pp', ...) shardings, per-device stage slices."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxhicache.layer_map import build_layer_maps, stack_layer_maps
from jaxhicache.mesh import make_mesh, pool_partition_spec, pool_sharding
from jaxhicache.pools.device import (
    DevicePools,
    allocate_device_pools,
    device_bytes_per_stage,
    pool_shape,
)
from jaxhicache.spec import ModelCacheSpec, PageSpace, PoolKind

MINI = ModelCacheSpec.tiny_dsv4(num_layers=9)


@pytest.mark.parametrize("pp", [2, 4])
def test_dsv4_pools_sharded_by_stage(pp):
    tp = 8 // pp
    maps = build_layer_maps(MINI, pp)
    stacked = stack_layer_maps(maps)
    mesh = make_mesh(pp, tp)
    pools = allocate_device_pools(MINI, mesh, maps, num_pages=6, num_swa_pages=3)
    assert isinstance(pools, DevicePools)
    assert set(pools.kinds()) == set(MINI.kinds())
    for kind in MINI.kinds():
        arr = pools[kind]
        pages = 6 if kind.page_space is PageSpace.FULL else 3
        max_layers = max(m.num_layers_of(kind) for m in maps)
        assert arr.shape == (pp, max_layers, pages, *MINI.row_shape(kind))
        assert arr.shape == pool_shape(MINI, stacked, kind, 6, 3)
        assert arr.dtype == MINI.row_dtype(kind)
        assert arr.sharding.spec == P("pp", None, None, None, None)
        # each device holds exactly its stage's slice, replicated over 'tp'
        for shard in arr.addressable_shards:
            assert shard.data.shape == (1, max_layers, pages, *MINI.row_shape(kind))
            stage = shard.index[0].start
            assert shard.device in mesh.devices[stage].tolist()
        assert len({s.device for s in arr.addressable_shards}) == 8


def test_mha_heads_shard_over_tp():
    spec = ModelCacheSpec.mha(
        num_layers=6, num_kv_heads=4, head_dim=8, page_size=4, dtype="bfloat16"
    )
    maps = build_layer_maps(spec, 2)
    mesh = make_mesh(2, 4)
    pools = allocate_device_pools(spec, mesh, maps, num_pages=5)
    arr = pools[PoolKind.FULL_KV]
    assert arr.shape == (2, 3, 5, 2, 4, 4, 8)
    assert arr.sharding.spec == P("pp", None, None, None, None, "tp", None)
    assert {s.data.shape for s in arr.addressable_shards} == {(1, 3, 5, 2, 4, 1, 8)}
    with pytest.raises(ValueError, match="not divisible by tp=3"):
        pool_partition_spec(spec, PoolKind.FULL_KV, tp=3)


def test_dsv4_kv_replicated_over_tp():
    assert pool_partition_spec(MINI, PoolKind.SWA_KV, tp=4) == P("pp", None, None, None, None)


def test_pools_are_created_on_device_without_host_roundtrip():
    """Allocation makes no host->device or device->device copy: the zeros are produced
    by one compiled program directly into their ``P('pp', ...)`` shards.

    ``jax.transfer_guard("disallow_explicit")`` turns every such transfer into an
    error, explicit ``device_put`` included, so building the zeros on the host (or on
    one device) and moving them fails here.
    """
    maps = build_layer_maps(MINI, 2)
    mesh = make_mesh(2, 4)
    # the guard really detects a host round trip in this environment (the control)
    kind = PoolKind.SWA_KV
    host_zeros = np.zeros(pool_shape(MINI, stack_layer_maps(maps), kind, 4, 2), np.float32)
    with (
        jax.transfer_guard("disallow_explicit"),
        pytest.raises(jax.errors.JaxRuntimeError, match="Disallowed host-to-device transfer"),
    ):
        jax.block_until_ready(jax.device_put(host_zeros, pool_sharding(MINI, mesh, kind)))
    for _ in range(2):  # first call (trace + compile) and a cached call
        with jax.transfer_guard("disallow_explicit"):
            pools = allocate_device_pools(MINI, mesh, maps, 4, 2)
            jax.block_until_ready(pools.arrays)
    for kind, arr in pools.arrays.items():
        assert arr.committed
        assert arr.sharding == pool_sharding(MINI, mesh, kind), kind
        assert len(arr.addressable_shards) == 8
        for shard in arr.addressable_shards:
            assert not np.asarray(shard.data).any()


def test_flash_device_budget_per_stage():
    spec = ModelCacheSpec.deepseek_v4_flash()
    maps = build_layer_maps(spec, 2)
    exact = device_bytes_per_stage(spec, maps, num_pages=10, num_swa_pages=4, padded=False)
    for m, got in zip(maps, exact, strict=True):
        want = 0
        for kind in spec.kinds():
            pages = 10 if kind.page_space is PageSpace.FULL else 4
            want += m.num_layers_of(kind) * pages * spec.row_bytes(kind)
        assert got == want
    padded = device_bytes_per_stage(spec, maps, num_pages=10, num_swa_pages=4)
    assert padded[0] == padded[1] >= max(exact)
    # full pages only: stage budgets add up to the whole-model page size
    full_only = sum(
        m.num_layers_of(k) * spec.row_bytes(k)
        for m in maps
        for k in spec.kinds()
        if k.page_space is PageSpace.FULL
    )
    swa_only = spec.page_bytes() - full_only
    assert sum(exact) == 10 * full_only + 4 * swa_only
    assert sum(spec.page_bytes(m) for m in maps) == spec.page_bytes() == 9_158_208


def test_bad_pool_requests():
    maps = build_layer_maps(MINI, 2)
    with pytest.raises(ValueError, match="num_pages must be >= 1, got 0"):
        allocate_device_pools(MINI, make_mesh(2), maps, 0, 2)
    with pytest.raises(ValueError, match="num_swa_pages must be >= 1"):
        allocate_device_pools(MINI, make_mesh(2), maps, 4, 0)
    with pytest.raises(ValueError, match="mesh has pp=4"):
        allocate_device_pools(MINI, make_mesh(4), maps, 4, 2)
    pools = allocate_device_pools(MINI, make_mesh(2), maps, 4, 2)
    with pytest.raises(ValueError, match="full_kv"):
        pools[PoolKind.FULL_KV]
    with pytest.raises(ValueError, match="exceeds"):
        make_mesh(4, 4)
    np.testing.assert_array_equal(np.asarray(pools[PoolKind.SWA_KV]), 0)
