"""Prometheus metrics of a :class:`~jaxhicache.cache.HiCache` (``pip install jaxhicache[metrics]``).

Data flow::

    cache.stats()              ──┐  read at every scrape: counters, page gauges, l3_* counters
    cache.ledger[tier, space]  ──┤  allocator capacities (gauges)
    cache.engine.stats         ──┤  TransferStats: deltas of (bytes, seconds, transfers) per
      (and the l3_* read/write   │  direction since the last update() -> one GB/s observation
       bytes/seconds/objects)    │  per direction that moved data (update() and every scrape)
                                 v
    CacheMetrics (a custom collector on a CollectorRegistry) ──> MetricsServer: GET /metrics

Nothing is pushed into ``prometheus_client`` metric objects between scrapes: each
scrape reads the cache's own counters, so exported values always equal
``cache.stats()`` at that moment. The reads are unsynchronised with the serving
thread (each value is a consistent integer; the set may straddle one request).
``prometheus_client`` is imported when a :class:`CacheMetrics` is built, never at
module import.

Names, with the default prefix ``jaxhicache_``: ``metric <- source [SGLang]``. The
source is a ``cache.stats()`` key unless it says otherwise; ``x page`` converts pages
to tokens. ``[= name]``: SGLang exports ``sglang:name`` with the same meaning;
``[~ name]``: SGLang's closest metric, which differs as noted; ``[-]``: none.

Requests and hits

* ``num_requests_total`` <- ``requests`` [= num_requests_total]
* ``deferred_requests_total`` <- ``deferred_requests`` [-]
* ``query_tokens_total`` <- ``query_tokens`` [~ prompt_tokens_total: every prompt token]
* ``cached_tokens_total{tier=device|host|storage}`` <- ``{tier}_hit_tokens``
  [= cached_tokens_total{cache_source=device|host|storage}]
* ``cache_hit_rate`` (gauge) <- ``hit_rate`` [= cache_hit_rate; SGLang's is recent, ours
  since the cache started]
* ``inserted_tokens_total`` <- ``inserted_tokens`` [-]

Device -> host backups (D2H)

* ``hicache_backups_total`` <- ``backups_issued`` [-]
* ``hicache_backups_skipped_total`` <- ``backups_skipped`` [~ hicache_backup_dropped_tokens_total]
* ``hicache_backups_failed_total`` <- ``backups_failed`` [-]
* ``hicache_backup_pages_total`` <- ``backed_up_pages`` [-]
* ``hicache_backup_tokens_total`` <- ``backed_up_pages`` x page [= hicache_backup_tokens_total]
* ``hicache_backup_bytes_total`` <- ``backup_bytes`` [= hicache_backup_bytes_total]
* ``hicache_backup_seconds_total`` <- ``cache.engine.stats.backup_seconds``
  [~ hicache_backup_duration_seconds: a histogram; ours is its sum]
* ``hicache_backups_in_flight`` (gauge) <- ``in_flight_backups`` [-]

Host -> device load-back (H2D, host hits and L3-prefetched pages)

* ``load_back_dispatches_total`` <- ``load_dispatches`` [-]
* ``load_back_pages_total{space=full|swa}`` <- ``loaded_pages`` / ``loaded_swa_pages`` [-]
* ``load_back_tokens_total`` <- ``loaded_pages`` x page [= load_back_tokens_total]
* ``load_back_bytes_total`` <- ``load_bytes`` [= load_back_bytes_total]
* ``load_back_seconds_total`` <- ``cache.engine.stats.load_seconds``
  [~ load_back_duration_seconds: a histogram; ours is its sum]

Transfers (both directions)

* ``transfers_total{direction=h2d|d2h}`` <- ``cache.engine.stats.loads`` / ``.backups`` [-]
* ``transfer_seconds_total`` <- ``transfer_seconds`` [-]
* ``transfer_stale_rows_skipped_total`` <- ``cache.engine.stats.stale_rows_skipped`` [-]
* ``transfer_bandwidth_gb_s{direction=h2d|d2h}`` (histogram, GB/s) <- deltas of
  ``cache.engine.stats`` [~ kv_transfer_speed_gb_s: a gauge of PD-disaggregation transfers]

Eviction and occupancy

* ``evicted_pages_total{tier=device|host}`` <- ``{tier}_evicted_pages`` [-]
* ``evicted_tokens_total`` <- ``device_evicted_pages`` x page [= evicted_tokens_total]
* ``swa_reclaimed_pages_total{tier}`` <- ``{tier}_swa_reclaimed_pages`` [-]
* ``device_pages_used{space=full|swa}`` / ``host_pages_used{space}`` (gauges)
  <- ``{tier}_{space}_pages_used`` [-]
* ``device_pages_capacity{space}`` / ``host_pages_capacity{space}`` (gauges)
  <- ``cache.ledger[tier, space].capacity`` [-]
* ``num_used_tokens`` / ``max_total_num_tokens`` (gauges) <- device full pages used /
  capacity x page [= num_used_tokens / max_total_num_tokens]
* ``token_usage`` (gauge) <- device full pages used / capacity [= token_usage]
* ``hicache_host_used_tokens`` / ``hicache_host_total_tokens`` (gauges) <- host full pages
  used / capacity x page [= hicache_host_used_tokens / hicache_host_total_tokens]

L3 (storage)

* ``prefetches_total`` <- ``storage_prefetches`` [-]
* ``prefetched_tokens_total`` <- ``storage_prefetched_tokens`` [= prefetched_tokens_total]
* ``prefetch_failures_total`` <- ``storage_read_failures`` [-]
* ``storage_written_pages_total`` <- ``storage_backed_up_pages`` (stage pages)
  [~ backuped_tokens_total: tokens]
* ``storage_write_failures_total`` <- ``storage_write_failures`` [-]
* ``storage_<field>`` (counters, with an L3 tier) <- ``l3_<field>``: every
  :class:`~jaxhicache.storage.stats.StorageStats` field under the name its
  ``as_prometheus()`` gives it, e.g. ``storage_hit_pages_total``,
  ``storage_integrity_failures_total`` [-; SGLang's ``prefetch_pgs`` / ``backup_pgs`` are
  per-batch histograms of what ``storage_prefetched_pages_total`` /
  ``storage_backed_up_pages_total`` count]
* ``prefetch_bandwidth`` / ``backup_bandwidth`` (histograms, GB/s, with an L3 tier) <- deltas
  of ``l3_read_*`` / ``l3_write_*`` bytes, seconds, objects [= prefetch_bandwidth /
  backup_bandwidth]

Multi-process agreement

* ``divergence_checks_total`` / ``agreement_calls_total`` / ``agreement_seconds_total``
  <- the keys of the same names [-]

Any other numeric ``cache.stats()`` key is exported untyped as ``cache_<key>``; a key
this table names that ``cache.stats()`` lacks is skipped. No scrape fails on either.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import itertools
import math
import numbers
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, final

from jaxhicache.cache import HiCache
from jaxhicache.spec import PageSpace, Tier

__all__ = ["DEFAULT_BANDWIDTH_BUCKETS", "CacheMetrics", "Direction", "MetricsServer"]

DEFAULT_BANDWIDTH_BUCKETS: tuple[float, ...] = (
    0.001, 0.01, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0,
)  # fmt: skip
"""GB/s bucket bounds: from a CPU test run (MB/s) to an H200's host link (~50 GB/s)."""

