"""The main job: a multi-turn chat workload served with the cache off, then on (L1, L2, L3).

``jaxhicache bench multiturn`` runs :func:`run_multiturn`. Data flow::

    MultiturnConfig ──> tiny DSV4 model (preset) + ServingLoop over one HiCache
                        (device pages < working set, host pages < working set,
                        L3 = a StorageBackend) + Workload (models/workload.py)
      1. warm-up   (timed apart)  steps 2-4 on variant-1 tokens (same lengths, no shared
                                  page) on the SAME cache instance, so every program shape
                                  (chunks, decode, fused host/L3 load-backs, per page-table
                                  bucket; the eager ops per prompt length) is compiled;
                                  then device and host are emptied
      2. cache off                every turn with ServingLoop.serve_uncached (recompute from
                                  position 0); the greedy answers build the transcript
      3. cache on                 the same prompts through ServingLoop.serve: prefix hits on
                                  device, host (after device eviction) and L3 (after host
                                  eviction); answers compared token by token with step 2.
                                  Before each request a host-headroom step frees host slots
                                  for its L3 pages (an L3 prefetch evicts nothing itself);
                                  its time counts in that request's TTFT
      4. L3 probe                 device and host emptied, a client's whole conversation plus
                                  a new user turn served from L3 vs recomputed (same prompt)
      ──> results dict (results.json), a PNG, a text table (``format_table``)

Both passes use the same compiled programs and page-table buckets, so the TTFT
ratio is the cache's effect alone. TTFT is ``RequestReport.ttft_s``: from the
start of the request's admission (cache on: match, L3 look-up and prefetch wait,
load-back) to its first token on the host. Timed steps run one after the other
on the same machine, cache off first. Backend compilations inside the timed steps
are counted (``compiles_in_timed_steps``; 0 when the warm-up covered every shape).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import enum
import json
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import final

import jax
import numpy as np

from jaxhicache.cache import PrefetchPolicy, StorageConfig, WritePolicy
from jaxhicache.layer_map import build_layer_maps
from jaxhicache.mesh import make_mesh
from jaxhicache.spec import PageSpace
from jaxhicache.storage import FileBackend, Namespace, StorageBackend, page_hashes
from models.config import TinyDSV4Config
from models.dsv4 import init_params
from models.multiturn_report import format_table, json_default, write_outputs
from models.paged import PagedModel
from models.serving import RequestReport, ServingLoop
from models.workload import Transcript, Workload, WorkloadConfig

__all__ = ["ModelPreset", "MultiturnConfig", "check", "format_table", "run_multiturn", "summary"]

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class ModelPreset(enum.Enum):
    """Tiny DSV4 model sizes for the job (random weights, seed 0)."""

    BENCH = "bench"  # default: page 64, W 32, hidden 256, 8 layers (~0.2 ms per token prefill)
    SMALL = "small"  # --quick: page 32, W 16, hidden 128, 6 layers
    TINY = "tiny"  # tests: the mini preset (page 16, W 8), 4 layers, fast compilation

    def model_config(self) -> TinyDSV4Config:
        if self is ModelPreset.TINY:
            return TinyDSV4Config.mini(num_layers=4)
        page, hidden, layers = (64, 256, 8) if self is ModelPreset.BENCH else (32, 128, 6)
        return TinyDSV4Config.mini(
            num_layers=layers,
            page_size=page,
            window=page // 2,
            hca_ratio=page // 2,
            hidden=hidden,
            mlp_hidden=2 * hidden,
            vocab=512,
            head_dim=32,
            q_lora=hidden // 2,
            o_lora=hidden // 4,
            index_head_dim=16,
            index_topk=8,
        )

    @property
    def fast_compile(self) -> bool:
        """XLA opt level 0 (3× faster compiles, slower programs): the test preset only."""
        return self is ModelPreset.TINY

    def workload(self, seed: int = 0, *, quick: bool = False) -> WorkloadConfig:
        """The default traffic for this preset (``quick``: 4 clients × 3 turns, else 6 × 4)."""
        if self is ModelPreset.TINY:  # sized for the tests: every tier hit with 11 / 14 pages
            return WorkloadConfig(
                seed=seed, clients=3, turns=3, system_prompts=1, system_prompt_len=32,
                user_tokens=24, gen_tokens=8, vocab=128,
            )  # fmt: skip
        page = self.model_config().page_size
        return WorkloadConfig(
            seed=seed, clients=4 if quick else 6, turns=3 if quick else 4, system_prompts=2,
            system_prompt_len=16 * page, user_tokens=2 * page, gen_tokens=page // 2, vocab=512,
        )  # fmt: skip


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
      preset: the model.
      workload: the traffic (``None``: the preset's).
      pp / tp: the mesh (``pp * tp`` devices).
      device_pages / host_pages: tier capacities in pages (``None``: sized from the
        workload so that device and host each hold less than its working set).
      host_ratio: host capacity relative to device, when ``host_pages`` is unset.
      write_policy / prefetch_policy: the cache's knobs.
      store: how the L3 store was given (recorded; ``None``: a temporary directory).
      probe_reps: L3 probes (one client each, at most ``clients``).
      out_dir: where ``results.json`` and the PNG go (``None``: nowhere).
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
    probe_reps: int = 3
    out_dir: str | os.PathLike | None = None
    quick: bool = False

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
        if self.workload.vocab > self.preset.model_config().vocab:
            raise ValueError(
                f"workload vocab {self.workload.vocab} exceeds the {self.preset.value} model's "
                f"{self.preset.model_config().vocab}"
            )

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
        dev = self.device_pages or max(need, math.ceil(0.35 * distinct))
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


@dataclasses.dataclass
class _Record:
    """One request of the schedule, cache off and cache on."""

    index: int
    client: int
    turn: int
    prompt_len: int
    gen_len: int
    off: RequestReport
    on: RequestReport
    headroom_s: float  # the job's host-headroom step before the cache-on request

    @property
    def ttft_off_s(self) -> float:
        return self.off.ttft_s

    @property
    def ttft_on_s(self) -> float:
        """Cache-on TTFT, the host-headroom step included."""
        return self.headroom_s + self.on.ttft_s

    def row(self) -> dict:
        off, on = self.off, self.on
        return {
            "index": self.index,
            "client": self.client,
            "turn": self.turn,
            "prompt_len": self.prompt_len,
            "gen_len": self.gen_len,
            "ttft_off_ms": self.ttft_off_s * 1e3,
            "ttft_on_ms": self.ttft_on_s * 1e3,
            "headroom_ms": self.headroom_s * 1e3,
            "decode_step_off_ms": _ms(_step_s(off)),
            "decode_step_on_ms": _ms(_step_s(on)),
            "device_tokens": on.device_cached_tokens,
            "host_tokens": on.host_cached_tokens,
            "storage_tokens": on.storage_cached_tokens,
            "prefill_tokens_on": on.prefill_tokens,
            "tokens_match": bool(np.array_equal(on.generated, off.generated)),
        }


def _step_s(r: RequestReport) -> float | None:
    """Seconds per decode step (``RequestReport.decode_s``: first token to last, the
    cache's insert and release excluded); ``None`` for one token."""
    n = r.generated.size
    return r.decode_s / (n - 1) if n > 1 else None


def _ms(s: float | None) -> float | None:
    return None if s is None else s * 1e3


class _CompileCounter:
    """Counts XLA backend compilations while active (``jax.monitoring``)."""

    def __init__(self):
        self.count = 0
        self.seconds = 0.0
        self.names: list[str] = []
        self._on = False
        jax.monitoring.register_event_duration_secs_listener(self._event)

    def _event(self, event: str, duration: float, **kw) -> None:
        if self._on and event == _COMPILE_EVENT:
            self.count += 1
            self.seconds += duration
            self.names.append(str(kw.get("fun_name", "?")))

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        self._on = True
        try:
            yield
        finally:
            self._on = False

    def close(self) -> None:
        jax.monitoring.unregister_event_duration_listener(self._event)


def _leading(mask: np.ndarray) -> int:
    """Length of the leading run of ``True``."""
    bad = np.flatnonzero(~mask)
    return int(bad[0]) if bad.size else int(mask.size)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, disable=not enabled, unit="req", leave=False)


