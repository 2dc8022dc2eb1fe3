"""Prometheus export of a HiCache: a live /metrics endpoint scraped after a multi-turn run
through device, host and storage hits equals ``cache.stats()``; bandwidth histograms come
from transfer deltas; bad arguments and a missing prometheus_client fail clearly."""

from __future__ import annotations

import sys
import urllib.request

import numpy as np
import pytest

pytest.importorskip("prometheus_client", reason="pip install jaxhicache[metrics]")
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from jaxhicache.cache import (
    HiCache,
    HiCacheConfig,
    PrefetchPolicy,
    StorageConfig,
    WritePolicy,
)
from jaxhicache.mesh import make_mesh
from jaxhicache.metrics import CacheMetrics
from jaxhicache.spec import ModelCacheSpec
from jaxhicache.storage import FileBackend
from models import PagedModel, TinyDSV4Config, init_params
from models.serving import ServingLoop

P = "jaxhicache_"
DEVICE_PAGES, HOST_RATIO = 16, 2.0
SPEC = ModelCacheSpec.tiny_dsv4()


def _scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """``{(sample name, labels): value}`` of one GET of ``url``."""
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        text = r.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _key(name: str, **labels) -> tuple[str, frozenset]:
    return (P + name, frozenset(labels.items()))


def _expected(stats: dict, cache: HiCache) -> dict[tuple[str, frozenset], float]:
    """What the endpoint must show for ``stats`` (written out here, not read from the module)."""
    ps = cache.page_size
    t = cache.engine.stats
    e = {
        _key("num_requests_total"): stats["requests"],
        _key("deferred_requests_total"): stats["deferred_requests"],
        _key("query_tokens_total"): stats["query_tokens"],
        _key("cached_tokens_total", tier="device"): stats["device_hit_tokens"],
        _key("cached_tokens_total", tier="host"): stats["host_hit_tokens"],
        _key("cached_tokens_total", tier="storage"): stats["storage_hit_tokens"],
        _key("cache_hit_rate"): stats["hit_rate"],
        _key("inserted_tokens_total"): stats["inserted_tokens"],
        _key("hicache_backups_total"): stats["backups_issued"],
        _key("hicache_backups_skipped_total"): stats["backups_skipped"],
        _key("hicache_backup_pages_total"): stats["backed_up_pages"],
        _key("hicache_backup_tokens_total"): stats["backed_up_pages"] * ps,
        _key("hicache_backup_bytes_total"): stats["backup_bytes"],
        _key("hicache_backup_seconds_total"): t.backup_seconds,
        _key("hicache_backups_in_flight"): stats["in_flight_backups"],
        _key("load_back_dispatches_total"): stats["load_dispatches"],
        _key("load_back_pages_total", space="full"): stats["loaded_pages"],
        _key("load_back_pages_total", space="swa"): stats["loaded_swa_pages"],
        _key("load_back_tokens_total"): stats["loaded_pages"] * ps,
        _key("load_back_bytes_total"): stats["load_bytes"],
        _key("load_back_seconds_total"): t.load_seconds,
        _key("transfers_total", direction="h2d"): t.loads,
        _key("transfers_total", direction="d2h"): t.backups,
        _key("transfer_seconds_total"): stats["transfer_seconds"],
        _key("transfer_stale_rows_skipped_total"): t.stale_rows_skipped,
        _key("evicted_pages_total", tier="device"): stats["device_evicted_pages"],
        _key("evicted_pages_total", tier="host"): stats["host_evicted_pages"],
        _key("evicted_tokens_total"): stats["device_evicted_pages"] * ps,
        _key("swa_reclaimed_pages_total", tier="device"): stats["device_swa_reclaimed_pages"],
        _key("swa_reclaimed_pages_total", tier="host"): stats["host_swa_reclaimed_pages"],
        _key("device_pages_used", space="full"): stats["device_full_pages_used"],
        _key("device_pages_used", space="swa"): stats["device_swa_pages_used"],
        _key("host_pages_used", space="full"): stats["host_full_pages_used"],
        _key("host_pages_used", space="swa"): stats["host_swa_pages_used"],
        _key("num_used_tokens"): stats["device_full_pages_used"] * ps,
        _key("hicache_host_used_tokens"): stats["host_full_pages_used"] * ps,
        # capacities: from the config the test passed, not from the cache
        _key("device_pages_capacity", space="full"): DEVICE_PAGES,
        _key("device_pages_capacity", space="swa"): DEVICE_PAGES,
        _key("host_pages_capacity", space="full"): DEVICE_PAGES * HOST_RATIO,
        _key("host_pages_capacity", space="swa"): DEVICE_PAGES * HOST_RATIO,
        _key("max_total_num_tokens"): DEVICE_PAGES * ps,
        _key("hicache_host_total_tokens"): DEVICE_PAGES * HOST_RATIO * ps,
        _key("token_usage"): stats["device_full_pages_used"] / DEVICE_PAGES,
        _key("prefetches_total"): stats["storage_prefetches"],
        _key("prefetched_tokens_total"): stats["storage_prefetched_tokens"],
        _key("prefetch_failures_total"): stats["storage_read_failures"],
        _key("storage_written_pages_total"): stats["storage_backed_up_pages"],
        _key("storage_write_failures_total"): stats["storage_write_failures"],
    }
    used = {
        "requests", "deferred_requests", "query_tokens", "device_hit_tokens", "host_hit_tokens",
        "storage_hit_tokens", "hit_rate", "inserted_tokens", "backups_issued", "backups_skipped",
        "backed_up_pages", "backup_bytes", "in_flight_backups", "load_dispatches",
        "loaded_pages", "loaded_swa_pages", "load_bytes", "transfer_seconds",
        "device_evicted_pages", "host_evicted_pages", "device_swa_reclaimed_pages",
        "host_swa_reclaimed_pages", "device_full_pages_used", "device_swa_pages_used",
        "host_full_pages_used", "host_swa_pages_used", "storage_prefetches",
        "storage_prefetched_tokens", "storage_read_failures", "storage_backed_up_pages",
        "storage_write_failures",
    }  # fmt: skip
    named = {  # keys some versions of HiCache.stats() have
        "backups_failed": "hicache_backups_failed_total",
        "divergence_checks": "divergence_checks_total",
        "agreement_calls": "agreement_calls_total",
        "agreement_seconds": "agreement_seconds_total",
    }
    for key, value in stats.items():
        if key in used:
            continue
        if key.startswith("l3_"):  # the L3 backend's StorageStats, named by as_prometheus()
            e[_key("storage_" + key.removeprefix("l3_"))] = value
        elif key in named:
            e[_key(named[key])] = value
        else:  # a key jaxhicache.metrics does not name yet: exported untyped
            e[_key("cache_" + key)] = value
    return e