_INSTALL = "pip install jaxhicache[metrics]"
_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def _prometheus():
    """The ``prometheus_client`` module, or an ImportError that says how to install it."""
    try:
        import prometheus_client
        import prometheus_client.core
    except ImportError as e:
        raise ImportError(
            f"jaxhicache.metrics needs prometheus_client, which is not installed: {_INSTALL}"
        ) from e
    return prometheus_client


class Kind(enum.StrEnum):
    """Prometheus metric type of a family."""

    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"
    UNTYPED = "untyped"


class Direction(enum.StrEnum):
    """Which way a transfer moved pages (the ``direction`` label)."""

    H2D = "h2d"  # host -> device: load-back of host hits and L3-prefetched pages
    D2H = "d2h"  # device -> host: backups


@dataclasses.dataclass(frozen=True)
class _Family:
    name: str  # without the prefix; counters without "_total" (the exposition appends it)
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class _Series:
    """One sample from one ``cache.stats()`` key (``x page size`` with ``per_page``)."""

    key: str
    family: str
    labels: tuple[str, ...] = ()
    per_page: bool = False


_TIER, _SPACE, _DIR = ("tier",), ("space",), ("direction",)
_C, _G, _H = Kind.COUNTER, Kind.GAUGE, Kind.HISTOGRAM

