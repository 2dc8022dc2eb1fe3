"""Window-only SWA objects (layout version 2): an SWA-space object holds exactly the
rows a restore at the end of its page reads, a load writes those rows and no
other, and objects of the old whole-page layout read as misses."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxhicache.layer_map import build_layer_maps
from jaxhicache.pools.host import HostPools
from jaxhicache.spec import KVFormat, ModelCacheSpec, PageSpace, PoolKind
from jaxhicache.storage import (
    LAYOUT_VERSION,
    FileBackend,
    Namespace,
    ObjectLayout,
    TensorStoreBackend,
    object_key,
    page_hashes,
    plan_units,
    stored_bytes_per_page,
)
from jaxhicache.storage.format import encode, header_length
from jaxhicache.storage.layout import MAX_DIRECT_RUNS, StagePages
from kernels_pallas.common import Layout

POISON = 0xEE


def _host(spec, maps, layout=Layout.PAGE_FIRST, fill=None, pages=6):
    h = HostPools(spec, maps, pages, pages, layout=layout, reserve_bytes=0)
    rng = np.random.default_rng(1)
    for k in spec.kinds():
        a = h.stacked(k).view(np.uint8)
        a[...] = rng.integers(1, 256, a.shape, dtype=np.uint8) if fill is None else fill
    return h


def _page(h, rank, kind, i):
    """``[n_kind, *row]`` of page ``i`` (a copy), whatever the slab layout."""
    s = h.slab(rank, kind)
    return np.array(s[i] if h.layout is Layout.PAGE_FIRST else s[:, i])


def _u8(a):
    return np.ascontiguousarray(a).view(np.uint8)


def _window_mask(spec, kind):
    """bool ``[*row]``: the elements of one layer's row a restore at the page end reads
    (written out from DSV4_MODEL.md §3.6, independently of ``layout.window_rows``)."""
    row = spec.row_shape(kind)
    mask = np.zeros(row, bool)
    page, w = spec.page_size, spec.window
    if kind is PoolKind.SWA_KV:  # keys P-W+1 .. P-1: the last W-1 tokens of the page
        if spec.kv_format is KVFormat.FLOAT:
            mask[page - (w - 1) :] = True
        else:
            tok = spec.fp8_token_bytes
            mask[(page - (w - 1)) * tok : page * tok] = True
        return mask
    ring, width = row  # slot = [kv_A | kv_B | score_A | score_B]; tokens P-4..P-1, A halves
    d = width // 4
    mask[ring - 4 :, :d] = True
    mask[ring - 4 :, 2 * d : 3 * d] = True
    return mask


def _backend(kind, tmp_path, layout):
    if kind == "file":
        return FileBackend(tmp_path / "f", object_layout=layout)
    if kind == "file-threads":
        return FileBackend(tmp_path / "t", object_layout=layout, io_threads=2)
    return TensorStoreBackend("memory://", object_layout=layout)


@pytest.mark.parametrize("kind", ["file", "file-threads", "ts-memory"])
@pytest.mark.parametrize("object_layout", list(ObjectLayout))
@pytest.mark.parametrize(
    ("fmt", "slab_layout", "pp"),
    [
        (KVFormat.FLOAT, Layout.PAGE_FIRST, 2),
        (KVFormat.FP8_DSV4, Layout.PAGE_FIRST, 1),
        (KVFormat.FLOAT, Layout.LAYER_FIRST, 3),
    ],
)
def test_a_load_writes_exactly_the_window_rows(kind, object_layout, fmt, slab_layout, pp, tmp_path):
    spec = ModelCacheSpec.tiny_dsv4(kv_format=fmt)
    maps = build_layer_maps(spec, pp)
    src = _host(spec, maps)
    dst = _host(spec, maps, layout=slab_layout, fill=POISON)
    be = _backend(kind, tmp_path, object_layout)
    hs = page_hashes(np.arange(3 * spec.page_size), spec.page_size)
    for r, m in enumerate(maps):
        ns = Namespace.for_stage(spec, m)
        if not ns.stage_kinds:
            continue
        assert be.put(ns, PageSpace.SWA, hs, src, r, [0, 1, 2]).all()
        assert be.get(ns, PageSpace.SWA, hs, dst, r, [5, 3, 4]).all()
        for kind_ in ns.stage_kinds:
            if kind_.page_space is not PageSpace.SWA:
                continue
            mask = _window_mask(spec, kind_)
            assert 0 < mask.sum() < mask.size
            for s_id, d_id in [(0, 5), (1, 3), (2, 4)]:
                got, want = _page(dst, r, kind_, d_id), _page(src, r, kind_, s_id)
                np.testing.assert_array_equal(got[:, mask], want[:, mask])
                assert (_u8(got[:, ~mask]) == POISON).all(), kind_  # untouched
    st = be.stats()
    payload = sum(stored_bytes_per_page(spec, m, PageSpace.SWA) for m in maps)
    objects = st.write_objects_total
    assert st.write_bytes_total - payload * 3 == st.read_bytes_total - payload * 3 > 0
    assert st.write_bytes_total < payload * 3 + objects * 512  # headers only on top


def test_failed_direct_read_zeroes_the_window_rows_only(tmp_path):
    spec = ModelCacheSpec.tiny_dsv4()
    maps = build_layer_maps(spec, 1)
    src, dst = _host(spec, maps), _host(spec, maps, fill=POISON)
    be = FileBackend(tmp_path)
    ns = Namespace.for_stage(spec, maps[0])
    hs = page_hashes(np.arange(spec.page_size), spec.page_size)
    assert be.put(ns, PageSpace.SWA, hs, src, 0, [0]).all()
    path = tmp_path / object_key(ns, PageSpace.SWA, hs[0])
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not be.get(ns, PageSpace.SWA, hs, dst, 0, [2]).any()
    assert be.stats().integrity_failures_total == 1
    for k in (PoolKind.SWA_KV, PoolKind.C4_STATE, PoolKind.C4_INDEXER_STATE):
        mask = _window_mask(spec, k)
        got = _page(dst, 0, k, 2).view(np.uint8).reshape(-1, mask.size, spec.row_dtype(k).itemsize)
        assert (got[:, mask.ravel()] == 0).all()  # the bytes that arrived, scrubbed
        assert (got[:, ~mask.ravel()] == POISON).all()  # never touched


def test_objects_of_the_whole_page_layout_are_misses(tmp_path):
    """A store written by layout version 1 (whole SWA pages) next to this version: its
    objects sit under other keys (misses), and a whole-page payload under a current
    key fails its length check (never loaded)."""
    spec = ModelCacheSpec.tiny_dsv4()
    maps = build_layer_maps(spec, 1)
    src, dst = _host(spec, maps), _host(spec, maps, fill=POISON)
    ns = Namespace.for_stage(spec, maps[0])
    assert ns.layout_version == LAYOUT_VERSION == 2
    old = dataclasses.replace(ns, layout_version=1)
    assert old.prefix.startswith("jaxhicache/v1/") and ns.prefix.startswith("jaxhicache/v2/")
    hs = page_hashes(np.arange(2 * spec.page_size), spec.page_size)
    whole = [
        np.ascontiguousarray(src.slab(0, k)[0])
        for k in ns.stage_kinds
        if k.page_space is PageSpace.SWA
    ]
    for h in hs:  # what a version-1 writer stored: whole page rows
        for key in (object_key(old, PageSpace.SWA, h),):
            p = tmp_path / key
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(encode(key, [memoryview(w).cast("B") for w in whole]))
    be = FileBackend(tmp_path)
    assert be.exists_prefix(ns, PageSpace.SWA, hs) == 0
    assert not be.get(ns, PageSpace.SWA, hs, dst, 0, [1, 2]).any()
    # the same whole-page bytes under the current key: rejected, not loaded
    key = object_key(ns, PageSpace.SWA, hs[0])
    (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / key).write_bytes(encode(key, [memoryview(w).cast("B") for w in whole]))
    assert be.exists_prefix(ns, PageSpace.SWA, hs) == 1  # present, but ...
    assert not be.get(ns, PageSpace.SWA, hs[:1], dst, 0, [3]).any()  # ... fails its check
    assert be.stats().integrity_failures_total == 1
    assert (tmp_path / old.prefix).is_dir()  # the old objects are left alone
    got = _page(dst, 0, PoolKind.SWA_KV, 3)
    mask = _window_mask(spec, PoolKind.SWA_KV)
    assert (_u8(got[:, ~mask]) == POISON).all()
    assert np.isin(_u8(got[:, mask]), [0, POISON]).all()  # nothing of the object


def test_flash_window_objects_are_direct_and_far_smaller():
    """DSV4-Flash: one SWA object per page and stage holds 3.6 MB instead of 8.2 MB, and
    its slab rows are few enough contiguous runs to be read and written in place."""
    spec = ModelCacheSpec.deepseek_v4_flash()
    whole = spec.page_bytes() - stored_bytes_per_page(spec, None, PageSpace.FULL)
    assert whole == 8_160_000
    assert stored_bytes_per_page(spec, None, PageSpace.SWA) == 3_619_304
    maps = build_layer_maps(spec, 4)
    host = HostPools(spec, maps, 2, 2, reserve_bytes=0)
    for r, m in enumerate(maps):
        ns = Namespace.for_stage(spec, m)
        (unit,) = plan_units(spec, m, ns, PageSpace.SWA)
        assert unit.nbytes == stored_bytes_per_page(spec, m, PageSpace.SWA)
        pages = StagePages(host, r, [unit])
        assert pages.contiguous
        views = pages.direct(0, 1)
        assert sum(v.nbytes for v in views) == unit.nbytes
        # one run per SWA layer, two (kv_A, score_A) per state slot and layer
        n4 = m.num_layers_of(PoolKind.C4_STATE)
        assert len(views) == m.num_layers_of(PoolKind.SWA_KV) + 2 * 4 * 2 * n4 <= MAX_DIRECT_RUNS
    assert header_length(object_key(ns, PageSpace.SWA, "0" * 64)) == 192
