"""One serving process of the L3 process tests (run by tests/test_l3_processes.py).

    python tests/l3_worker.py write|read PP STORE_JSON OUT_JSON
    python tests/l3_worker.py mp MODE PP OUT_DIR        (under jaxhicache.launch)

``write``: serves turn 1 of a conversation with write-through backups to host and
L3, then closes (every L3 write lands). ``read``: a fresh process and cache over
the same store serves turn 2 and the uncached recomputation of it; writes the
report figures and the max logit difference to OUT_JSON.

``mp``: one of several cooperating processes (multi-controller JAX, each owning its
stages) sharing the file store OUT_DIR/store. Every process serves turn 1 (each
writes its own stages' objects), empties device and host, then serves turn 2, whose
prefix only L3 holds; ``check_every=1`` compares the cache digests at every step.
MODE ``agree``: no fault. ``fail-read``: process 1's storage reads fail (injected;
its existence checks succeed, so the lookups agree and the fetch fails on process 1
only). ``fail-stat``: process 1's existence checks fail (the lookups disagree).
Writes OUT_DIR/p{i}.json: turn 2's L3 tokens, the logit difference to recomputation,
the digest and counters.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

TURN1, NEW1, USER2, NEW2 = 45, 6, 13, 4


def _store(spec: dict):
    from jaxhicache.storage import FileBackend, TensorStoreBackend

    if spec["kind"] == "file":
        return FileBackend(spec["path"])
    return TensorStoreBackend(spec["kvstore"])


def _loop(model, store, g=1, **kw):
    from jaxhicache.cache import WritePolicy
    from jaxhicache.cache.l3 import PrefetchPolicy, StorageConfig
    from models.serving import ServingLoop

    storage = StorageConfig(  # the cost model off: these tests pin what is served, not when
        model_id="tiny-mini-6",
        prefetch_threshold=16,
        prefetch_policy=PrefetchPolicy.WAIT_COMPLETE,
        cost_model=False,
        pages_per_object=g,
    )
    return ServingLoop.for_model(
        model,
        device_pages=8,
        write_policy=WritePolicy.WRITE_THROUGH,
        storage=storage,
        store=store,
        layerwise=True,  # the engine's path (the default dispatches the load)
        **kw,
    )


def _diff(r, oracle) -> float:
    return max(
        float(np.abs(r.step_logits - oracle.step_logits).max()),
        float(np.abs(r.prefill_logits - oracle.prefill_logits[r.cached_tokens :]).max()),
    )


def main(role: str, pp: int, store_spec: dict, out: str) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", 8)  # before any jax work
    jax.config.update("jax_platforms", "cpu")
    from models.config import TinyDSV4Config
    from models.dsv4 import init_params
    from models.paged import PagedModel

    cfg = TinyDSV4Config.mini(num_layers=6)
    model = PagedModel(cfg, init_params(cfg, 0), pp=pp)
    loop = _loop(model, _store(store_spec))
    rng = np.random.default_rng(1)
    turn1 = rng.integers(0, cfg.vocab, TURN1).astype(np.int32)
    result: dict = {}
    if role == "write":
        r1 = loop.serve(turn1, NEW1)
        loop.close()
        result = {"generated": r1.generated.tolist(), "stats": _ints(loop.cache.stats())}
    else:
        generated = np.asarray(json.loads(store_spec["generated"]), np.int32)
        turn2 = np.concatenate([turn1, generated, rng.integers(0, cfg.vocab, USER2)])
        r2 = loop.serve(turn2, NEW2)
        oracle = loop.serve_uncached(turn2, NEW2)
        loop.close()
        result = {
            "cached": r2.cached_tokens,
            "device": r2.device_cached_tokens,
            "host": r2.host_cached_tokens,
            "storage": r2.storage_cached_tokens,
            "diff": _diff(r2, oracle),
            "same_tokens": bool((r2.generated == oracle.generated).all()),
            "stats": _ints(loop.cache.stats()),
        }
    with open(out, "w") as f:
        json.dump(result, f)


def main_mp(mode: str, pp: int, out: Path) -> int:
    from jaxhicache.distributed import initialize

    initialize()  # from the launcher's environment, before any other jax work
    import jax

    from jaxhicache.distributed import DivergenceError
    from jaxhicache.mesh import make_mesh
    from jaxhicache.storage import FileBackend
    from jaxhicache.storage.faults import FaultInjectionBackend
    from models.config import TinyDSV4Config
    from models.dsv4 import init_params
    from models.paged import PagedModel

    me = jax.process_index()
    cfg = TinyDSV4Config.mini(num_layers=6)
    model = PagedModel(cfg, init_params(cfg, 0), mesh=make_mesh(pp))
    mode, _, g = mode.partition("-g")  # "<mode>-g<pages per object>"
    store = FileBackend(out / "store")
    if me == 1 and mode == "fail-read":
        store = FaultInjectionBackend(store, fail_read=True)
    elif me == 1 and mode == "fail-stat":
        store = FaultInjectionBackend(store, fail_stat=True)
    loop = _loop(model, store, int(g or 1), check_every=1)
    rng = np.random.default_rng(1)
    turn1 = rng.integers(0, cfg.vocab, TURN1).astype(np.int32)
    try:
        r1 = loop.serve(turn1, NEW1)
        loop.cache.poll(wait=True)
        loop.cache.l3.finish_writes()
        loop.evict(10**6)
        loop.evict_host(10**6)  # turn 1's pages: in L3 only
        turn2 = np.concatenate([turn1, r1.generated, rng.integers(0, cfg.vocab, USER2)])
        r2 = loop.serve(turn2.astype(np.int32), NEW2)
    except DivergenceError as e:
        (out / f"p{me}.diverged").write_text(str(e))
        return 3
    oracle = loop.serve_uncached(turn2, NEW2)
    loop.cache.poll(wait=True)
    loop.cache.check_invariants()
    info = {
        "process": me,
        "storage": r2.storage_cached_tokens,
        "cached": r2.cached_tokens,
        "diff": _diff(r2, oracle),
        "same_tokens": bool((r2.generated == oracle.generated).all()),
        "digest": loop.cache.digest().hex(),
        "stats": {k: v for k, v in loop.cache.stats().items() if isinstance(v, int | float)},
        "injected": getattr(store, "injected", 0),
    }
    loop.cache.check_agreement()
    (out / f"p{me}.json").write_text(json.dumps(info))
    loop.close()
    return 0


def _ints(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if isinstance(v, int)}


if __name__ == "__main__":
    if sys.argv[1] == "mp":
        sys.exit(main_mp(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])))
    main(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4])
