"""Threaded and asynchronous reads verify exactly as the default path does (issue 16 §1):
a corrupt, truncated or foreign object is a counted miss on ``FileBackend(io_threads >
0)`` (its pipelined direct reads) and on the tensorstore backend (staged reads), never
a page with unverified bytes. ``FileBackend(io_threads=0)`` (its one-object-at-a-time
path) is the control the others must match; threaded writes too."""

from __future__ import annotations

import numpy as np
import pytest

from jaxhicache.layer_map import build_layer_maps
from jaxhicache.pools.host import HostPools
from jaxhicache.spec import PAGE_SPACES, ModelCacheSpec
from jaxhicache.storage import (
    FileBackend,
    Namespace,
    ObjectLayout,
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


def _pools(maps, fill=None, seed=0, pages=8):
    h = HostPools(SPEC, maps, pages, pages, reserve_bytes=0)
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


def _counters(st):
    return {k: v for k, v in st.as_prometheus("").items() if not k.endswith("_seconds_total")}


def _spy_read_loops(monkeypatch, taken, loops, hold_up_s=0.0):
    """Records, for every loop of ``FileBackend``'s direct reads, its thread in
    ``loops`` and each page it takes as ``(thread, page)`` in ``taken``; loops on I/O
    threads start ``hold_up_s`` late."""
    import threading
    import time

    read_pages = FileBackend._read_pages

    def spy(self, *a):
        *args, todo = a
        name = threading.current_thread().name
        loops.append(name)
        if name != "MainThread":
            time.sleep(hold_up_s)

        def pages():
            for i in todo:
                taken.append((name, i))
                yield i

        return read_pages(self, *args, pages())

    monkeypatch.setattr(FileBackend, "_read_pages", spy)


def test_threaded_reads_split_the_pages_among_the_threads_and_count_as_the_default(
    tmp_path, monkeypatch
):
    """``FileBackend(io_threads=3)`` reads a 9-page ``get`` as three tight loops (the
    calling thread's and two I/O threads') over one queue of the pages, each page
    taken by exactly one loop; a flipped, a missing and a truncated object give
    exactly the default path's pages, slots and counters."""
    import shutil

    maps = build_layer_maps(SPEC, 1)
    space = PAGE_SPACES[0]
    src = _pools(maps, pages=9)
    ns = Namespace.for_stage(SPEC, maps[0])
    hs = page_hashes(np.arange(9 * SPEC.page_size) % 991, SPEC.page_size)
    assert FileBackend(tmp_path / "a").put(ns, space, hs, src, 0, list(range(9))).all()
    _flip(tmp_path / "a" / object_key(ns, space, hs[1]))
    (tmp_path / "a" / object_key(ns, space, hs[4])).unlink()
    _truncate(tmp_path / "a" / object_key(ns, space, hs[8]))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    taken = []  # (thread, page) for every page a loop took
    loops = []  # the thread of every loop
    _spy_read_loops(monkeypatch, taken, loops)
    got, threads = {}, {}
    for name, be in (
        ("a", FileBackend(tmp_path / "a")),
        ("b", FileBackend(tmp_path / "b", io_threads=3)),
    ):
        dst = _pools(maps, fill=POISON, pages=9)
        ok = be.get(ns, space, hs, dst, 0, list(range(9)))
        got[name] = (
            ok.tolist(),
            _counters(be.stats()),
            [_slot(dst, 0, space, i) for i in range(9)],
        )
        be.close()
        threads[name] = sorted(loops)
        assert sorted(i for _, i in taken) == list(range(9))  # each page once
        taken.clear()
        loops.clear()
    assert threads["a"] == ["MainThread"]  # the default: one loop on the calling thread
    assert threads["b"][0] == "MainThread" and len(threads["b"]) == 3
    assert all(t.startswith("jaxhicache-l3") for t in threads["b"][1:])
    (ok_a, st_a, slots_a), (ok_b, st_b, slots_b) = got["a"], got["b"]
    assert ok_a == ok_b == [i not in (1, 4, 8) for i in range(9)]
    assert st_a == st_b
    assert st_b["integrity_failures_total"] == 2 and st_b["missing_objects_total"] == 1
    assert st_b["deleted_objects_total"] == 2
    for i in range(9):
        np.testing.assert_array_equal(slots_a[i], slots_b[i])
        if ok_b[i]:
            np.testing.assert_array_equal(slots_b[i], _slot(src, 0, space, i))
        else:  # never unverified bytes: zeroed (read, then failed) or untouched (absent)
            assert np.isin(slots_b[i], [POISON, 0]).all()


def test_a_held_up_io_thread_leaves_its_pages_to_the_other_loops(tmp_path, monkeypatch):
    """The loops of a threaded ``get`` share one queue of pages: when the I/O
    threads start late (a busy machine), the calling thread's loop reads every page
    rather than waiting for a fixed share, and the pages are the same."""

    maps = build_layer_maps(SPEC, 1)
    space = PAGE_SPACES[0]
    src = _pools(maps, pages=6)
    ns = Namespace.for_stage(SPEC, maps[0])
    hs = page_hashes(np.arange(6 * SPEC.page_size) % 991, SPEC.page_size)
    be = FileBackend(tmp_path, io_threads=2)
    assert be.put(ns, space, hs, src, 0, list(range(6))).all()
    taken = []
    _spy_read_loops(monkeypatch, taken, [], hold_up_s=0.3)  # the queue is empty by then
    dst = _pools(maps, fill=POISON, pages=6)
    assert be.get(ns, space, hs, dst, 0, list(range(6))).all()
    be.close()
    assert taken == [("MainThread", i) for i in range(6)]
    for i in range(6):
        np.testing.assert_array_equal(_slot(dst, 0, space, i), _slot(src, 0, space, i))


def test_threaded_writes_share_the_pages_and_count_as_the_default(tmp_path, monkeypatch):
    """``FileBackend(io_threads=3).put`` writes through three loops (the calling
    thread's among them) that take pages from one queue, each object written once;
    with one object per sub-pool and a write that fails mid-page, the pages, the
    counters and the files written are the default path's (the failed page stops at
    its failed object)."""
    import threading
    import time

    maps = build_layer_maps(SPEC, 1)
    space = PAGE_SPACES[0]
    src = _pools(maps, pages=9)
    ns = Namespace.for_stage(SPEC, maps[0])
    hs = page_hashes(np.arange(9 * SPEC.page_size) % 991, SPEC.page_size)
    writers = []
    write_now = FileBackend._write_now

    def spy(self, key, parts):
        name = threading.current_thread().name
        if name != "MainThread" and name not in {t for t, _ in writers}:
            time.sleep(0.2)  # an I/O thread held up on its first object: the caller goes on
        writers.append((name, key))
        return write_now(self, key, parts)

    monkeypatch.setattr(FileBackend, "_write_now", spy)
    got = {}
    for name, threads in (("a", 0), ("b", 3)):
        be = FileBackend(
            tmp_path / name, io_threads=threads, object_layout=ObjectLayout.PER_SUBPOOL
        )
        keys = be._keys(ns, be._unit_names(ns, space), hs)
        assert len(keys[4]) >= 3
        (tmp_path / name / keys[4][1] / "x").mkdir(parents=True)  # its rename fails
        ok = be.put(ns, space, hs, src, 0, list(range(9)))
        files = sorted(
            str(p.relative_to(tmp_path / name)) for p in (tmp_path / name).rglob("*") if p.is_file()
        )
        got[name] = (ok.tolist(), _counters(be.stats()), files)
        be.close()
    (ok_a, st_a, files_a), (ok_b, st_b, files_b) = got["a"], got["b"]
    assert ok_a == ok_b == [i != 4 for i in range(9)]
    assert st_a == st_b and st_b["write_errors_total"] == 1
    assert files_a == files_b and len(files_b) == 8 * len(keys[0]) + 1  # (no *.tmp left)
    names = [t for t, _ in writers]
    assert sorted(k for _, k in writers) == sorted(
        [k for ks in keys for k in ks if k not in keys[4][2:]]
    )  # each object once; page 4 stops at its failed object
    assert "MainThread" in names and len(set(names)) <= 3
    assert all(t == "MainThread" or t.startswith("jaxhicache-l3") for t in names)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_a_bad_max_in_flight_is_refused_on_every_read_path(tmp_path, kind, bad):
    maps = build_layer_maps(SPEC, 1)
    ns = Namespace.for_stage(SPEC, maps[0])
    hs = page_hashes(np.arange(2 * SPEC.page_size), SPEC.page_size)
    be = _backend(kind, tmp_path)
    with pytest.raises(ValueError, match="max_in_flight"):
        be.get(ns, PAGE_SPACES[0], hs, _pools(maps), 0, [0, 1], max_in_flight=bad)
    be.close()
