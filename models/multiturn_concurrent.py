"""The main job under concurrency: ``jaxhicache bench multiturn --concurrency N``.

The same multi-turn workload as the sequential job, served by the continuous-batching
:class:`~models.engine.Engine` with ``N`` clients in flight::

    clients   N conversations at once, each asking its turns in order; a turn is
       │      submitted when the client's previous answer is complete (plus
       │      ``think_ms``); a client that finished its last turn hands its place
       │      to the next conversation (clients in index order)
    engine    admission under a token budget, one prefill and one batched decode
       │      forward per step, page growth and retraction (models/engine.py)
    passes    1. warm-up   both passes below on variant-1 tokens (same lengths, no
              │            shared page): every program shape compiles here; then the
              │            cache-on tiers are emptied
              2. cache off Engine(use_cache=False) over its own HiCache with no L3 and
              │            the same device pages: nothing is ever hit
              3. cache on  Engine over a HiCache with device, host and L3 tiers; the
                           cache-off prompts replayed (answers compared token by token)
      ──> results dict: output tokens/s and requests/s per pass (their ratio), TTFT
          p50/p90 per turn class, inter-token latency p50/p90, hit tokens per tier,
          retractions, tokens_match (models/multiturn_report.py draws and prints it)

TTFT is measured from when the client's turn became ready (its previous answer's end
plus the think time; turn 1: the pass start or when the client got its place) to its
first token on the host, so time waiting for admission counts. A pass's wall time
runs from its start to its last answer. Backend compilations inside the timed passes
are counted (``compiles_in_timed_steps``; 0 when the warm-up covered every shape).
"""

from __future__ import annotations

import dataclasses
import heapq
import secrets
import sys
import time
from pathlib import Path

import numpy as np

from jaxhicache.cache import HiCache, HiCacheConfig, StorageConfig
from jaxhicache.mesh import make_mesh
from jaxhicache.storage import StorageBackend
from models.compile_counter import CompileCounter
from models.engine import Completion, Engine, EngineConfig
from models.multiturn_concurrent_results import concurrent_results
from models.multiturn_config import JobStore, MultiturnConfig, check, job_store
from models.multiturn_report import write_outputs
from models.multiturn_results import snapshot
from models.workload import Transcript, Workload

__all__ = ["Served", "drive_clients", "empty_tiers", "run_concurrent"]


@dataclasses.dataclass(frozen=True)
class Served:
    """One turn of one pass: its prompt, when it became ready, and what the engine did."""

    client: int
    turn: int
    prompt: np.ndarray
    ready_s: float
    completion: Completion

    @property
    def ttft_s(self) -> float:
        return self.completion.token_s[0] - self.ready_s


def drive_clients(
    engine: Engine,
    workload: Workload,
    concurrency: int,
    *,
    think_s: float = 0.0,
    prompts: dict | None = None,
    on_done=None,
) -> tuple[dict[tuple[int, int], Served], float]:
    """Serves every turn of ``workload`` through ``engine`` with ``concurrency`` clients
    in flight; ``prompts``: replay these ``{(client, turn): tokens}`` (else each
    prompt is built from this pass's own answers). Returns ``({(client, turn):
    Served}, wall seconds)``."""
    if type(concurrency) is not int or not 1 <= concurrency <= workload.config.clients:
        raise ValueError(
            f"concurrency must be an int in [1, {workload.config.clients}], got {concurrency!r}"
        )
    turns = workload.config.turns
    tr = Transcript(workload)
    ready: list[tuple[float, int, int, int]] = []  # (ready time, seq, client, turn)
    in_flight: dict[int, tuple[int, int, np.ndarray, float]] = {}
    served: dict[tuple[int, int], Served] = {}
    state = {"next_client": 0, "seq": 0}

    def push(t: float, client: int, turn: int) -> None:
        heapq.heappush(ready, (t, state["seq"], client, turn))
        state["seq"] += 1

    def start_next(t: float) -> None:
        if state["next_client"] < workload.config.clients:
            push(t, state["next_client"], 1)
            state["next_client"] += 1

    def finished(c: Completion) -> None:
        client, turn, prompt, t_ready = in_flight.pop(c.rid)
        served[client, turn] = Served(client, turn, prompt, t_ready, c)
        tr.record(client, turn, c.generated)
        if on_done is not None:
            on_done()
        if turn < turns:
            push(c.end_s + think_s, client, turn + 1)
        else:
            start_next(c.end_s)

    before = engine.on_finish
    engine.on_finish = finished
    t0 = time.perf_counter()
    for _ in range(concurrency):
        start_next(t0)
    try:
        while True:
            now = time.perf_counter()
            while ready and ready[0][0] <= now:
                t, _seq, client, turn = heapq.heappop(ready)
                p = tr.prompt(client, turn) if prompts is None else prompts[client, turn]
                rid = engine.submit(p, workload.gen_len(client, turn))
                in_flight[rid] = (client, turn, p, t)
            if engine.idle:
                if not ready:
                    break
                time.sleep(max(0.0, ready[0][0] - time.perf_counter()))
                continue
            engine.step()
    finally:
        engine.on_finish = before
    wall = max(s.completion.end_s for s in served.values()) - t0
    if len(served) != len(workload):
        raise RuntimeError(f"{len(served)} of {len(workload)} turns served")
    return served, wall


def empty_tiers(cache: HiCache, pools) -> dict:
    """Empties device and host, L3 kept: ``HiCache.flush`` (backups landed, L3 writes
    finished and L3 prefetches nobody claimed dropped first); returns what it dropped."""
    return cache.flush(pools)


