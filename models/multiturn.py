"""The main job: a multi-turn chat workload served with the cache off, then on (L1, L2, L3).

``jaxhicache bench multiturn`` runs :func:`run_multiturn`: this module is the
sequential job (one request after another through ``ServingLoop``); with
``--concurrency N`` (``MultiturnConfig.concurrency``) it hands over to
``models/multiturn_concurrent.py`` (N clients on the continuous-batching engine).
Configuration: ``models/multiturn_config.py``; figures: ``models/multiturn_results.py``;
table and PNG: ``models/multiturn_report.py``. Data flow of the sequential job::

    MultiturnConfig ──> the preset's model (any family: models/multiturn_presets.py,
                        a ServableModel) + ServingLoop over one HiCache with the
                        preset's cache knobs (device pages < working set, host
                        pages < working set, L3 = a StorageBackend unless the
                        family's cache has no L3 tier) + Workload (models/workload.py)
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
     (3b. --two-pass              HiCache.flush (device and host emptied, L3 kept), then
                                  the same prompts again: every reusable prefix that device
                                  and host do not hold must come from L3; tokens compared
                                  with step 2 (models/multiturn_two_pass.py))
      4. L3 probe                 device and host emptied, a client's whole conversation plus
                                  a new user turn served from L3 vs recomputed (same prompt);
                                  skipped without an L3 tier
      ──> results dict (results.json), a PNG, a text table (``format_table``)

Both passes use the same compiled programs and page-table buckets, so the TTFT
ratio is the cache's effect alone. TTFT is ``RequestReport.ttft_s``: from the
start of the request's admission (cache on: match, L3 look-up and prefetch wait,
load-back) to its first token on the host. Timed steps run one after the other
on the same machine, cache off first. Backend compilations inside the timed steps
are counted (``compiles_in_timed_steps``; 0 when the warm-up covered every shape).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jaxhicache.cache import StorageConfig
from jaxhicache.mesh import make_mesh
from jaxhicache.storage import StorageBackend
from models.compile_counter import CompileCounter
from models.multiturn_concurrent import empty_tiers, run_concurrent
from models.multiturn_concurrent_results import concurrent_summary
from models.multiturn_config import JobStore, ModelPreset, MultiturnConfig, check, job_store
from models.multiturn_report import format_table, write_outputs
from models.multiturn_results import RequestRecord, build_results, snapshot
from models.multiturn_results import summary as sequential_summary
from models.multiturn_two_pass import check_two_pass, two_pass_results
from models.serving import ServingLoop
from models.workload import Transcript, Workload

__all__ = [
    "ModelPreset",
    "MultiturnConfig",
    "check",
    "format_table",
    "run_multiturn",
    "summary",
]


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, disable=not enabled, unit="req", leave=False)


class _Job:
    """One run: the model, the loop over one cache, and the two workload variants."""

    def __init__(self, config: MultiturnConfig, store: StorageBackend | None, progress: bool):
        self.config = c = config
        self.store = store  # None: the preset's cache has no L3 tier
        self.mcfg = c.preset.model_config()
        self.page = self.mcfg.page_size
        self.workload = Workload(c.workload)
        self.warm_workload = Workload(c.workload, variant=1)
        self.device_pages, self.host_pages = c.pool_sizes(self.workload)
        self.model = c.preset.build_model(make_mesh(c.pp, c.tp), self.mcfg)
        # a run tag in the model id keeps a reused store from serving an earlier run's
        # pages (tenant salts would too, but a salted L3 lookup after an L1/L2 hit raises
        # in jaxhicache/cache/l3.py today); warm-up and timed tokens never overlap anyway
        self.tag = secrets.token_hex(4)
        self.model_id = f"{c.preset.model_name}-w0/run-{self.tag}"
        storage = None
        if store is not None:
            storage = StorageConfig(
                model_id=self.model_id,
                prefetch_threshold=self.page,
                prefetch_policy=c.prefetch_policy,
                cost_model=c.l3_cost_model,
                pages_per_object=c.pages_per_object(self.page),
            )
        self.loop = ServingLoop.for_model(
            self.model,
            device_pages=self.device_pages,
            host_pages=self.host_pages,
            write_policy=c.write_policy,
            storage=storage,
            store=store,
            layerwise=True,  # the measured path: the load rides in the first chunk
            **c.preset.cache_fields(),
        )
        cache = self.loop.cache
        # a hit's granularity: whole pages, or the snapshot grid of a recurrent hybrid
        self.hit_unit = cache.config.state_grid(cache.spec) or self.page
        if c.two_pass:
            check_two_pass(cache)
        reps = c.probe_reps if store is not None else 0
        self.probe_clients = list(range(min(reps, c.workload.clients)))
        passes = 3 if c.two_pass else 2
        # warm-up and timed steps; probes: 2 serves each, the warm-up's twice
        total = 2 * passes * len(self.workload) + 3 * 2 * len(self.probe_clients)
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
        How many pages L3 holds comes from the request's own lookup
        (``HiCache.stored_pages``), which its admission then reuses.
        """
        t0 = time.perf_counter()
        if self.store is None:
            return 0.0
        cache, page = self.loop.cache, self.page
        key = prompt[:-1]
        m = cache.lookup(key)
        first, pages = m.matched_len // page, key.size // page
        if pages > first:
            need = cache.stored_pages(prompt)  # the request's own lookup, kept for admission
            short = need - self._free_host()
            if short > 0:
                short -= self.loop.evict_host(short)
            if short > 0:
                used = cache.stats()["device_full_pages_used"]
                want = math.ceil((prompt.size + gen_len - 1) / page) - m.device_len // page
                would_evict = want - (self.device_pages - used)
                if would_evict > 0:
                    self.loop.evict(min(short, would_evict))
                    cache.poll(wait=True, l3=False)  # their backups land: host-only now
                    # the pages it evicted from device may now come from L3 too
                    short = cache.stored_pages(prompt) - self._free_host()
                    if short > 0:
                        self.loop.evict_host(short)
        return time.perf_counter() - t0

    def _free_host(self) -> int:
        return self.host_pages - self.loop.cache.stats()["host_full_pages_used"]

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
            empty_tiers(self.loop.cache, self.loop.pools)
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

    def flush(self) -> tuple[dict, float]:
        """``HiCache.flush``: device and host emptied, L3 kept; (what it dropped, seconds)."""
        t0 = time.perf_counter()
        dropped = empty_tiers(self.loop.cache, self.loop.pools)
        return dropped, time.perf_counter() - t0

    def warm_up(self) -> Transcript:
        """The whole job on the variant-1 tokens (same lengths, other pages), on this
        cache: every program and eager-op shape of the timed steps compiles here, with
        the probes once more serving every L3 hit (``StorageTier.every_hit``: which of
        them the cost model accepts depends on timing). Then device and host are
        emptied."""
        wl = self.warm_workload
        _off, prompts, tr = self.cache_off(wl)
        self.cache_on(wl, prompts)
        if self.config.two_pass:
            self.flush()
            self.cache_on(wl, prompts)
        self.probe(tr)
        l3 = self.loop.cache.l3
        if l3 is not None and self.probe_clients:
            with l3.every_hit():  # the probes' whole restores, which the model may accept
                self.probe(tr)
        empty_tiers(self.loop.cache, self.loop.pools)
        return tr


