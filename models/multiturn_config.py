"""What the main job runs with: :class:`MultiturnConfig` and the pre-flight
:func:`check` (devices, layer split, tier capacities). The model presets, one per
family and size, are ``models/multiturn_presets.py``.

``MultiturnConfig.concurrency`` picks the job: ``None`` (default) serves the
schedule one request after another through ``ServingLoop`` (``models.multiturn``);
an int serves it with that many clients in flight through the continuous-batching
``Engine`` (``models.multiturn_concurrent``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, final

import jax

from jaxhicache.cache import PrefetchPolicy, WritePolicy
from jaxhicache.layer_map import build_layer_maps
from jaxhicache.storage import FileBackend, LatencyBackend, StorageBackend
from models.multiturn_presets import Family, ModelPreset
from models.workload import Workload, WorkloadConfig

__all__ = [
    "Family",
    "JobStore",
    "ModelPreset",
    "MultiturnConfig",
    "check",
    "check_store",
    "job_store",
]


def _positive(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if type(value) is bool or not isinstance(value, int) or value < 1:
        raise ValueError(f"MultiturnConfig.{name} must be a positive int, got {value!r}")


@final
@dataclasses.dataclass(frozen=True)
class MultiturnConfig:
    """Everything the job runs with (frozen; ``ValueError`` names a bad field and value).

    Attributes:
      preset: the model (its family, size, cache knobs and workload defaults).
      workload: the traffic (``None``: the preset's).
      pp / tp: the mesh (``pp * tp`` devices).
      device_pages / host_pages: tier capacities in pages (``None``: sized from the
        workload so that device and host each hold less than its working set).
      host_ratio: host capacity relative to device, when ``host_pages`` is unset.
      write_policy / prefetch_policy: the cache's knobs.
      store: how the L3 store was given (recorded; ``None``: a temporary directory).
      l3_cost_model: ``StorageConfig.cost_model``: serve an L3 hit only where the
        running estimates say loading it is cheaper than recomputing it (``False``:
        every hit, whatever it costs).
      store_latency_ms: added to every L3 object request (``LatencyBackend``), to
        measure the tier at an object store's round trip on one machine (0: none).
      l3_pages_per_object: ``StorageConfig.pages_per_object`` (``None``: auto, see
        :meth:`pages_per_object`).
      probe_reps: L3 probes (one client each, at most ``clients``; none when the
        preset's cache has no L3 tier).
      out_dir: where ``results.json`` and the PNG go (``None``: nowhere).
      concurrency: ``None``: the sequential job; ``N``: ``N`` clients in flight at
        once through the continuous-batching engine (at most ``workload.clients``).
      think_ms: with ``concurrency``, the pause between a client's answer and its
        next turn.
      two_pass: after the cache-on pass, flush device and host (L3 kept) and serve
        the same traffic again (``models/multiturn_two_pass.py``); sequential job only.
    """

    preset: ModelPreset = ModelPreset.BENCH
    workload: WorkloadConfig | None = None
    pp: int = 1
    tp: int = 1
    device_pages: int | None = None
    host_pages: int | None = None
    host_ratio: float | None = None
    write_policy: WritePolicy = WritePolicy.WRITE_THROUGH
    prefetch_policy: PrefetchPolicy = PrefetchPolicy.TIMEOUT
    store: str | None = None
    store_latency_ms: float = 0.0
    l3_cost_model: bool = True
    l3_pages_per_object: int | None = None
    probe_reps: int = 3
    out_dir: str | os.PathLike | None = None
    quick: bool = False
    concurrency: int | None = None
    think_ms: float = 0.0
    two_pass: bool = False

    def __post_init__(self):
        if not isinstance(self.preset, ModelPreset):
            raise ValueError(f"MultiturnConfig.preset must be a ModelPreset, got {self.preset!r}")
        if self.workload is None:
            object.__setattr__(self, "workload", self.preset.workload(quick=self.quick))
        if self.out_dir is not None:
            object.__setattr__(self, "out_dir", Path(self.out_dir))
        if not isinstance(self.workload, WorkloadConfig):
            raise ValueError(
                f"MultiturnConfig.workload must be a WorkloadConfig, got {self.workload!r}"
            )
        for name in ("pp", "tp", "probe_reps"):
            _positive(name, getattr(self, name))
        _positive("device_pages", self.device_pages, allow_none=True)
        _positive("l3_pages_per_object", self.l3_pages_per_object, allow_none=True)
        _positive("host_pages", self.host_pages, allow_none=True)
        r = self.host_ratio
        if r is not None:
            if type(r) is bool or not isinstance(r, int | float) or not math.isfinite(r) or r <= 0:
                raise ValueError(f"MultiturnConfig.host_ratio must be a number > 0, got {r!r}")
            if self.host_pages is not None:
                raise ValueError("give host_pages or host_ratio, not both")
        if not isinstance(self.write_policy, WritePolicy):
            raise ValueError(
                f"MultiturnConfig.write_policy must be a WritePolicy, got {self.write_policy!r}"
            )
        if not isinstance(self.prefetch_policy, PrefetchPolicy):
            raise ValueError(
                f"MultiturnConfig.prefetch_policy must be a PrefetchPolicy, got {self.prefetch_policy!r}"
            )
        _positive("concurrency", self.concurrency, allow_none=True)
        if self.concurrency is not None and self.concurrency > self.workload.clients:
            raise ValueError(
                f"MultiturnConfig.concurrency={self.concurrency} exceeds the workload's "
                f"{self.workload.clients} clients"
            )
        if type(self.l3_cost_model) is not bool:
            raise ValueError(
                f"MultiturnConfig.l3_cost_model must be a bool, got {self.l3_cost_model!r}"
            )
        lat = self.store_latency_ms
        if (
            type(lat) is bool
            or not isinstance(lat, int | float)
            or not math.isfinite(lat)
            or lat < 0
        ):
            raise ValueError(f"MultiturnConfig.store_latency_ms must be a number >= 0, got {lat!r}")
        if lat and self.preset.l3_refusal is not None:
            raise ValueError(
                f"--store-latency-ms on the {self.preset.value} model: {self.preset.l3_refusal}"
            )
        t = self.think_ms
        if type(t) is bool or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise ValueError(f"MultiturnConfig.think_ms must be a number >= 0, got {t!r}")
        if t and self.concurrency is None:
            raise ValueError(f"MultiturnConfig.think_ms={t} needs a concurrency")
        if type(self.two_pass) is not bool:
            raise ValueError(f"MultiturnConfig.two_pass must be a bool, got {self.two_pass!r}")
        if self.two_pass and self.concurrency is not None:
            raise ValueError(
                "--two-pass runs on the sequential job only, not with --concurrency "
                f"{self.concurrency}: drop one of them"
            )
        refusal = self.preset.l3_refusal
        if refusal is not None and (self.store is not None or self.two_pass):
            flags = " and ".join(
                f for f, on in (("--store", self.store is not None), ("--two-pass", self.two_pass))
                if on
            )  # fmt: skip
            raise ValueError(f"{flags} on the {self.preset.value} model: {refusal}")
        if self.workload.vocab > self.preset.model_config().vocab:
            raise ValueError(
                f"workload vocab {self.workload.vocab} exceeds the {self.preset.value} model's "
                f"{self.preset.model_config().vocab}"
            )

    def pages_per_object(self, page_size: int) -> int:
        """Full-space pages per L3 object: ``l3_pages_per_object`` if given; auto: on
        an object store (``s3``, ``gcs`` or ``http`` kvstore), which charges (and may
        serve one at a time) per request, objects of at least 256 tokens (``256 //
        page_size`` pages, as LMCache's default chunk), dividing a restore's requests
        by as much; 1 elsewhere, ``store_latency_ms`` included (a store answering
        every request in flight at once after a latency gains nothing from fewer,
        larger objects, and a hit would end on a coarser grid)."""
        if self.l3_pages_per_object is not None:
            return self.l3_pages_per_object
        return max(1, 256 // page_size) if _object_store(self.store) else 1

    def pool_sizes(self, workload: Workload) -> tuple[int, int]:
        """``(device_pages, host_pages)``: given, or sized so that every tier gets hits.

        Auto: device holds about 35 % and host about 70 % of the distinct pages the
        workload inserts; device never less than one request, host at least 15 % of the
        working set more than device (with write-through, host pages mirror device
        pages first: only the rest holds pages evicted from device).
        Raises ``ValueError`` when a given device capacity cannot hold one request.
        """
        page = self.preset.model_config().page_size
        need = workload.request_pages(page) + 1
        distinct = workload.distinct_pages(page)
        dev = self.device_pages or max(need * (self.concurrency or 1), math.ceil(0.35 * distinct))
        if dev < need:
            raise ValueError(
                f"device_pages={dev} cannot hold the largest request of this workload ({need} pages)"
            )
        if self.host_pages is not None:
            host = self.host_pages
        elif self.host_ratio is not None:
            host = max(1, int(dev * self.host_ratio))
        else:
            host = max(math.ceil(0.7 * distinct), dev + math.ceil(0.15 * distinct))
        return dev, host


def check(config: MultiturnConfig) -> dict:
    """Checks what the job needs before it builds anything: devices for ``pp * tp``, a
    layer split for ``pp``, tier capacities for the workload. ``ValueError`` names the
    bad value; returns ``{device_pages, host_pages, request_pages, distinct_pages}``."""
    if not isinstance(config, MultiturnConfig):
        raise ValueError(f"config must be a MultiturnConfig, got {type(config).__name__}")
    need = config.pp * config.tp
    devices = jax.devices()
    if need > len(devices):
        hint = " (on CPU: JAX_NUM_CPU_DEVICES=N)" if devices[0].platform == "cpu" else ""
        raise ValueError(
            f"--pp {config.pp} --tp {config.tp} needs {need} devices; "
            f"{len(devices)} {devices[0].platform} device(s) available{hint}"
        )
    mcfg = config.preset.model_config()
    try:
        build_layer_maps(mcfg.cache_spec(), config.pp)
    except ValueError as e:
        raise ValueError(f"--pp {config.pp} for the {config.preset.value} model: {e}") from None
    wl = Workload(config.workload)
    dev, host = config.pool_sizes(wl)
    return {
        "device_pages": dev,
        "host_pages": host,
        "request_pages": wl.request_pages(mcfg.page_size),
        "distinct_pages": wl.distinct_pages(mcfg.page_size),
    }


def _object_store(spec: str | None) -> bool:
    """Whether ``--store`` names an object store (a kvstore spec or URL on ``s3``,
    ``gcs`` or ``http``), where every request costs a round trip."""
    if not spec:
        return False
    text = spec.strip()
    if text.startswith("{"):
        try:
            driver = json.loads(text).get("driver", "")
        except (ValueError, AttributeError):
            return False
        return driver in ("s3", "gcs", "http")
    return text.split("://", 1)[0] in ("s3", "gs", "gcs", "http", "https") and "://" in text


def check_store(config: MultiturnConfig, store) -> None:
    """``ValueError`` unless ``store`` (the opened L3 backend) is given exactly when
    ``config.store`` names one."""
    if (store is None) != (config.store is None):
        raise ValueError(
            "pass the opened L3 backend as store= exactly when config.store names it "
            f"(config.store={config.store!r}, store={store!r})"
        )


class JobStore(NamedTuple):
    """The L3 backend a job serves with (:func:`job_store`).

    Attributes:
      backend: what the cache reads and writes (``None``: no L3 tier).
      inner: the store itself (``backend`` without the injected latency), for
        listing what it holds.
      temporary: whether it is a temporary directory the job removes.
    """

    backend: StorageBackend | None
    inner: StorageBackend | None
    temporary: bool


@contextlib.contextmanager
def job_store(config: MultiturnConfig, store: StorageBackend | None) -> Iterator[JobStore]:
    """The job's L3 backend: ``store`` (opened from ``config.store`` by the caller, who
    closes it), else a ``FileBackend`` on a temporary directory closed and removed on
    exit; none when the preset's cache has no L3 tier. Behind
    ``config.store_latency_ms`` per request when that is set."""
    check_store(config, store)
    tmp = None
    if store is None and config.preset.l3_refusal is None:
        tmp = tempfile.mkdtemp(prefix="jaxhicache-multiturn-")
        store = FileBackend(tmp)
    served = store
    if store is not None and config.store_latency_ms:
        served = LatencyBackend(store, config.store_latency_ms / 1e3)
    try:
        yield JobStore(served, store, tmp is not None)
    finally:
        if tmp is not None and store is not None:
            store.close()
            shutil.rmtree(tmp, ignore_errors=True)