def _empty_tiers(loop: ServingLoop, device_pages: int, host_pages: int) -> None:
    """Evicts everything from device and host (backups landed, L3 writes finished and L3
    prefetches nobody claimed dropped first: BEST_EFFORT leaves landed ones behind)."""
    cache = loop.cache
    cache.poll(wait=True)
    if cache.l3 is not None:
        cache.l3.drop_landed()
    loop.evict_device(device_pages)
    loop.evict_host(host_pages)
    s = cache.stats()
    used = {k: v for k, v in s.items() if k.endswith("_pages_used") and v}
    if used:
        raise RuntimeError(f"tiers not empty after evicting everything: {used}")


class _Job:
    """One run: the model, the loop over one cache, and the two workload variants."""

    def __init__(self, config: MultiturnConfig, store: StorageBackend, progress: bool):
        self.config = c = config
        self.store = store
        self.mcfg = c.preset.model_config()
        self.page = self.mcfg.page_size
        self.workload = Workload(c.workload)
        self.warm_workload = Workload(c.workload, variant=1)
        self.device_pages, self.host_pages = c.pool_sizes(self.workload)
        mesh = make_mesh(c.pp, c.tp)
        self.model = PagedModel(
            self.mcfg, init_params(self.mcfg, 0), mesh=mesh, fast_compile=c.preset.fast_compile
        )
        # a run tag in the model id keeps a reused store from serving an earlier run's
        # pages (tenant salts would too, but a salted L3 lookup after an L1/L2 hit raises
        # in jaxhicache/cache/l3.py today); warm-up and timed tokens never overlap anyway
        self.tag = secrets.token_hex(4)
        self.model_id = f"tiny-dsv4-{c.preset.value}-w0/run-{self.tag}"
        storage = StorageConfig(
            model_id=self.model_id,
            prefetch_threshold=self.page,
            prefetch_policy=c.prefetch_policy,
        )
        self.loop = ServingLoop.for_model(
            self.model,
            device_pages=self.device_pages,
            host_pages=self.host_pages,
            write_policy=c.write_policy,
            storage=storage,
            store=store,
        )
        self.namespaces = [
            Namespace.for_stage(self.model.spec, m, model_id=self.model_id)
            for m in self.model.layer_maps
        ]
        self.probe_clients = list(range(min(c.probe_reps, c.workload.clients)))
        total = 2 * (2 * len(self.workload) + 2 * len(self.probe_clients))
        self.bar = _progress(total, progress)

    # ----------------------------------------------------------------- passes
    def host_headroom(self, prompt: np.ndarray, gen_len: int) -> float:
        """Makes room in host slots for the pages of ``prompt`` that L3 holds after its
        L1/L2 match; returns the seconds it took (added to the request's TTFT).

        An L3 prefetch takes free host slots and evicts nothing for them
        (``StorageTier.start_prefetch``), so on a full host every L3 hit would be a miss.
        Like a server's host watermark, this evicts LRU host-only leaves (L3 holds their
        pages) and, when those are too few (host slots mirror device pages under
        write-through), first the device pages the request's admission would evict anyway.
        The L3 look-up is ``exists`` per page (it counts no hits).
        """
        t0 = time.perf_counter()
        cache, page = self.loop.cache, self.page
        key = prompt[:-1]
        m = cache.lookup(key)
        first, pages = m.matched_len // page, key.size // page
        if pages > first:
            hashes = page_hashes(key[: pages * page], page)[first:]
            need = min(
                _leading(self.store.exists(ns, PageSpace.FULL, hashes)) for ns in self.namespaces
            )
            short = need - (self.host_pages - cache.stats()["host_full_pages_used"])
            if short > 0:
                short -= self.loop.evict_host(short)
            if short > 0:
                used = cache.stats()["device_full_pages_used"]
                want = math.ceil((prompt.size + gen_len - 1) / page) - m.device_len // page
                would_evict = want - (self.device_pages - used)
                if would_evict > 0:
                    self.loop.evict_device(min(short, would_evict))
                    cache.poll(wait=True)
                    self.loop.evict_host(short)
        return time.perf_counter() - t0

    def cache_on(self, wl: Workload, prompts=None) -> tuple[list, list, Transcript]:
        """Serves the schedule with the cache; ``prompts``: replay these (else the
        transcript of this pass's own answers). Returns reports, per-request host
        headroom seconds, transcript."""
        tr = Transcript(wl)
        reports, headroom = [], []
        for t in wl.schedule:
            p = tr.prompt(t.client, t.turn) if prompts is None else prompts[t.index]
            headroom.append(self.host_headroom(p, t.gen_len))
            r = self.loop.serve(p, t.gen_len)
            tr.record(t.client, t.turn, r.generated)
            reports.append(r)
            self.bar.update()
        return reports, headroom, tr

    def cache_off(self, wl: Workload) -> tuple[list, list, Transcript]:
        tr = Transcript(wl)
        reports, prompts = [], []
        for t in wl.schedule:
            p = tr.prompt(t.client, t.turn)
            r = self.loop.serve_uncached(p, t.gen_len)
            tr.record(t.client, t.turn, r.generated)
            reports.append(r)
            prompts.append(p)
            self.bar.update()
        return reports, prompts, tr

    def probe(self, tr: Transcript) -> list[dict]:
        """Per probe client: device and host emptied, its conversation + a new user turn
        served from L3 and recomputed (order alternating), both TTFTs."""
        out = []
        for k, c in enumerate(self.probe_clients):
            _empty_tiers(self.loop, self.device_pages, self.host_pages)
            prompt = tr.probe_prompt(c)
            runs = {}
            for which in ("on", "off") if k % 2 == 0 else ("off", "on"):
                if which == "on":
                    runs[which] = self.loop.serve(prompt, 1)
                else:
                    runs[which] = self.loop.serve_uncached(prompt, 1)
                self.bar.update()
            on, off = runs["on"], runs["off"]
            out.append(
                {
                    "client": c,
                    "prompt_len": int(prompt.size),
                    "storage_tokens": on.storage_cached_tokens,
                    "device_tokens": on.device_cached_tokens,
                    "host_tokens": on.host_cached_tokens,
                    "ttft_l3_ms": on.ttft_s * 1e3,
                    "ttft_recompute_ms": off.ttft_s * 1e3,
                    "ratio": on.ttft_s / off.ttft_s,
                    "tokens_match": bool(np.array_equal(on.generated, off.generated)),
                }
            )
        return out

    def warm_up(self) -> Transcript:
        """The whole job on the variant-1 tokens (same lengths, other pages), on this
        cache: every program and eager-op shape of the timed steps compiles here. Then
        device and host are emptied."""
        wl = self.warm_workload
        _off, prompts, tr = self.cache_off(wl)
        self.cache_on(wl, prompts)
        self.probe(tr)
        _empty_tiers(self.loop, self.device_pages, self.host_pages)
        return tr


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


