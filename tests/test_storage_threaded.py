"""Threaded and asynchronous reads verify exactly as the default path does (issue 16 §1):
a corrupt, truncated or foreign object is a counted miss on ``FileBackend(io_threads >
0)`` (its pipelined direct reads) and on the tensorstore backend (staged reads), never
a page with unverified bytes. ``FileBackend(io_threads=0)`` (its one-object-at-a-time
path) is the control the others must match."""

from __future__ import annotations

import numpy as np
import pytest

from jaxhicache.layer_map import build_layer_maps
from jaxhicache.pools.host import HostPools
from jaxhicache.spec import PAGE_SPACES, ModelCacheSpec
from jaxhicache.storage import (
    FileBackend,
    Namespace,
    TensorStoreBackend,
    object_key,
    page_hashes,
)

SPEC = ModelCacheSpec.tiny_dsv4()
POISON = 0xEE
KINDS = ["file_sync", "file_threads", "tensorstore"]


def _backend(kind, root):
    if kind == "file_sync":
        return FileBackend(root)
    if kind == "file_threads":
        return FileBackend(root, io_threads=3, max_in_flight=8)
    return TensorStoreBackend(str(root), max_in_flight=8)


def _pools(maps, fill=None, seed=0):
    h = HostPools(SPEC, maps, 8, 8, reserve_bytes=0)
    rng = np.random.default_rng(seed)
    for k in SPEC.kinds():
        a = h.stacked(k).view(np.uint8)
        a[...] = rng.integers(1, 256, a.shape, dtype=np.uint8) if fill is None else fill
    return h


def _slot(h, rank, space, slot):
    return np.concatenate(
        [
            np.ascontiguousarray(h.slab(rank, k)[slot]).view(np.uint8).reshape(-1)
            for k in SPEC.kinds()
            if k.page_space is space
        ]
    )


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) - 3] ^= 0x10  # a payload byte
    path.write_bytes(bytes(data))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 5])


def _foreign(path, other):
    path.write_bytes(other.read_bytes())  # another page's (valid) object under this key


@pytest.mark.parametrize("space", list(PAGE_SPACES))
@pytest.mark.parametrize("fault", ["flipped", "truncated", "foreign"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_object_is_a_counted_miss_on_every_read_path(tmp_path, kind, fault, space):
    maps = build_layer_maps(SPEC, 2)
    src = _pools(maps)
    ns = [Namespace.for_stage(SPEC, m) for m in maps]
    hs = page_hashes(np.arange(6 * SPEC.page_size) % 997, SPEC.page_size)
    writer = FileBackend(tmp_path)
    for r in range(2):
        assert writer.put(ns[r], space, hs, src, r, list(range(6))).all()
    # the reference: what a good read of every page puts in a slot (default path)
    ref = _pools(maps, fill=POISON)
    assert FileBackend(tmp_path).get(ns[1], space, hs, ref, 1, [2, 3, 4, 5, 6, 7]).all()
    bad = 3
    path = tmp_path / object_key(ns[1], space, hs[bad])
    if fault == "foreign":
        _foreign(path, tmp_path / object_key(ns[1], space, hs[bad + 1]))
    elif fault == "flipped":
        _flip(path)
    else:
        _truncate(path)
    be = _backend(kind, tmp_path)
    assert be.concurrent == (kind != "file_sync")
    dst = _pools(maps, fill=POISON)
    before = be.stats()
    ok = be.get(ns[1], space, hs, dst, 1, [2, 3, 4, 5, 6, 7])
    assert ok.tolist() == [i != bad for i in range(6)]
    d = be.stats() - before
    assert d.integrity_failures_total == 1 and d.prefetch_failed_pages_total == 1
    assert d.deleted_objects_total == 1 and not path.exists()  # a corrupt object goes
    for i in range(6):
        got = _slot(dst, 1, space, 2 + i)
        if i == bad:  # never the source's bytes: untouched (staged) or zeroed (direct)
            assert np.isin(got, [POISON, 0]).all(), kind
        else:
            np.testing.assert_array_equal(got, _slot(ref, 1, space, 2 + i))
    be.close()
