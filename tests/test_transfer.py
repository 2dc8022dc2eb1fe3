"""Transfer engine and host slabs: D2H/H2D round trips for every sub-pool on PP 1, 2, 4.

Every round-trip, stale-generation and per-layer test runs on both copy paths:
STAGED (gather kernel -> pinned host -> slab, the GPU path, run here on CPU) and
DIRECT (rows copied straight between pool buffers and slabs, CPU only).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxhicache.layer_map import build_layer_maps
from jaxhicache.mesh import make_mesh
from jaxhicache.pools.device import allocate_device_pools
from jaxhicache.pools.host import HostPools
from jaxhicache.spec import ModelCacheSpec, PageSpace, PoolKind
from jaxhicache.transfer import CopyPath, PageMove, TransferEngine
from jaxhicache.transfer.strategy import resolve_copy_path
from kernels_pallas.common import Layout

MINI = ModelCacheSpec.tiny_dsv4(num_layers=7)  # 7 layers: uneven stages on PP 2 and 4
PATHS = [CopyPath.STAGED, CopyPath.DIRECT]


def _random_pools(spec, mesh, maps, pages, swa_pages, seed=0):
    pools = allocate_device_pools(spec, mesh, maps, pages, swa_pages)
    rng = np.random.default_rng(seed)
    arrays = {}
    for k, a in pools.arrays.items():
        data = rng.standard_normal(a.shape).astype(np.float32).astype(a.dtype)
        arrays[k] = jax.device_put(jnp.asarray(data), a.sharding)
    return pools.replace(arrays=arrays)


def _check_pages(spec, maps, got, want, dst, src):
    """got[kind][r, :nk, dst[space]] == want[kind][r, :nk, src[space]] for every stage."""
    for kind in spec.kinds():
        g, w = np.asarray(got[kind]), np.asarray(want[kind])
        d, s = dst[kind.page_space], src[kind.page_space]
        for r, m in enumerate(maps):
            nk = m.num_layers_of(kind)
            np.testing.assert_array_equal(g[r, :nk, d], w[r, :nk, s], err_msg=f"{kind} stage {r}")


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.value)
@pytest.mark.parametrize(
    "pp,layout",
    [
        (1, Layout.PAGE_FIRST),
        (2, Layout.PAGE_FIRST),
        (4, Layout.PAGE_FIRST),
        (2, Layout.LAYER_FIRST),
    ],
)
def test_round_trip_bit_exact_every_subpool(pp, layout, path):
    maps = build_layer_maps(MINI, pp)
    mesh = make_mesh(pp, 8 // pp)
    pools = _random_pools(MINI, mesh, maps, pages=8, swa_pages=6)
    before = {k: np.asarray(a) for k, a in pools.arrays.items()}
    host = HostPools(MINI, maps, num_pages=10, num_swa_pages=7, layout=layout)
    eng = TransferEngine(mesh, maps, host, copy_path=path)
    assert eng.copy_path is path
    up = PageMove.of([5, 1, 2], [9, 0, 3], [4, 2], [6, 1])
    assert eng.backup(pools, up).wait() > 0
    # the slabs hold exactly the stage's own layers
    for r, m in enumerate(maps):
        got = host.read(r, PoolKind.SWA_KV, np.array([6]))  # SWA device page 4 -> host 6
        np.testing.assert_array_equal(
            got[0], before[PoolKind.SWA_KV][r, : m.num_layers_of(PoolKind.SWA_KV), 4]
        )
    # load into a fresh pool at other device pages; untouched pages stay zero
    fresh = allocate_device_pools(MINI, mesh, maps, 8, 6)
    down = PageMove.of([0, 3, 7], [9, 0, 3], [0, 5], [6, 1])
    loaded, handle = eng.load(fresh, down)
    handle.wait()
    dst = {PageSpace.FULL: [0, 3, 7], PageSpace.SWA: [0, 5]}
    src = {PageSpace.FULL: [5, 1, 2], PageSpace.SWA: [4, 2]}
    _check_pages(MINI, maps, loaded.arrays, before, dst, src)
    for kind in MINI.kinds():
        a = np.asarray(loaded[kind])
        untouched = np.setdiff1d(np.arange(a.shape[2]), dst[kind.page_space])
        assert not a[:, :, untouched].any(), kind
    assert eng.stats.backup_bytes == eng.stats.load_bytes
    eng.close()


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.value)
@pytest.mark.parametrize("pp", [2, 4])
def test_layerwise_load_waits_per_layer(pp, path):
    maps = build_layer_maps(MINI, pp)
    mesh = make_mesh(pp, 1)
    pools = _random_pools(MINI, mesh, maps, 4, 4, seed=1)
    before = {k: np.asarray(a) for k, a in pools.arrays.items()}
    host = HostPools(MINI, maps, 4, 4)
    eng = TransferEngine(mesh, maps, host, copy_path=path)
    eng.backup(pools, PageMove.of([0, 1, 2, 3], [3, 2, 1, 0], [0, 1], [1, 0])).wait()
    fresh = allocate_device_pools(MINI, mesh, maps, 4, 4)
    down = PageMove.of([1, 2], [3, 2], [2], [1])  # host 3,2 hold device pages 0,1
    out, handle = eng.load_layerwise(fresh, down)
    for lyr in range(max(m.num_local_layers for m in maps)):
        handle.wait(lyr)
    handle.wait()
    _check_pages(
        MINI,
        maps,
        out.arrays,
        before,
        {PageSpace.FULL: [1, 2], PageSpace.SWA: [2]},
        {PageSpace.FULL: [0, 1], PageSpace.SWA: [0]},
    )
    # one stage-local layer only: other layers stay untouched
    single, h = eng.load(allocate_device_pools(MINI, mesh, maps, 4, 4), down, layer=0)
    h.wait(0)
    swa = np.asarray(single[PoolKind.SWA_KV])
    for r in range(pp):
        np.testing.assert_array_equal(swa[r, 0, 2], before[PoolKind.SWA_KV][r, 0, 0])
        assert not swa[r, 1:].any()
    with pytest.raises(ValueError, match="was not part of this load"):
        h.wait(1)
    with pytest.raises(ValueError, match="stage-local layer 99"):
        eng.load(single, down, layer=99)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.value)
def test_mha_round_trip_with_tp_sharded_heads(path):
    spec = ModelCacheSpec.mha(
        num_layers=5, num_kv_heads=4, head_dim=8, page_size=4, dtype="bfloat16"
    )
    maps = build_layer_maps(spec, 2)
    mesh = make_mesh(2, 4)
    pools = _random_pools(spec, mesh, maps, 6, 0, seed=2)
    before = {k: np.asarray(a) for k, a in pools.arrays.items()}
    eng = TransferEngine(mesh, maps, HostPools(spec, maps, 5), copy_path=path)
    eng.backup(pools, PageMove.of([4, 0], [1, 2])).wait()
    out, h = eng.load(allocate_device_pools(spec, mesh, maps, 6), PageMove.of([2, 3], [1, 2]))
    h.wait()
    _check_pages(spec, maps, out.arrays, before, {PageSpace.FULL: [2, 3]}, {PageSpace.FULL: [4, 0]})
    assert out[PoolKind.FULL_KV].sharding == pools[PoolKind.FULL_KV].sharding


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.value)
def test_stale_host_pages_are_not_written(path):
    maps = build_layer_maps(MINI, 2)
    mesh = make_mesh(2, 1)
    pools = _random_pools(MINI, mesh, maps, 4, 4)
    host = HostPools(MINI, maps, 4, 4)
    stale = {PageSpace.FULL: {2}}

    def is_current(space, ids, gens):
        return np.array([i not in stale.get(space, set()) for i in ids])

    eng = TransferEngine(mesh, maps, host, host_is_current=is_current, copy_path=path)
    gens = {PageSpace.FULL: np.zeros(2, np.uint32), PageSpace.SWA: np.zeros(1, np.uint32)}
    eng.backup(pools, PageMove.of([0, 1], [1, 2], [3], [0]), host_generations=gens).wait()
    assert eng.stats.stale_rows_skipped == 1
    assert not host.slab(0, PoolKind.C4_KV)[2].any()  # reallocated page: untouched
    assert host.slab(0, PoolKind.C4_KV)[1].any()


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.value)
def test_invalid_ids_raise_before_any_kernel(path):
    maps = build_layer_maps(MINI, 2)
    mesh = make_mesh(2, 1)
    pools = allocate_device_pools(MINI, mesh, maps, 4, 4)
    eng = TransferEngine(mesh, maps, HostPools(MINI, maps, 4, 4), copy_path=path)
    with pytest.raises(ValueError, match=r"out of range \[0, 4\): \[4\]"):
        eng.backup(pools, PageMove.of([4], [0]))
    with pytest.raises(ValueError, match=r"out of range \[0, 4\): \[7\]"):
        eng.backup(pools, PageMove.of([0], [7]))
    with pytest.raises(ValueError, match=r"duplicate page ids in scatter: \[1\]"):
        eng.load(pools, PageMove.of([1, 1], [0, 2]))
    with pytest.raises(ValueError, match=r"duplicate page ids in scatter: \[1\]"):
        eng.prepare_layerwise(pools, PageMove.of([1, 1], [0, 2]))
    with pytest.raises(ValueError, match=r"out of range \[0, 4\): \[9\]"):
        eng.load(pools, PageMove.of([1], [9]), layer=0)
    with pytest.raises(ValueError, match="2 full device ids but 1 full host ids"):
        PageMove.of([1, 2], [0])
    assert eng.prepare_layerwise(pools, PageMove.of()) is None


def test_host_pool_sizing():
    spec = ModelCacheSpec.deepseek_v4_flash()
    maps = build_layer_maps(spec, 4)
    per_page = max(spec.page_bytes(m) for m in maps)
    host = HostPools.from_bytes(spec, maps, 3 * per_page + 10)
    assert host.num_pages == 3 and host.num_swa_pages == 3  # the minimum over stages
    assert max(host.nbytes_per_stage()) <= 3 * per_page
    assert host.nbytes_per_stage() == [3 * spec.page_bytes(m) for m in maps]
    small = ModelCacheSpec.tiny_dsv4()
    smaps = build_layer_maps(small, 2)
    r = HostPools.from_ratio(small, smaps, device_pages=10, device_swa_pages=4, ratio=2.5)
    assert (r.num_pages, r.num_swa_pages) == (25, 10)
    with pytest.raises(ValueError, match="hold no page"):
        HostPools.from_bytes(spec, maps, per_page - 1)
    with pytest.raises(ValueError, match="are available after a reserve"):
        HostPools(spec, maps, num_pages=10**6, num_swa_pages=10**6)
    with pytest.raises(ValueError, match="host ratio must be > 0"):
        HostPools.from_ratio(small, smaps, 10, 4, 0)


@pytest.mark.parametrize(
    "spec",
    [MINI, ModelCacheSpec.mha(4, 4, 8, 4, dtype="bfloat16")],
    ids=["dsv4-mini", "mha-bf16"],
)
def test_engine_programs_lower_for_cuda_with_triton(spec):
    """The engine's shard_map gather / scatter / per-layer load (pinned-host rows moved
    to the device inside the program) with the Triton backend go through the real
    Pallas -> Triton lowering (no GPU needed)."""
    from kernels_pallas.common import Backend

    maps = build_layer_maps(spec, 2)
    mesh = make_mesh(2, 2)
    swa = 4 if spec.is_dsv4 else 0
    pools = allocate_device_pools(spec, mesh, maps, 8, swa)
    host = HostPools(spec, maps, 8, swa)
    eng = TransferEngine(mesh, maps, host, backend=Backend.TRITON, copy_path=CopyPath.STAGED)
    ids = {PageSpace.FULL: jnp.zeros(4, jnp.int32), PageSpace.SWA: jnp.zeros(2, jnp.int32)}
    progs = eng.programs
    staging = jax.eval_shape(progs.gather_all, pools.arrays, ids)
    lw = eng.prepare_layerwise(
        pools, PageMove.of([1, 2], [3, 4], [0] if swa else (), [1] if swa else ())
    )
    assert all(a.sharding.memory_kind == "pinned_host" for a in lw.rows.values())
    lowered = [
        progs.gather_all.trace(pools.arrays, ids),
        progs.scatter_all.trace(pools.arrays, ids, staging),
        progs.layer_load.trace(pools.arrays, lw, jnp.int32(1)),
    ]
    for traced in lowered:
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
        assert "triton" in text.lower()
    assert (
        'mhlo.memory_kind = "pinned_host"'
        in lowered[-1].lower(lowering_platforms=("cuda",)).as_text()
    )
    eng.close()


def _rows_where_loaded(spec, maps, out, before, dst, src, layer):
    """Per stage and kind: sub-pool row ``k = local_to_subpool[kind][layer]`` holds the
    loaded pages, every other row of the pool is untouched (zero)."""
    checked = 0
    for kind in spec.kinds():
        got, want = np.asarray(out[kind]), before[kind]
        d, s_ = dst[kind.page_space], src[kind.page_space]
        for r, m in enumerate(maps):
            k = int(m.local_to_subpool(kind)[layer]) if layer < m.num_local_layers else -1
            other = [j for j in range(got.shape[1]) if j != k]
            assert not got[r, other].any(), f"{kind} stage {r}: rows {other} written"
            if k >= 0:
                np.testing.assert_array_equal(
                    got[r, k][d], want[r, k][s_], err_msg=f"{kind} stage {r} layer {layer}"
                )
                untouched = np.setdiff1d(np.arange(got.shape[2]), d)
                assert not got[r, k][untouched].any()
                checked += 1
    return checked


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.value)
@pytest.mark.parametrize("pp,partition", [(2, [2, 5]), (4, [1, 2, 3, 1])], ids=["pp2", "pp4"])
def test_per_layer_load_writes_the_subpool_row_of_that_layer(pp, partition, path):
    """``load(layer=l)`` writes, on every stage, row ``k = local_to_subpool[kind][l]``
    of each sub-pool (the sub-pool id, never the stage-local id ``l``), and nothing
    else. Uneven partitions make ``k != l`` on most stages and kinds."""
    maps = build_layer_maps(MINI, pp, partition)
    mesh = make_mesh(pp, 1)
    pools = _random_pools(MINI, mesh, maps, 6, 4, seed=3)
    before = {k: np.asarray(a) for k, a in pools.arrays.items()}
    host = HostPools(MINI, maps, 6, 4)
    eng = TransferEngine(mesh, maps, host, copy_path=path)
    eng.backup(
        pools, PageMove.of([0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [0, 1, 2], [2, 1, 0])
    ).wait()
    down = PageMove.of([2, 4], [5, 3], [3], [1])  # host 5, 3 hold device pages 0, 2; SWA 1 <- 1
    dst = {PageSpace.FULL: [2, 4], PageSpace.SWA: [3]}
    src = {PageSpace.FULL: [0, 2], PageSpace.SWA: [1]}
    differs = 0
    for layer in range(max(m.num_local_layers for m in maps)):
        out, h = eng.load(allocate_device_pools(MINI, mesh, maps, 6, 4), down, layer=layer)
        h.wait(layer)
        differs += _rows_where_loaded(MINI, maps, out.arrays, before, dst, src, layer)
    assert differs > 0
    # the partition really separates the index spaces: some (stage, kind, layer) has k != l
    assert any(
        0 <= m.local_to_subpool(k)[lyr] != lyr
        for m in maps
        for k in MINI.kinds()
        for lyr in range(m.num_local_layers)
    )
    eng.close()


def test_copy_path_follows_the_mesh_platform():
    maps = build_layer_maps(MINI, 2)
    mesh = make_mesh(2, 1)
    host = HostPools(MINI, maps, 4, 4)
    assert TransferEngine(mesh, maps, host).copy_path is CopyPath.DIRECT  # CPU mesh
    assert TransferEngine(mesh, maps, host, copy_path="staged").copy_path is CopyPath.STAGED

    gpu = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H200")
    fake = types.SimpleNamespace(devices=np.array([gpu, gpu]))
    assert resolve_copy_path(fake, None) is CopyPath.STAGED
    assert resolve_copy_path(fake, CopyPath.STAGED) is CopyPath.STAGED
    with pytest.raises(ValueError, match=r"DIRECT needs a CPU mesh.*gpu \(NVIDIA H200\)"):
        resolve_copy_path(fake, CopyPath.DIRECT)
    with pytest.raises(TypeError, match="direct_host_copy"):  # the boolean is gone
        TransferEngine(mesh, maps, host, direct_host_copy=True)