def summary(results: dict) -> dict:
    """The one-line JSON of a run (the headline figures)."""
    keys = (
        "ttft_ratio_later_turns", "decode_step_ratio", "hit_tokens", "prefill_tokens",
        "tokens_match", "l3_restore_vs_recompute", "warmup_s", "wall_s",
        "compiles_in_timed_steps",
    )  # fmt: skip
    out = {"bench": "multiturn", **{k: results[k] for k in keys}}
    out["ttft_turn1_ratio"] = results["ttft"]["turn1"]["ratio_p50"]
    out["preset"] = results["config"]["preset"]
    return json.loads(
        json.dumps(out, default=json_default), parse_float=lambda x: round(float(x), 4)
    )


def run_multiturn(
    config: MultiturnConfig,
    *,
    store: StorageBackend | None = None,
    progress: bool = True,
    store_usage: Callable[[StorageBackend], dict] | None = None,
) -> dict:
    """Runs the job (see the module docstring) and returns the results dict.

    ``store``: the L3 backend that ``config.store`` names (both ``None``: a
    ``FileBackend`` on a temporary directory, removed afterwards). ``store_usage``: reports the store's objects and bytes at the
    end (the CLI passes its lister). Writes ``results.json`` and ``multiturn.png``
    into ``config.out_dir`` when set.
    """
    check(config)
    if (store is None) != (config.store is None):
        raise ValueError(
            "pass the opened L3 backend as store= exactly when config.store names it "
            f"(config.store={config.store!r}, store={store!r})"
        )
    t_start = time.perf_counter()
    tmp = None
    if store is None:
        tmp = tempfile.mkdtemp(prefix="jaxhicache-multiturn-")
        store = FileBackend(tmp)
    counter = _CompileCounter()
    job = None
    try:
        job = _Job(config, store, progress)
        t0 = time.perf_counter()
        job.bar.set_description("warm-up")
        job.warm_up()
        warmup_s = time.perf_counter() - t0
        with counter.active():
            job.bar.set_description("cache off")
            t0 = time.perf_counter()
            off, prompts, tr = job.cache_off(job.workload)
            off_s = time.perf_counter() - t0
            job.bar.set_description("cache on")
            before = _snapshot(job.loop)
            t0 = time.perf_counter()
            on, headroom, _tr_on = job.cache_on(job.workload, prompts)
            job.loop.cache.poll(wait=True)
            on_s = time.perf_counter() - t0
            after = _snapshot(job.loop)
            job.bar.set_description("L3 probe")
            probes = job.probe(tr)
        job.bar.close()
        records = [
            _Record(t.index, t.client, t.turn, int(prompts[t.index].size), t.gen_len, a, b, h)
            for t, a, b, h in zip(job.workload.schedule, off, on, headroom, strict=True)
        ]
        usage = store_usage(store) if store_usage is not None else None
        results = _results(
            job, records, probes, before, after, usage,
            warmup_s=warmup_s, off_s=off_s, on_s=on_s, compiles=counter,
            wall_s=time.perf_counter() - t_start, temp_store=tmp is not None,
        )  # fmt: skip
    finally:
        counter.close()
        if job is not None:
            job.bar.close()
            job.loop.close()
        if tmp is not None:
            store.close()
            shutil.rmtree(tmp, ignore_errors=True)
    if config.out_dir is not None:
        write_outputs(results, records, Path(config.out_dir))
    return results


