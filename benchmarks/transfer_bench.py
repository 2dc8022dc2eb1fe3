"""Transfer benchmark: paged gather/scatter, D2H backup and H2D load vs a plain memcpy.

DSV4-Flash-shaped sub-pools (the real fp8 row sizes: 149,760 / 37,440 / 8,448 /
1,728 / 65,536 / 16,384 bytes) with fewer layers so the pools fit this machine,
plus an MHA case; page counts 1 ... 1024 (``--quick``: up to 256). Every figure
is measured in the same run as a numpy memcpy of the same bytes, and reported
as a ratio to it (machines here are shared and noisy: ratios, not absolutes).

Prints a table and, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

from jaxhicache.layer_map import build_layer_maps
from jaxhicache.mesh import make_mesh
from jaxhicache.pools.device import allocate_device_pools
from jaxhicache.pools.host import HostPools
from jaxhicache.spec import KVFormat, ModelCacheSpec
from jaxhicache.transfer import CopyPath, PageMove, TransferEngine
from kernels_pallas.common import Backend
from kernels_pallas.paged_gather import paged_gather
from kernels_pallas.paged_scatter import paged_scatter_donated


def flash_shaped(num_layers: int) -> ModelCacheSpec:
    """DSV4-Flash geometry (fp8 rows, page 256, window 128) with fewer layers."""
    return ModelCacheSpec.tiny_dsv4(
        num_layers,
        window=128,
        page_size=256,
        hca_ratio=128,
        head_dim=512,
        rope_dim=64,
        indexer_head_dim=128,
        kv_format=KVFormat.FP8_DSV4,
        name=f"dsv4-flash-shaped-l{num_layers}",
    )


def _time(fn, reps: int) -> float:
    fn()  # warm-up (compile)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_case(name, spec, pool_pages, counts, reps, backend, copy_path=None):
    maps = build_layer_maps(spec, 1)
    mesh = make_mesh(1, 1)
    pools = allocate_device_pools(spec, mesh, maps, pool_pages, pool_pages)
    rng = np.random.default_rng(0)
    pools = pools.replace(
        arrays={
            k: jax.device_put(
                rng.integers(0, 255, a.shape, dtype=np.uint8).view(a.dtype)
                if a.dtype.itemsize == 1
                else rng.standard_normal(a.shape).astype(a.dtype),
                a.sharding,
            )
            for k, a in pools.arrays.items()
        }
    )
    host = HostPools(spec, maps, pool_pages, pool_pages)
    eng = TransferEngine(mesh, maps, host, backend=backend, copy_path=copy_path)
    rows = []
    live = {"pools": pools}  # H2D loads donate the pools: always use the newest
    for n in counts:
        dev = rng.permutation(pool_pages)[:n].astype(np.int32)
        hst = rng.permutation(pool_pages)[:n].astype(np.int32)
        swa = spec.is_dsv4
        move = PageMove.of(dev, hst, dev if swa else (), hst if swa else ())
        nbytes = n * spec.page_bytes()

        def gather():
            out = [paged_gather(a[0], dev, backend=backend) for a in live["pools"].arrays.values()]
            jax.block_until_ready(out)

        cur = live["pools"].arrays
        staged = {k: paged_gather(a[0], dev, backend=backend) for k, a in cur.items()}
        state = {"pools": {k: a[0] for k, a in cur.items()}}

        def scatter():
            state["pools"] = {
                k: paged_scatter_donated(state["pools"][k], dev, staged[k], backend=backend)
                for k in staged
            }
            jax.block_until_ready(state["pools"])

        def backup():
            eng.backup(live["pools"], move).wait()

        def load():
            p, h = eng.load(live["pools"], move)
            h.wait()
            live["pools"] = p

        src = np.empty(nbytes, np.uint8)
        src[:] = 1
        dst = np.empty_like(src)

        def memcpy():
            np.copyto(dst, src)

        t = {f.__name__: _time(f, reps) for f in (memcpy, gather, scatter, backup, load)}
        gbps = {k: nbytes / v / 1e9 for k, v in t.items()}
        rows.append(
            {"case": name, "pages": n, "bytes": nbytes, **{f"{k}_GBps": v for k, v in gbps.items()}}
        )
    eng.close()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer page counts and layers (< 1 minute)")
    p.add_argument("--backend", choices=[b.name for b in Backend], default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument(
        "--copy-path",
        choices=[c.value for c in CopyPath],
        default=None,
        help="engine copy path (default: direct on a CPU mesh, else staged)",
    )
    p.add_argument(
        "--mha-dtype",
        default=None,
        help="dtype of the MHA case (default: bfloat16 on GPU, float32 on CPU)",
    )
    args = p.parse_args(argv)
    backend = Backend[args.backend] if args.backend else None
    if args.mha_dtype is None:
        args.mha_dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    if args.quick:
        counts, layers, pool_pages, reps = [1, 16, 64, 256], 4, 256, args.reps or 3
    else:
        counts, layers, pool_pages, reps = [1, 4, 16, 64, 256, 1024], 6, 1024, args.reps or 5
    dsv4 = flash_shaped(layers)
    # MHA in the platform's fast dtype: on the XLA CPU backend, per-page dynamic updates of
    # 16-bit pools run at ~0.04 GB/s (see RESULTS.md); pass --mha-dtype bfloat16 to see it.
    mha = ModelCacheSpec.mha(
        num_layers=8, num_kv_heads=8, head_dim=128, page_size=16, dtype=args.mha_dtype
    )
    path = CopyPath(args.copy_path) if args.copy_path else None
    rows = bench_case(dsv4.name, dsv4, pool_pages, counts, reps, backend, path)
    rows += bench_case(
        f"mha-l8-h8-d128-p16-{args.mha_dtype}", mha, pool_pages, counts, reps, backend, path
    )

    cols = ["memcpy", "gather", "scatter", "backup", "load"]
    print(
        f"platform={jax.default_backend()} backend={(backend or 'default')} "
        f"copy_path={args.copy_path or 'default'} cpus={os.cpu_count()}"
    )
    print(
        f"{'case':<28} {'pages':>6} {'MiB':>9} "
        + " ".join(f"{c + ' GB/s':>13}" for c in cols)
        + "  backup/memcpy load/memcpy"
    )
    for r in rows:
        vals = " ".join(f"{r[c + '_GBps']:>13.2f}" for c in cols)
        print(
            f"{r['case']:<28} {r['pages']:>6} {r['bytes'] / 2**20:>9.1f} {vals}  "
            f"{r['backup_GBps'] / r['memcpy_GBps']:>13.2f} {r['load_GBps'] / r['memcpy_GBps']:>11.2f}"
        )
    # Headline: DSV4 batch of >= 64 pages, the largest measured.
    big = [r for r in rows if r["case"] == dsv4.name and r["pages"] >= 64]
    head = big[-1]
    summary = {
        "platform": jax.default_backend(),
        "case": head["case"],
        "pages": head["pages"],
        "gather_GBps": round(head["gather_GBps"], 3),
        "scatter_GBps": round(head["scatter_GBps"], 3),
        "backup_GBps": round(head["backup_GBps"], 3),
        "load_GBps": round(head["load_GBps"], 3),
        "memcpy_GBps": round(head["memcpy_GBps"], 3),
        "backup_vs_memcpy": round(head["backup_GBps"] / head["memcpy_GBps"], 3),
        "load_vs_memcpy": round(head["load_GBps"] / head["memcpy_GBps"], 3),
        "rows": rows,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
