"""Cost of the cross-process agreement step, and per-process memory of DSV4-Flash PP runs.

    python benchmarks/agreement_bench.py [--processes 2] [--calls 300]

Part 1 starts N local processes (``jaxhicache.launch``, gloo CPU collectives) and
measures, warm:
  * one :class:`~jaxhicache.distributed.Agreement` ``min`` of a 1-element and a
    16-element vector (µs per call, median over ``--calls``);
  * the agreement time per request of a multi-turn serving run of the tiny model
    over PP = N (one stage per process), i.e. what the serving loop pays for
    agreed backup outcomes, and the request time it is a fraction of.
Part 2 prints, for DeepSeek V4 Flash over PP 4 with one process per stage, the
host and device bytes each process allocates as the library computes them
(``HostPools.nbytes_per_stage`` of its stages, ``device_bytes_per_stage``).

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def _worker(out: Path, calls: int) -> None:
    from jaxhicache.distributed import initialize

    initialize()
    import jax
    import numpy as np

    from jaxhicache.cache import WritePolicy
    from jaxhicache.distributed import Agreement
    from jaxhicache.mesh import make_mesh
    from models import PagedModel, TinyDSV4Config, init_params
    from models.serving import ServingLoop

    ag = Agreement()
    res = {}
    for n in (1, 16):
        v = np.arange(n) + jax.process_index()
        for _ in range(10):
            ag.min(v)  # compile and warm
        ts = []
        for _ in range(calls):
            t0 = time.perf_counter()
            ag.min(v)
            ts.append(time.perf_counter() - t0)
        res[f"min{n}_us_p50"] = float(np.median(ts) * 1e6)
        res[f"min{n}_us_p90"] = float(np.percentile(ts, 90) * 1e6)
    cfg = TinyDSV4Config.mini(num_layers=6)
    model = PagedModel(cfg, init_params(cfg, 0), mesh=make_mesh(jax.process_count()))
    loop = ServingLoop.for_model(
        model,
        device_pages=32,
        host_ratio=4.0,
        write_policy=WritePolicy.WRITE_THROUGH,
        layerwise=True,
    )
    rng = np.random.default_rng(0)

    def conversation(turns: int):
        history = np.zeros(0, np.int32)
        out = []
        for _ in range(turns):
            prompt = np.concatenate([history, rng.integers(0, cfg.vocab, 20)]).astype(np.int32)
            r = loop.serve(prompt, 3)
            history = np.concatenate([prompt, r.generated]).astype(np.int32)
            loop.evict(10**6)
            out.append(r)
        return out

    conversation(3)  # compile every shape
    c = loop.cache
    calls0, secs0 = c.agreement.calls, c.agreement.seconds
    t0 = time.perf_counter()
    reports = conversation(6)
    wall = time.perf_counter() - t0
    res["requests"] = len(reports)
    res["agreement_calls_per_request"] = (c.agreement.calls - calls0) / len(reports)
    res["agreement_us_per_request"] = (c.agreement.seconds - secs0) / len(reports) * 1e6
    res["request_ms"] = wall / len(reports) * 1e3
    loop.close()
    (out / f"p{jax.process_index()}.json").write_text(json.dumps(res))


def _memory() -> list[dict]:
    from jaxhicache.layer_map import build_layer_maps
    from jaxhicache.pools.device import device_bytes_per_stage
    from jaxhicache.spec import ModelCacheSpec

    spec = ModelCacheSpec.deepseek_v4_flash()
    maps = build_layer_maps(spec, 4)
    device_pages, host_pages = 1024, 4096  # 256-token pages: 262k device, 1M host tokens
    dev = device_bytes_per_stage(spec, maps, device_pages, device_pages, padded=True)
    rows = []
    for m, d in zip(maps, dev, strict=True):
        # HostPools(ranks=(m.pp_rank,)) holds exactly this stage: page bytes x pages.
        host = spec.page_bytes(m) * host_pages
        rows.append(
            {
                "process": m.pp_rank,
                "layers": [m.start_layer, m.end_layer],
                "device_bytes": int(d),
                "host_bytes": int(host),
            }
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        _worker(Path(args.worker), args.calls)
        return 0
    from jaxhicache.launch import launch_local

    with tempfile.TemporaryDirectory() as tmp:
        codes = launch_local(
            [sys.executable, __file__, "--worker", tmp, "--calls", str(args.calls)],
            args.processes,
            1,
            log_dir=tmp,
        )
        if codes != [0] * args.processes:
            print(f"workers failed: {codes}", file=sys.stderr)
            for i in range(args.processes):
                print(Path(tmp, f"p{i}.log").read_text()[-2000:], file=sys.stderr)
            return 1
        per = [json.loads(Path(tmp, f"p{i}.json").read_text()) for i in range(args.processes)]
    mem = _memory()
    print(f"agreement over {args.processes} processes (gloo, CPU), process 0:")
    print(f"{'metric':36s} {'value':>12s}")
    for k, v in per[0].items():
        print(f"{k:36s} {v:12.1f}")
    print("\nDeepSeek V4 Flash, PP 4, one process per stage (1024 device / 4096 host pages):")
    print(f"{'process':>7s} {'layers':>9s} {'device GiB':>11s} {'host GiB':>9s}")
    for r in mem:
        lo, hi = r["layers"]
        print(
            f"{r['process']:7d} {f'{lo}-{hi}':>9s} {r['device_bytes'] / 2**30:11.2f} "
            f"{r['host_bytes'] / 2**30:9.2f}"
        )
    print(json.dumps({"processes": args.processes, "agreement": per, "dsv4_flash_pp4": mem}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