def run_multiturn(
    config: MultiturnConfig,
    *,
    store: StorageBackend | None = None,
    progress: bool = True,
    store_usage: Callable[[StorageBackend], dict] | None = None,
) -> dict:
    """Runs the job (see the module docstring) and returns the results dict.

    ``store``: the L3 backend that ``config.store`` names (both ``None``: a
    ``FileBackend`` on a temporary directory, removed afterwards; none at all when the
    preset's cache has no L3 tier, ``ModelPreset.l3_refusal``). ``store_usage``:
    reports the store's objects and bytes at the end (the CLI passes its lister). Writes ``results.json`` and ``multiturn.png``
    into ``config.out_dir`` when set. With ``config.concurrency`` set, runs the
    concurrent job instead (``models.multiturn_concurrent``).
    """
    if isinstance(config, MultiturnConfig) and config.concurrency is not None:
        return run_concurrent(config, store=store, progress=progress, store_usage=store_usage)
    check(config)
    t_start = time.perf_counter()
    with job_store(config, store) as js:
        results, records = _run(config, js, progress, store_usage, t_start)
    if config.out_dir is not None:
        write_outputs(results, records, Path(config.out_dir))
    return results


def _run(config: MultiturnConfig, js: JobStore, progress: bool, store_usage, t_start: float):
    """The sequential job's steps on the job's store; ``(results, records)``."""
    store = js.backend
    counter = CompileCounter()
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
            before = snapshot(job.loop.cache)
            t0 = time.perf_counter()
            on, headroom, _tr_on = job.cache_on(job.workload, prompts)
            job.loop.cache.poll(wait=True)
            on_s = time.perf_counter() - t0
            after = snapshot(job.loop.cache)
            if config.two_pass:
                job.bar.set_description("flush, second pass")
                flushed, flush_s = job.flush()
                t0 = time.perf_counter()
                on2, headroom2, _tr2 = job.cache_on(job.workload, prompts)
                job.loop.cache.poll(wait=True)
                on2_s = time.perf_counter() - t0
            job.bar.set_description("L3 probe")
            probes = job.probe(tr)
        job.bar.close()
        records = [
            RequestRecord(t.index, t.client, t.turn, int(prompts[t.index].size), t.gen_len, a, b, h)
            for t, a, b, h in zip(job.workload.schedule, off, on, headroom, strict=True)
        ]
        usage = store_usage(js.inner) if store_usage is not None and js.inner is not None else None
        results = build_results(
            job, records, probes, before, after, usage,
            warmup_s=warmup_s, off_s=off_s, on_s=on_s, compiles=counter,
            wall_s=time.perf_counter() - t_start, temp_store=js.temporary,
        )  # fmt: skip
        if config.two_pass:
            second = [
                dataclasses.replace(r, on=b, headroom_s=h)
                for r, b, h in zip(records, on2, headroom2, strict=True)
            ]
            results["two_pass"] = two_pass_results(
                records, second, job.hit_unit, flushed=flushed, flush_s=flush_s, on_s=on2_s
            )
    finally:
        counter.close()
        if job is not None:
            job.bar.close()
            job.loop.close()
    return results, records


def summary(results: dict) -> dict:
    """The one-line JSON of a run (the headline figures), sequential or concurrent."""
    if results.get("mode") == "concurrent":
        return concurrent_summary(results)
    return sequential_summary(results)