# ---------------------------------------------------------------------- results
def _snapshot(loop: ServingLoop) -> dict:
    """The cache's counters plus the transfer engine's D2H seconds."""
    s = loop.cache.stats()
    s["d2h_seconds"] = loop.cache.engine.stats.backup_seconds
    return s


def _pct(xs, q) -> float | None:
    return float(np.percentile(np.asarray(xs, float), q)) if len(xs) else None


def _ttft_block(records: list[_Record], sel: Callable[[_Record], bool]) -> dict:
    rs = [r for r in records if sel(r)]
    off = [r.ttft_off_s * 1e3 for r in rs]
    on = [r.ttft_on_s * 1e3 for r in rs]
    out = {
        "requests": len(rs),
        "off_p50_ms": _pct(off, 50),
        "off_p90_ms": _pct(off, 90),
        "on_p50_ms": _pct(on, 50),
        "on_p90_ms": _pct(on, 90),
    }
    out["ratio_p50"] = out["on_p50_ms"] / out["off_p50_ms"] if rs else None
    out["ratio_p90"] = out["on_p90_ms"] / out["off_p90_ms"] if rs else None
    return out


def _mismatches(records: list[_Record]) -> list[dict]:
    """Requests whose cache-on tokens differ from cache-off's, with the first differing step."""
    out = []
    for r in records:
        a, b = r.on.generated, r.off.generated
        if not np.array_equal(a, b):
            diff = np.flatnonzero(a[: min(a.size, b.size)] != b[: min(a.size, b.size)])
            step = int(diff[0]) if diff.size else min(a.size, b.size)
            out.append({"index": r.index, "client": r.client, "turn": r.turn, "first_step": step})
    return out