_FAMILIES: tuple[_Family, ...] = (
    _Family("num_requests", _C, "Requests admitted."),
    _Family("deferred_requests", _C, "Requests deferred for lack of device pages."),
    _Family("query_tokens", _C, "Page-aligned tokens of admitted prompts (minus the last)."),
    _Family("cached_tokens", _C, "Prefix tokens served from the cache, by tier.", _TIER),
    _Family("cache_hit_rate", _G, "Cached tokens / query tokens since the cache started."),
    _Family("inserted_tokens", _C, "Tokens inserted into the radix tree."),
    _Family("hicache_backups", _C, "Device-to-host backups issued."),
    _Family("hicache_backups_skipped", _C, "Backups skipped: no host room."),
    _Family("hicache_backups_failed", _C, "Backups whose copy raised (dropped)."),
    _Family("hicache_backup_pages", _C, "Full pages backed up to host."),
    _Family("hicache_backup_tokens", _C, "Tokens backed up to host."),
    _Family("hicache_backup_bytes", _C, "Bytes copied device to host."),
    _Family("hicache_backup_seconds", _C, "Seconds spent in device-to-host copies."),
    _Family("hicache_backups_in_flight", _G, "Backups issued and not recorded yet."),
    _Family("load_back_dispatches", _C, "Merged host-to-device loads dispatched."),
    _Family("load_back_pages", _C, "Pages loaded host to device, by page space.", _SPACE),
    _Family("load_back_tokens", _C, "Tokens loaded host to device."),
    _Family("load_back_bytes", _C, "Bytes copied host to device."),
    _Family("load_back_seconds", _C, "Seconds spent in host-to-device copies."),
    _Family("transfers", _C, "Host/device page transfers, by direction.", _DIR),
    _Family("transfer_seconds", _C, "Seconds the cache spent dispatching loads and backups."),
    _Family("transfer_stale_rows_skipped", _C, "Backup rows dropped: their host page moved on."),
    _Family("transfer_bandwidth_gb_s", _H, "Host/device transfer bandwidth in GB/s.", _DIR),
    _Family("evicted_pages", _C, "Full pages evicted, by tier.", _TIER),
    _Family("evicted_tokens", _C, "Tokens evicted from the device."),
    _Family("swa_reclaimed_pages", _C, "SWA pages reclaimed outside windows, by tier.", _TIER),
    _Family("device_pages_used", _G, "Device pages allocated, by page space.", _SPACE),
    _Family("device_pages_capacity", _G, "Device pages, by page space.", _SPACE),
    _Family("host_pages_used", _G, "Host pages allocated, by page space.", _SPACE),
    _Family("host_pages_capacity", _G, "Host pages, by page space.", _SPACE),
    _Family("num_used_tokens", _G, "Tokens of allocated device full pages."),
    _Family("max_total_num_tokens", _G, "Tokens the device full pages hold."),
    _Family("token_usage", _G, "Device full pages allocated / capacity."),
    _Family("hicache_host_used_tokens", _G, "Tokens of allocated host full pages."),
    _Family("hicache_host_total_tokens", _G, "Tokens the host full pages hold."),
    _Family("prefetches", _C, "L3 prefetches started."),
    _Family("prefetched_tokens", _C, "Tokens an L3 prefetch brought in."),
    _Family("prefetch_failures", _C, "L3 prefetches that failed as a whole."),
    _Family("storage_written_pages", _C, "Stage pages the cache wrote to L3."),
    _Family("storage_write_failures", _C, "L3 write batches that failed."),
    _Family("divergence_checks", _C, "Cross-process cache digest comparisons."),
    _Family("agreement_calls", _C, "Cross-process agreement collectives."),
    _Family("agreement_seconds", _C, "Seconds in cross-process agreement collectives."),
)
_L3_FAMILIES: tuple[_Family, ...] = (
    _Family("prefetch_bandwidth", _H, "Storage-to-host (L3 read) bandwidth in GB/s."),
    _Family("backup_bandwidth", _H, "Host-to-storage (L3 write) bandwidth in GB/s."),
)

