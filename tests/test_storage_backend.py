"""L3 page operations: host slabs <-> objects, on the memory and file kvstores."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from storage_rows import stored_bytes

from jaxhicache.layer_map import build_layer_maps
from jaxhicache.pools.host import HostPools
from jaxhicache.spec import PAGE_SPACES, KVFormat, ModelCacheSpec, PageSpace, PoolKind
from jaxhicache.storage import (
    FileBackend,
    Namespace,
    ObjectLayout,
    ObjectRead,
    StorageBackend,
    TensorStoreBackend,
    object_key,
    page_hashes,
    parse_kvstore_spec,
    plan_units,
    stored_bytes_per_page,
)
from kernels_pallas.common import Layout

RESERVE = 0  # tiny slabs: no memory reserve needed


def _spec(fmt=KVFormat.FLOAT):
    return ModelCacheSpec.tiny_dsv4(kv_format=fmt)


def _filled(spec, maps, pages=8, seed=0, layout=Layout.PAGE_FIRST):
    """Host pools with fresh random (never zero) bytes everywhere."""
    h = HostPools(spec, maps, pages, pages, layout=layout, reserve_bytes=RESERVE)
    rng = np.random.default_rng(seed)
    for k in spec.kinds():
        a = h.stacked(k).view(np.uint8)
        a[...] = rng.integers(1, 256, a.shape, dtype=np.uint8)
    return h


def _poisoned(spec, maps, pages=8, layout=Layout.PAGE_FIRST):
    h = HostPools(spec, maps, pages, pages, layout=layout, reserve_bytes=RESERVE)
    for k in spec.kinds():
        h.stacked(k).view(np.uint8)[...] = 0xEE
    return h


_rows = stored_bytes  # what an object holds (SWA space: the window rows)


BACKENDS = ["ts-memory", "ts-file", "file", "file-threads"]


def _make(kind, tmp_path, **kw):
    """A backend of kind ``kind`` on a fresh store."""
    if kind == "ts-memory":
        return TensorStoreBackend("memory://", **kw)
    if kind == "ts-file":
        return TensorStoreBackend(str(tmp_path / "ts"), **kw)
    if kind == "file":
        return FileBackend(tmp_path / "file", **kw)
    return FileBackend(tmp_path / "file-threads", io_threads=2, **kw)


def _hashes(spec, n, seed=0, salt=None):
    toks = np.random.default_rng(seed).integers(0, 50_000, n * spec.page_size)
    return page_hashes(toks, spec.page_size, salt=salt)


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("object_layout", list(ObjectLayout))
@pytest.mark.parametrize(
    ("pp", "fmt"), [(1, KVFormat.FLOAT), (2, KVFormat.FP8_DSV4), (3, KVFormat.FLOAT)]
)
def test_round_trip_every_stage_and_space(kind, object_layout, pp, fmt, tmp_path):
    spec = _spec(fmt)
    maps = build_layer_maps(spec, pp)
    src, dst = _filled(spec, maps), _poisoned(spec, maps)
    be = _make(kind, tmp_path, object_layout=object_layout, max_in_flight=3)
    hs = _hashes(spec, 5)
    put_ids, get_ids = np.array([0, 1, 2, 3, 4]), np.array([7, 5, 3, 1, 6])
    for r, m in enumerate(maps):
        ns = Namespace.for_stage(spec, m)
        for space in PAGE_SPACES:
            assert be.put(ns, space, hs, src, r, put_ids).all()
            assert be.exists_prefix(ns, space, hs) == 5
            assert be.get(ns, space, hs, dst, r, get_ids).all()
            np.testing.assert_array_equal(
                _rows(dst, r, space, get_ids), _rows(src, r, space, put_ids)
            )
            # slots not loaded keep their poison
            assert (_rows(dst, r, space, [0, 2, 4]) == 0xEE).all()
    st = be.stats()
    objects = sum(
        len(plan_units(spec, m, Namespace.for_stage(spec, m), s, object_layout))
        for m in maps
        for s in PAGE_SPACES
    )
    if object_layout is ObjectLayout.PER_SUBPOOL:
        assert objects == sum(len(Namespace.for_stage(spec, m).stage_kinds) for m in maps)
    assert st.write_objects_total == st.read_objects_total == 5 * objects
    assert st.backed_up_pages_total == st.prefetched_pages_total == st.hit_pages_total == 5 * pp * 2
    assert st.backed_up_tokens_total == 5 * pp * 2 * spec.page_size
    payload = sum(stored_bytes_per_page(spec, m, s) for m in maps for s in PAGE_SPACES)
    assert st.read_bytes_total == st.write_bytes_total > payload * 5
    assert payload < sum(spec.page_bytes(m) for m in maps)  # SWA objects: the window only
    assert st.integrity_failures_total == st.read_errors_total == st.write_errors_total == 0


@pytest.mark.parametrize("kind", ["ts-memory", "file"])
def test_layer_first_slabs_interoperate_with_page_first(kind, tmp_path):
    spec = _spec()
    maps = build_layer_maps(spec, 2)
    src = _filled(spec, maps, layout=Layout.LAYER_FIRST)
    dst = _poisoned(spec, maps, layout=Layout.PAGE_FIRST)
    back = _poisoned(spec, maps, layout=Layout.LAYER_FIRST)
    be = _make(kind, tmp_path)
    hs = _hashes(spec, 3)
    for r, m in enumerate(maps):
        ns = Namespace.for_stage(spec, m)
        for space in PAGE_SPACES:
            assert be.put(ns, space, hs, src, r, [4, 2, 0]).all()
            assert be.get(ns, space, hs, dst, r, [1, 2, 3]).all()
            np.testing.assert_array_equal(
                _rows(dst, r, space, [1, 2, 3]), _rows(src, r, space, [4, 2, 0])
            )
            assert be.get(ns, space, hs, back, r, [0, 6, 7]).all()
            np.testing.assert_array_equal(
                _rows(back, r, space, [0, 6, 7]), _rows(src, r, space, [4, 2, 0])
            )


@pytest.mark.parametrize("kind", ["ts-memory", "file"])
def test_exists_prefix_stops_at_the_first_absent_page_and_counts(kind, tmp_path):
    spec = _spec()
    maps = build_layer_maps(spec, 1)
    src = _filled(spec, maps)
    ns = Namespace.for_stage(spec, maps[0])
    be = _make(kind, tmp_path, object_layout=ObjectLayout.PER_SUBPOOL)
    hs = _hashes(spec, 6)
    assert be.put(ns, PageSpace.FULL, hs[:2] + hs[3:], src, 0, [0, 1, 3, 4, 5]).all()
    assert be.exists_prefix(ns, PageSpace.FULL, hs) == 2
    assert be.exists(ns, PageSpace.FULL, hs).tolist() == [True, True, False, True, True, True]
    st = be.stats()
    assert (st.hit_pages_total, st.miss_pages_total) == (2, 4)
    assert (st.hit_tokens_total, st.miss_tokens_total) == (2 * spec.page_size, 4 * spec.page_size)
    # one missing sub-pool object makes its page absent
    be.delete(ns, PageSpace.FULL, [])  # nothing
    c4 = object_key(ns, PoolKind.C4_KV, hs[0])
    assert be._start_delete(c4).result() is True
    assert be.exists_prefix(ns, PageSpace.FULL, hs) == 0
    assert be.exists_prefix(ns, PageSpace.FULL, []) == 0


@pytest.mark.parametrize("kind", BACKENDS)
def test_get_of_absent_pages_fails_them_and_leaves_their_slots(kind, tmp_path):
    spec = _spec()
    maps = build_layer_maps(spec, 1)
    src, dst = _filled(spec, maps), _poisoned(spec, maps)
    ns = Namespace.for_stage(spec, maps[0])
    be = _make(kind, tmp_path)
    hs = _hashes(spec, 3)
    assert be.put(ns, PageSpace.SWA, [hs[1]], src, 0, [5]).all()
    ok = be.get(ns, PageSpace.SWA, hs, dst, 0, [0, 1, 2])
    assert ok.tolist() == [False, True, False]
    assert (_rows(dst, 0, PageSpace.SWA, [0, 2]) == 0xEE).all()
    np.testing.assert_array_equal(
        _rows(dst, 0, PageSpace.SWA, [1]), _rows(src, 0, PageSpace.SWA, [5])
    )
    st = be.stats()
    assert (st.missing_objects_total, st.prefetch_failed_pages_total) == (2, 2)
    assert st.integrity_failures_total == 0


def test_salted_pages_are_never_shared():
    spec = _spec()
    maps = build_layer_maps(spec, 1)
    src, dst = _filled(spec, maps), _poisoned(spec, maps)
    ns = Namespace.for_stage(spec, maps[0])
    be = TensorStoreBackend("memory://")
    a, b = _hashes(spec, 3, salt="a"), _hashes(spec, 3, salt="b")
    assert be.put(ns, PageSpace.FULL, a, src, 0, [0, 1, 2]).all()
    assert be.exists_prefix(ns, PageSpace.FULL, b) == 0
    assert not be.get(ns, PageSpace.FULL, b, dst, 0, [0, 1, 2]).any()
    assert be.exists_prefix(ns, PageSpace.FULL, _hashes(spec, 3)) == 0


@pytest.mark.parametrize(
    ("writer_kind", "reader_kind"), [("ts", "ts"), ("file", "ts"), ("ts", "file")]
)
def test_two_instances_with_one_partition_share_objects_other_partitions_do_not(
    writer_kind, reader_kind, tmp_path
):
    """Also: FileBackend and tensorstore's file driver read each other's directories."""
    spec = _spec()
    hs = _hashes(spec, 4)
    pp2 = build_layer_maps(spec, 2)
    open_dir = {
        "ts": lambda: TensorStoreBackend(str(tmp_path)),
        "file": lambda: FileBackend(tmp_path),
    }
    writer = open_dir[writer_kind]()
    src = _filled(spec, pp2)
    for r, m in enumerate(pp2):
        assert writer.put(
            Namespace.for_stage(spec, m), PageSpace.FULL, hs, src, r, [0, 1, 2, 3]
        ).all()
    # another instance (new backend, new slabs, maps rebuilt) reads them
    reader = (
        TensorStoreBackend({"driver": "file", "path": str(tmp_path)})
        if reader_kind == "ts"
        else FileBackend(str(tmp_path))
    )
    again = build_layer_maps(_spec(), 2)
    dst = _poisoned(spec, again)
    for r, m in enumerate(again):
        ns = Namespace.for_stage(spec, m)
        assert reader.exists_prefix(ns, PageSpace.FULL, hs) == 4
        assert reader.get(ns, PageSpace.FULL, hs, dst, r, [4, 5, 6, 7]).all()
        np.testing.assert_array_equal(
            _rows(dst, r, PageSpace.FULL, [4, 5, 6, 7]), _rows(src, r, PageSpace.FULL, [0, 1, 2, 3])
        )
    # a PP-3 instance holds other layer ranges: nothing to share
    pp3 = build_layer_maps(spec, 3)
    for m in pp3:
        ns = Namespace.for_stage(spec, m)
        if m.num_layers_of(PoolKind.C4_KV):
            assert reader.exists_prefix(ns, PageSpace.FULL, hs) == 0
        else:  # stage 0 holds layers 0-1 (SWA only): no full-space object, nothing missing
            assert m.start_layer == 0
            assert reader.exists_prefix(ns, PageSpace.FULL, hs) == 4


@pytest.mark.parametrize("kind", ["ts-memory", "file"])  # file: heads through its staging
def test_mha_tp_shards_store_their_heads_only(kind, tmp_path):
    spec = ModelCacheSpec.mha(2, num_kv_heads=4, head_dim=8, page_size=4, dtype="float32")
    maps = build_layer_maps(spec, 1)
    src, dst = _filled(spec, maps, pages=4), _poisoned(spec, maps, pages=4)
    be = _make(kind, tmp_path)
    hs = _hashes(spec, 2)
    nss = [Namespace.for_stage(spec, maps[0], tp_rank=r, tp_size=2) for r in range(2)]
    for ns in nss:
        assert be.put(ns, PageSpace.FULL, hs, src, 0, [0, 1]).all()
    assert be.stats().write_bytes_total < 2 * 2 * spec.page_bytes(maps[0]) + 2 * 2 * 256
    assert be.get(nss[0], PageSpace.FULL, hs, dst, 0, [2, 3]).all()
    full_src, full_dst = src.slab(0, PoolKind.FULL_KV), dst.slab(0, PoolKind.FULL_KV)
    np.testing.assert_array_equal(full_dst[[2, 3], :, :, :, :2], full_src[[0, 1], :, :, :, :2])
    assert (full_dst[[2, 3], :, :, :, 2:].view(np.uint8) == 0xEE).all()  # rank 1's heads not yet
    assert be.get(nss[1], PageSpace.FULL, hs, dst, 0, [2, 3]).all()
    np.testing.assert_array_equal(full_dst[[2, 3]], full_src[[0, 1]])
    with pytest.raises(ValueError, match="no sub-pool in page space 'swa'"):
        be.put(nss[0], PageSpace.SWA, hs, src, 0, [0, 1])


def test_caller_bugs_raise_value_error():
    spec = _spec()
    maps = build_layer_maps(spec, 2)
    h = _filled(spec, maps)
    be = TensorStoreBackend("memory://")
    hs = _hashes(spec, 2)
    ns0 = Namespace.for_stage(spec, maps[0])
    with pytest.raises(ValueError, match="does not describe stage 1"):
        be.put(ns0, PageSpace.FULL, hs, h, 1, [0, 1])
    with pytest.raises(ValueError, match="duplicate host ids"):
        be.get(ns0, PageSpace.FULL, hs, h, 0, [1, 1])
    with pytest.raises(ValueError, match=r"not in \[0, 8\)"):
        be.put(ns0, PageSpace.FULL, hs, h, 0, [0, 8])
    with pytest.raises(ValueError, match="one per key"):
        be.put(ns0, PageSpace.FULL, hs, h, 0, [0])
    with pytest.raises(ValueError, match="page hash"):
        be.put(ns0, PageSpace.FULL, ["x", "y"], h, 0, [0, 1])
    with pytest.raises(ValueError, match="not one string"):
        be.exists(ns0, PageSpace.FULL, hs[0])
    with pytest.raises(ValueError, match="stage rank"):
        be.get(ns0, PageSpace.FULL, hs, h, 2, [0, 1])
    with pytest.raises(ValueError, match="max_in_flight"):
        TensorStoreBackend("memory://", max_in_flight=0)


@pytest.mark.parametrize("kind", ["ts-memory", "ts-file", "file"])
def test_delete_and_clear_by_namespace(kind, tmp_path):
    spec = _spec()
    maps = build_layer_maps(spec, 2)
    src = _filled(spec, maps)
    be = _make(kind, tmp_path)
    hs = _hashes(spec, 3)
    ns = [Namespace.for_stage(spec, m) for m in maps]
    for r in range(2):
        for space in PAGE_SPACES:
            assert be.put(ns[r], space, hs, src, r, [0, 1, 2]).all()
    assert be.delete(ns[0], PageSpace.SWA, hs[1:2]) == 1
    assert be.exists(ns[0], PageSpace.SWA, hs).tolist() == [True, False, True]
    assert be.clear(ns[0])
    assert not be.exists(ns[0], PageSpace.FULL, hs).any()
    assert be.exists(ns[1], PageSpace.FULL, hs).all()
    assert be.clear()
    assert not be.exists(ns[1], PageSpace.FULL, hs).any()


def test_kvstore_specs_urls_and_paths(tmp_path):
    assert parse_kvstore_spec(None)["driver"] == "file"
    assert parse_kvstore_spec(str(tmp_path)) == {"driver": "file", "path": str(tmp_path)}
    assert parse_kvstore_spec(tmp_path) == {"driver": "file", "path": str(tmp_path)}
    assert parse_kvstore_spec('{"driver": "memory"}') == {"driver": "memory"}
    assert parse_kvstore_spec("s3://bucket/prefix") == "s3://bucket/prefix"
    with pytest.raises(ValueError, match="JSON"):
        parse_kvstore_spec("{not json")
    # a path without a trailing slash still puts objects under the directory
    spec = _spec()
    maps = build_layer_maps(spec, 1)
    be = TensorStoreBackend(json.dumps({"driver": "file", "path": str(tmp_path / "l3")}))
    ns = Namespace.for_stage(spec, maps[0])
    hs = _hashes(spec, 1)
    assert be.put(ns, PageSpace.FULL, hs, _filled(spec, maps), 0, [0]).all()
    assert (tmp_path / "l3" / object_key(ns, PageSpace.FULL, hs[0])).is_file()
    url = TensorStoreBackend(f"file://{tmp_path}/l3/")
    assert url.exists_prefix(ns, PageSpace.FULL, hs) == 1


class _CountingStore(StorageBackend):
    """A dict store whose operations complete only when their result is asked for."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.data: dict[str, bytes] = {}
        self.open = self.peak = 0
        self.lock = threading.Lock()

    def _op(self, fn):
        with self.lock:
            self.open += 1
            self.peak = max(self.peak, self.open)
        store = self

        class _P:
            def result(self):
                with store.lock:
                    store.open -= 1
                return fn()

        return _P()

    def _start_read(self, key):
        return self._op(lambda: ObjectRead(self.data.get(key)))

    def _start_stat(self, key):
        return self._op(lambda: key in self.data)

    def _start_write(self, key, parts):
        value = b"".join(parts)
        return self._op(lambda: self.data.__setitem__(key, value))

    def _start_delete(self, key, generation=None):
        return self._op(lambda: self.data.pop(key, None) is not None)

    def _clear(self, prefix):
        for k in [k for k in self.data if k.startswith(prefix)]:
            del self.data[k]


