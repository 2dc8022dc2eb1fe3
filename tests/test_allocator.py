"""PageAllocator: free list, validation without partial changes, generations and leases."""

from __future__ import annotations

import numpy as np
import pytest

from jaxhicache.pools.allocator import Lease, OutOfPages, PageAllocator


def test_alloc_free_capacity_accounting():
    a = PageAllocator(10, "dev-full")
    assert (a.capacity, a.num_free, a.num_used) == (10, 10, 0)
    x = a.alloc(4)
    assert x.dtype == np.int32 and x.tolist() == [0, 1, 2, 3]
    y = a.alloc(6)
    assert sorted(np.concatenate([x, y]).tolist()) == list(range(10))
    assert (a.num_free, a.num_used) == (0, 10)
    a.free(x)
    assert (a.num_free, a.num_used) == (4, 6)
    z = a.alloc(4)
    assert sorted(z.tolist()) == [0, 1, 2, 3]
    assert a.alloc(0).size == 0
    assert a.is_allocated(z).all()
    assert a.allocated_ids().tolist() == list(range(10))


def test_out_of_pages_names_request_and_free():
    a = PageAllocator(3, "host-swa")
    a.alloc(2)
    with pytest.raises(OutOfPages, match=r"host-swa.*requested 5.*only 1") as ei:
        a.alloc(5)
    assert isinstance(ei.value, MemoryError)
    assert (ei.value.requested, ei.value.free) == (5, 1)
    assert a.num_free == 1  # nothing taken
    with pytest.raises(ValueError):
        a.alloc(-1)


def test_double_free_rejected_without_partial_change():
    a = PageAllocator(8, "d")
    ids = a.alloc(5)
    a.free(ids[:2])
    before_free = a.num_free
    gens = a.generation(np.arange(8))
    with pytest.raises(ValueError, match=r"double free.*\[0"):
        a.free(np.array([2, 3, 0], dtype=np.int32))  # 0 is already free
    assert a.num_free == before_free
    assert (a.generation(np.arange(8)) == gens).all()
    assert a.is_allocated([2, 3]).all()  # the valid part of the batch was not applied


def test_duplicate_in_batch_rejected():
    a = PageAllocator(8, "d")
    a.alloc(8)
    with pytest.raises(ValueError, match="duplicate page ids"):
        a.free([1, 2, 1])
    assert a.num_free == 0


@pytest.mark.parametrize("bad", [[-1], [8], [3, 100]])
def test_foreign_ids_rejected(bad):
    a = PageAllocator(8, "d")
    a.alloc(8)
    with pytest.raises(ValueError, match="outside"):
        a.free(bad)
    assert a.num_free == 0


def test_non_integer_ids_rejected():
    a = PageAllocator(4, "d")
    a.alloc(4)
    with pytest.raises(ValueError, match="integer"):
        a.free(np.array([1.0, 2.0]))


def test_free_is_lifo_and_all_pages_distinct():
    a = PageAllocator(64, "d")
    rng = np.random.default_rng(0)
    held: list[np.ndarray] = []
    for _ in range(200):
        if held and rng.random() < 0.5:
            a.free(held.pop(int(rng.integers(len(held)))))
        else:
            n = int(rng.integers(0, 6))
            if a.can_alloc(n):
                held.append(a.alloc(n))
        live = np.concatenate(held) if held else np.zeros(0, np.int32)
        assert np.unique(live).size == live.size
        assert a.num_used == live.size
        assert a.num_used + a.num_free == a.capacity


def test_generation_snapshot_detects_reallocation():
    a = PageAllocator(4, "dev")
    ids = a.alloc(2)
    lease = a.snapshot(ids)
    assert isinstance(lease, Lease) and a.is_current(lease)
    a.free(ids[:1])
    assert not a.is_current(lease)  # freed
    assert a.current_mask(lease).tolist() == [False, True]
    again = a.alloc(1)
    assert again[0] == ids[0]  # same page id handed to someone else ...
    assert not a.is_current(lease)  # ... and the old lease still says stale
    assert a.generation(again)[0] == 1


def test_snapshot_with_tombstones_and_validation():
    a = PageAllocator(4, "swa")
    ids = a.alloc(2)
    lease = a.snapshot(np.array([-1, ids[1], -1], dtype=np.int32))
    assert a.is_current(lease)
    a.free(ids[1:])
    assert a.current_mask(lease).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="not allocated"):
        a.snapshot([3])
    other = PageAllocator(4, "other")
    with pytest.raises(ValueError, match="lease of allocator"):
        other.is_current(lease)


def test_snapshot_range_checks_ids_before_narrowing_them():
    a = PageAllocator(4, "t")
    a.alloc(1)
    with pytest.raises(ValueError, match="4294967296"):
        a.snapshot(np.array([2**32], np.int64))  # would wrap to page 0 as int32
