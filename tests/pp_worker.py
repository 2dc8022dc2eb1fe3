"""One process of the multi-process PP tests (started by tests/test_pp_processes.py
through ``jaxhicache.launch``).

    python tests/pp_worker.py PP OUT_DIR MODE

Every process serves the same multi-turn conversations (device eviction between
turns, so later turns load their prefix back from the host tier) and writes
``OUT_DIR/p{process}.npz``: the logits of every request (cached and recomputed),
its host slab shapes, the global ids of its C4 state sub-pool rows, its cache
digest and counters.

MODE: ``normal``; ``l3`` (an L3 file store in OUT_DIR/store as well, and the host
tier emptied after every turn too, so later turns come back from storage: every
process reads and writes its own stages' objects); ``disagree`` (process 1 is told one backup failed; the
agreement step resolves it); ``disagree-unagreed`` (the same without the agreement
step: the digest check must fire); ``die`` (process 1 dies after the first turn);
``engine`` (the continuous-batching engine over a fixed request stream with
arrivals, an abort and retractions; the digest is checked after every cache call).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

TURNS = ((40, 5), (11, 4), (19, 3))  # (new user tokens, max_new_tokens) per turn
SYSTEM = 32


def conversations(vocab: int, seed: int = 3) -> list[list[np.ndarray]]:
    """Two conversations sharing a system prompt: per turn the new user tokens."""
    rng = np.random.default_rng(seed)
    system = rng.integers(0, vocab, SYSTEM)
    return [
        [np.concatenate([system, rng.integers(0, vocab, TURNS[0][0])])]
        + [rng.integers(0, vocab, n) for n, _ in TURNS[1:]]
        for _ in range(2)
    ]


def serve_all(loop, vocab: int, after_turn=None, *, evict_host: bool = False):
    """Serves the conversations turn by turn (both per turn), evicting every device page
    (and with ``evict_host`` every host page) after each turn; returns the prompts and
    the reports in order."""
    convs = conversations(vocab)
    history = [np.zeros(0, np.int32) for _ in convs]
    prompts, reports = [], []
    for t, (_, max_new) in enumerate(TURNS):
        for c, conv in enumerate(convs):
            prompt = np.concatenate([history[c], conv[t]]).astype(np.int32)
            r = loop.serve(prompt, max_new)
            prompts.append(prompt)
            history[c] = np.concatenate([prompt, r.generated]).astype(np.int32)
            reports.append(r)
        loop.cache.poll(wait=True)
        loop.evict(10**6)  # later turns: the prefix comes back from the host tier
        if evict_host:
            loop.evict_host(10**6)  # ... or from storage
        if after_turn is not None:
            after_turn(t)
    return prompts, reports


def serve_engine(model, **config):
    """The engine over a fixed stream (the same in every process): 14 requests sharing a
    system prompt, two arriving per step, request 3 aborted at step 4, a device pool
    small enough to retract. Returns the engine after it went idle."""
    from jaxhicache.cache import HiCache, HiCacheConfig, WritePolicy
    from models.engine import Engine, EngineConfig

    partition = tuple(m.num_local_layers for m in model.layer_maps)
    cfg = HiCacheConfig(
        device_pages=10,
        host_ratio=4.0,
        write_policy=WritePolicy.WRITE_THROUGH,
        partition=partition,
        **config,
    )
    cache = HiCache(model.spec, model.mesh, cfg)
    eng = Engine(model, cache, EngineConfig(max_running=4, prefill_tokens=16))
    rng = np.random.default_rng(5)
    vocab = model.config.vocab
    system = rng.integers(0, vocab, SYSTEM)
    stream = [
        (np.concatenate([system, rng.integers(0, vocab, int(rng.integers(3, 30)))]), int(n))
        for n in rng.integers(8, 30, 14)
    ]
    step = 0
    while stream or not eng.idle:
        for prompt, n in stream[:2]:
            eng.submit(prompt, n)
        stream = stream[2:]
        if step == 4 and 3 in eng._all and eng._all[3].phase.value != "finished":
            eng.abort(3)
        eng.step()
        step += 1
    return eng


def hybrid_loop(mesh, **config):
    """The tiny hybrid recurrent-state model on ``mesh`` (PP 2: layers [3, 5]) in a
    serving loop with snapshots every 32 tokens; returns ``(model, loop)``."""
    from jaxhicache.cache import WritePolicy
    from models.hybrid import init_params as hybrid_params
    from models.hybrid_config import TinyHybridConfig
    from models.hybrid_paged import PagedHybridModel
    from models.serving import ServingLoop

    hcfg = TinyHybridConfig.mini()
    model = PagedHybridModel(hcfg, hybrid_params(hcfg, seed=0), mesh=mesh, partition=[3, 5])
    loop = ServingLoop.for_model(
        model,
        device_pages=16,
        host_ratio=4.0,
        write_policy=WritePolicy.WRITE_THROUGH,
        state_interval=32,
        layerwise=False,
        **config,
    )
    return model, loop


def main(pp: int, out: Path, mode: str) -> int:
    from jaxhicache.distributed import initialize

    initialize()  # from the launcher's environment
    import jax

    from jaxhicache.cache import PrefetchPolicy, StorageConfig, WritePolicy
    from jaxhicache.distributed import Agreement, DivergenceError, local_stages
    from jaxhicache.mesh import make_mesh
    from jaxhicache.spec import PoolKind
    from jaxhicache.storage import FileBackend
    from models import PagedModel, TinyDSV4Config, init_params
    from models.serving import ServingLoop

    me = jax.process_index()
    cfg = TinyDSV4Config.mini(num_layers=6)
    model = PagedModel(cfg, init_params(cfg, 0), mesh=make_mesh(pp))
    if mode == "hybrid":  # the recurrent hybrid: snapshots on device and host, agreed
        hyb, loop = hybrid_loop(make_mesh(pp), check_every=1)
        prompts, reports = serve_all(loop, hyb.config.vocab)
        uncached = [
            loop.serve_uncached(p, len(r.generated)) for p, r in zip(prompts, reports, strict=True)
        ]
        loop.cache.poll(wait=True)
        loop.cache.check_invariants()
        np.savez(
            out / f"p{me}.npz",
            step_logits=np.concatenate([r.step_logits for r in reports]),
            uncached_step_logits=np.concatenate([r.step_logits for r in uncached]),
            generated=np.concatenate([r.generated for r in reports]),
            host_tokens=np.array([r.host_cached_tokens for r in reports]),
        )
        st = loop.cache.tree.states
        info = {
            "digest": loop.cache.digest().hex(),
            "snapshots": [len(st.dev), len(st.host)],
            "stats": {k: v for k, v in loop.cache.stats().items() if isinstance(v, int | float)},
        }
        (out / f"p{me}.json").write_text(json.dumps(info))
        loop.close()
        return 0
    if mode == "engine":
        eng = serve_engine(model, check_every=1)
        eng.cache.poll(wait=True)
        eng.cache.check_invariants()
        done = [eng.done[r] for r in sorted(eng.done)]
        np.savez(
            out / f"p{me}.npz",
            generated=np.concatenate([c.generated for c in done]),
            aborted=np.array([c.aborted for c in done]),
        )
        info = {
            "digest": eng.cache.digest().hex(),
            "retractions": eng.retractions,
            "stats": {k: v for k, v in eng.cache.stats().items() if isinstance(v, int | float)},
        }
        eng.cache.check_agreement()
        (out / f"p{me}.json").write_text(json.dumps(info))
        eng.cache.close()
        return 0
    l3 = {}
    if mode == "l3":
        l3 = {
            "store": FileBackend(out / "store"),
            "storage": StorageConfig(
                model_id="tiny-mini-6",
                prefetch_threshold=16,
                prefetch_policy=PrefetchPolicy.WAIT_COMPLETE,
                cost_model=False,  # what is served must not depend on timing
            ),
        }
    loop = ServingLoop.for_model(
        model,
        device_pages=16,
        host_ratio=4.0,
        write_policy=WritePolicy.WRITE_THROUGH,
        check_every=1 if mode in ("disagree-unagreed", "l3") else 0,
        layerwise=True,  # the engine's path (the default dispatches the load)
        **l3,
    )
    cache = loop.cache
    if mode.startswith("disagree"):
        if mode == "disagree-unagreed":
            cache._backups.agreement = Agreement(local_only=True)  # the negative control
        engine_backup = cache.engine.backup
        calls = {"n": 0}

        def backup(pools, move, host_generations=None):
            handle = engine_backup(pools, move, host_generations)
            calls["n"] += 1
            if me == 1 and calls["n"] == 2:  # this process is told its 2nd backup failed
                handle._future = _failed_future()
            return handle

        cache.engine.backup = backup

    def after_turn(t):
        if mode == "die" and me == 1 and t == 0:
            os._exit(17)  # dies without a word, mid-run

    try:
        prompts, reports = serve_all(loop, cfg.vocab, after_turn, evict_host=mode == "l3")
    except DivergenceError as e:
        (out / f"p{me}.diverged").write_text(str(e))
        return 3
    uncached = [
        loop.serve_uncached(p, len(r.generated)) for p, r in zip(prompts, reports, strict=True)
    ]
    cache.poll(wait=True)
    cache.check_invariants()
    mine = local_stages(model.mesh)
    np.savez(
        out / f"p{me}.npz",
        step_logits=np.concatenate([r.step_logits for r in reports]),
        uncached_step_logits=np.concatenate([r.step_logits for r in uncached]),
        prefill_logits=np.concatenate([r.prefill_logits for r in reports]),
        generated=np.concatenate([r.generated for r in reports]),
        host_tokens=np.array([r.host_cached_tokens for r in reports]),
        storage_tokens=np.array([r.storage_cached_tokens for r in reports]),
        device_tokens=np.array([r.device_cached_tokens for r in reports]),
    )
    info = {
        "process": me,
        "stages": list(mine),
        "host_ranks": list(cache.host.ranks),
        "slab_shapes": {k.value: list(cache.host.stacked(k).shape) for k in cache.spec.kinds()},
        "c4_state_global_ids": {
            str(r): cache.layer_maps[r].subpool_to_global(PoolKind.C4_STATE).tolist()
            for r in cache.host.ranks
        },
        "host_bytes": sum(cache.host.nbytes_per_stage()),
        "digest": cache.digest().hex(),
        "stats": {k: v for k, v in cache.stats().items() if isinstance(v, int | float)},
    }
    cache.check_agreement()
    (out / f"p{me}.json").write_text(json.dumps(info))
    loop.close()
    return 0


def _failed_future():
    import concurrent.futures

    f: concurrent.futures.Future = concurrent.futures.Future()
    f.set_exception(OSError("injected: the D2H copy of this backup failed on this process"))
    return f


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]))