@pytest.fixture(scope="module")
def model():
    cfg = TinyDSV4Config.mini()
    return PagedModel(cfg, init_params(cfg, 0), pp=2)


def test_scraped_endpoint_equals_stats_after_device_host_and_storage_hits(model, tmp_path):
    l3 = StorageConfig(
        model_id="tiny",
        prefetch_threshold=16,
        prefetch_policy=PrefetchPolicy.WAIT_COMPLETE,
        cost_model=False,  # every tier must serve: the tiny model recomputes cheaply
    )
    loop = ServingLoop.for_model(
        model,
        device_pages=DEVICE_PAGES,
        host_ratio=HOST_RATIO,
        write_policy=WritePolicy.WRITE_THROUGH,
        storage=l3,
        store=FileBackend(tmp_path),
        layerwise=True,
    )
    cache = loop.cache
    metrics = CacheMetrics(cache)
    server = metrics.start_http_server(0)  # a free port on loopback
    try:
        assert server.url.startswith("http://127.0.0.1:") and server.port > 0
        before = _scrape(server.url)  # negative control: nothing served, nothing moved
        for tier in ("device", "host", "storage"):
            assert before[_key("cached_tokens_total", tier=tier)] == 0
        for d in ("h2d", "d2h"):
            assert before[_key("transfer_bandwidth_gb_s_count", direction=d)] == 0

        rng = np.random.default_rng(0)
        history = rng.integers(0, model.config.vocab, 40)
        served = {"device": 0, "host": 0, "storage": 0}
        for turn in range(4):  # cold, device hit, host hit (load-back), storage hit (L3)
            r = loop.serve(history, 4)
            served["device"] += r.device_cached_tokens
            served["host"] += r.host_cached_tokens
            served["storage"] += r.storage_cached_tokens
            metrics.update()
            history = np.concatenate(
                [history, r.generated, rng.integers(0, model.config.vocab, 10)]
            )
            if turn == 1:
                loop.evict(DEVICE_PAGES)  # demoted to host: the next turn loads back
            if turn == 2:
                cache.poll(wait=True)  # backups land, their L3 writes start
                loop.evict(DEVICE_PAGES)
                loop.evict_host(int(DEVICE_PAGES * HOST_RATIO))  # only L3 has it now
        assert all(served.values()), served
        cache.poll(wait=True)
        cache.poll(wait=True)  # the L3 writes of backups that landed in the first poll
        stats = cache.stats()
        got = _scrape(server.url)
        assert cache.stats() == stats, "the cache moved during the scrape"
    finally:
        server.close()
        loop.close()

    want = _expected(stats, cache)
    wrong = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
    assert not wrong, f"scraped != stats (sample: (scraped, stats)): {wrong}"
    for tier, n in served.items():
        assert got[_key("cached_tokens_total", tier=tier)] == n > 0
    assert got[_key("storage_hit_pages_total")] > 0
    assert got[_key("storage_prefetched_pages_total")] > 0
    assert got[_key("storage_integrity_failures_total")] == 0
    for d in ("h2d", "d2h"):
        count = got[_key("transfer_bandwidth_gb_s_count", direction=d)]
        assert count > 0
        assert got[_key("transfer_bandwidth_gb_s_bucket", direction=d, le="+Inf")] == count
        assert got[_key("transfer_bandwidth_gb_s_sum", direction=d)] > 0
    for name in ("prefetch_bandwidth", "backup_bandwidth"):
        assert got[_key(name + "_count")] > 0
    # the control the check above is made of: a value off by one is reported
    k = _key("cached_tokens_total", tier="host")
    assert {**got, k: got[k] + 1}[k] != want[k]


