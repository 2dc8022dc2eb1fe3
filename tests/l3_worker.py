"""One serving process of the two-process L3 test (run by tests/test_l3_processes.py).

    python tests/l3_worker.py write|read PP STORE_JSON OUT_JSON

``write``: serves turn 1 of a conversation with write-through backups to host and
L3, then closes (every L3 write lands). ``read``: a fresh process and cache over
the same store serves turn 2 and the uncached recomputation of it; writes the
report figures and the max logit difference to OUT_JSON.
"""

from __future__ import annotations

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any jax work
jax.config.update("jax_platforms", "cpu")

import numpy as np  # noqa: E402

from jaxhicache.cache import WritePolicy  # noqa: E402
from jaxhicache.cache.l3 import PrefetchPolicy, StorageConfig  # noqa: E402
from jaxhicache.storage import FileBackend, TensorStoreBackend  # noqa: E402
from models.config import TinyDSV4Config  # noqa: E402
from models.dsv4 import init_params  # noqa: E402
from models.paged import PagedModel  # noqa: E402
from models.serving import ServingLoop  # noqa: E402

TURN1, NEW1, USER2, NEW2 = 45, 6, 13, 4


def _store(spec: dict):
    if spec["kind"] == "file":
        return FileBackend(spec["path"])
    return TensorStoreBackend(spec["kvstore"])


def main(role: str, pp: int, store_spec: dict, out: str) -> None:
    cfg = TinyDSV4Config.mini(num_layers=6)
    model = PagedModel(cfg, init_params(cfg, 0), pp=pp)
    storage = StorageConfig(
        model_id="tiny-mini-6", prefetch_threshold=16, prefetch_policy=PrefetchPolicy.WAIT_COMPLETE
    )
    loop = ServingLoop.for_model(
        model,
        device_pages=8,
        write_policy=WritePolicy.WRITE_THROUGH,
        storage=storage,
        store=_store(store_spec),
    )
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
        diff = max(
            float(np.abs(r2.step_logits - oracle.step_logits).max()),
            float(np.abs(r2.prefill_logits - oracle.prefill_logits[r2.cached_tokens :]).max()),
        )
        loop.close()
        result = {
            "cached": r2.cached_tokens,
            "device": r2.device_cached_tokens,
            "host": r2.host_cached_tokens,
            "storage": r2.storage_cached_tokens,
            "diff": diff,
            "same_tokens": bool((r2.generated == oracle.generated).all()),
            "stats": _ints(loop.cache.stats()),
        }
    with open(out, "w") as f:
        json.dump(result, f)


def _ints(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if isinstance(v, int)}


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4])
