"""L3 faults: each is a miss or a failed put with a counter, never an exception, never a wrong page."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import time
import uuid

import numpy as np
import pytest
from storage_rows import stored_bytes

from jaxhicache.layer_map import build_layer_maps
from jaxhicache.pools.host import HostPools
from jaxhicache.spec import PAGE_SPACES, ModelCacheSpec, PageSpace, PoolKind
from jaxhicache.storage import (
    FaultInjectionBackend,
    FileBackend,
    Namespace,
    ObjectLayout,
    TensorStoreBackend,
    object_key,
    page_hashes,
)


def _spec(**kw):
    return ModelCacheSpec.tiny_dsv4(**kw)


def _pools(spec, maps, pages=8, fill=None, seed=0):
    h = HostPools(spec, maps, pages, pages, reserve_bytes=0)
    rng = np.random.default_rng(seed)
    for k in spec.kinds():
        a = h.stacked(k).view(np.uint8)
        a[...] = rng.integers(1, 256, a.shape, dtype=np.uint8) if fill is None else fill
    return h


_bytes = stored_bytes  # what an object holds (SWA space: the window rows)


def _hashes(spec, n, seed=0):
    toks = np.random.default_rng(seed).integers(0, 50_000, n * spec.page_size)
    return page_hashes(toks, spec.page_size)


class Setup:
    """One PP-2 model with a written file store: pages 0..3 of both spaces on both stages.

    ``kind``: ``"ts"`` (tensorstore file driver: staged reads, a failed slot stays
    untouched) or ``"file"`` (FileBackend: direct reads, a slot that received
    bytes of a failed page is zeroed).
    """

    def __init__(self, root, layout=ObjectLayout.PER_SPACE, kind="ts"):
        self.spec = _spec()
        self.maps = build_layer_maps(self.spec, 2)
        self.src = _pools(self.spec, self.maps)
        self.dst = _pools(self.spec, self.maps, fill=0xEE)
        self.root = root
        if kind == "ts":
            self.be = TensorStoreBackend(str(root), object_layout=layout)
        else:
            self.be = FileBackend(root, object_layout=layout)
        self.failed_fill = 0xEE if kind == "ts" else 0x00
        self.ns = [Namespace.for_stage(self.spec, m) for m in self.maps]
        self.hs = _hashes(self.spec, 4)
        for r in range(2):
            for s in PAGE_SPACES:
                assert self.be.put(self.ns[r], s, self.hs, self.src, r, [0, 1, 2, 3]).all()

    def path(self, rank, unit, i):
        return self.root / object_key(self.ns[rank], unit, self.hs[i])

    def get(self, rank, space, ids=(4, 5, 6, 7)):
        return self.be.get(self.ns[rank], space, self.hs, self.dst, rank, list(ids))

    def check_loaded(self, rank, space, ok, ids=(4, 5, 6, 7), failed_fill=None):
        """Loaded pages equal the source; failed ones keep their poison (or are zeroed)."""
        ids = np.asarray(ids)
        fill = self.failed_fill if failed_fill is None else failed_fill
        got = _bytes(self.dst, rank, space, ids[ok])
        np.testing.assert_array_equal(got, _bytes(self.src, rank, space, np.arange(4)[ok]))
        assert (_bytes(self.dst, rank, space, ids[~ok]) == fill).all()


@pytest.fixture(params=["ts", "file"])
def setup(request, tmp_path):
    return Setup(tmp_path, kind=request.param)


def _corrupt_case(setup, mutate, reason_counter="integrity_failures_total"):
    before = setup.be.stats()
    path = setup.path(1, PageSpace.SWA, 2)
    mutate(path)
    ok = setup.get(1, PageSpace.SWA)
    assert ok.tolist() == [True, True, False, True]
    setup.check_loaded(1, PageSpace.SWA, ok)
    d = setup.be.stats() - before
    assert getattr(d, reason_counter) == 1
    assert d.prefetch_failed_pages_total == 1 and d.prefetched_pages_total == 3
    return d, path


def test_truncated_object_is_a_counted_miss_and_is_deleted(setup):
    def cut(p):
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])

    d, path = _corrupt_case(setup, cut)
    assert d.deleted_objects_total == 1
    assert not path.exists()
    assert setup.be.exists_prefix(setup.ns[1], PageSpace.SWA, setup.hs) == 2


def test_flipped_payload_byte_is_a_counted_miss(setup):
    def flip(p):
        data = bytearray(p.read_bytes())
        data[-100] ^= 0x10
        p.write_bytes(bytes(data))

    d, path = _corrupt_case(setup, flip)
    assert d.deleted_objects_total == 1 and not path.exists()


def test_bad_header_is_a_counted_miss(setup):
    def magic(p):
        data = bytearray(p.read_bytes())
        data[:4] = b"XXXX"
        p.write_bytes(bytes(data))

    _corrupt_case(setup, magic)


def test_object_of_another_stage_copied_under_this_key_is_rejected(setup):
    # stage 0's SWA object of the same page, copied over stage 1's
    _corrupt_case(setup, lambda p: shutil.copyfile(setup.path(0, PageSpace.SWA, 2), p))


def test_object_of_another_page_space_copied_under_this_key_is_rejected(setup):
    _corrupt_case(setup, lambda p: shutil.copyfile(setup.path(1, PageSpace.FULL, 2), p))


@pytest.mark.parametrize("kind", ["ts", "file"])
def test_object_of_another_sub_pool_copied_under_this_key_is_rejected(tmp_path, kind):
    s = Setup(tmp_path, ObjectLayout.PER_SUBPOOL, kind)
    src = tmp_path / object_key(s.ns[1], PoolKind.C4_STATE, s.hs[0])
    dst = tmp_path / object_key(s.ns[1], PoolKind.C4_INDEXER_STATE, s.hs[0])
    shutil.copyfile(src, dst)
    ok = s.get(1, PageSpace.SWA)
    assert ok.tolist() == [False, True, True, True]
    s.check_loaded(1, PageSpace.SWA, ok)
    st = s.be.stats()
    assert st.integrity_failures_total == 1 and st.deleted_objects_total == 1


def test_a_corrupt_object_replaced_meanwhile_is_not_deleted(setup):
    key = object_key(setup.ns[0], PageSpace.FULL, setup.hs[0])
    stale = setup.be._start_read(key).result().generation
    assert setup.be.put(setup.ns[0], PageSpace.FULL, setup.hs[:1], setup.src, 0, [0]).all()
    assert setup.be._start_delete(key, stale).result() is False
    assert setup.be.exists(setup.ns[0], PageSpace.FULL, setup.hs[:1]).all()


def test_read_io_error_is_a_counted_miss_and_the_object_stays(setup):
    path = setup.path(0, PageSpace.FULL, 1)
    path.unlink()
    os.symlink(path.name, path)  # a symlink loop: open() fails with ELOOP
    ok = setup.get(0, PageSpace.FULL)
    assert ok.tolist() == [True, False, True, True]
    setup.check_loaded(0, PageSpace.FULL, ok)
    st = setup.be.stats()
    assert st.read_errors_total == 1 and st.integrity_failures_total == 0
    assert st.deleted_objects_total == 0 and path.is_symlink()
    assert setup.be.exists_prefix(setup.ns[0], PageSpace.FULL, setup.hs) == 1
    assert setup.be.stats().read_errors_total == 2


@pytest.mark.parametrize("kind", ["ts", "file"])
def test_write_io_error_fails_that_page_only(tmp_path, kind):
    spec = _spec()
    maps = build_layer_maps(spec, 1)
    src = _pools(spec, maps)
    be = TensorStoreBackend(str(tmp_path)) if kind == "ts" else FileBackend(tmp_path)
    ns = Namespace.for_stage(spec, maps[0])
    hs = _hashes(spec, 3)
    fan_out = (tmp_path / object_key(ns, PageSpace.FULL, hs[1])).parent
    fan_out.parent.mkdir(parents=True, exist_ok=True)
    fan_out.write_bytes(b"a file where a directory should be")  # ENOTDIR on write
    ok = be.put(ns, PageSpace.FULL, hs, src, 0, [0, 1, 2])
    assert ok.tolist() == [True, False, True]
    st = be.stats()
    assert st.write_errors_total == 1 and st.backup_failed_pages_total == 1
    assert st.backed_up_pages_total == 2 and st.write_objects_total == 2


def test_injected_faults_on_every_primitive(setup):
    bad = setup.hs[1]
    fb = FaultInjectionBackend(
        setup.be,
        fail_read=lambda k: k.endswith(bad),
        fail_stat=lambda k: k.endswith(bad),
        fail_write=True,
        fail_delete=True,
    )
    ok = fb.get(setup.ns[0], PageSpace.SWA, setup.hs, setup.dst, 0, [4, 5, 6, 7])
    assert ok.tolist() == [True, False, True, True]
    setup.check_loaded(0, PageSpace.SWA, ok)
    assert fb.exists_prefix(setup.ns[0], PageSpace.SWA, setup.hs) == 1
    assert not fb.put(setup.ns[0], PageSpace.SWA, setup.hs, setup.src, 0, [0, 1, 2, 3]).any()
    assert fb.delete(setup.ns[0], PageSpace.SWA, setup.hs) == 0
    assert fb.clear() is False
    st = fb.stats()
    assert (st.read_errors_total, st.write_errors_total, st.delete_errors_total) == (2, 4, 5)
    assert st.backup_failed_pages_total == 4 and st.prefetch_failed_pages_total == 1
    # the store itself is intact
    assert setup.be.exists_prefix(setup.ns[0], PageSpace.SWA, setup.hs) == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_store_fails_fast_with_counters(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    spec = _spec()
    maps = build_layer_maps(spec, 1)
    src, dst = _pools(spec, maps), _pools(spec, maps, fill=0xEE)
    be = TensorStoreBackend(
        {
            "driver": "s3",
            "bucket": "nobody-home",
            "endpoint": f"http://127.0.0.1:{_free_port()}",  # nothing listens there
            "aws_region": "us-east-1",
            "aws_credentials": {"type": "environment"},
        },
        request_retries=1,
    )
    ns = Namespace.for_stage(spec, maps[0])
    hs = _hashes(spec, 3)
    t0 = time.perf_counter()
    assert not be.put(ns, PageSpace.FULL, hs, src, 0, [0, 1, 2]).any()
    assert be.exists_prefix(ns, PageSpace.FULL, hs) == 0
    assert not be.get(ns, PageSpace.FULL, hs, dst, 0, [0, 1, 2]).any()
    assert be.clear() is False
    assert time.perf_counter() - t0 < 20
    assert (_bytes(dst, 0, PageSpace.FULL, [0, 1, 2]) == 0xEE).all()
    st = be.stats()
    assert st.write_errors_total == 3 and st.read_errors_total == 3 + 3  # stats + reads
    assert st.delete_errors_total == 1 and st.miss_pages_total == 3
    assert st.backup_failed_pages_total == 3 and st.prefetch_failed_pages_total == 3


# ------------------------------------------------------------------ disk full


@pytest.fixture(params=["tmpfs", "injected"])
def small_disk(request, tmp_path):
    """A real 2 MiB tmpfs (needs root; falls back to injection), or an injected ENOSPC.

    Yields ``(directory, method)``; ``method`` says which one is in use.
    """
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    r = None
    if request.param == "tmpfs" and shutil.which("mount"):
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
            capture_output=True,
            check=False,
        )
    if r is not None and r.returncode == 0:
        try:
            yield mnt, "tmpfs"
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    else:
        yield mnt, "injected"


@pytest.mark.parametrize("kind", ["ts", "file"])
def test_disk_full_fails_puts_without_partial_objects(small_disk, kind):
    root, method = small_disk
    spec = _spec(head_dim=64, rope_dim=8, indexer_head_dim=32)
    maps = build_layer_maps(spec, 1)
    n = 80
    src = _pools(spec, maps, pages=n)
    dst = _pools(spec, maps, pages=n, fill=0xEE)
    ns = Namespace.for_stage(spec, maps[0])
    page = spec.page_bytes(maps[0])
    assert n * page > 3 * 2**20  # more than the disk holds
    if kind == "ts":
        inner = TensorStoreBackend(str(root), max_in_flight=4)
    else:
        inner = FileBackend(root, max_in_flight=4)
    if method == "tmpfs":
        be = inner
    else:  # no mount allowed: the same calls with ENOSPC injected after 2 MiB
        written = {"bytes": 0}

        def full(_key):
            written["bytes"] += page // 2
            return written["bytes"] > 2 * 2**20

        be = FaultInjectionBackend(inner, fail_write=full, errno=errno.ENOSPC)
    hs = _hashes(spec, n)
    ids = np.arange(n)
    ok = {s: be.put(ns, s, hs, src, 0, ids) for s in PAGE_SPACES}
    st = be.stats()
    assert st.write_errors_total > 0
    assert st.backup_failed_pages_total == sum(int((~v).sum()) for v in ok.values())
    assert any(v.any() for v in ok.values()), method
    assert not ok[PageSpace.SWA].all(), method
    # every page reported written reads back exactly; every other one is absent, not torn
    for s in PAGE_SPACES:
        got = be.get(ns, s, hs, dst, 0, ids)
        np.testing.assert_array_equal(got, ok[s])
        np.testing.assert_array_equal(_bytes(dst, 0, s, ids[got]), _bytes(src, 0, s, ids[got]))
        assert (_bytes(dst, 0, s, ids[~got]) == 0xEE).all()
    assert be.stats().integrity_failures_total == 0
    if method == "tmpfs":  # failed writes left no temporary files behind
        assert not [p for p in root.rglob("*.tmp")]