_SERIES: tuple[_Series, ...] = (
    _Series("requests", "num_requests"),
    _Series("deferred_requests", "deferred_requests"),
    _Series("query_tokens", "query_tokens"),
    _Series("device_hit_tokens", "cached_tokens", (Tier.DEVICE,)),
    _Series("host_hit_tokens", "cached_tokens", (Tier.HOST,)),
    _Series("storage_hit_tokens", "cached_tokens", (Tier.STORAGE,)),
    _Series("hit_rate", "cache_hit_rate"),
    _Series("inserted_tokens", "inserted_tokens"),
    _Series("backups_issued", "hicache_backups"),
    _Series("backups_skipped", "hicache_backups_skipped"),
    _Series("backups_failed", "hicache_backups_failed"),
    _Series("backed_up_pages", "hicache_backup_pages"),
    _Series("backed_up_pages", "hicache_backup_tokens", per_page=True),
    _Series("backup_bytes", "hicache_backup_bytes"),
    _Series("in_flight_backups", "hicache_backups_in_flight"),
    _Series("load_dispatches", "load_back_dispatches"),
    _Series("loaded_pages", "load_back_pages", (PageSpace.FULL,)),
    _Series("loaded_swa_pages", "load_back_pages", (PageSpace.SWA,)),
    _Series("loaded_pages", "load_back_tokens", per_page=True),
    _Series("load_bytes", "load_back_bytes"),
    _Series("transfer_seconds", "transfer_seconds"),
    _Series("device_evicted_pages", "evicted_pages", (Tier.DEVICE,)),
    _Series("host_evicted_pages", "evicted_pages", (Tier.HOST,)),
    _Series("device_evicted_pages", "evicted_tokens", per_page=True),
    _Series("device_swa_reclaimed_pages", "swa_reclaimed_pages", (Tier.DEVICE,)),
    _Series("host_swa_reclaimed_pages", "swa_reclaimed_pages", (Tier.HOST,)),
    _Series("device_full_pages_used", "device_pages_used", (PageSpace.FULL,)),
    _Series("device_swa_pages_used", "device_pages_used", (PageSpace.SWA,)),
    _Series("host_full_pages_used", "host_pages_used", (PageSpace.FULL,)),
    _Series("host_swa_pages_used", "host_pages_used", (PageSpace.SWA,)),
    _Series("device_full_pages_used", "num_used_tokens", per_page=True),
    _Series("host_full_pages_used", "hicache_host_used_tokens", per_page=True),
    _Series("storage_prefetches", "prefetches"),
    _Series("storage_prefetched_tokens", "prefetched_tokens"),
    _Series("storage_read_failures", "prefetch_failures"),
    _Series("storage_backed_up_pages", "storage_written_pages"),
    _Series("storage_write_failures", "storage_write_failures"),
    _Series("divergence_checks", "divergence_checks"),
    _Series("agreement_calls", "agreement_calls"),
    _Series("agreement_seconds", "agreement_seconds"),
)
_MAPPED_KEYS = frozenset(s.key for s in _SERIES)
_L3_KEY = "l3_"  # HiCache.stats() prefix of the L3 backend's StorageStats counters


