"""The L3 probe at object-store latency: restore a conversation from L3 vs recompute it.

    python benchmarks/l3_latency_bench.py [--store file|s3] [--latency-ms 0 20]
                                          [--reps 3] [--pages 24] [--pp 1] [--early]
                                          [--windows auto|all|end]

The main job's L3 probe (``jaxhicache bench multiturn``) on the ``--quick`` model
(``small`` preset: page 32, 6 layers), with a store that answers every object request
``--latency-ms`` late (:class:`~jaxhicache.storage.latency.LatencyBackend` over a
directory or a moto S3 server on loopback): one conversation of ``--pages`` pages is
written to L3, device and host are emptied, and its next turn is served from L3 and
recomputed (order alternating), ``--reps`` times per latency. The cost model is fed
the recompute times it sees (``StorageTier.observe_recompute``, as an engine would),
so at a high latency it declines hits that would be slower than recomputing.
``--early``: the lookup is started when the request is queued
(``StorageTier.start_lookup``), here ``--queue-ms`` before admission.

Prints per latency the median TTFT ratio (L3 / recompute), the L3 tokens served, the
lookup round trips and wait; then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _open_store(kind: str, root: Path):
    from jaxhicache.storage import FileBackend, TensorStoreBackend

    if kind == "file":
        return FileBackend(root), None
    import boto3
    from moto_server import BUCKET, MotoServer, s3_spec

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    server = MotoServer()
    boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1").create_bucket(
        Bucket=BUCKET
    )
    return TensorStoreBackend(s3_spec(server), request_retries=1), server


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", choices=["file", "s3"], default="file")
    ap.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 20.0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pages", type=int, default=24)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--early", action="store_true")
    ap.add_argument("--queue-ms", type=float, default=50.0)
    ap.add_argument("--no-cost-model", action="store_true")
    ap.add_argument("--windows", choices=["auto", "all", "end"], default="auto")
    args = ap.parse_args(argv)

    import jax

    jax.config.update("jax_num_cpu_devices", max(args.pp, 1))
    from jaxhicache.cache import PrefetchPolicy, StorageConfig, WritePolicy
    from jaxhicache.mesh import make_mesh
    from jaxhicache.storage.latency import LatencyBackend
    from models.dsv4 import init_params
    from models.multiturn_config import ModelPreset
    from models.paged import PagedModel
    from models.serving import ServingLoop

    cfg = ModelPreset.SMALL.model_config()
    page = cfg.page_size
    model = PagedModel(cfg, init_params(cfg, 0), mesh=make_mesh(args.pp, 1))
    tmp = Path(tempfile.mkdtemp(prefix="l3-latency-"))
    inner, server = _open_store(args.store, tmp)
    rng = np.random.default_rng(0)
    rows = []
    try:
        for latency in args.latency_ms:
            store = LatencyBackend(inner, latency / 1e3) if latency else inner
            storage = StorageConfig(
                model_id=f"bench-l3-latency-{time.time_ns()}",
                prefetch_threshold=page,
                prefetch_policy=PrefetchPolicy.TIMEOUT,
                cost_model=not args.no_cost_model,
                lookup_windows=args.windows,
            )
            loop = ServingLoop.for_model(
                model,
                device_pages=args.pages + 4,
                host_pages=2 * args.pages,
                write_policy=WritePolicy.WRITE_THROUGH,
                storage=storage,
                store=store,
                layerwise=True,
            )
            tier = loop.cache.l3
            probes = []
            for rep in range(args.reps + 2):  # reps 0-1 warm every shape up (not reported)
                turn1 = rng.integers(0, cfg.vocab, args.pages * page - 8).astype(np.int32)
                r1 = loop.serve(turn1, 9)
                turn2 = np.concatenate([turn1, r1.generated, rng.integers(0, cfg.vocab, 40)])
                turn2 = turn2.astype(np.int32)
                loop.cache.poll(wait=True)
                loop.cache.l3.finish_writes()
                loop.evict(10**6)
                loop.evict_host(10**6)
                runs = {}
                for which in ("on", "off") if rep % 2 == 0 else ("off", "on"):
                    if which == "off":
                        runs["off"] = off = loop.serve_uncached(turn2, 1)
                        tier.observe_recompute(int(turn2.size), off.ttft_s)  # the engine's part
                        continue
                    before = loop.cache.stats()
                    if isinstance(store, LatencyBackend):
                        store.reset_round_trips()
                    if args.early:
                        tier.start_lookup(turn2[:-1])
                        time.sleep(args.queue_ms / 1e3)  # the request waits in the queue
                    runs["on"] = loop.serve(turn2, 1)
                    after = loop.cache.stats()
                    trips = store.round_trips("stat") if isinstance(store, LatencyBackend) else None
                    lookup_ms = 1e3 * (
                        after["storage_lookup_seconds"] - before["storage_lookup_seconds"]
                    )
                on, off = runs["on"], runs["off"]
                if rep >= 2:
                    probes.append(
                        {
                            "ratio": on.ttft_s / off.ttft_s,
                            "ttft_l3_ms": 1e3 * on.ttft_s,
                            "ttft_recompute_ms": 1e3 * off.ttft_s,
                            "storage_tokens": on.storage_cached_tokens,
                            "prompt_tokens": int(turn2.size),
                            "lookup_round_trips": trips,
                            "lookup_wait_ms": lookup_ms,
                            "tokens_match": bool(np.array_equal(on.generated, off.generated)),
                        }
                    )
                loop.evict(10**6)
                loop.evict_host(10**6)
            costs = tier.costs.snapshot()
            loop.close()
            row = {
                "store": args.store,
                "latency_ms": latency,
                "early": args.early,
                "lookup_windows": args.windows,
                "ratio_median": statistics.median(p["ratio"] for p in probes),
                "storage_tokens": [p["storage_tokens"] for p in probes],
                "lookup_round_trips": [p["lookup_round_trips"] for p in probes],
                "lookup_wait_ms": [round(p["lookup_wait_ms"], 2) for p in probes],
                "ttft_l3_ms": [round(p["ttft_l3_ms"], 1) for p in probes],
                "ttft_recompute_ms": [round(p["ttft_recompute_ms"], 1) for p in probes],
                "tokens_match": all(p["tokens_match"] for p in probes),
                "estimates": {
                    k: costs[k]
                    for k in ("latency_s", "request_s", "bytes_per_s", "recompute_s_per_token")
                },
            }
            rows.append(row)
            print(
                f"{args.store:4s} latency {latency:5.1f} ms  early={args.early!s:5s} "
                f"ratio {row['ratio_median']:.3f}  L3 tokens {row['storage_tokens']}  "
                f"lookup trips {row['lookup_round_trips']}  wait ms {row['lookup_wait_ms']}  "
                f"TTFT L3 {row['ttft_l3_ms']} / recompute {row['ttft_recompute_ms']} ms",
                flush=True,
            )
    finally:
        inner.close()
        if server is not None:
            server.stop()
    out = {"l3_latency_bench": rows, "pages": args.pages, "pp": args.pp, "reps": args.reps}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