class ConcurrentJob:
    """The model, a cache-off engine and a cache-on engine of the same shapes."""

    def __init__(
        self,
        config: MultiturnConfig,
        store: StorageBackend | None,
        progress: bool,
        engine: EngineConfig | None = None,
    ):
        self.config = c = config
        self.store = store
        self.mcfg = c.preset.model_config()
        self.page = self.mcfg.page_size
        self.workload = Workload(c.workload)
        self.warm_workload = Workload(c.workload, variant=1)
        self.device_pages, self.host_pages = c.pool_sizes(self.workload)
        self.concurrency = c.concurrency
        self.model = c.preset.build_model(make_mesh(c.pp, c.tp), self.mcfg)
        self.tag = secrets.token_hex(4)  # a reused store never serves an earlier run
        self.model_id = f"{c.preset.model_name}-w0/run-{self.tag}"
        partition = tuple(m.num_local_layers for m in self.model.layer_maps)
        base = HiCacheConfig(
            device_pages=self.device_pages,
            host_pages=self.host_pages,
            write_policy=c.write_policy,
            partition=partition,
            **c.preset.cache_fields(),
        )
        self.cache_off = HiCache(self.model.spec, self.model.mesh, base)
        storage = None  # no L3 tier when the preset's cache has none (store None)
        if store is not None:
            storage = StorageConfig(
                model_id=self.model_id,
                prefetch_threshold=self.page,
                prefetch_policy=c.prefetch_policy,
                cost_model=c.l3_cost_model,
                pages_per_object=c.pages_per_object(self.page),
            )
        self.cache_on = HiCache(
            self.model.spec,
            self.model.mesh,
            dataclasses.replace(base, storage=storage),
            store=store,
        )
        ecfg = engine or EngineConfig(max_running=self.concurrency)
        if ecfg.max_running < self.concurrency:
            raise ValueError(
                f"EngineConfig.max_running={ecfg.max_running} < concurrency {self.concurrency}"
            )
        self.off = Engine(self.model, self.cache_off, dataclasses.replace(ecfg, use_cache=False))
        self.on = Engine(self.model, self.cache_on, ecfg)
        self.think_s = c.think_ms / 1e3
        from tqdm import tqdm

        self.bar = tqdm(
            total=4 * len(self.workload), file=sys.stderr, disable=not progress, unit="req",
            leave=False,
        )  # fmt: skip

    def pass_off(self, wl: Workload):
        return drive_clients(
            self.off, wl, self.concurrency, think_s=self.think_s, on_done=self.bar.update
        )

    def pass_on(self, wl: Workload, prompts: dict):
        return drive_clients(
            self.on,
            wl,
            self.concurrency,
            think_s=self.think_s,
            prompts=prompts,
            on_done=self.bar.update,
        )

    def warm_up(self) -> None:
        wl = self.warm_workload
        off, _wall = self.pass_off(wl)
        self.pass_on(wl, {k: s.prompt for k, s in off.items()})
        empty_tiers(self.cache_on, self.on.pools)

    def close(self) -> None:
        self.bar.close()
        self.cache_off.close()
        self.cache_on.close()


def run_concurrent(
    config: MultiturnConfig,
    *,
    store: StorageBackend | None = None,
    progress: bool = True,
    store_usage=None,
    engine: EngineConfig | None = None,
) -> dict:
    """Runs the concurrent job (see the module docstring); returns the results dict and
    writes ``results.json`` and ``multiturn.png`` into ``config.out_dir`` when set.
    ``engine``: both engines' knobs (default ``EngineConfig(max_running=concurrency)``;
    ``use_cache`` is set per pass)."""
    check(config)
    if config.concurrency is None:
        raise ValueError("run_concurrent needs MultiturnConfig.concurrency")
    t_start = time.perf_counter()
    with job_store(config, store) as js:
        results = _run(config, js, progress, store_usage, engine, t_start)
    if config.out_dir is not None:
        write_outputs(results, None, Path(config.out_dir))
    return results


def _run(config, js: JobStore, progress: bool, store_usage, engine, t_start: float) -> dict:
    """The concurrent job's steps on the job's store; the results dict."""
    counter = CompileCounter()
    job = None
    try:
        job = ConcurrentJob(config, js.backend, progress, engine)
        t0 = time.perf_counter()
        job.bar.set_description("warm-up")
        job.warm_up()
        warmup_s = time.perf_counter() - t0
        with counter.active():
            job.bar.set_description("cache off")
            r0, s0 = job.off.retractions, job.off.steps
            off, off_s = job.pass_off(job.workload)
            off_retractions, off_steps = job.off.retractions - r0, job.off.steps - s0
            job.bar.set_description("cache on")
            before = snapshot(job.cache_on)
            r0, s0 = job.on.retractions, job.on.steps
            on, on_s = job.pass_on(job.workload, {k: s.prompt for k, s in off.items()})
            on_retractions, on_steps = job.on.retractions - r0, job.on.steps - s0
            job.cache_on.poll(wait=True)
            after = snapshot(job.cache_on)
        job.bar.close()
        usage = store_usage(js.inner) if store_usage is not None and js.inner is not None else None
        results = concurrent_results(
            job, off, on, before, after, usage,
            off_s=off_s, on_s=on_s, retractions=(off_retractions, on_retractions),
            steps=(off_steps, on_steps),
            warmup_s=warmup_s, compiles=counter, wall_s=time.perf_counter() - t_start,
            temp_store=js.temporary,
        )  # fmt: skip
    finally:
        counter.close()
        if job is not None:
            job.close()
    return results