@dataclasses.dataclass
class _Rate:
    """GB/s observations from the deltas of cumulative ``(bytes, seconds, count)``."""

    bounds: tuple[float, ...]
    last: tuple[float, float, float] = (0.0, 0.0, 0.0)  # cumulative from the cache's start
    counts: list[int] = dataclasses.field(default_factory=list)  # per bucket, then +Inf
    sum: float = 0.0

    def __post_init__(self):
        self.counts = [0] * (len(self.bounds) + 1)

    def advance(self, nbytes: float, seconds: float, count: float) -> None:
        """Observes the mean bandwidth of the transfers since the last call, if any."""
        b0, s0, n0 = self.last
        db, ds, dn = nbytes - b0, seconds - s0, count - n0
        self.last = (nbytes, seconds, count)
        if dn <= 0 or ds <= 0 or db < 0:  # nothing finished, or no measurable time
            return
        gb_s = db / ds / 1e9
        self.counts[bisect.bisect_left(self.bounds, gb_s)] += 1  # first bound >= gb_s
        self.sum += gb_s

    def buckets(self) -> list[tuple[str, float]]:
        from prometheus_client.utils import floatToGoString

        out: list[tuple[str, float]] = []
        acc = 0
        for b, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            acc += n
            out.append((floatToGoString(b), acc))
        return out


