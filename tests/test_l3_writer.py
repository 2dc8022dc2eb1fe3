"""The L3 write-back: batched drains, a lower CPU priority, failures counted not raised."""

import os
import sys
import threading

import numpy as np
import pytest

from jaxhicache.cache import StorageConfig
from jaxhicache.cache.l3_writer import WriteBack, WriteItem


def _item(k):
    return WriteItem([f"{k:064x}"], np.array([k], np.int32), [], np.zeros(0, np.int32))


def test_items_queued_during_a_drain_go_in_one_batch():
    gate, started = threading.Event(), threading.Event()
    calls = []

    def put(items):
        calls.append(len(items))
        started.set()
        gate.wait(5)
        return sum(it.pages for it in items)

    wb = WriteBack(put, nice=0)
    wb.add(_item(0))  # the first drain starts and blocks in put
    assert started.wait(5)
    for k in range(1, 9):
        wb.add(_item(k))  # queued behind it
    gate.set()
    wb.finish()
    assert calls == [1, 8] and wb.batches == 2
    assert wb.collect() == (9, 0) and wb.collect() == (0, 0)
    wb.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_the_writer_runs_at_a_lower_priority_than_the_caller():
    seen = []

    def put(items):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return 0

    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    wb = WriteBack(put, nice=7)
    wb.add(_item(1))
    wb.finish()
    assert seen == [min(19, mine + 7)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine  # caller unchanged
    wb.close()


def test_a_failing_put_is_counted_and_later_items_still_written():
    def put(items):
        if any(int(it.hashes[0], 16) == 3 for it in items):
            raise OSError("injected: the store refused the batch")
        return len(items)

    wb = WriteBack(put, nice=0)
    wb.add(_item(3))
    wb.finish()
    wb.add(_item(4))
    wb.add(_item(5))
    assert wb.collect(wait=True) == (2, 1)
    wb.close()


def test_write_nice_is_validated():
    with pytest.raises(ValueError, match=r"write_nice must be an int in \[0, 19\], got 20"):
        StorageConfig(model_id="m", write_nice=20)
    with pytest.raises(ValueError, match=r"write_nice must be an int in \[0, 19\], got True"):
        StorageConfig(model_id="m", write_nice=True)


def test_finish_of_some_slots_waits_only_for_the_writes_that_read_them():
    """An eviction of old pages does not wait behind the newest writes: ``finish(slots)``
    returns once the items reading those host slots are written, while a later item
    is still in its put."""
    gate = threading.Event()

    def put(items):
        if any(it.host_full[0] == 5 for it in items):
            gate.wait(10)  # a slow store holds the newest write
        return sum(it.pages for it in items)

    wb = WriteBack(put, nice=0)
    wb.add(_item(0))
    wb.finish({"full": np.array([0])})  # item 0's own drain
    wb.add(_item(5))
    done = threading.Event()
    t = threading.Thread(target=lambda: (wb.finish({"full": np.array([0, 3])}), done.set()))
    t.start()
    assert done.wait(2)  # slot 0's write landed before; slot 3 has none
    late = threading.Thread(target=lambda: (wb.finish({"full": np.array([5])}), done.clear()))
    late.start()
    late.join(0.3)
    assert late.is_alive()  # slot 5's write is still in its put
    gate.set()
    late.join(5)
    assert not late.is_alive() and not done.is_set()
    wb.finish()
    assert wb.collect() == (2, 0)
    wb.close()


def test_drop_takes_the_slots_objects_out_of_items_not_yet_started():
    gate, started = threading.Event(), threading.Event()
    calls = []

    def put(items):
        calls.append(sorted(int(i) for it in items for i in it.host_full))
        started.set()
        gate.wait(10)
        return sum(it.pages for it in items)

    wb = WriteBack(put, nice=0)
    wb.add(_item(1))  # running: its put is held
    assert started.wait(5)
    wb.add(
        WriteItem([f"{2:064x}", f"{3:064x}"], np.array([2, 3], np.int32), [], np.zeros(0, np.int32))
    )
    assert wb.drop({"full": np.array([1, 3])}) == 1  # page 3 of the queued item; 1 is running
    gate.set()
    wb.finish()
    assert calls == [[1], [2]] and wb.collect() == (2, 0)
    wb.close()


def test_dropping_one_slot_of_a_group_drops_the_whole_group_object():
    """Full-space objects of ``g`` pages: a group any of whose slots is freed cannot be
    written (its payload would be incomplete), so it goes whole; the others stay."""
    none = np.zeros(0, np.int32)
    item = WriteItem(["a", "b", "c"], np.array([1, 2, 3, 4, 5, 6], np.int32), [], none, group=2)
    assert item.pages == 6
    less = item.without({"full": np.array([4])})
    assert less.hashes == ["a", "c"] and less.host_full.tolist() == [1, 2, 5, 6]
    assert less.pages == 4 and less.group == 2
    assert item.without({"swa": np.array([4])}).hashes == ["a", "b", "c"]  # other space
