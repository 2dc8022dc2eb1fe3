"""Objects holding several pages (``Namespace.pages_per_object``): one full-space object
per group of ``g`` pages, keyed by its last page's hash, on every read path; window and
state objects stay one per page; other ``g`` never read each other's objects."""

from __future__ import annotations

import numpy as np
import pytest
from test_storage_threaded import KINDS, POISON, SPEC, _backend, _pools, _slot

from jaxhicache.layer_map import build_layer_maps
from jaxhicache.spec import PageSpace
from jaxhicache.storage import FileBackend, Namespace, object_key, page_hashes
from jaxhicache.storage.format import header_length


def _setup(g):
    maps = build_layer_maps(SPEC, 1)
    ns = Namespace.for_stage(SPEC, maps[0], pages_per_object=g)
    hs = page_hashes(np.arange(12 * SPEC.page_size) % 883, SPEC.page_size)
    return maps, ns, hs


@pytest.mark.parametrize("kind", KINDS)
def test_a_group_of_pages_is_one_object_keyed_by_its_last_page(tmp_path, kind):
    maps, ns, hs = _setup(3)
    src = _pools(maps, pages=12)
    be = _backend(kind, tmp_path)
    groups = [hs[2], hs[5], hs[8]]  # pages [0, 9) in groups of 3
    src_ids = [11, 0, 7, 3, 4, 5, 9, 1, 2]  # any slots, in page order
    before = be.stats()
    assert be.put(ns, PageSpace.FULL, groups, src, 0, src_ids).tolist() == [True] * 3
    d = be.stats() - before
    assert d.write_objects_total == 3 and d.backed_up_pages_total == 9
    for h in groups:
        assert (tmp_path / object_key(ns, PageSpace.FULL, h)).exists()
        assert "/full-x3/" in object_key(ns, PageSpace.FULL, h)
    assert not (tmp_path / object_key(ns, PageSpace.FULL, hs[0])).exists()
    dst = _pools(maps, fill=POISON, pages=12)
    dst_ids = [3, 4, 5, 0, 1, 2, 8, 6, 10]
    before = be.stats()
    assert be.get(ns, PageSpace.FULL, groups, dst, 0, dst_ids).all()
    d = be.stats() - before
    assert d.read_objects_total == 3 and d.prefetched_pages_total == 9
    for s, t in zip(src_ids, dst_ids, strict=True):
        np.testing.assert_array_equal(
            _slot(dst, 0, PageSpace.FULL, t), _slot(src, 0, PageSpace.FULL, s)
        )
    untouched = sorted(set(range(12)) - set(dst_ids))
    for t in untouched:
        assert (_slot(dst, 0, PageSpace.FULL, t) == POISON).all()
    be.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_object_fails_its_whole_group_and_leaves_no_unverified_slot(tmp_path, kind):
    maps, ns, hs = _setup(2)
    src = _pools(maps, pages=12)
    groups = [hs[1], hs[3], hs[5]]
    assert FileBackend(tmp_path).put(ns, PageSpace.FULL, groups, src, 0, list(range(6))).all()
    path = tmp_path / object_key(ns, PageSpace.FULL, hs[3])
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    be = _backend(kind, tmp_path)
    dst = _pools(maps, fill=POISON, pages=12)
    before = be.stats()
    ok = be.get(ns, PageSpace.FULL, groups, dst, 0, [6, 7, 8, 9, 10, 11])
    assert ok.tolist() == [True, False, True]
    d = be.stats() - before
    assert d.integrity_failures_total == 1 and d.deleted_objects_total == 1 and not path.exists()
    assert d.prefetched_pages_total == 4 and d.prefetch_failed_pages_total == 2
    for i, slot in enumerate(range(6, 12)):
        got = _slot(dst, 0, PageSpace.FULL, slot)
        if i in (2, 3):  # the bad group's two slots: zeroed (direct) or untouched (staged)
            assert np.isin(got, [POISON, 0]).all(), kind
        else:
            np.testing.assert_array_equal(got, _slot(src, 0, PageSpace.FULL, i))
    be.close()


def test_other_groupings_never_read_each_others_objects_and_windows_stay_per_page(tmp_path):
    maps, ns3, hs = _setup(3)
    ns1 = Namespace.for_stage(SPEC, maps[0])
    src = _pools(maps, pages=12)
    be = FileBackend(tmp_path)
    assert be.put(ns1, PageSpace.FULL, hs[:6], src, 0, list(range(6))).all()
    assert not be.exists(ns3, PageSpace.FULL, [hs[2], hs[5]]).any()
    assert be.put(ns3, PageSpace.FULL, [hs[2], hs[5]], src, 0, list(range(6))).all()
    assert be.exists(ns1, PageSpace.FULL, hs[:6]).all()  # both kept, under other keys
    # the SWA space of a grouped namespace: one object per page, one slot per hash
    assert ns3.group(PageSpace.SWA) == 1 and ns3.group(PageSpace.FULL) == 3
    assert object_key(ns3, PageSpace.SWA, hs[0]) == object_key(ns1, PageSpace.SWA, hs[0])
    assert be.put(ns3, PageSpace.SWA, hs[:2], src, 0, [0, 1]).all()
    with pytest.raises(ValueError, match="host_ids must be 6 integers"):
        be.put(ns3, PageSpace.FULL, [hs[2], hs[5]], src, 0, list(range(5)))
    full1, full3 = (be.page_objects(n, PageSpace.FULL, src, 0) for n in (ns1, ns3))
    hdr = header_length(object_key(ns3, PageSpace.FULL, hs[0]))
    assert full3 == (
        1,
        3 * (full1[1] - header_length(object_key(ns1, PageSpace.FULL, hs[0]))) + hdr,
    )


@pytest.mark.parametrize("bad", [0, -2, True, 2.0, "2"])
def test_pages_per_object_must_be_a_positive_int(bad):
    maps = build_layer_maps(SPEC, 1)
    with pytest.raises(ValueError, match="pages_per_object"):
        Namespace.for_stage(SPEC, maps[0], pages_per_object=bad)
