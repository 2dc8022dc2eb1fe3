"""Issue 19's review of the public API: one meaning per name, one default per knob.

Points 1 (str vs bytes salt in the L3 claim) and 4 (``lookup`` leaves the LRU
order alone) are pinned in ``test_l3_decisions.py`` and ``test_cache_inflight.py``.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from test_cache_l3 import PAGE, _read, _tokens, _write

from jaxhicache.cache import HiCache, HiCacheConfig, StorageConfig
from jaxhicache.mesh import make_mesh
from jaxhicache.pools.host import DEFAULT_RESERVE_BYTES, available_host_memory
from jaxhicache.spec import ModelCacheSpec
from jaxhicache.storage import FileBackend
from models.serving import ServingLoop

SPEC = ModelCacheSpec.tiny_dsv4()


# ------------------------------------------- review: one type per knob (WritePolicy)
@pytest.mark.parametrize("bad", ["write_back", None, 1])
def test_the_tree_takes_a_write_policy_as_the_config_does(bad):
    from jaxhicache.tree import RadixTree, WritePolicy

    with pytest.raises(ValueError, match="write_policy"):
        RadixTree(4, 2, write_policy=bad)
    with pytest.raises(ValueError, match="write_policy"):
        HiCacheConfig(device_pages=4, write_policy=bad)
    assert (
        RadixTree(4, 2, write_policy=WritePolicy.WRITE_BACK).write_policy is WritePolicy.WRITE_BACK
    )


# ---------------------------------------------------------- 2: the host reserve
def test_host_reserve_is_a_config_field_that_reaches_the_host_pools():
    assert HiCacheConfig(device_pages=4).host_reserve_bytes == DEFAULT_RESERVE_BYTES
    small = HiCache(SPEC, make_mesh(1, 1), HiCacheConfig(device_pages=4, host_reserve_bytes=0))
    assert small.host.num_pages == 8
    small.close()
    too_much = available_host_memory() + (1 << 40)  # no machine leaves this free
    with pytest.raises(ValueError, match="host_reserve_bytes"):
        HiCache(SPEC, make_mesh(1, 1), HiCacheConfig(device_pages=4, host_reserve_bytes=too_much))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "0"])
def test_host_reserve_must_be_an_int_at_least_zero(bad):
    with pytest.raises(ValueError, match="host_reserve_bytes"):
        HiCacheConfig(device_pages=4, host_reserve_bytes=bad)


# -------------------------------------------------- 3: the layerwise default
def test_layerwise_defaults_agree_between_the_cache_and_the_serving_loop():
    def default(fn):
        return inspect.signature(fn).parameters["layerwise"].default

    got = {
        "HiCache.admit": default(HiCache.admit),
        "ServingLoop": default(ServingLoop.__init__),
        "ServingLoop.for_model": default(ServingLoop.for_model),
    }
    assert set(got.values()) == {False}, got


# ------------------------------------------------------- 5: partition sequences
def test_partition_accepts_a_list_as_the_model_does_and_stores_a_tuple():
    a = HiCacheConfig(device_pages=4, partition=[3, 3])
    b = HiCacheConfig(device_pages=4, partition=(3, 3))
    assert a.partition == (3, 3) and a == b and hash(a) == hash(b)
    cache = HiCache(SPEC, make_mesh(2, 1), HiCacheConfig(device_pages=4, partition=[4, 2]))
    assert [m.num_local_layers for m in cache.layer_maps] == [4, 2]
    cache.close()


@pytest.mark.parametrize("bad", [3, "33", [3, 0], [3, -1], [2.0, 4]])
def test_partition_refuses_what_is_not_a_sequence_of_positive_ints(bad):
    with pytest.raises(ValueError, match="partition"):
        HiCacheConfig(device_pages=4, partition=bad)


# ------------------------------------------------ 6: prefetch_threshold=0
def test_prefetch_threshold_zero_is_refused_not_read_as_one():
    with pytest.raises(ValueError, match=r"prefetch_threshold.*got 0"):
        StorageConfig(model_id="m", prefetch_threshold=0)
    assert StorageConfig(model_id="m", prefetch_threshold=1).prefetch_threshold == 1


# ------------------------------------------- 7: loaded_pages counts L3 pages
def test_loaded_pages_counts_storage_pages_as_documented(tmp_path):
    store = FileBackend(tmp_path)
    tokens = _tokens(7, 3)
    _write(store, tokens, 3.0)
    cache, _pools, req = _read(store, tokens)
    s = cache.stats()
    assert req.storage_hit_tokens == 3 * PAGE and req.host_hit_tokens == 0
    # documented: full pages copied host -> device, host hits and L3 hits alike
    assert s["loaded_pages"] == (s["host_hit_tokens"] + s["storage_hit_tokens"]) // PAGE == 3
    cache.release(req)
    cache.close()


def test_docs_of_the_report_fields_name_storage():
    from jaxhicache.cache import stats

    src = inspect.getsource(stats.CacheStats)
    assert "host -> device: host hits and L3 hits" in src
    assert "became host nodes" not in src  # they become tree nodes at insert (cache/README)
    readme = (Path(__file__).parents[1] / "models" / "README.md").read_text()
    assert "`storage_cached_tokens`" in readme


# ------------------------------------ review: lookup_windows is an enum, strings kept
@pytest.mark.parametrize("value", ["auto", "all", "end"])
def test_lookup_windows_takes_the_enum_or_its_string_and_stores_the_enum(value):
    from jaxhicache.cache import LookupWindows

    member = LookupWindows(value)
    for given in (value, member):
        got = StorageConfig(model_id="m", lookup_windows=given).lookup_windows
        assert got is member and type(got) is LookupWindows
    assert StorageConfig(model_id="m").lookup_windows is LookupWindows.AUTO
    assert StorageConfig(model_id="m", lookup_windows=value) == StorageConfig(
        model_id="m", lookup_windows=member
    )


@pytest.mark.parametrize("bad", ["some", "AUTO", "", None, 1])
def test_lookup_windows_refuses_other_values_naming_them(bad):
    with pytest.raises(ValueError, match=rf"StorageConfig\.lookup_windows .*got {bad!r}"):
        StorageConfig(model_id="m", lookup_windows=bad)


# ------------------------------- review: one name per operation (evict, not evict_device)
def test_the_serving_loop_evicts_under_the_caches_name():
    class Cache:
        def evict(self, pools, num_pages):
            self.args = (pools, num_pages)
            return num_pages - 1

    loop = ServingLoop.__new__(ServingLoop)  # the methods under test touch .cache / .pools only
    loop.cache, loop.pools = Cache(), object()
    assert ServingLoop.evict.__name__ == HiCache.evict.__name__ == "evict"
    assert loop.evict(5) == 4 and loop.cache.args == (loop.pools, 5)
    with pytest.warns(DeprecationWarning, match=r"ServingLoop\.evict_device .*ServingLoop\.evict"):
        assert loop.evict_device(3) == 2  # the old name: an alias that warns
    assert loop.cache.args == (loop.pools, 3)
    notebook = (Path(__file__).parents[1] / "notebooks" / "02_hierarchical_cache.ipynb").read_text()
    assert "loop.evict(" in notebook and "evict_device" not in notebook