@final
class MetricsServer:
    """A ``/metrics`` HTTP endpoint on a daemon thread; ``close()`` stops it.

    Made by :meth:`CacheMetrics.start_http_server`; also a context manager that
    closes it on exit.

    Args:
      httpd: the running HTTP server (``prometheus_client.start_http_server``'s).
      thread: the daemon thread serving it.
    """

    def __init__(self, httpd, thread: threading.Thread):
        self._httpd = httpd
        self._thread = thread

    @property
    def host(self) -> str:
        """The bound address."""
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        """The bound port (the free one the OS chose for ``port=0``)."""
        return int(self._httpd.server_port)

    @property
    def url(self) -> str:
        """The scrape URL of the metrics page."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stops serving and closes the socket (idempotent)."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@final
class CacheMetrics:
    """Exports one cache's counters as Prometheus metrics (a custom collector).

    Args:
      cache: the :class:`~jaxhicache.cache.HiCache` to read.
      registry: a ``prometheus_client.CollectorRegistry`` to register on (default: a
        fresh one, ``self.registry``; pass ``prometheus_client.REGISTRY`` to join the
        process's default registry).
      prefix: prepended to every metric name (``""`` or a valid Prometheus name).
      labels: constant labels on every sample (e.g. ``{"model_name": "..."}``, as SGLang
        labels its metrics). Two caches on one registry need different prefixes: the
        registry refuses duplicate metric names whatever the labels.
      bandwidth_buckets: GB/s upper bounds of the bandwidth histograms, increasing.

    Raises:
      ImportError: ``prometheus_client`` is not installed (the message names
        ``pip install jaxhicache[metrics]``).
      ValueError: ``cache`` is not a ``HiCache``, or a bad prefix, label or bucket
        bound (named); also the registry's refusal of a duplicate metric name.
    """

    def __init__(
        self,
        cache: HiCache,
        registry=None,
        prefix: str = "jaxhicache_",
        *,
        labels: Mapping[str, str] | None = None,
        bandwidth_buckets: Sequence[float] = DEFAULT_BANDWIDTH_BUCKETS,
    ):
        prom = _prometheus()
        if not isinstance(cache, HiCache):
            raise ValueError(f"cache must be a HiCache, got {type(cache).__name__}")
        if not isinstance(prefix, str) or (prefix and not _NAME_RE.match(prefix)):
            raise ValueError(f"prefix must be '' or a Prometheus metric name, got {prefix!r}")
        self._const = _check_labels(labels)
        self._bounds = _check_buckets(bandwidth_buckets)
        self.cache = cache
        self.prefix = prefix
        self.registry = prom.CollectorRegistry() if registry is None else registry
        self._lock = threading.Lock()
        self._rates = {d: _Rate(self._bounds) for d in Direction}
        self._l3_rates = {name: _Rate(self._bounds) for name in ("read", "write")}
        self.registry.register(self)

    # ------------------------------------------------------------ updates
    def update(self) -> None:
        """Observes the transfer bandwidth since the last update (also done at each scrape).

        Call it as often as you want finer histograms (e.g. once per serving step):
        each call adds at most one observation per direction, the mean GB/s of the
        transfers that finished since the previous call.
        """
        with self._lock:
            self._advance(self.cache.stats() if self.cache.l3 is not None else None)

    def _advance(self, stats: Mapping[str, Any] | None) -> None:
        t = self.cache.engine.stats_snapshot()
        self._rates[Direction.H2D].advance(t.load_bytes, t.load_seconds, t.loads)
        self._rates[Direction.D2H].advance(t.backup_bytes, t.backup_seconds, t.backups)
        if stats is not None:
            for op, rate in self._l3_rates.items():
                rate.advance(
                    stats.get(f"{_L3_KEY}{op}_bytes_total", 0),
                    stats.get(f"{_L3_KEY}{op}_seconds_total", 0.0),
                    stats.get(f"{_L3_KEY}{op}_objects_total", 0),
                )

    # ---------------------------------------------------------- collector
    def describe(self) -> list:
        """The metric families without samples, for the registry's duplicate check.

        Returns:
          One family per metric this collector exports (the L3 ones only when the
          cache has an L3 tier).
        """
        return list(self._families(None))

    def collect(self) -> Iterator:
        """One scrape: reads ``cache.stats()``, advances the bandwidth histograms.

        Yields:
          The metric families with their samples.
        """
        with self._lock:
            stats = self.cache.stats()
            self._advance(stats)
            families = list(self._families(stats))
        yield from families

    def _families(self, stats: Mapping[str, Any] | None):
        core = _prometheus().core
        const_names, const_values = tuple(self._const), tuple(self._const.values())
        made: dict[str, Any] = {}

        def family(f: _Family):
            if f.name not in made:
                cls = {
                    Kind.COUNTER: core.CounterMetricFamily,
                    Kind.GAUGE: core.GaugeMetricFamily,
                    Kind.HISTOGRAM: core.HistogramMetricFamily,
                    Kind.UNTYPED: core.UnknownMetricFamily,
                }[f.kind]
                made[f.name] = cls(self.prefix + f.name, f.help, labels=const_names + f.labels)
            return made[f.name]

        def add(f: _Family, labels: tuple[str, ...], value: float) -> None:
            family(f).add_metric(const_values + tuple(str(v) for v in labels), float(value))

        families = {f.name: f for f in _FAMILIES}
        l3 = self.cache.l3 is not None
        for f in _FAMILIES + (_L3_FAMILIES if l3 else ()):
            family(f)  # every family, even one without samples now
        if stats is None:
            return made.values()
        ps = self.cache.page_size
        for s in _SERIES:
            if s.key in stats:
                add(families[s.family], s.labels, stats[s.key] * (ps if s.per_page else 1))
        capacity = {key: a.capacity for key, a in self.cache.ledger.items()}
        for (tier, space), n in capacity.items():
            add(families[f"{tier.value}_pages_capacity"], (space,), n)
        device_full = capacity[Tier.DEVICE, PageSpace.FULL]
        add(families["max_total_num_tokens"], (), device_full * ps)
        add(families["hicache_host_total_tokens"], (), capacity[Tier.HOST, PageSpace.FULL] * ps)
        used = stats.get("device_full_pages_used")
        if used is not None:
            add(families["token_usage"], (), used / max(device_full, 1))
        t = self.cache.engine.stats_snapshot()
        add(families["transfers"], (Direction.H2D,), t.loads)
        add(families["transfers"], (Direction.D2H,), t.backups)
        add(families["load_back_seconds"], (), t.load_seconds)
        add(families["hicache_backup_seconds"], (), t.backup_seconds)
        add(families["transfer_stale_rows_skipped"], (), t.stale_rows_skipped)
        for d, rate in self._rates.items():
            family(families["transfer_bandwidth_gb_s"]).add_metric(
                (*const_values, d.value), rate.buckets(), rate.sum
            )
        if l3:
            for f, op in zip(_L3_FAMILIES, ("read", "write"), strict=True):
                rate = self._l3_rates[op]
                family(f).add_metric(const_values, rate.buckets(), rate.sum)
        for key, value in stats.items():
            if key in _MAPPED_KEYS or not _is_number(value):
                continue
            if key.startswith(_L3_KEY):  # StorageStats counters, all monotonic "*_total"
                field = key[len(_L3_KEY) :].removesuffix("_total")
                add(_Family(f"storage_{field}", _C, f"L3 backend StorageStats.{field}."), (), value)
            else:  # a counter this module does not know yet: exported, untyped
                add(_Family(f"cache_{key}", Kind.UNTYPED, f"HiCache.stats()[{key!r}]."), (), value)
        return made.values()

    # --------------------------------------------------------------- HTTP
    def start_http_server(self, port: int, addr: str = "127.0.0.1") -> MetricsServer:
        """Serves this registry on ``http://addr:port/metrics``.

        Args:
          port: the TCP port, ``0``: a free one (read it back from the server).
          addr: the address to bind; the default is loopback only, pass
            ``"0.0.0.0"`` to expose it.

        Returns:
          The running :class:`MetricsServer`; ``close()`` it when done.

        Raises:
          ValueError: ``port`` not an int in ``[0, 65535]`` or ``addr`` not a
            non-empty string.
        """
        if type(port) is bool or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int in [0, 65535], got {port!r}")
        if not isinstance(addr, str) or not addr:
            raise ValueError(f"addr must be a non-empty host string, got {addr!r}")
        httpd, thread = _prometheus().start_http_server(port, addr=addr, registry=self.registry)
        return MetricsServer(httpd, thread)

    def close(self) -> None:
        """Unregisters from the registry (the cache is left alone)."""
        self.registry.unregister(self)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise ValueError(f"labels must be a mapping of label name to value, got {labels!r}")
    reserved = {"tier", "space", "direction", "le"}
    for name, value in labels.items():
        if not isinstance(name, str) or not _LABEL_RE.match(name) or name.startswith("__"):
            raise ValueError(f"label name {name!r} is not a valid Prometheus label name")
        if name in reserved:
            raise ValueError(
                f"label name {name!r} is used by the cache metrics ({sorted(reserved)})"
            )
        if not isinstance(value, str):
            raise ValueError(f"label {name!r} must have a str value, got {value!r}")
    return dict(labels)


def _check_buckets(buckets: Sequence[float]) -> tuple[float, ...]:
    try:
        bounds = tuple(float(b) for b in buckets)
    except (TypeError, ValueError):
        raise ValueError(f"bandwidth_buckets must be numbers, got {buckets!r}") from None
    if not bounds or any(not math.isfinite(b) or b <= 0 for b in bounds):
        raise ValueError(f"bandwidth_buckets must be finite and > 0, got {list(bounds)}")
    if any(a >= b for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"bandwidth_buckets must increase strictly, got {list(bounds)}")
    return bounds