def _gbps(nbytes: float, seconds: float) -> float | None:
    return nbytes / seconds / 1e9 if seconds > 0 else None


def _results(job: _Job, records, probes, before, after, usage, **tm) -> dict:
    c = job.config
    d = {
        k: after[k] - before[k] for k in after if isinstance(after[k], int | float) and k in before
    }
    hit = {
        "device": sum(r.on.device_cached_tokens for r in records),
        "host": sum(r.on.host_cached_tokens for r in records),
        "storage": sum(r.on.storage_cached_tokens for r in records),
    }
    mismatches = _mismatches(records)
    logit_diff = max(float(np.abs(r.on.step_logits - r.off.step_logits).max()) for r in records)
    probe_ok = [
        p for p in probes if p["storage_tokens"] > 0 and p["device_tokens"] == p["host_tokens"] == 0
    ]
    step_on = [_step_s(r.on) for r in records if r.gen_len > 1]
    step_off = [_step_s(r.off) for r in records if r.gen_len > 1]
    later = _ttft_block(records, lambda r: r.turn >= 2)
    turns = c.workload.turns
    per_turn = []
    for t in range(1, turns + 1):
        rs = [r for r in records if r.turn == t]
        computed = sum(r.on.prefill_tokens for r in rs)
        per_turn.append(
            {
                "turn": t,
                "ttft_off_p50_ms": _pct([r.ttft_off_s * 1e3 for r in rs], 50),
                "ttft_on_p50_ms": _pct([r.ttft_on_s * 1e3 for r in rs], 50),
                "device_tokens": sum(r.on.device_cached_tokens for r in rs),
                "host_tokens": sum(r.on.host_cached_tokens for r in rs),
                "storage_tokens": sum(r.on.storage_cached_tokens for r in rs),
                "computed_tokens": computed,
            }
        )
    d2h_s = d.get("d2h_seconds", 0.0)
    mc = job.mcfg
    return {
        "job": "multiturn",
        "date": datetime.date.today().isoformat(),
        "requests": len(records),
        "ttft_ratio_later_turns": later["ratio_p50"],
        "ttft": {"turn1": _ttft_block(records, lambda r: r.turn == 1), "later_turns": later},
        "decode_step_ratio": float(np.median(step_on) / np.median(step_off)) if step_on else None,
        "decode_step_ms": {
            "cache_off_p50": float(np.median(step_off) * 1e3) if step_off else None,
            "cache_on_p50": float(np.median(step_on) * 1e3) if step_on else None,
        },
        "hit_tokens": hit,
        "prefill_tokens": {
            "cache_on": sum(r.on.prefill_tokens for r in records),
            "cache_off": sum(r.off.prefill_tokens for r in records),
        },
        "tokens_match": not mismatches and all(p["tokens_match"] for p in probes),
        "mismatches": mismatches,
        "max_step_logit_diff": logit_diff,
        "l3_restore_vs_recompute": (
            float(np.median([p["ratio"] for p in probe_ok])) if probe_ok else None
        ),
        "l3_probe": probes,
        "bytes": {
            "d2h": {
                "bytes": d.get("backup_bytes", 0),
                "seconds": d2h_s,
                "GBps": _gbps(d.get("backup_bytes", 0), d2h_s),
            },
            "h2d": {
                "bytes": d.get("load_bytes", 0),
                "note": "fused into the first prefill chunk (layer-wise); not timed apart",
            },
            "l3_write": {
                "bytes": d.get("l3_write_bytes_total", 0),
                "seconds": d.get("l3_write_seconds_total", 0.0),
                "GBps": _gbps(
                    d.get("l3_write_bytes_total", 0), d.get("l3_write_seconds_total", 0.0)
                ),
            },
            "l3_read": {
                "bytes": d.get("l3_read_bytes_total", 0),
                "seconds": d.get("l3_read_seconds_total", 0.0),
                "GBps": _gbps(d.get("l3_read_bytes_total", 0), d.get("l3_read_seconds_total", 0.0)),
            },
        },
        "usage": {
            "device_pages": job.device_pages,
            "device_pages_used": after["device_full_pages_used"],
            "host_pages": job.host_pages,
            "host_pages_used": after["host_full_pages_used"],
            "device_evicted_pages": d.get("device_evicted_pages", 0),
            "host_evicted_pages": d.get("host_evicted_pages", 0),
            "backups_skipped": d.get("backups_skipped", 0),
            "l3_store": usage,
        },
        "per_turn": per_turn,
        "cache_counters": d,  # the cache-on pass's deltas of HiCache.stats()
        "host_headroom_s": sum(r.headroom_s for r in records),  # inside the cache-on TTFTs
        "warmup_s": tm["warmup_s"],
        "cache_off_s": tm["off_s"],
        "cache_on_s": tm["on_s"],
        "wall_s": tm["wall_s"],
        "compiles_in_timed_steps": tm["compiles"].count,
        "compiled_in_timed_steps": tm["compiles"].names,
        "config": {
            "preset": c.preset.value,
            "quick": c.quick,
            "model": dataclasses.asdict(mc),
            "fast_compile": c.preset.fast_compile,
            "pp": c.pp,
            "tp": c.tp,
            "device_pages": job.device_pages,
            "host_pages": job.host_pages,
            "page_size": job.page,
            "chunk_size": job.loop.chunk_size,
            "write_policy": c.write_policy.value,
            "prefetch_policy": c.prefetch_policy.value,
            "prefetch_threshold": job.page,
            "store": c.store or "temporary FileBackend directory",
            "store_backend": repr(job.store) if not tm["temp_store"] else "FileBackend(<temp>)",
            "model_id": job.model_id,
            "workload": dataclasses.asdict(c.workload),
            "workload_digest": job.workload.digest(),
            "probe_clients": job.probe_clients,
            "jax": jax.__version__,
            "devices": f"{len(jax.devices())} x {jax.devices()[0].platform}",
            "cpu_count": os.cpu_count(),
        },
        "per_request": [r.row() for r in records],
    }