@pytest.mark.parametrize("limit", [1, 3])
def test_objects_in_flight_are_bounded(limit):
    spec = _spec()
    maps = build_layer_maps(spec, 1)
    src, dst = _filled(spec, maps), _poisoned(spec, maps)
    be = _CountingStore(max_in_flight=limit, object_layout=ObjectLayout.PER_SUBPOOL)
    ns = Namespace.for_stage(spec, maps[0])
    hs = _hashes(spec, 6)
    ids = np.arange(6)
    assert be.put(ns, PageSpace.SWA, hs, src, 0, ids).all()
    assert be.exists_prefix(ns, PageSpace.SWA, hs) == 6
    assert be.get(ns, PageSpace.SWA, hs, dst, 0, ids).all()
    np.testing.assert_array_equal(
        _rows(dst, 0, PageSpace.SWA, ids), _rows(src, 0, PageSpace.SWA, ids)
    )
    assert be.peak == limit
    assert be.open == 0


def test_stats_map_to_prometheus_counters():
    be = TensorStoreBackend("memory://")
    names = be.stats().as_prometheus()
    assert len(names) >= 20
    assert all(n.startswith("jaxhicache_storage_") and n.endswith("_total") for n in names)
    assert all(v == 0 for v in names.values())


def test_cached_stage_plans_do_not_keep_host_slabs_alive():
    import gc
    import weakref

    spec = _spec()
    maps = build_layer_maps(spec, 1)
    be = TensorStoreBackend("memory://")
    host = _filled(spec, maps, pages=2)
    slab = weakref.ref(host.stacked(PoolKind.SWA_KV))
    ns = Namespace.for_stage(spec, maps[0])
    assert be.put(ns, PageSpace.SWA, _hashes(spec, 1), host, 0, [0]).all()
    del host
    gc.collect()
    assert slab() is None