def _cache(**kw) -> HiCache:
    return HiCache(SPEC, make_mesh(2, 1), HiCacheConfig(device_pages=4, **kw))


def test_bandwidth_histogram_observes_transfer_deltas():
    cache = _cache()
    m = CacheMetrics(cache, bandwidth_buckets=(1.0, 2.0, 4.0))

    def h2d(suffix, **labels):
        return m.registry.get_sample_value(
            f"{P}transfer_bandwidth_gb_s_{suffix}", {"direction": "h2d", **labels}
        )

    assert h2d("count") == 0
    t = cache.engine.stats
    t.load_bytes, t.load_seconds, t.loads = 3_000_000_000, 1.5, 1  # one load at 2 GB/s
    m.update()
    assert (h2d("count"), h2d("sum")) == (1, 2.0)
    assert [h2d("bucket", le=le) for le in ("1.0", "2.0", "4.0", "+Inf")] == [0, 1, 1, 1]
    m.update()  # nothing moved since: no observation (scrapes above changed nothing either)
    assert h2d("count") == 1
    t.load_bytes, t.load_seconds, t.loads = 3_000_000_000 + 10**10, 2.5, 3  # 2 loads, 10 GB/s
    assert h2d("count") == 2 and h2d("sum") == 12.0  # the scrape itself observed them
    assert h2d("bucket", le="4.0") == 1 and h2d("bucket", le="+Inf") == 2
    assert (
        m.registry.get_sample_value(f"{P}transfer_bandwidth_gb_s_count", {"direction": "d2h"}) == 0
    )
    cache.close()


def test_labels_prefix_registry_and_close():
    cache = _cache()
    reg = CollectorRegistry()
    m = CacheMetrics(cache, reg, prefix="x_", labels={"model_name": "tiny"})
    assert reg.get_sample_value("x_num_requests_total", {"model_name": "tiny"}) == 0
    capacity = reg.get_sample_value(
        "x_device_pages_capacity", {"model_name": "tiny", "space": "full"}
    )
    assert capacity == 4
    assert reg.get_sample_value("x_prefetch_bandwidth_count", {"model_name": "tiny"}) is None
    with pytest.raises(ValueError, match="Duplicated"):  # same names on the same registry
        CacheMetrics(cache, reg, prefix="x_")
    m.close()
    assert reg.get_sample_value("x_num_requests_total", {"model_name": "tiny"}) is None
    CacheMetrics(cache, reg, prefix="x_")  # the names are free again
    assert reg.get_sample_value("x_num_requests_total") == 0
    cache.close()


def test_unknown_stats_keys_are_exported_untyped():
    cache = _cache()
    m = CacheMetrics(cache)
    real = cache.stats
    cache.stats = lambda: {**real(), "new_counter": 7, "note": "text"}
    assert m.registry.get_sample_value(f"{P}cache_new_counter") == 7
    assert m.registry.get_sample_value(f"{P}cache_note") is None  # not a number: skipped
    cache.close()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"prefix": "9x_"}, "prefix"),
        ({"labels": {"tier": "a"}}, "'tier' is used"),
        ({"labels": {"bad-name": "a"}}, "'bad-name'"),
        ({"labels": {"model": 3}}, "str value"),
        ({"bandwidth_buckets": (1.0, 1.0)}, "increase strictly"),
        ({"bandwidth_buckets": (0.0, 1.0)}, "> 0"),
        ({"bandwidth_buckets": ()}, "> 0"),
    ],
)
def test_bad_arguments_name_the_value(kw, match):
    cache = _cache()
    with pytest.raises(ValueError, match=match):
        CacheMetrics(cache, **kw)
    cache.close()


def test_bad_cache_and_port():
    with pytest.raises(ValueError, match="HiCache, got dict"):
        CacheMetrics({})
    cache = _cache()
    m = CacheMetrics(cache)
    for port in (-1, 65536, True, "80"):
        with pytest.raises(ValueError, match="port must be"):
            m.start_http_server(port)
    cache.close()


def test_missing_prometheus_client_names_the_extra(monkeypatch):
    cache = _cache()
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install jaxhicache\[metrics\]"):
        CacheMetrics(cache)
    cache.close()