def test_the_documented_lookup_and_restore_flow_across_two_instances(tmp_path):
    """README 'For the cache integration': instance A backs up a prefix (SWA objects
    only at its last page); instance B finds the longest restorable prefix on every
    stage and loads it into fresh slots."""
    spec = _spec()
    maps = build_layer_maps(spec, 2)
    t = spec.swa_trailing_pages
    hs = _hashes(spec, 5)
    a_host = _filled(spec, maps)
    a = FileBackend(tmp_path)
    for r, m in enumerate(maps):
        ns = Namespace.for_stage(spec, m)
        assert a.put(ns, PageSpace.FULL, hs, a_host, r, np.arange(5)).all()
        assert a.put(ns, PageSpace.SWA, hs[4 - t : 4], a_host, r, np.arange(4 - t, 4)).all()

    b = FileBackend(tmp_path)
    b_host = _poisoned(spec, maps)
    nss = [Namespace.for_stage(spec, m) for m in maps]
    n = min(b.exists_prefix(ns, PageSpace.FULL, hs) for ns in nss)
    assert n == 5
    p = next(
        p
        for p in range(n, t - 1, -1)
        if all(b.exists(ns, PageSpace.SWA, hs[p - t : p]).all() for ns in nss)
    )
    assert p == 4  # the SWA objects exist for a hit ending at page 4, not 5
    loaded = []
    for r, ns in enumerate(nss):
        full = b.get(ns, PageSpace.FULL, hs[:p], b_host, r, np.arange(p))
        swa = b.get(ns, PageSpace.SWA, hs[p - t : p], b_host, r, np.arange(p - t, p))
        loaded.append(bool(full.all() and swa.all()))
        for space, ids in [(PageSpace.FULL, np.arange(p)), (PageSpace.SWA, np.arange(p - t, p))]:
            np.testing.assert_array_equal(
                _rows(b_host, r, space, ids), _rows(a_host, r, space, ids)
            )
    assert all(loaded)
